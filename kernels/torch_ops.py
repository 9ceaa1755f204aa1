"""Backend implementations of the kernel ops: PyTorch, flash-attn and xformers.

Every function here assumes its inputs were validated by ``check_attention_inputs``
or ``check_patch_embed_inputs`` (the dispatcher calls them once, before it picks
a backend), so the backends share one set of error messages.

Conventions shared by all attention backends: q, k, v are (batch, heads,
tokens, head_dim) as in ``F.scaled_dot_product_attention``; attention is
non-causal; ``key_padding_mask`` is (batch, key_tokens) bool with True = keep
(the key takes part in attention), False = padding. Every sample must keep at
least one key: a fully padded sample has no defined softmax (NaN in PyTorch).
"""

import importlib
import importlib.util
import math
from types import ModuleType

import torch
import torch.nn.functional as F

# ----------------------------------------------------------------- validation


def check_attention_inputs(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None
) -> None:
    """Raise ValueError naming the offending tensor when the attention inputs disagree."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.ndim != 4:
            raise ValueError(
                f"kernels.attention: {name} must be (batch, heads, tokens, head_dim), got shape {tuple(t.shape)}"
            )
    if k.shape != v.shape:
        raise ValueError(f"kernels.attention: k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    if q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(
            f"kernels.attention: q {tuple(q.shape)} and k {tuple(k.shape)} must agree on batch, heads and head_dim"
        )
    if key_padding_mask is not None:
        if key_padding_mask.dtype != torch.bool:
            raise ValueError(
                f"kernels.attention: key_padding_mask must be bool (True = keep), got {key_padding_mask.dtype}"
            )
        expected = (k.shape[0], k.shape[2])
        if tuple(key_padding_mask.shape) != expected:
            raise ValueError(
                f"kernels.attention: key_padding_mask must be (batch, key_tokens) = {expected}, "
                f"got {tuple(key_padding_mask.shape)}"
            )


def normalize_patch_size(patch_size: int | tuple[int, ...] | list[int], spatial_dims: int) -> tuple[int, ...]:
    """Turn an int or a sequence into a ``spatial_dims``-tuple of positive ints."""
    if isinstance(patch_size, int):
        patch = (patch_size,) * spatial_dims
    else:
        patch = tuple([int(p) for p in patch_size])
    if len(patch) != spatial_dims or min(patch) < 1:
        raise ValueError(
            f"kernels.patch_embed: patch_size {patch_size!r} must be a positive int or "
            f"{spatial_dims} positive ints for a {spatial_dims}-D input"
        )
    return patch


def check_patch_embed_inputs(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    patch: tuple[int, ...],
    pos_embed: torch.Tensor | None,
) -> None:
    """Raise ValueError naming the shapes when x, weight, bias, patch size and pos_embed disagree."""
    if x.ndim not in (4, 5):
        raise ValueError(f"kernels.patch_embed: x must be (B, C, H, W) or (B, C, D, H, W), got {tuple(x.shape)}")
    if weight.ndim != x.ndim:
        raise ValueError(
            f"kernels.patch_embed: weight {tuple(weight.shape)} must have the Conv layout of the "
            f"{x.ndim - 2}-D input x {tuple(x.shape)}"
        )
    if weight.shape[1] != x.shape[1]:
        raise ValueError(
            f"kernels.patch_embed: x has {x.shape[1]} channels but weight {tuple(weight.shape)} "
            f"expects {weight.shape[1]}"
        )
    if tuple(weight.shape[2:]) != patch:
        raise ValueError(f"kernels.patch_embed: weight {tuple(weight.shape)} does not match patch_size {patch}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"kernels.patch_embed: bias {tuple(bias.shape)} must be ({weight.shape[0]},)")
    spatial = tuple(x.shape[2:])
    if [s % p for s, p in zip(spatial, patch)] != [0] * len(patch):
        raise ValueError(
            f"kernels.patch_embed: spatial size {spatial} of x {tuple(x.shape)} is not divisible by patch_size {patch}"
        )
    if pos_embed is not None:
        num_patches = math.prod([s // p for s, p in zip(spatial, patch)])
        if pos_embed.ndim != 3 or pos_embed.shape[1:] != (num_patches, weight.shape[0]):
            raise ValueError(
                f"kernels.patch_embed: pos_embed {tuple(pos_embed.shape)} must be (1 or B, {num_patches}, "
                f"{weight.shape[0]}) for x {tuple(x.shape)} with patch_size {patch}"
            )


# ------------------------------------------------------------------ attention


def sdpa_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """PyTorch SDPA; the key padding mask becomes a boolean attn_mask broadcast over heads and queries."""
    attn_mask = None if key_padding_mask is None else key_padding_mask[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)


def _try_import(module: str) -> tuple[ModuleType | None, str]:
    try:
        return importlib.import_module(module), ""
    except Exception as err:  # a broken CUDA extension raises more than ImportError
        return None, f"import {module} failed: {type(err).__name__}: {err}"


# The optional libraries are probed once, when kernels is imported, and never
# again: an import inside a torch.compile trace would break the graph at every
# attention call. A library that is not installed costs one find_spec.
_OPTIONAL_IMPORTS: dict[str, tuple[ModuleType | None, str]] = {
    module: _try_import(module) if importlib.util.find_spec(package) is not None
    else (None, f"{package} is not installed")
    for package, module in (("flash_attn", "flash_attn"), ("xformers", "xformers.ops"))
}


def _optional_import(module: str) -> tuple[ModuleType | None, str]:
    """(module, "") when the optional library imported, else (None, why not)."""
    return _OPTIONAL_IMPORTS[module]


def _cuda_library_environment(module: str, device: torch.device) -> str | None:
    """None when ``module`` imports and ``device`` is CUDA, else every reason that applies."""
    reasons = []
    if device.type != "cuda":
        reasons.append(f"needs a CUDA device, not {device.type}")
    lib, why = _optional_import(module)
    if lib is None:
        reasons.append(f"not installed ({why})")
    return "; ".join(reasons) or None


def flash_attn_environment(device: torch.device) -> str | None:
    """None when flash-attn can run on ``device``, else the reason."""
    return _cuda_library_environment("flash_attn", device)


def flash_attn_supports(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None = None
) -> str | None:
    """flash-attn 2 computes in fp16/bf16 only and supports head_dim up to 256."""
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"needs float16 or bfloat16 inputs, got {q.dtype}"
    if q.shape[-1] > 256:
        return f"supports head_dim <= 256, got {q.shape[-1]}"
    return None


def flash_attn_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """flash-attn 2 adapter; padded keys go through the variable-length kernel.

    flash-attn wants (batch, tokens, heads, head_dim). With a key padding mask
    the keys are packed to (total_kept_keys, heads, head_dim) with cumulative
    lengths; queries are never padded, so every sample contributes all of them.
    """
    flash_attn = _optional_import("flash_attn")[0]
    batch, heads, q_len, head_dim = q.shape
    k_len = k.shape[2]
    q_BNHd, k_BNHd, v_BNHd = (t.transpose(1, 2) for t in (q, k, v))
    if key_padding_mask is None:
        out_BNHd = flash_attn.flash_attn_func(q_BNHd, k_BNHd, v_BNHd, dropout_p=0.0, causal=False)
        return out_BNHd.transpose(1, 2)
    kept_per_sample = key_padding_mask.sum(dim=1, dtype=torch.int32)
    cu_seqlens_k = F.pad(kept_per_sample.cumsum(0, dtype=torch.int32), (1, 0))
    cu_seqlens_q = torch.arange(0, (batch + 1) * q_len, q_len, device=q.device, dtype=torch.int32)
    out_packed = flash_attn.flash_attn_varlen_func(
        q_BNHd.reshape(batch * q_len, heads, head_dim),
        k_BNHd[key_padding_mask],
        v_BNHd[key_padding_mask],
        cu_seqlens_q=cu_seqlens_q,
        cu_seqlens_k=cu_seqlens_k,
        max_seqlen_q=q_len,
        # An upper bound is valid (the kernel reads true lengths from cu_seqlens) and avoids a host sync.
        max_seqlen_k=k_len,
        dropout_p=0.0,
        causal=False,
    )
    return out_packed.reshape(batch, q_len, heads, head_dim).transpose(1, 2)


def xformers_environment(device: torch.device) -> str | None:
    """None when xformers' memory-efficient attention can run on ``device``, else the reason."""
    return _cuda_library_environment("xformers.ops", device)


