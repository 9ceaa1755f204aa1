"""The flash-attn and xformers adapters against the real libraries, where they can run.

Fakes elsewhere (test_dispatch.py) check the packing logic; these run the
libraries' own kernels in fp16 and compare with PyTorch SDPA in fp32. They
skip with the dispatcher's own reason (not installed, no CUDA) where they cannot.
"""
from __future__ import annotations

import pytest
import torch

from pretrain import kernels
from pretrain.kernels import torch_ops

CASES = [(2, 4, 77, 64, False), (3, 6, 197, 64, True), (1, 8, 129, 128, True)]


def _skip_reason(backend: str) -> str | None:
    """None where the library runs (CUDA, installed), else the dispatcher's reason."""
    status = kernels.describe("cuda" if torch.cuda.is_available() else "cpu")["attention"]["backends"][backend]
    return None if torch.cuda.is_available() and status == "available" else status


@pytest.mark.parametrize("backend", ["flash_attn", "xformers"])
@pytest.mark.parametrize("batch, heads, tokens, head_dim, padded", CASES)
def test_adapter_matches_sdpa_on_the_real_library(backend, batch, heads, tokens, head_dim, padded):
    reason = _skip_reason(backend)
    if reason is not None:
        pytest.skip(f"{backend}: {reason}")
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(batch, heads, tokens, head_dim, device="cuda", dtype=torch.float16, generator=g)
               for _ in range(3))
    mask = None
    if padded:
        lengths = torch.tensor([tokens - 3 * i for i in range(batch)], device="cuda")
        mask = torch.arange(tokens, device="cuda")[None] < lengths[:, None]
    for t in (q, k, v):
        t.requires_grad_(True)
    out = kernels.attention(q, k, v, key_padding_mask=mask, backend=backend)
    ref = torch_ops.sdpa_attention(q.float(), k.float(), v.float(), mask)
    torch.testing.assert_close(out.float(), ref, atol=2e-3, rtol=2e-3)
    grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)


def test_auto_attention_is_pytorch_sdpa_on_cuda_until_measured_otherwise():
    assert kernels.backend_names("attention", "cuda")[0] == "torch"
    assert kernels.backend_names("attention", "cpu")[0] == "torch"
