"""Flash-attention style non-causal attention in Triton, forward and backward.

Layout (batch, heads, tokens, head_dim) with arbitrary strides, so the q/k/v
views the ViT takes out of its fused qkv projection are read in place. The
forward keeps a running max and sum per query row (online softmax, fp32) and
saves only the output O and the log-sum-exp L per row; the backward recomputes
the probabilities from L: delta = rowsum(dO * O), then one kernel per key block
for dK/dV and one per query block for dQ (no atomics).

Any sequence length: rows and keys past the end are masked on load/store, and
the head dimension is padded to the next power of two (80 -> 128) with masked
loads. An optional key-padding mask (batch, key_tokens), True = keep, puts -inf
on the dropped keys.
"""

import math

import torch
import triton
import triton.language as tl

SUPPORTED_HEAD_DIMS = (32, 64, 80, 96, 128)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
LOG2_E = 1.4426950408889634


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, KEEP, O, LSE,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_mb, stride_mn,
    heads, q_len, k_len, head_dim, qk_scale_log2,
    HAS_MASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)  # offsets of long sequences pass 2**31
    b = pid_bh // heads
    h = pid_bh % heads
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols_d = tl.arange(0, BLOCK_D)
    row_ok = rows < q_len
    d_ok = cols_d < head_dim

    q_ptrs = Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qn + cols_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running max, log2 units
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, k_len, BLOCK_N):
        keys = start_n + tl.arange(0, BLOCK_N)
        key_ok = keys < k_len
        kv_mask = key_ok[:, None] & d_ok[None, :]
        k = tl.load(
            K + b * stride_kb + h * stride_kh + keys[:, None] * stride_kn + cols_d[None, :] * stride_kd,
            mask=kv_mask, other=0.0,
        )
        v = tl.load(
            V + b * stride_vb + h * stride_vh + keys[:, None] * stride_vn + cols_d[None, :] * stride_vd,
            mask=kv_mask, other=0.0,
        )
        if HAS_MASK:
            keep = tl.load(KEEP + b * stride_mb + keys * stride_mn, mask=key_ok, other=0)
            key_ok = key_ok & (keep != 0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale_log2
        s = tl.where(key_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # A row that has seen only dropped keys so far keeps m = -inf; shift by 0 then, not by -inf (NaN).
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_shift[:, None])
        alpha = tl.exp2(m_i - m_shift)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    out = acc / l_i[:, None]
    o_ptrs = O + b * stride_ob + h * stride_oh + rows[:, None] * stride_on + cols_d[None, :] * stride_od
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    lse = (m_i + tl.log2(l_i)) / 1.4426950408889634  # natural-log units
    tl.store(LSE + pid_bh * q_len + rows, lse, mask=row_ok)


@triton.jit
def _attn_bwd_delta_kernel(
    O, DO, DELTA,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_gb, stride_gh, stride_gn, stride_gd,
    heads, q_len, head_dim,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)  # offsets of long sequences pass 2**31
    b = pid_bh // heads
    h = pid_bh % heads
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols_d = tl.arange(0, BLOCK_D)
    mask = (rows < q_len)[:, None] & (cols_d < head_dim)[None, :]
    o = tl.load(
        O + b * stride_ob + h * stride_oh + rows[:, None] * stride_on + cols_d[None, :] * stride_od, mask=mask, other=0.0
    )
    do = tl.load(
        DO + b * stride_gb + h * stride_gh + rows[:, None] * stride_gn + cols_d[None, :] * stride_gd,
        mask=mask, other=0.0,
    )
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(DELTA + pid_bh * q_len + rows, delta, mask=rows < q_len)


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, KEEP, DO, LSE, DELTA, DK, DV,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_gb, stride_gh, stride_gn, stride_gd,
    stride_mb, stride_mn,
    heads, q_len, k_len, head_dim, sm_scale,
    HAS_MASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)  # offsets of long sequences pass 2**31
    b = pid_bh // heads
    h = pid_bh % heads
    keys = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols_d = tl.arange(0, BLOCK_D)
    key_ok = keys < k_len
    d_ok = cols_d < head_dim
    kv_mask = key_ok[:, None] & d_ok[None, :]
    k = tl.load(
        K + b * stride_kb + h * stride_kh + keys[:, None] * stride_kn + cols_d[None, :] * stride_kd,
        mask=kv_mask, other=0.0,
    )
    v = tl.load(
        V + b * stride_vb + h * stride_vh + keys[:, None] * stride_vn + cols_d[None, :] * stride_vd,
        mask=kv_mask, other=0.0,
    )
    if HAS_MASK:
        keep = tl.load(KEEP + b * stride_mb + keys * stride_mn, mask=key_ok, other=0)
        key_ok = key_ok & (keep != 0)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for start_m in range(0, q_len, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)
        row_ok = rows < q_len
        q_mask = row_ok[:, None] & d_ok[None, :]
        q = tl.load(
            Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qn + cols_d[None, :] * stride_qd,
            mask=q_mask, other=0.0,
        )
        do = tl.load(
            DO + b * stride_gb + h * stride_gh + rows[:, None] * stride_gn + cols_d[None, :] * stride_gd,
            mask=q_mask, other=0.0,
        )
        lse = tl.load(LSE + pid_bh * q_len + rows, mask=row_ok, other=0.0)
        delta = tl.load(DELTA + pid_bh * q_len + rows, mask=row_ok, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * sm_scale
        p = tl.exp(s - lse[:, None])
        p = tl.where(row_ok[:, None] & key_ok[None, :], p, 0.0)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PRECISION)

    dk = dk * sm_scale
    dk_ptrs = DK + pid_bh * k_len * head_dim + keys[:, None] * head_dim + cols_d[None, :]
    dv_ptrs = DV + pid_bh * k_len * head_dim + keys[:, None] * head_dim + cols_d[None, :]
    store_mask = (keys < k_len)[:, None] & d_ok[None, :]
    tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=store_mask)
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=store_mask)


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, KEEP, DO, LSE, DELTA, DQ,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_gb, stride_gh, stride_gn, stride_gd,
    stride_mb, stride_mn,
    heads, q_len, k_len, head_dim, sm_scale,
    HAS_MASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)  # offsets of long sequences pass 2**31
    b = pid_bh // heads
    h = pid_bh % heads
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols_d = tl.arange(0, BLOCK_D)
    row_ok = rows < q_len
    d_ok = cols_d < head_dim
    q_mask = row_ok[:, None] & d_ok[None, :]
    q = tl.load(
        Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qn + cols_d[None, :] * stride_qd,
        mask=q_mask, other=0.0,
    )
    do = tl.load(
        DO + b * stride_gb + h * stride_gh + rows[:, None] * stride_gn + cols_d[None, :] * stride_gd,
        mask=q_mask, other=0.0,
    )
    lse = tl.load(LSE + pid_bh * q_len + rows, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + pid_bh * q_len + rows, mask=row_ok, other=0.0)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, k_len, BLOCK_N):
        keys = start_n + tl.arange(0, BLOCK_N)
        key_ok = keys < k_len
        kv_mask = key_ok[:, None] & d_ok[None, :]
        k = tl.load(
            K + b * stride_kb + h * stride_kh + keys[:, None] * stride_kn + cols_d[None, :] * stride_kd,
            mask=kv_mask, other=0.0,
        )
        v = tl.load(
            V + b * stride_vb + h * stride_vh + keys[:, None] * stride_vn + cols_d[None, :] * stride_vd,
            mask=kv_mask, other=0.0,
        )
        if HAS_MASK:
            keep = tl.load(KEEP + b * stride_mb + keys * stride_mn, mask=key_ok, other=0)
            key_ok = key_ok & (keep != 0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * sm_scale
        p = tl.exp(s - lse[:, None])
        p = tl.where(row_ok[:, None] & key_ok[None, :], p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)

    dq = dq * sm_scale
    dq_ptrs = DQ + pid_bh * q_len * head_dim + rows[:, None] * head_dim + cols_d[None, :]
    tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=q_mask)