def xformers_supports(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None = None
) -> str | None:
    """xformers' CUDA kernels cover fp16, bf16 and fp32."""
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"needs float16, bfloat16 or float32 inputs, got {q.dtype}"
    return None


def xformers_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """xformers adapter; padded keys become a block-diagonal mask over packed sequences.

    xformers wants (batch, tokens, heads, head_dim). With a key padding mask all
    samples are packed into one batch row and a BlockDiagonalMask keeps each
    sample's queries on its own kept keys.
    """
    fmha = _optional_import("xformers.ops")[0].fmha
    batch, heads, q_len, head_dim = q.shape
    q_BNHd, k_BNHd, v_BNHd = (t.transpose(1, 2) for t in (q, k, v))
    if key_padding_mask is None:
        out_BNHd = fmha.memory_efficient_attention(q_BNHd, k_BNHd, v_BNHd)
        return out_BNHd.transpose(1, 2)
    kept_per_sample = key_padding_mask.sum(dim=1).tolist()
    bias = fmha.attn_bias.BlockDiagonalMask.from_seqlens(q_seqlen=[q_len] * batch, kv_seqlen=kept_per_sample)
    out_packed = fmha.memory_efficient_attention(
        q_BNHd.reshape(1, batch * q_len, heads, head_dim),
        k_BNHd[key_padding_mask].unsqueeze(0),
        v_BNHd[key_padding_mask].unsqueeze(0),
        attn_bias=bias,
    )
    return out_packed.reshape(batch, q_len, heads, head_dim).transpose(1, 2)


