"""Continued pretraining: start a ``VisionTransformer`` from existing weights.

Public DINOv2 / timm ViTs are RGB at 224 (or 518) px with patch 14 or 16; our
users train on 1-channel X-rays, other sizes and other patches. This module
reads such weights (timm files, DINOv2 checkpoints, MONAI ViT / UNETR weights, our
exports and DeepSpeed checkpoints), maps them onto our names (timm's), adapts what can be adapted
exactly or in a documented way, and reports everything else instead of letting
a wrong prefix or a foreign architecture load silently.

Adaptations:

- Input channels (``patch_embed.proj.weight``, (O, C, *k)): to fewer channels
  each source channel c is summed into target channel c % C (3 -> 1: the sum
  over RGB); to more channels target channel c copies source channel c % C_src
  divided by how many target channels copy it (1 -> 3: repeat / 3). Either
  way an image whose channels are all equal gets exactly the source's response
  to the same grey image repeated on its channels.
- Patch size: FlexiViT's pseudo-inverse resize. With M the (linear) bilinear /
  trilinear resize of a source patch to the new patch size, the new kernel w'
  solves M w' = w in the least-squares / least-norm sense, so the resized
  model gives a patch resized by M the source's embedding of the original
  patch: exactly when the patch grows (14 -> 16), best in L2 when it shrinks.
  Plain interpolation of the kernel would change the embedding's scale and
  frequency response instead.
- Position embedding (learned): the patch rows are resampled to the model's
  grid as ``VisionTransformer`` itself does (bicubic 2D, trilinear 3D); the
  class row is copied; register rows are copied when the source's table has
  them, else zero (DINOv2 and timm's ``no_embed_class`` give registers, and
  there the class token too, no position). A sin-cos model keeps its table.
- 2D weights into a 3D model (kernel inflation) is not supported: ValueError.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from pretrain.storage.checkpoints import COMPLETE, fp32_state_dict, resolve_checkpoint
from pretrain.models.pos_embed import resample_pos_embed
from pretrain.models.vit import VisionTransformer

WEIGHTS = "model.safetensors"  # the file tools/export writes, beside config.json
CONTAINERS = ("teacher", "model", "state_dict", "module")
# "teacher" before "student": DINO-style methods evaluate (and release) the EMA teacher.
PREFIXES = ("", "teacher.backbone.", "student.backbone.", "backbone.", "encoder.",
            "module.", "module.backbone.", "module.encoder.", "vit.")
PATCH_WEIGHT = "patch_embed.proj.weight"


# ---------------------------------------------------------------------------------- reading


def read_state_dict(source: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a weights file, an export / hub folder, a checkpoint folder or a run directory.

    Files: ``.safetensors``; ``.pth``/``.pt``/``.bin`` through ``torch.load(weights_only=True)``
    with common containers unwrapped ({"teacher"|"model"|"state_dict"|"module": ...}).
    Folders: ``model.safetensors`` (our export, timm hub) or ``pytorch_model.bin``; else a
    DeepSpeed checkpoint (``pretrain.engine.checkpoint.fp32_state_dict``) (``step_*`` folder with COMPLETE,
    a ``checkpoints/`` folder or a run directory holding one), keys of the whole objective.
    """
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if path.is_file():
        return _read_file(path)
    for name in (WEIGHTS, "pytorch_model.bin"):
        if (path / name).is_file():
            return _read_file(path / name)
    try:
        ckpt = resolve_checkpoint(path)
    except FileNotFoundError:
        found = sorted(p.name for p in path.iterdir())[:10]
        raise FileNotFoundError(
            f"{path}: found {found}; expected {WEIGHTS}, pytorch_model.bin, a checkpoint folder with "
            f"{COMPLETE}, or a run directory / checkpoints folder with 'latest'"
        ) from None
    return fp32_state_dict(ckpt)


def _read_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return load_file(str(path))
    if path.suffix not in (".pth", ".pt", ".bin"):
        raise ValueError(f"{path}: unsupported weights file; expected .safetensors, .pth, .pt or .bin")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle errors come in many types; all mean the same here
        raise ValueError(f"{path}: cannot be read with torch.load(weights_only=True): {err}") from err
    while isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        inner = next((k for k in CONTAINERS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj = obj[inner]
    state = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)} if isinstance(obj, dict) else {}
    if not state:
        found = sorted(obj)[:10] if isinstance(obj, dict) else type(obj).__name__
        raise ValueError(f"{path}: no state dict of tensors found (top level: {found}; containers tried: {CONTAINERS})")
    return state


