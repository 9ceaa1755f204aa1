"""Shared set-up of the kernel tests: the device they run on, Triton's skip mark, clean dispatcher defaults."""
from __future__ import annotations

import pytest
import torch

from pretrain import kernels

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def skip_unless_triton_usable():
    """A module's ``pytestmark``: skip where triton is missing or its backend cannot run on DEVICE.

    Call it before importing the Triton kernel modules (they import triton). On CPU the
    kernels need the interpreter, which tests/conftest.py turns on before triton is imported.
    """
    pytest.importorskip("triton")
    from pretrain.kernels import triton_backends

    reason = triton_backends.triton_environment(torch.device(DEVICE))
    return pytest.mark.skipif(reason is not None, reason=f"triton backend unusable: {reason}")


@pytest.fixture(autouse=True)
def _restore_defaults():
    """Every kernel test leaves the dispatcher on its default backends."""
    yield
    kernels.configure()
