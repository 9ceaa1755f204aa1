"""Backend registry and the public ops: ``attention`` and ``patch_embed``.

A backend is one registry entry: a name, the function, a priority for "auto",
an environment check (can it run on this device at all: library importable,
right device type) and an optional per-call check (dtype, head size). Both
checks return None when fine, else a sentence saying why not, which is what
``describe()`` reports and what an explicit selection raises.

Selection: the ``backend`` argument of an op wins unless it is "auto"; "auto"
falls back to the process default set by ``configure()``, which is "auto"
itself unless changed; "auto" there means the highest-priority backend whose
checks pass for the call's tensors (on CPU that is always "torch").
"""

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from pretrain.kernels import torch_ops

logger = logging.getLogger(__name__)

OPS = ("attention", "patch_embed")
AUTO = "auto"


@dataclass(frozen=True)
class Backend:
    """One implementation of one op."""

    op: str
    name: str
    fn: Callable[..., torch.Tensor]
    priority: int | Callable[[torch.device], int]  # "auto" prefers the highest; may depend on the device
    environment: Callable[[torch.device], str | None]  # None = can run on this device
    supports: Callable[..., str | None] | None = None  # None = handles these exact call arguments


_REGISTRY: dict[str, dict[str, Backend]] = {op: {} for op in OPS}
_DEFAULTS: dict[str, str] = {op: AUTO for op in OPS}
_LOGGED: set[tuple[str, str, str]] = set()


def register_backend(
    op: str,
    name: str,
    fn: Callable[..., torch.Tensor],
    *,
    priority: int | Callable[[torch.device], int],
    environment: Callable[[torch.device], str | None],
    supports: Callable[..., str | None] | None = None,
) -> None:
    """Add (or replace) backend ``name`` of ``op``; ``fn`` takes the op's validated arguments.

    ``priority`` is an int, or a function of the device for a backend that should
    win "auto" on one device type only (Triton: above torch on CUDA, below it on CPU).
    """
    if op not in _REGISTRY:
        raise ValueError(f"kernels: unknown op {op!r}; known ops: {', '.join(OPS)}")
    if name == AUTO:
        raise ValueError(f"kernels: {AUTO!r} is reserved and cannot name a backend")
    _REGISTRY[op][name] = Backend(op, name, fn, priority, environment, supports)


def _priority(backend: Backend, device: torch.device) -> int:
    return backend.priority(device) if callable(backend.priority) else backend.priority


def backend_names(op: str, device: torch.device | str | None = None) -> list[str]:
    """All registered backends of ``op`` (available or not), best first on ``device``
    (default: CUDA when present, else CPU)."""
    if op not in _REGISTRY:
        raise ValueError(f"kernels: unknown op {op!r}; known ops: {', '.join(OPS)}")
    device = _default_device() if device is None else torch.device(device)
    return [b.name for b in sorted(_REGISTRY[op].values(), key=lambda b: -_priority(b, device))]


def _check_name(op: str, name: str) -> None:
    if name != AUTO and name not in _REGISTRY[op]:
        raise ValueError(
            f"kernels: unknown {op} backend {name!r}; choose one of: {', '.join([AUTO, *backend_names(op)])}"
        )


def configure(attention: str = AUTO, patch_embed: str = AUTO) -> None:
    """Set the process-wide default backend of every op ("auto" = best available per call)."""
    for op, name in (("attention", attention), ("patch_embed", patch_embed)):
        _check_name(op, name)
    _DEFAULTS["attention"] = attention
    _DEFAULTS["patch_embed"] = patch_embed


def _unusable_reason(backend: Backend, device: torch.device, args: tuple) -> str | None:
    reason = backend.environment(device)
    if reason is None and backend.supports is not None and args:
        reason = backend.supports(*args)
    return reason


def resolve(op: str, device: torch.device, requested: str = AUTO, args: tuple = ()) -> Backend:
    """The backend that runs ``op`` on ``device`` for the call arguments ``args``.

    Raises RuntimeError saying why when an explicitly requested backend cannot run.
    """
    _check_name(op, requested)
    name = _DEFAULTS[op] if requested == AUTO else requested
    if name != AUTO:
        backend = _REGISTRY[op][name]
        reason = _unusable_reason(backend, device, args)
        if reason is not None:
            raise RuntimeError(f"kernels: {op} backend {name!r} was selected but cannot run: {reason}")
        return backend
    for backend_name in backend_names(op, device):
        backend = _REGISTRY[op][backend_name]
        if _unusable_reason(backend, device, args) is None:
            return backend
    raise RuntimeError(f"kernels: no {op} backend can run on {device}: {_reasons(op, device)}")