# MONAI's ViT (our MONAI exports, UNETR's ``vit.``) -> timm's names; its position table has no class row
_MONAI_NAMES = (("patch_embedding.patch_embeddings.", "patch_embed.proj."),
                ("patch_embedding.position_embeddings", "pos_embed"), (".attn.out_proj.", ".attn.proj."),
                (".mlp.linear1.", ".mlp.fc1."), (".mlp.linear2.", ".mlp.fc2."))


def _rename(key: str) -> str:
    """DINOv2's official names and MONAI's ViT names -> timm's (ours)."""
    key = re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", key)  # FSDP block chunks: blocks.<chunk>.<index>.
    key = re.sub(r"\.mlp\.w12\.", ".mlp.fc1.", key)  # packed SwiGLU, gate first
    key = re.sub(r"\.mlp\.w3\.", ".mlp.fc2.", key)
    for theirs, ours in _MONAI_NAMES:
        key = key.replace(theirs, ours)
    return "reg_token" if key == "register_tokens" else key


def _detect_prefix(keys: list[str], target: set[str]) -> str:
    def hits(prefix: str) -> int:
        names = (_rename(k[len(prefix):]) for k in keys if k.startswith(prefix))
        return sum(n in target or n.replace(".mlp.fc1.", ".mlp.fc1_g.") in target for n in names)

    scores = [hits(p) for p in PREFIXES]
    return PREFIXES[scores.index(max(scores))]


def _adapt_channels(w: torch.Tensor, chans: int) -> torch.Tensor:
    src = w.shape[1]
    if chans < src:
        out = w.new_zeros(w.shape[0], chans, *w.shape[2:])
        for c in range(src):
            out[:, c % chans] += w[:, c]
        return out
    copies = torch.tensor([len(range(c, chans, src)) for c in range(src)], dtype=w.dtype)
    scaled = w / copies.view(1, src, *([1] * (w.ndim - 2)))
    return scaled[:, [c % src for c in range(chans)]]