def _launch_config(head_dim: int, dtype: torch.dtype) -> dict:
    """Tile sizes: the head dim padded to a power of two; smaller tiles for fp32 (twice the bytes)."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    block = 32 if dtype == torch.float32 or block_d > 64 else 64
    return dict(
        BLOCK_D=block_d,
        BLOCK_M=block,
        BLOCK_N=block,
        # fp32 inputs mean "accurate": no TF32 rounding in the matmuls.
        DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32",
        num_warps=4 if block_d <= 64 else 8,
    )


def _strides(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.stride())


def _mask_args(key_padding_mask: torch.Tensor | None, device: torch.device) -> tuple[torch.Tensor, int, int]:
    """The keep mask as uint8 (a free reinterpretation of bool) and its strides; a dummy when absent."""
    if key_padding_mask is None:
        return torch.empty(1, dtype=torch.uint8, device=device), 0, 0
    keep = key_padding_mask.view(torch.uint8)
    return keep, keep.stride(0), keep.stride(1)


def attention_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Output (B, H, Nq, d) in q's dtype and log-sum-exp (B, H, Nq) in fp32 (natural log)."""
    batch, heads, q_len, head_dim = q.shape
    k_len = k.shape[2]
    out = torch.empty((batch, heads, q_len, head_dim), dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, heads, q_len), dtype=torch.float32, device=q.device)
    keep, stride_mb, stride_mn = _mask_args(key_padding_mask, q.device)
    cfg = _launch_config(head_dim, q.dtype)
    grid = (triton.cdiv(q_len, cfg["BLOCK_M"]), batch * heads)
    _attn_fwd_kernel[grid](
        q, k, v, keep, out, lse,
        *_strides(q), *_strides(k), *_strides(v), *_strides(out), stride_mb, stride_mn,
        heads, q_len, k_len, head_dim, LOG2_E / math.sqrt(head_dim),
        HAS_MASK=key_padding_mask is not None, **cfg,
    )
    return out, lse


