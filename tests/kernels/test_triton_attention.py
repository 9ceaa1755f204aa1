"""Triton attention (interpreted on CPU): output, log-sum-exp and dq/dk/dv against a float64
reference for odd lengths, every supported head dim, fp32/fp16, key padding and strided inputs;
the dispatcher's rules for the "triton" backend; bf16 and large shapes on a GPU."""

import math

import pytest
import torch

from pretrain import kernels
from tests.kernels.conftest import DEVICE, skip_unless_triton_usable

pytestmark = skip_unless_triton_usable()
from pretrain.kernels import triton_attention as ta  # noqa: E402 - after the skip when triton is absent


def reference(q, k, v, keep_BN=None):
    """(output, log-sum-exp) of softmax(q k^T / sqrt(d)) v in float64."""
    q, k, v = (t.double() for t in (q, k, v))
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if keep_BN is not None:
        scores = scores.masked_fill(~keep_BN[:, None, None, :].to(scores.device), float("-inf"))
    return scores.softmax(dim=-1) @ v, scores.logsumexp(dim=-1)


def random_qkv(batch, heads, q_len, k_len, head_dim, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(batch, heads, q_len, head_dim), (batch, heads, k_len, head_dim), (batch, heads, k_len, head_dim)]
    return [torch.randn(s, generator=gen).to(DEVICE, dtype) for s in shapes]


def ragged_mask(batch, k_len):
    """Sample 0 keeps every key, sample 1 a prefix, sample 2 (if any) only the last key."""
    keep = torch.ones(batch, k_len, dtype=torch.bool)
    keep[1, k_len // 2 + 1:] = False
    if batch > 2:
        keep[2] = False
        keep[2, -1] = True
    return keep.to(DEVICE)


def tolerance(dtype):
    return dict(atol=2e-5, rtol=2e-5) if dtype == torch.float32 else dict(atol=3e-3, rtol=3e-3)


@pytest.mark.parametrize("head_dim", [32, 64, 80, 96, 128])
@pytest.mark.parametrize("length", [1, 7, 65])
def test_forward_output_and_lse_fp32(head_dim, length):
    q, k, v = random_qkv(2, 2, length, length, head_dim, torch.float32)
    out, lse = ta.attention_forward(q, k, v)
    want_out, want_lse = reference(q, k, v)
    torch.testing.assert_close(out.double(), want_out, **tolerance(torch.float32))
    torch.testing.assert_close(lse.double(), want_lse, **tolerance(torch.float32))


@pytest.mark.parametrize("head_dim,q_len,k_len", [(64, 7, 65), (80, 65, 33), (128, 1, 7)])
def test_forward_fp16_cross_lengths_with_padding_mask(head_dim, q_len, k_len):
    q, k, v = random_qkv(3, 2, q_len, k_len, head_dim, torch.float16, seed=1)
    keep = ragged_mask(3, k_len)
    out, lse = ta.attention_forward(q, k, v, keep)
    want_out, want_lse = reference(q, k, v, keep)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.double(), want_out, **tolerance(torch.float16))
    torch.testing.assert_close(lse.double(), want_lse, **tolerance(torch.float16))