def _resize_kernel(w: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """FlexiViT pseudo-inverse resize of the kernel's spatial axes (see the module docstring)."""
    old = tuple(w.shape[2:])
    n_old = math.prod(old)
    basis = torch.eye(n_old, dtype=torch.float64).reshape(n_old, 1, *old)
    mode = "bilinear" if len(old) == 2 else "trilinear"
    resize = F.interpolate(basis, size=size, mode=mode, align_corners=False).reshape(n_old, -1)
    new = w.double().reshape(-1, n_old) @ torch.linalg.pinv(resize).T
    return new.reshape(*w.shape[:2], *size).to(w.dtype)


def _root_grid(count: int, dims: int) -> tuple[int, ...] | None:
    side = round(count ** (1 / dims))
    return (side,) * dims if count > 0 and side**dims == count else None


def _adapt_pos_embed(src: torch.Tensor, state: dict, model: VisionTransformer, report: dict) -> torch.Tensor | None:
    target = model.pos_embed
    if src.ndim != 3 or src.shape[-1] != target.shape[-1]:
        report["dropped"]["pos_embed"] = f"shape {tuple(src.shape)} does not fit the model's {tuple(target.shape)}"
        return None
    src_regs = state["reg_token"].shape[1] if "reg_token" in state else 0
    has_cls = int("cls_token" in state)
    num_patches, grid = math.prod(model.native_grid), model.native_grid
    # Which rows lead the table: cls + registers (timm default), cls only (DINOv2), none (no_embed_class).
    for rows in dict.fromkeys((has_cls + src_regs, has_cls, 0)):
        count = src.shape[1] - rows
        src_grid = grid if count == num_patches else _root_grid(count, len(grid))
        if src_grid is not None:
            break
    else:
        report["dropped"]["pos_embed"] = f"{src.shape[1]} rows fit no patch grid for grid {grid}"
        return None
    out = target.detach().new_zeros(target.shape).float()
    out[:, model.num_prefix_tokens :] = resample_pos_embed(src[:, rows:].float(), src_grid, grid, num_prefix=0)
    if has_cls and rows >= 1:
        out[:, 0] = src[:, 0]
    model_regs = model.num_prefix_tokens - 1
    if rows == 1 + src_regs and src_regs == model_regs:
        out[:, 1 : 1 + model_regs] = src[:, 1:rows]
    if tuple(src.shape) != tuple(out.shape) or src_grid != grid:
        how = f"patch grid {src_grid} -> {grid}; {rows} prefix rows -> {model.num_prefix_tokens}"
        report["adapted"]["pos_embed"] = {"from": tuple(src.shape), "to": tuple(out.shape), "how": how}
    return out


def _adapt_patch_weight(w: torch.Tensor, target: torch.Tensor, report: dict) -> torch.Tensor | None:
    if w.ndim != target.ndim:
        raise ValueError(
            f"{PATCH_WEIGHT}: source {tuple(w.shape)} is {w.ndim - 2}-D, the model's {tuple(target.shape)} is "
            f"{target.ndim - 2}-D; inflating 2D weights to 3D (or back) is not supported"
        )
    if w.shape[0] != target.shape[0]:
        report["dropped"][PATCH_WEIGHT] = f"shape {tuple(w.shape)} vs the model's {tuple(target.shape)}"
        return None
    steps, out = [], w.float()
    if out.shape[1] != target.shape[1]:
        out = _adapt_channels(out, target.shape[1])
        steps.append(f"channels {w.shape[1]} -> {target.shape[1]}")
    if out.shape[2:] != target.shape[2:]:
        out = _resize_kernel(out, tuple(target.shape[2:]))
        steps.append(f"patch {tuple(w.shape[2:])} -> {tuple(target.shape[2:])} (pseudo-inverse resize)")
    if steps:
        report["adapted"][PATCH_WEIGHT] = {"from": tuple(w.shape), "to": tuple(out.shape), "how": "; ".join(steps)}
    return out


def _split_packed_swiglu(state: dict, target: dict) -> None:
    """timm's packed / DINOv2's fused SwiGLU ``mlp.fc1`` (2H rows, gate first) -> our fc1_g and fc1_x."""
    for key in [k for k in state if ".mlp.fc1." in k]:
        gate = key.replace(".mlp.fc1.", ".mlp.fc1_g.")
        if gate in target and key not in target and state[key].shape[0] == 2 * target[gate].shape[0]:
            state[gate], state[key.replace(".mlp.fc1.", ".mlp.fc1_x.")] = state.pop(key).chunk(2, dim=0)


def adapt_state_dict(
    state: dict[str, torch.Tensor], model: VisionTransformer, *, prefix: str | None = None
) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict for ``model.load_state_dict(strict=False)``, report); see the module docstring.

    ``prefix``: the wrapper prefix to strip; None picks the one of ``PREFIXES`` under which the
    most keys match the model. The report holds "prefix", "loaded" (count), "adapted"
    ({key: {"from", "to", "how"}}), "dropped" ({source key: reason}) and "missing" (model
    keys the result lacks; a sin-cos ``pos_embed`` is not missing, it is kept by design).
    """
    target = model.state_dict()
    report: dict = {"prefix": prefix, "loaded": 0, "adapted": {}, "dropped": {}, "missing": []}
    if prefix is None:
        prefix = report["prefix"] = _detect_prefix(list(state), set(target))
    renamed: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith(prefix):
            renamed[_rename(key[len(prefix):])] = value
        else:
            report["dropped"][key] = f"outside prefix {prefix!r}"
    _split_packed_swiglu(renamed, target)

    out: dict[str, torch.Tensor] = {}
    for key, value in renamed.items():
        if key not in target:
            report["dropped"][key] = "not in the model"
        elif key == "pos_embed" and model.cfg.pos_embed == "sincos":
            report["dropped"][key] = "pos_embed kept as sincos"
        elif key == "pos_embed":
            out[key] = _adapt_pos_embed(value, renamed, model, report)
        elif key == PATCH_WEIGHT:
            out[key] = _adapt_patch_weight(value, target[key], report)
        elif value.shape != target[key].shape:
            report["dropped"][key] = f"shape {tuple(value.shape)} vs the model's {tuple(target[key].shape)}"
        else:
            out[key] = value
    out = {k: v.to(target[k].dtype) for k, v in out.items() if v is not None}
    skip = {"pos_embed"} if model.cfg.pos_embed == "sincos" else set()
    report["missing"] = [k for k in target if k not in out and k not in skip]
    report["loaded"] = len(out)
    return out, report


def load_pretrained(model: VisionTransformer, source: str | Path, *, prefix: str | None = None) -> dict:
    """Read ``source``, adapt it to ``model``, load it (strict=False) and return the report.

    ValueError naming ``source`` when it cannot be adapted or when fewer than half of the
    model's block parameters would load (a wrong prefix or another architecture); the model
    is left untouched then.
    """
    state = read_state_dict(source)
    try:
        adapted, report = adapt_state_dict(state, model, prefix=prefix)
    except ValueError as err:
        raise ValueError(f"{source}: {err}") from err
    blocks = [k for k in model.state_dict() if k.startswith("blocks.")]
    loaded = sum(k in adapted for k in blocks)
    if loaded * 2 < len(blocks):
        raise ValueError(
            f"{source}: only {loaded} of the model's {len(blocks)} block parameters match under prefix "
            f"{report['prefix']!r} (source keys start {sorted(state)[:5]}; dropped e.g. "
            f"{dict(list(report['dropped'].items())[:3])}); pass the right prefix or a matching architecture"
        )
    model.load_state_dict(adapted, strict=False)
    report["source"] = str(source)
    return report