def _reasons(op: str, device: torch.device) -> dict[str, str]:
    return {
        name: _REGISTRY[op][name].environment(device) or "available" for name in backend_names(op, device)
    }


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def describe(device: torch.device | str | None = None) -> dict[str, dict]:
    """Per op: the configured default, the backend "auto" resolves to on ``device``
    (default: CUDA when present, else CPU) and, per backend, "available" or why not.

    Per-call constraints (dtype, head size) are not known here; at call time
    "auto" may skip a backend listed as available, e.g. flash_attn for fp32.
    """
    device = _default_device() if device is None else torch.device(device)
    summary = {}
    for op in OPS:
        try:
            resolved = resolve(op, device, AUTO).name
        except RuntimeError as err:
            resolved = f"unavailable ({err})"
        summary[op] = {
            "configured": _DEFAULTS[op],
            "device": str(device),
            "resolved": resolved,
            "backends": _reasons(op, device),
        }
    return summary


def available_backends(device: torch.device | str | None = None) -> dict[str, list[str]]:
    """Per op, the backends that can run on ``device`` (default: CUDA when present, else CPU), best first."""
    device = _default_device() if device is None else torch.device(device)
    return {
        op: [name for name in backend_names(op, device) if _REGISTRY[op][name].environment(device) is None]
        for op in OPS
    }


def _log_once(backend: Backend, device: torch.device) -> None:
    """Log the first use of each (op, backend, device type). Skipped inside torch.compile
    traces, where a logging call would break the graph; ``describe()`` shows the choice."""
    key = (backend.op, backend.name, device.type)
    if key in _LOGGED or torch.compiler.is_compiling():
        return
    _LOGGED.add(key)
    others = {name: why for name, why in _reasons(backend.op, device).items() if name != backend.name}
    logger.info(
        "kernels: %s runs on backend %r on %s (default %r; others: %s)",
        backend.op, backend.name, device.type, _DEFAULTS[backend.op],
        "; ".join(f"{name}: {why}" for name, why in others.items()) or "none registered",
    )


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    backend: str = AUTO,
) -> torch.Tensor:
    """Non-causal multi-head attention softmax(q k^T / sqrt(head_dim)) v.

    Args:
        q: (batch, heads, q_tokens, head_dim), the layout of ``F.scaled_dot_product_attention``.
        k, v: (batch, heads, k_tokens, head_dim).
        key_padding_mask: optional (batch, k_tokens) bool, True = keep the key,
            False = padding that no query attends to. Every sample must keep at
            least one key (a fully padded sample has no defined output).
        backend: "auto" (process default, see ``configure``) or a registered name:
            "torch", "flash_attn", "xformers".

    Returns:
        (batch, heads, q_tokens, head_dim) in the dtype of q.
    """
    torch_ops.check_attention_inputs(q, k, v, key_padding_mask)
    args = (q, k, v, key_padding_mask)
    chosen = resolve("attention", q.device, backend, args)
    _log_once(chosen, q.device)
    return chosen.fn(*args)


def patch_embed(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    patch_size: int | tuple[int, ...] | list[int],
    pos_embed: torch.Tensor | None = None,
    backend: str = AUTO,
) -> torch.Tensor:
    """Non-overlapping patch embedding of a channels-first image or volume.

    Args:
        x: (B, C, H, W) or (B, C, D, H, W); every spatial size divisible by the patch.
        weight: Conv layout, (D_out, C, p, p) or (D_out, C, p, p, p).
        bias: (D_out,) or None.
        patch_size: int (same on every axis) or one int per spatial axis.
        pos_embed: optional (1 or B, num_patches, D_out), added to the tokens.
        backend: "auto" (process default, see ``configure``), "torch" (reshape + linear)
            or "conv" (convolution reference).

    Returns:
        tokens (B, num_patches, D_out), patches in row-major order over the grid.
    """
    patch = torch_ops.normalize_patch_size(patch_size, x.ndim - 2)
    torch_ops.check_patch_embed_inputs(x, weight, bias, patch, pos_embed)
    args = (x, weight, bias, patch, pos_embed)
    chosen = resolve("patch_embed", x.device, backend, args)
    _log_once(chosen, x.device)
    return chosen.fn(*args)


# Built-in backends. A later backend (e.g. Triton) is one more register_backend call.
# SDPA first everywhere: its cuDNN and flash backends are fast on Hopper; the others run when asked for.
register_backend("attention", "torch", torch_ops.sdpa_attention, priority=30, environment=torch_ops.always_available)
register_backend(
    "attention", "xformers", torch_ops.xformers_attention, priority=10,
    environment=torch_ops.xformers_environment, supports=torch_ops.xformers_supports,
)
register_backend(
    "attention", "flash_attn", torch_ops.flash_attn_attention, priority=20,
    environment=torch_ops.flash_attn_environment, supports=torch_ops.flash_attn_supports,
)
register_backend(
    "patch_embed", "torch", torch_ops.linear_patch_embed, priority=10, environment=torch_ops.always_available
)
# The convolution is a reference and a benchmark baseline, never picked by "auto" over "torch".
register_backend("patch_embed", "conv", torch_ops.conv_patch_embed, priority=0, environment=torch_ops.always_available)
