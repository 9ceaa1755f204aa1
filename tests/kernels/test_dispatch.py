"""kernels: numerics of the PyTorch backends against references computed another way,
the registry's selection rules, and the flash-attn / xformers adapters' packing logic."""

import logging
import os
import math
import types

import pytest
import torch
import torch.nn.functional as F

from pretrain import kernels
from pretrain.kernels import dispatch, torch_ops


def reference_attention(q, k, v, keep_BN=None):
    """softmax(q k^T / sqrt(d)) v in float64, padded keys at -inf."""
    q, k, v = (t.double() for t in (q, k, v))
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if keep_BN is not None:
        scores = scores.masked_fill(~keep_BN[:, None, None, :], float("-inf"))
    return scores.softmax(dim=-1) @ v


def random_qkv(batch=3, heads=2, q_len=7, k_len=11, head_dim=5, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, q_len, head_dim, generator=gen, dtype=dtype)
    k = torch.randn(batch, heads, k_len, head_dim, generator=gen, dtype=dtype)
    v = torch.randn(batch, heads, k_len, head_dim, generator=gen, dtype=dtype)
    return q, k, v


def padding_mask(batch=3, k_len=11):
    """Sample 0 keeps everything, sample 1 keeps a ragged prefix, sample 2 keeps only one key."""
    keep = torch.ones(batch, k_len, dtype=torch.bool)
    keep[1, 6:] = False
    keep[2] = False
    keep[2, 4] = True
    return keep


# ------------------------------------------------------------------ attention


@pytest.mark.parametrize("q_len,k_len", [(7, 11), (13, 13), (1, 5)])
def test_torch_attention_matches_float64_reference(q_len, k_len):
    q, k, v = random_qkv(q_len=q_len, k_len=k_len)
    out = kernels.attention(q, k, v, backend="torch")
    torch.testing.assert_close(out, reference_attention(q, k, v), rtol=1e-10, atol=1e-10)


def test_torch_attention_key_padding_mask():
    q, k, v = random_qkv()
    keep = padding_mask()
    out = kernels.attention(q, k, v, key_padding_mask=keep, backend="torch")
    torch.testing.assert_close(out, reference_attention(q, k, v, keep), rtol=1e-10, atol=1e-10)
    # The sample that keeps a single key returns exactly that key's value for every query.
    torch.testing.assert_close(out[2], v[2, :, 4:5].expand(-1, q.shape[2], -1))
    # Values of padded keys must not leak into the output.
    v_changed = v.clone()
    v_changed[1, :, 6:] += 100.0
    out_changed = kernels.attention(q, k, v_changed, key_padding_mask=keep, backend="torch")
    torch.testing.assert_close(out_changed, out)


def test_torch_attention_float32_and_gradients():
    q, k, v = random_qkv(dtype=torch.float32)
    keep = padding_mask()
    out = kernels.attention(q, k, v, key_padding_mask=keep)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), reference_attention(q, k, v, keep), rtol=1e-5, atol=1e-5)
    q64, k64, v64 = (t.detach().requires_grad_() for t in random_qkv(batch=2, q_len=3, k_len=4, head_dim=3))
    keep = torch.tensor([[True, True, False, True], [False, True, False, False]])
    assert torch.autograd.gradcheck(lambda a, b, c: kernels.attention(a, b, c, key_padding_mask=keep), (q64, k64, v64))


def test_attention_rejects_bad_inputs():
    q, k, v = random_qkv()
    with pytest.raises(ValueError, match=r"key_padding_mask must be \(batch, key_tokens\) = \(3, 11\)"):
        kernels.attention(q, k, v, key_padding_mask=torch.ones(3, 7, dtype=torch.bool))
    with pytest.raises(ValueError, match="must be bool"):
        kernels.attention(q, k, v, key_padding_mask=torch.ones(3, 11))
    with pytest.raises(ValueError, match=r"q must be \(batch, heads, tokens, head_dim\)"):
        kernels.attention(q[0], k, v)
    with pytest.raises(ValueError, match="must agree on batch, heads and head_dim"):
        kernels.attention(q[..., :4], k, v)


# ---------------------------------------------------------------- patch embed


