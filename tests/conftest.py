"""Suite-wide test setup: Triton's CPU interpreter when there is no GPU.

Triton fixes interpreted vs compiled for the whole process when it is first
imported, and many test modules import it indirectly (timm, deepspeed,
kernels), so TRITON_INTERPRET=1 has to be set here, before any test module is
collected. It only changes what the "triton" kernel backend can do on CPU:
"auto" never picks triton there, so every other test runs as before.
"""

import os
import sys

import pytest

if "triton" not in sys.modules and os.environ.get("TRITON_INTERPRET") is None:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture
def single_process(monkeypatch):
    """A lone rank on a fresh port, as `pretrain train` without a launcher; the environment that
    setup_distributed fills in is restored afterwards."""
    from pretrain.engine.distributed import free_port

    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(free_port())}.items():
        monkeypatch.setenv(key, value)