def attention_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv (contiguous, input dtypes) from the upstream gradient and the saved O and log-sum-exp."""
    batch, heads, q_len, head_dim = q.shape
    k_len = k.shape[2]
    cfg = _launch_config(head_dim, q.dtype)
    keep, stride_mb, stride_mn = _mask_args(key_padding_mask, q.device)
    delta = torch.empty((batch, heads, q_len), dtype=torch.float32, device=q.device)
    _attn_bwd_delta_kernel[(triton.cdiv(q_len, cfg["BLOCK_M"]), batch * heads)](
        out, grad_out, delta, *_strides(out), *_strides(grad_out), heads, q_len, head_dim,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_D=cfg["BLOCK_D"],
    )
    dq = torch.empty((batch, heads, q_len, head_dim), dtype=q.dtype, device=q.device)
    dk = torch.empty((batch, heads, k_len, head_dim), dtype=k.dtype, device=k.device)
    dv = torch.empty((batch, heads, k_len, head_dim), dtype=v.dtype, device=v.device)
    common = (
        *_strides(q), *_strides(k), *_strides(v), *_strides(grad_out), stride_mb, stride_mn,
        heads, q_len, k_len, head_dim, 1.0 / math.sqrt(head_dim),
    )
    has_mask = key_padding_mask is not None
    _attn_bwd_dkdv_kernel[(triton.cdiv(k_len, cfg["BLOCK_N"]), batch * heads)](
        q, k, v, keep, grad_out, lse, delta, dk, dv, *common, HAS_MASK=has_mask, **cfg
    )
    _attn_bwd_dq_kernel[(triton.cdiv(q_len, cfg["BLOCK_M"]), batch * heads)](
        q, k, v, keep, grad_out, lse, delta, dq, *common, HAS_MASK=has_mask, **cfg
    )
    return dq, dk, dv


class TritonAttention(torch.autograd.Function):
    """Autograd wrapper: saves q, k, v, the output and the log-sum-exp (no attention matrix)."""

    @staticmethod
    def forward(ctx, q, k, v, key_padding_mask):  # noqa: D102 - autograd signature
        out, lse = attention_forward(q, k, v, key_padding_mask)
        ctx.save_for_backward(q, k, v, out, lse, key_padding_mask)
        return out

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102 - autograd signature
        q, k, v, out, lse, key_padding_mask = ctx.saved_tensors
        dq, dk, dv = attention_backward(grad_out, q, k, v, out, lse, key_padding_mask)
        return dq, dk, dv, None


def triton_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v with the Triton kernels; same contract as ``kernels.attention``."""
    return TritonAttention.apply(q, k, v, key_padding_mask)


def attention_supports(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None = None
) -> str | None:
    """None when the Triton kernels handle these inputs, else why not (head dim, dtype)."""
    if q.shape[-1] not in SUPPORTED_HEAD_DIMS:
        return f"supports head_dim in {SUPPORTED_HEAD_DIMS}, got {q.shape[-1]}"
    if q.dtype not in SUPPORTED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"needs q, k, v all float16, bfloat16 or float32, got {q.dtype}, {k.dtype}, {v.dtype}"
    return None