@pytest.mark.parametrize(
    "x_shape,patch",
    [((2, 3, 12, 18), (4, 6)), ((2, 1, 8, 8), 4), ((2, 2, 4, 6, 8), (2, 3, 4)), ((1, 1, 8, 8, 8), 4)],
)
def test_torch_patch_embed_matches_conv_forward_and_grads(x_shape, patch):
    gen = torch.Generator().manual_seed(1)
    spatial_dims = len(x_shape) - 2
    patch_t = (patch,) * spatial_dims if isinstance(patch, int) else patch
    x = torch.randn(x_shape, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(5, x_shape[1], *patch_t, generator=gen, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(5, generator=gen, dtype=torch.float64, requires_grad=True)
    conv = F.conv2d if spatial_dims == 2 else F.conv3d

    ours = kernels.patch_embed(x, weight, bias, patch, backend="torch")
    expected = conv(x, weight, bias, stride=patch_t).flatten(2).transpose(1, 2)
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-12)

    upstream = torch.randn(expected.shape, generator=gen, dtype=torch.float64)
    grads_ours = torch.autograd.grad(ours, (x, weight, bias), upstream)
    grads_conv = torch.autograd.grad(expected, (x, weight, bias), upstream)
    for got, want in zip(grads_ours, grads_conv):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_patch_embed_pos_embed_and_conv_backend():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 1, 4, 8, 8, generator=gen, dtype=torch.float64)
    weight = torch.randn(6, 1, 2, 4, 4, generator=gen, dtype=torch.float64)
    pos = torch.randn(1, 2 * 2 * 2, 6, generator=gen, dtype=torch.float64)
    with_pos = kernels.patch_embed(x, weight, None, (2, 4, 4), pos_embed=pos, backend="torch")
    via_conv = kernels.patch_embed(x, weight, None, (2, 4, 4), pos_embed=pos, backend="conv")
    torch.testing.assert_close(with_pos, via_conv, rtol=1e-12, atol=1e-12)
    without = kernels.patch_embed(x, weight, None, (2, 4, 4))
    torch.testing.assert_close(with_pos - without, pos.expand(2, -1, -1), rtol=1e-12, atol=1e-12)


def test_patch_embed_shape_errors_name_the_shapes():
    x = torch.randn(1, 1, 30, 32)
    weight = torch.randn(8, 1, 16, 16)
    with pytest.raises(ValueError, match=r"spatial size \(30, 32\).*not divisible by patch_size \(16, 16\)"):
        kernels.patch_embed(x, weight, None, 16)
    with pytest.raises(ValueError, match="x has 3 channels but weight"):
        kernels.patch_embed(torch.randn(1, 3, 32, 32), weight, None, 16)
    with pytest.raises(ValueError, match=r"does not match patch_size \(8, 8\)"):
        kernels.patch_embed(torch.randn(1, 1, 32, 32), weight, None, 8)
    with pytest.raises(ValueError, match=r"pos_embed \(1, 3, 8\) must be \(1 or B, 4, 8\)"):
        kernels.patch_embed(torch.randn(1, 1, 32, 32), weight, None, 16, pos_embed=torch.zeros(1, 3, 8))


# ------------------------------------------------------------------- registry


@pytest.mark.parametrize("name,library", [("flash_attn", "flash_attn"), ("xformers", "xformers")])
def test_explicit_unavailable_backend_says_why(name, library):
    q, k, v = random_qkv(dtype=torch.float32)
    with pytest.raises(RuntimeError, match=rf"attention backend '{name}' was selected but cannot run: .*CUDA"):
        kernels.attention(q, k, v, backend=name)
    kernels.configure(attention=name)  # the process default is honoured and fails the same way
    with pytest.raises(RuntimeError, match=library):
        kernels.attention(q, k, v)


def test_unknown_backend_names_the_choices():
    q, k, v = random_qkv()
    with pytest.raises(ValueError, match=r"unknown attention backend 'tpu'; choose one of: auto, .*torch"):
        kernels.attention(q, k, v, backend="tpu")
    with pytest.raises(ValueError, match="unknown patch_embed backend 'cuda'"):
        kernels.configure(patch_embed="cuda")


def test_describe_and_available_backends_on_cpu():
    summary = kernels.describe("cpu")
    assert summary["attention"]["resolved"] == "torch"
    assert summary["patch_embed"]["resolved"] == "torch"
    assert summary["attention"]["backends"]["torch"] == "available"
    assert "CUDA" in summary["attention"]["backends"]["flash_attn"]
    # Triton runs on CPU only under its interpreter (tests/conftest.py turns it on where no GPU is present),
    # and ranks below torch there, so "auto" above still resolved to torch.
    triton = ["triton"] if os.environ.get("TRITON_INTERPRET") == "1" else []
    assert kernels.available_backends("cpu") == {"attention": ["torch", *triton], "patch_embed": ["torch", "conv", *triton]}
    kernels.configure(patch_embed="conv")
    assert kernels.describe("cpu")["patch_embed"]["configured"] == "conv"


