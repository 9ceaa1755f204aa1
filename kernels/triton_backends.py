"""Registers the Triton kernels as the "triton" backend of ``attention`` and ``patch_embed``.

Where it runs: on CUDA whenever triton imports, and on CPU only through
Triton's interpreter (``TRITON_INTERPRET=1`` set before ``kernels`` is
imported; slow, no bf16, meant for tests). Its priority depends on the device:
for patch embedding on CUDA it is above the PyTorch backends; attention on
CUDA stays with PyTorch SDPA (cuDNN / flash backends) until measured otherwise;
on CPU it is below them, so "auto" keeps picking torch there and the interpreter only runs when "triton" is selected
explicitly (``kernels.configure(attention="triton")`` or ``backend="triton"``).

Triton is probed once, at import, like the other optional libraries: an import
inside a ``torch.compile`` trace would break the graph at every call.
"""

import importlib
from collections.abc import Callable
from types import ModuleType

import torch

from pretrain.kernels.dispatch import register_backend

# Below PyTorch SDPA (30) on CUDA until `pretrain bench kernels` on a GPU measures ours faster for that device
# and shape: no GPU has timed it yet, and its head-dim 80-128 path compiles to Ampere's mma.sync, not wgmma.
_ATTENTION_PRIORITY_CUDA = 5  # triton 5 < xformers 10 < flash_attn 20 < torch 30
_PATCH_EMBED_PRIORITY_CUDA = 20  # conv 0 < torch 10 < triton
_PRIORITY_OFF_CUDA = -10  # below every PyTorch backend: never "auto" on CPU


def _load() -> tuple[ModuleType | None, ModuleType | None, str]:
    """(attention module, patch-embed module, "") when triton imports, else (None, None, why not)."""
    try:
        attention_module = importlib.import_module("pretrain.kernels.triton_attention")
        patch_embed_module = importlib.import_module("pretrain.kernels.triton_patch_embed")
    except Exception as err:  # a broken triton install raises more than ImportError
        return None, None, f"import triton failed: {type(err).__name__}: {err}"
    return attention_module, patch_embed_module, ""


_ATTENTION, _PATCH_EMBED, _IMPORT_ERROR = _load()


def _interpreted() -> bool:
    """True when the kernels were built by Triton's CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return type(_ATTENTION._attn_fwd_kernel).__name__ == "InterpretedFunction"


def triton_environment(device: torch.device) -> str | None:
    """None when the Triton kernels can run on ``device``, else the reason."""
    if _ATTENTION is None:
        return f"not installed ({_IMPORT_ERROR})"
    if device.type == "cuda":
        return "kernels were built for the CPU interpreter (TRITON_INTERPRET=1)" if _interpreted() else None
    if device.type == "cpu":
        return None if _interpreted() else "runs on CPU only under TRITON_INTERPRET=1 set before importing kernels"
    return f"needs a CUDA device (or CPU with TRITON_INTERPRET=1), not {device.type}"


def _priority(on_cuda: int) -> Callable[[torch.device], int]:
    return lambda device: on_cuda if device.type == "cuda" else _PRIORITY_OFF_CUDA


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The autocast dtype active for ``device``, or None: the Triton functions are not autocast-aware."""
    if device.type in ("cuda", "cpu") and torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """The "triton" attention backend (casts q, k, v to the autocast dtype when autocast is on)."""
    dtype = _autocast_dtype(q.device)
    if dtype is not None:
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    return _ATTENTION.triton_attention(q, k, v, key_padding_mask)


def patch_embed(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    patch: tuple[int, ...],
    pos_embed: torch.Tensor | None = None,
) -> torch.Tensor:
    """The "triton" patch-embedding backend (casts every input to the autocast dtype when autocast is on)."""
    dtype = _autocast_dtype(x.device)
    if dtype is not None:
        x, weight = x.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
        pos_embed = None if pos_embed is None else pos_embed.to(dtype)
    return _PATCH_EMBED.triton_patch_embed(x, weight, bias, patch, pos_embed)


def _interpreter_dtype_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    if device.type == "cpu" and dtype == torch.bfloat16:
        return "the Triton CPU interpreter has no bfloat16"
    return None


def attention_supports(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None = None
) -> str | None:
    """Head dims 32/64/80/96/128; fp16/bf16/fp32 (no bf16 in the CPU interpreter)."""
    dtype = _autocast_dtype(q.device)
    reason = _interpreter_dtype_reason(q.device, dtype or q.dtype)
    if reason is None and dtype is not None and q.shape[-1] not in _ATTENTION.SUPPORTED_HEAD_DIMS:
        reason = f"supports head_dim in {_ATTENTION.SUPPORTED_HEAD_DIMS}, got {q.shape[-1]}"
    if reason is None and dtype is None:  # under autocast every input is cast to one supported dtype
        reason = _ATTENTION.attention_supports(q, k, v, key_padding_mask)
    return reason


def patch_embed_supports(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    patch: tuple[int, ...],
    pos_embed: torch.Tensor | None = None,
) -> str | None:
    """fp16/bf16/fp32 with every input in one dtype (no bf16 in the CPU interpreter)."""
    dtype = _autocast_dtype(x.device)
    reason = _interpreter_dtype_reason(x.device, dtype or x.dtype)
    if reason is None and dtype is None:  # under autocast every input is cast to one supported dtype
        reason = _PATCH_EMBED.patch_embed_supports(x, weight, bias, patch, pos_embed)
    return reason


register_backend(
    "attention", "triton", attention, priority=_priority(_ATTENTION_PRIORITY_CUDA),
    environment=triton_environment, supports=attention_supports,
)
register_backend(
    "patch_embed", "triton", patch_embed, priority=_priority(_PATCH_EMBED_PRIORITY_CUDA),
    environment=triton_environment, supports=patch_embed_supports,
)