def always_available(device: torch.device) -> str | None:
    """Environment check of backends written in plain PyTorch: they run everywhere."""
    return None


# ---------------------------------------------------------------- patch embed


def linear_patch_embed(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    patch: tuple[int, ...],
    pos_embed: torch.Tensor | None = None,
) -> torch.Tensor:
    """Non-overlapping patches by reshape + permute, then one ``F.linear``.

    Equivalent to a convolution with stride == kernel, but a plain GEMM: cuDNN's
    Conv3d is pathologically slow for that case. Tokens come out in row-major
    order over the patch grid, exactly like ``conv(x).flatten(2).transpose(1, 2)``.
    """
    batch, channels = x.shape[:2]
    grid = [size // p for size, p in zip(x.shape[2:], patch)]
    spatial_dims = len(patch)
    # (B, C, g0, p0, g1, p1, ...) -> (B, g0, g1, ..., C, p0, p1, ...): the trailing
    # (C, p0, p1, ...) block matches the flattened Conv weight (D, C, p0, p1, ...).
    split_shape = [batch, channels]
    for g, p in zip(grid, patch):
        split_shape += [g, p]
    grid_axes = [2 + 2 * i for i in range(spatial_dims)]
    patch_axes = [3 + 2 * i for i in range(spatial_dims)]
    patches = x.reshape(split_shape).permute(0, *grid_axes, 1, *patch_axes)
    patches_BNK = patches.reshape(batch, math.prod(grid), channels * math.prod(patch))
    tokens_BND = F.linear(patches_BNK, weight.reshape(weight.shape[0], -1), bias)
    if pos_embed is not None:
        tokens_BND = tokens_BND + pos_embed
    return tokens_BND


def conv_patch_embed(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    patch: tuple[int, ...],
    pos_embed: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference: ``F.conv2d``/``F.conv3d`` with stride == kernel, then flatten to tokens."""
    conv = F.conv2d if len(patch) == 2 else F.conv3d
    tokens_BND = conv(x, weight, bias, stride=patch).flatten(2).transpose(1, 2)
    if pos_embed is not None:
        tokens_BND = tokens_BND + pos_embed
    return tokens_BND