def test_a_new_backend_is_one_entry_and_auto_respects_its_checks(monkeypatch):
    """A registered backend wins "auto" when its checks pass and is skipped (with fallback) when not."""
    monkeypatch.setitem(dispatch._REGISTRY, "attention", dict(dispatch._REGISTRY["attention"]))
    calls = []

    def spy(q, k, v, key_padding_mask=None):
        calls.append(q.dtype)
        return torch_ops.sdpa_attention(q, k, v, key_padding_mask)

    kernels.register_backend(
        "attention", "spy", spy, priority=100,
        environment=lambda device: None if device.type == "cpu" else "cpu only",
        supports=lambda q, k, v, mask=None: None if q.dtype == torch.float32 else "float32 only",
    )
    assert kernels.describe("cpu")["attention"]["resolved"] == "spy"
    kernels.attention(*random_qkv(dtype=torch.float32))
    kernels.attention(*random_qkv(dtype=torch.float64))  # falls back to torch
    assert calls == [torch.float32]
    with pytest.raises(RuntimeError, match="float32 only"):
        kernels.attention(*random_qkv(dtype=torch.float64), backend="spy")


def test_backend_choice_is_logged_once(monkeypatch, caplog):
    monkeypatch.setattr(dispatch, "_LOGGED", set())
    q, k, v = random_qkv()
    with caplog.at_level(logging.INFO, logger="pretrain.kernels.dispatch"):
        kernels.attention(q, k, v)
        kernels.attention(q, k, v)
    records = [r.getMessage() for r in caplog.records if "attention runs on backend" in r.getMessage()]
    assert len(records) == 1 and "'torch' on cpu" in records[0] and "flash_attn" in records[0]


# ---------------------------------------------- flash-attn / xformers adapters


def fake_flash_attn():
    """Reference implementations of the two flash-attn entry points the adapter uses, (B, N, H, d) layout."""

    def flash_attn_func(q, k, v, dropout_p=0.0, causal=False):
        return reference_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)

    def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, causal):
        outs = []
        for i in range(len(cu_seqlens_q) - 1):
            qs, ks = slice(cu_seqlens_q[i], cu_seqlens_q[i + 1]), slice(cu_seqlens_k[i], cu_seqlens_k[i + 1])
            assert cu_seqlens_k[i + 1] - cu_seqlens_k[i] <= max_seqlen_k
            sample = [t[None].transpose(1, 2) for t in (q[qs], k[ks], v[ks])]
            outs.append(reference_attention(*sample)[0].transpose(0, 1))
        return torch.cat(outs)

    return types.SimpleNamespace(flash_attn_func=flash_attn_func, flash_attn_varlen_func=flash_attn_varlen_func)


def fake_xformers():
    """Reference BlockDiagonalMask + memory_efficient_attention, (B, N, H, d) layout."""

    class BlockDiagonalMask:
        def __init__(self, q_seqlen, kv_seqlen):
            self.q_seqlen, self.kv_seqlen = q_seqlen, kv_seqlen

        @classmethod
        def from_seqlens(cls, q_seqlen, kv_seqlen):
            return cls(list(q_seqlen), list(kv_seqlen))

    def memory_efficient_attention(q, k, v, attn_bias=None):
        q_BHNd, k_BHNd, v_BHNd = (t.transpose(1, 2) for t in (q, k, v))
        if attn_bias is None:
            return reference_attention(q_BHNd, k_BHNd, v_BHNd).transpose(1, 2)
        allowed = torch.block_diag(*[torch.ones(a, b) for a, b in zip(attn_bias.q_seqlen, attn_bias.kv_seqlen)])
        scores = q_BHNd.double() @ k_BHNd.double().transpose(-1, -2) / math.sqrt(q.shape[-1])
        scores = scores.masked_fill(allowed == 0, float("-inf"))
        return (scores.softmax(-1) @ v_BHNd.double()).transpose(1, 2)

    fmha = types.SimpleNamespace(
        memory_efficient_attention=memory_efficient_attention,
        attn_bias=types.SimpleNamespace(BlockDiagonalMask=BlockDiagonalMask),
    )
    return types.SimpleNamespace(fmha=fmha)


@pytest.mark.parametrize(
    "adapter,module,fake",
    [
        (torch_ops.flash_attn_attention, "flash_attn", fake_flash_attn),
        (torch_ops.xformers_attention, "xformers.ops", fake_xformers),
    ],
)
def test_library_adapters_pack_and_unpack_correctly(monkeypatch, adapter, module, fake):
    fake_module = fake()
    monkeypatch.setattr(torch_ops, "_optional_import", lambda name: (fake_module, "") if name == module else None)
    q, k, v = random_qkv()
    keep = padding_mask()
    torch.testing.assert_close(adapter(q, k, v), reference_attention(q, k, v))
    torch.testing.assert_close(adapter(q, k, v, keep), reference_attention(q, k, v, keep))


def test_flash_attn_per_call_constraints():
    q, k, v = random_qkv(dtype=torch.float32)
    assert "float16 or bfloat16" in torch_ops.flash_attn_supports(q, k, v)
    big = torch.zeros(1, 1, 2, 512, dtype=torch.bfloat16)
    assert "head_dim <= 256" in torch_ops.flash_attn_supports(big, big, big)
    assert torch_ops.flash_attn_supports(q.bfloat16(), k.bfloat16(), v.bfloat16()) is None
