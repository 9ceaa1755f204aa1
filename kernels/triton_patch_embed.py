"""2D/3D non-overlapping patch embedding in Triton, forward and backward.

tokens (B*N, D) = patches (B*N, K) @ W^T (K, D) + bias + pos_embed, with
K = C * prod(patch) and W the Conv weight viewed as (D, K). No im2col copy:
every program computes a tile of tokens x features and gathers the patch
pixels straight from the channels-first input through its strides. The
address of pixel (token m, column k) splits into a token part (batch and grid
cell) plus a column part (channel and offset inside the patch), so both are
1-D vectors and the gather is their outer sum.

2D inputs run through the 3D kernels as volumes of depth 1 (stride 0).

Backward: dX by a Triton kernel that scatters dY @ W through the same index
math (patches do not overlap, so every pixel is written once, no atomics); dW
by a Triton kernel that gathers the patches again while it accumulates
dY^T @ patches over tokens; db and d(pos_embed) are plain torch sums.
"""

import math

import torch
import triton
import triton.language as tl

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _token_offsets(m, n_tok, g1, g2, p0, p1, p2, sb, s0, s1, s2):
    """Offset of each token's first pixel (channel 0, patch corner) from the input's start."""
    b = (m // n_tok).to(tl.int64)  # a large batch of volumes passes 2**31 elements
    t = m % n_tok
    i0 = t // (g1 * g2)
    i1 = (t // g2) % g1
    i2 = t % g2
    return b * sb + i0 * p0 * s0 + i1 * p1 * s1 + i2 * p2 * s2


@triton.jit
def _column_offsets(kk, p0, p1, p2, sc, s0, s1, s2):
    """Offset of each patch column (channel, z, y, x inside the patch), in Conv weight order."""
    c = kk // (p0 * p1 * p2)
    r = kk % (p0 * p1 * p2)
    o0 = r // (p1 * p2)
    o1 = (r // p2) % p1
    o2 = r % p2
    return c * sc + o0 * s0 + o1 * s1 + o2 * s2


@triton.jit
def _patch_embed_fwd_kernel(
    X, W, BIAS, POS, OUT,
    n_rows, n_tok, n_feat, n_cols,
    g1, g2, p0, p1, p2,
    sb, sc, s0, s1, s2,
    stride_wd, stride_wk,
    stride_pb, stride_pn, stride_pd,
    HAS_BIAS: tl.constexpr, HAS_POS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = m < n_rows
    n_ok = n < n_feat
    tok_off = _token_offsets(m, n_tok, g1, g2, p0, p1, p2, sb, s0, s1, s2)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for start_k in range(0, n_cols, BLOCK_K):
        kk = start_k + tl.arange(0, BLOCK_K)
        k_ok = kk < n_cols
        col_off = _column_offsets(kk, p0, p1, p2, sc, s0, s1, s2)
        x = tl.load(X + tok_off[:, None] + col_off[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(W + n[None, :] * stride_wd + kk[:, None] * stride_wk, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc += tl.dot(x, w, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(BIAS + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    out_mask = m_ok[:, None] & n_ok[None, :]
    if HAS_POS:
        b = m // n_tok
        t = m % n_tok
        pos = tl.load(POS + b[:, None] * stride_pb + t[:, None] * stride_pn + n[None, :] * stride_pd, mask=out_mask)
        acc += pos.to(tl.float32)
    tl.store(OUT + m[:, None] * n_feat + n[None, :], acc.to(OUT.dtype.element_ty), mask=out_mask)


@triton.jit
def _patch_embed_dx_kernel(
    DY, W, DX,
    n_rows, n_tok, n_feat, n_cols,
    g1, g2, p0, p1, p2,
    sb, sc, s0, s1, s2,
    stride_wd, stride_wk,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # Tile of (tokens x patch columns): dpatch = dY @ W, scattered to the (contiguous) dX.
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    kk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    m_ok = m < n_rows
    k_ok = kk < n_cols
    acc = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
    for start_n in range(0, n_feat, BLOCK_N):
        n = start_n + tl.arange(0, BLOCK_N)
        n_ok = n < n_feat
        dy = tl.load(DY + m[:, None] * n_feat + n[None, :], mask=m_ok[:, None] & n_ok[None, :], other=0.0)
        w = tl.load(W + n[:, None] * stride_wd + kk[None, :] * stride_wk, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        acc += tl.dot(dy, w, input_precision=DOT_PRECISION)
    tok_off = _token_offsets(m, n_tok, g1, g2, p0, p1, p2, sb, s0, s1, s2)
    col_off = _column_offsets(kk, p0, p1, p2, sc, s0, s1, s2)
    tl.store(DX + tok_off[:, None] + col_off[None, :], acc.to(DX.dtype.element_ty), mask=m_ok[:, None] & k_ok[None, :])


@triton.jit
def _patch_embed_dw_kernel(
    DY, X, DW,
    n_rows, n_tok, n_feat, n_cols,
    g1, g2, p0, p1, p2,
    sb, sc, s0, s1, s2,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # Tile of (features x patch columns): dW = dY^T @ patches, reduced over every token.
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    kk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    n_ok = n < n_feat
    k_ok = kk < n_cols
    col_off = _column_offsets(kk, p0, p1, p2, sc, s0, s1, s2)
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for start_m in range(0, n_rows, BLOCK_M):
        m = start_m + tl.arange(0, BLOCK_M)
        m_ok = m < n_rows
        dy = tl.load(DY + m[:, None] * n_feat + n[None, :], mask=m_ok[:, None] & n_ok[None, :], other=0.0)
        tok_off = _token_offsets(m, n_tok, g1, g2, p0, p1, p2, sb, s0, s1, s2)
        x = tl.load(X + tok_off[:, None] + col_off[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        acc += tl.dot(tl.trans(dy), x, input_precision=DOT_PRECISION)
    tl.store(DW + n[:, None] * n_cols + kk[None, :], acc.to(DW.dtype.element_ty), mask=n_ok[:, None] & k_ok[None, :])


_BLOCK_M, _BLOCK_N, _BLOCK_K = 64, 64, 32


def _geometry(x: torch.Tensor, patch: tuple[int, ...]) -> tuple[int, ...]:
    """(n_tok, g1, g2, p0, p1, p2, sb, sc, s0, s1, s2): a 2D input as a depth-1 volume."""
    grid = [size // p for size, p in zip(x.shape[2:], patch)]
    strides = list(x.stride()[2:])
    patch = list(patch)
    if len(grid) == 2:
        grid, patch, strides = [1, *grid], [1, *patch], [0, *strides]
    return (math.prod(grid), grid[1], grid[2], *patch, x.stride(0), x.stride(1), *strides)


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def patch_embed_forward(
    x: torch.Tensor,
    weight_DK: torch.Tensor,
    bias: torch.Tensor | None,
    patch: tuple[int, ...],
    pos_embed: torch.Tensor | None,
) -> torch.Tensor:
    """Tokens (B, N, D) in x's dtype; ``weight_DK`` is the Conv weight viewed as (D, C*prod(patch))."""
    geometry = _geometry(x, patch)
    n_tok = geometry[0]
    n_feat, n_cols = weight_DK.shape
    n_rows = x.shape[0] * n_tok
    out = torch.empty((x.shape[0], n_tok, n_feat), dtype=x.dtype, device=x.device)
    dummy = out  # never read: HAS_BIAS / HAS_POS are compile-time False
    pos_strides = (0, 0, 0)
    if pos_embed is not None:
        pos_strides = (pos_embed.stride(0) if pos_embed.shape[0] > 1 else 0, pos_embed.stride(1), pos_embed.stride(2))
    grid = (triton.cdiv(n_rows, _BLOCK_M), triton.cdiv(n_feat, _BLOCK_N))
    _patch_embed_fwd_kernel[grid](
        x, weight_DK, dummy if bias is None else bias, dummy if pos_embed is None else pos_embed, out,
        n_rows, n_tok, n_feat, n_cols, *geometry[1:],
        weight_DK.stride(0), weight_DK.stride(1), *pos_strides,
        HAS_BIAS=bias is not None, HAS_POS=pos_embed is not None,
        BLOCK_M=_BLOCK_M, BLOCK_N=_BLOCK_N, BLOCK_K=_BLOCK_K, DOT_PRECISION=_precision(x.dtype),
    )
    return out


def patch_embed_backward(
    grad_BND: torch.Tensor, x: torch.Tensor, weight_DK: torch.Tensor, patch: tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """dX (contiguous, x's shape) and dW (D, K) in the weight's dtype."""
    grad_BND = grad_BND.contiguous()
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    geometry_x = _geometry(x, patch)
    geometry_dx = _geometry(dx, patch)
    n_tok = geometry_x[0]
    n_feat, n_cols = weight_DK.shape
    n_rows = x.shape[0] * n_tok
    precision = _precision(x.dtype)
    blocks = dict(BLOCK_M=_BLOCK_M, BLOCK_N=_BLOCK_N, BLOCK_K=_BLOCK_K, DOT_PRECISION=precision)
    _patch_embed_dx_kernel[(triton.cdiv(n_rows, _BLOCK_M), triton.cdiv(n_cols, _BLOCK_K))](
        grad_BND, weight_DK, dx, n_rows, n_tok, n_feat, n_cols, *geometry_dx[1:],
        weight_DK.stride(0), weight_DK.stride(1), **blocks,
    )
    dw = torch.empty((n_feat, n_cols), dtype=weight_DK.dtype, device=x.device)
    _patch_embed_dw_kernel[(triton.cdiv(n_feat, _BLOCK_N), triton.cdiv(n_cols, _BLOCK_K))](
        grad_BND, x, dw, n_rows, n_tok, n_feat, n_cols, *geometry_x[1:], **blocks,
    )
    return dx, dw


class TritonPatchEmbed(torch.autograd.Function):
    """Autograd wrapper; saves x and the weight (no patch matrix)."""

    @staticmethod
    def forward(ctx, x, weight, bias, patch, pos_embed):  # noqa: D102 - autograd signature
        weight_DK = weight.reshape(weight.shape[0], -1)
        ctx.save_for_backward(x, weight_DK)
        ctx.patch = patch
        ctx.weight_shape = weight.shape
        ctx.pos_batched = pos_embed is not None and pos_embed.shape[0] > 1
        return patch_embed_forward(x, weight_DK, bias, patch, pos_embed)

    @staticmethod
    def backward(ctx, grad_BND):  # noqa: D102 - autograd signature
        x, weight_DK = ctx.saved_tensors
        dx = dw = dbias = dpos = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            dx, dw_DK = patch_embed_backward(grad_BND, x, weight_DK, ctx.patch)
            dw = dw_DK.reshape(ctx.weight_shape)
        if ctx.needs_input_grad[2]:
            dbias = grad_BND.sum(dim=(0, 1), dtype=torch.float32).to(grad_BND.dtype)
        if ctx.needs_input_grad[4]:
            dpos = grad_BND if ctx.pos_batched else grad_BND.sum(dim=0, keepdim=True, dtype=torch.float32)
            dpos = dpos.to(grad_BND.dtype)
        return dx, dw, dbias, None, dpos


def triton_patch_embed(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    patch: tuple[int, ...],
    pos_embed: torch.Tensor | None = None,
) -> torch.Tensor:
    """Patch embedding with the Triton kernels; same contract as the ``kernels.patch_embed`` backends."""
    return TritonPatchEmbed.apply(x, weight, bias, patch, pos_embed)


def patch_embed_supports(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    patch: tuple[int, ...],
    pos_embed: torch.Tensor | None = None,
) -> str | None:
    """None when the Triton kernels handle these inputs, else why not (dtypes)."""
    tensors = {"x": x, "weight": weight, "bias": bias, "pos_embed": pos_embed}
    dtypes = {name: t.dtype for name, t in tensors.items() if t is not None}
    if x.dtype not in SUPPORTED_DTYPES or set(dtypes.values()) != {x.dtype}:
        return f"needs x, weight, bias and pos_embed all float16, bfloat16 or float32 alike, got {dtypes}"
    return None
