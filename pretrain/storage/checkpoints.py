"""Reading the checkpoint layout, without DeepSpeed engines or process groups.

Layout of ``<run_dir>/checkpoints``::

    step_00000100/            DeepSpeed files, rank<r>_state.pt (RNG, data position), config.yaml, COMPLETE
    latest                    name of the newest complete checkpoint (replaced atomically)

The trainer writes it (``pretrain.engine.checkpoint``); weight loading, export
and evaluation only read it, through this module.
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import torch

LATEST = "latest"
COMPLETE = "COMPLETE"
_STEP_FOLDER = re.compile(r"step_(\d{8})")
logger = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A run's checkpoints cannot be read as asked; the message names the folder or file."""


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that a reader sees the old or the new content, never a part."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def latest_tag(ckpt_dir: str | Path) -> str | None:
    """The newest complete checkpoint's tag, or None when there is none.

    ``latest`` names it. A pointer that cannot be read or names no complete checkpoint (a damaged disk,
    a hand edit) falls back, with a warning, to the newest ``step_*`` folder holding ``COMPLETE``; with
    none, ``CheckpointError`` says so rather than starting the run over.
    """
    ckpt_dir = Path(ckpt_dir)
    pointer = ckpt_dir / LATEST
    if not pointer.is_file():
        return None
    try:
        tag = pointer.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        tag, problem = None, f"is not readable ({e})"
    else:
        problem = f"names {tag!r}, which is not a complete checkpoint"
    if tag and _STEP_FOLDER.fullmatch(tag) and (ckpt_dir / tag / COMPLETE).is_file():
        return tag
    complete = sorted((p.name for p in ckpt_dir.iterdir() if _STEP_FOLDER.fullmatch(p.name) and (p / COMPLETE).is_file()),
                      key=lambda name: int(name[5:]))
    if not complete:
        raise CheckpointError(f"{pointer} {problem} in {ckpt_dir}, and no other checkpoint there is complete: "
                              f"remove {ckpt_dir} to start the run over")
    logger.warning("%s %s: using %s, the newest complete checkpoint in %s", pointer, problem, complete[-1], ckpt_dir)
    return complete[-1]


def resolve_checkpoint(source: str | Path) -> Path:
    """A run directory (its latest checkpoint), a checkpoints folder, or one checkpoint folder."""
    source = Path(source)
    if (source / COMPLETE).is_file():
        return source
    for root in (source / "checkpoints", source):
        if (root / "latest").is_file():
            return root / latest_tag(root)
    raise FileNotFoundError(f"{source}: no complete checkpoint (expected a run dir, its checkpoints/ or a step_* folder)")


def fp32_state_dict(ckpt: Path) -> dict[str, torch.Tensor]:
    """The objective's full state dict in fp32 from a DeepSpeed checkpoint folder."""
    model_states = next(iter(sorted(ckpt.glob("*mp_rank_00_model_states.pt"))), None)
    module = torch.load(model_states, map_location="cpu", weights_only=False)["module"] if model_states else {}
    if any(ckpt.glob("*optim_states.pt")):  # ZeRO 1-3 (and bf16) keep fp32 masters in optimizer shards
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
        # Frozen tensors (fixed position tables) are not in the optimizer; ZeRO-1 leaves them
        # out of the reconstruction, but the model states hold them whole.
        for key, value in module.items():
            if key not in state and isinstance(value, torch.Tensor) and value.numel():
                state[key] = value
    else:
        state = module
    return {k: v.float().contiguous() for k, v in state.items()}