@pytest.mark.parametrize(
    "head_dim,length,dtype,masked",
    [
        (32, 7, torch.float32, False),
        (80, 65, torch.float32, True),
        (96, 7, torch.float32, True),
        (64, 65, torch.float16, True),
        (128, 1, torch.float16, False),
        (64, 197, torch.float32, True),
    ],
)
def test_backward_matches_float64_autograd(head_dim, length, dtype, masked):
    q, k, v = (t.requires_grad_() for t in random_qkv(3, 2, length, length, head_dim, dtype, seed=2))
    keep = ragged_mask(3, length) if masked else None
    out = kernels.attention(q, k, v, key_padding_mask=keep, backend="triton")
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    want, _ = reference(q64, k64, v64, keep)
    grad_out = torch.randn(want.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(DEVICE)
    got = torch.autograd.grad(out, (q, k, v), grad_out.to(dtype))
    expected = torch.autograd.grad(want, (q64, k64, v64), grad_out)
    torch.testing.assert_close(out.double(), want, **tolerance(dtype))
    for name, g, e in zip("qkv", got, expected):
        assert g.dtype == dtype, name
        torch.testing.assert_close(g.double(), e, **tolerance(dtype), msg=lambda m: f"d{name}: {m}")
    if masked:  # dropped keys get no gradient at all
        dropped_k, dropped_v = (g.transpose(1, 2)[~keep] for g in got[1:])
        assert dropped_k.abs().max() == 0 and dropped_v.abs().max() == 0


def test_strided_views_from_a_fused_qkv_are_read_in_place():
    """The ViT's q, k, v are non-contiguous slices of one (B, N, 3, H, d) projection."""
    gen = torch.Generator().manual_seed(4)
    qkv = torch.randn(2, 9, 3, 2, 32, generator=gen).to(DEVICE).permute(2, 0, 3, 1, 4)
    q, k, v = (t.requires_grad_() for t in (x.clone() for x in qkv.unbind(0)))
    q_s, k_s, v_s = qkv.unbind(0)
    assert not q_s.is_contiguous()
    torch.testing.assert_close(
        kernels.attention(q_s, k_s, v_s, backend="triton"), kernels.attention(q, k, v, backend="torch"),
        atol=2e-5, rtol=2e-5,
    )


def test_dispatch_rules_for_the_triton_backend():
    q, k, v = random_qkv(1, 1, 4, 4, 48, torch.float32)
    with pytest.raises(RuntimeError, match=r"'triton' was selected but cannot run: supports head_dim in"):
        kernels.attention(q, k, v, backend="triton")
    # On CUDA "auto" attention is PyTorch SDPA until a GPU measurement shows ours faster; patch embedding is ours.
    assert kernels.backend_names("attention", "cuda")[0] == "torch"
    assert kernels.backend_names("attention", "cpu")[-1] == "triton"
    assert kernels.backend_names("patch_embed", "cuda")[0] == "triton"
    if DEVICE == "cpu":
        assert kernels.describe("cpu")["attention"]["resolved"] == "torch"  # auto never interprets
        assert kernels.describe("cpu")["attention"]["backends"]["triton"] == "available"
        bf16 = [t.bfloat16() for t in random_qkv(1, 1, 4, 4, 32, torch.float32)]
        with pytest.raises(RuntimeError, match="interpreter has no bfloat16"):
            kernels.attention(*bf16, backend="triton")
        kernels.configure(attention="triton")  # the process default reaches the interpreter
        q, k, v = random_qkv(1, 1, 3, 3, 32, torch.float32)
        torch.testing.assert_close(kernels.attention(q, k, v).double(), reference(q, k, v)[0], atol=2e-5, rtol=2e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 and large shapes need a CUDA GPU")
@pytest.mark.parametrize("head_dim,length", [(64, 197), (64, 1025), (80, 257), (128, 4097)])
def test_gpu_bf16_matches_sdpa(head_dim, length):
    q, k, v = (t.requires_grad_() for t in random_qkv(2, 4, length, length, head_dim, torch.bfloat16, seed=5))
    keep = ragged_mask(2, length)
    out = kernels.attention(q, k, v, key_padding_mask=keep, backend="triton")
    want = kernels.attention(*(t.float() for t in (q, k, v)), key_padding_mask=keep, backend="torch")
    torch.testing.assert_close(out.float(), want, atol=2e-2, rtol=2e-2)
    grad_out = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad_out)
    expected = torch.autograd.grad(want, (q, k, v), grad_out.float())
    for g, e in zip(got, expected):
        torch.testing.assert_close(g.float(), e.float(), atol=5e-2, rtol=5e-2)
