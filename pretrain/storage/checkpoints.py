"""Reading the checkpoint layout, without DeepSpeed engines or process groups.

Layout of ``<run_dir>/checkpoints``::

    step_00000100/            DeepSpeed files, rank<r>_state.pt (RNG, data position), config.yaml, COMPLETE
    latest                    name of the newest complete checkpoint (replaced atomically)

``COMPLETE`` holds the step on its first line, then one line ``<sha256> <bytes> <file>`` per file of
the checkpoint (every rank's), so that a truncated, damaged or missing file is found before it is
loaded. Checkpoints written before the checksums hold the step alone; they are checked for the
files every rank must have written (``layout_problems``).

The trainer writes it (``pretrain.engine.checkpoint``); weight loading, export
and evaluation only read it, through this module.
"""
from __future__ import annotations

import errno
import hashlib
import logging
import os
import re
from pathlib import Path

import torch

LATEST = "latest"
COMPLETE = "COMPLETE"
_STEP_FOLDER = re.compile(r"step_(\d{8})")
# DeepSpeed's per-rank files, e.g. zero_pp_rank_1_mp_rank_00_optim_states.pt or bf16_zero_pp_rank_0_...
_RANK_FILE = re.compile(r"(.*zero_pp_rank_)(\d+)(_mp_rank_\d+_(?:optim|model)_states\.pt)")
_OUR_RANK_FILE = re.compile(r"rank(\d{5})_state\.pt")
_HASH_CHUNK = 1 << 20
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
    complete = [p.name for p in step_folders(ckpt_dir)]
    if not complete:
        raise CheckpointError(f"{pointer} {problem} in {ckpt_dir}, and no other checkpoint there is complete: "
                              f"remove {ckpt_dir} to start the run over")
    logger.warning("%s %s: using %s, the newest complete checkpoint in %s", pointer, problem, complete[-1], ckpt_dir)
    return complete[-1]


def step_folders(ckpt_dir: Path) -> list[Path]:
    """The complete ``step_*`` folders of ``ckpt_dir``, oldest first (not ``.partial`` nor moved-aside ones)."""
    found = [p for p in ckpt_dir.iterdir() if _STEP_FOLDER.fullmatch(p.name) and (p / COMPLETE).is_file()]
    return sorted(found, key=lambda p: int(p.name[5:]))


# --- checksums ---------------------------------------------------------------------------------

def checkpoint_files(folder: Path) -> list[str]:
    """Every file of a checkpoint folder but ``COMPLETE``, as sorted relative paths."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != COMPLETE)


def file_digest(path: Path) -> tuple[int, str]:
    """(size in bytes, sha256 hex) of one file."""
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


def marker_text(step: int, digests: dict[str, tuple[int, str]]) -> str:
    return f"{step}\n" + "".join(f"{sha} {size} {name}\n" for name, (size, sha) in sorted(digests.items()))


def read_marker(folder: Path) -> tuple[int, dict[str, tuple[int, str]] | None]:
    """(step, {file: (size, sha256)}) of a checkpoint's ``COMPLETE``; None for a checkpoint without checksums."""
    marker = folder / COMPLETE
    try:
        lines = marker.read_text(encoding="utf-8").splitlines()
        step = int(lines[0].strip() or 0) if lines else 0
        digests = {}
        for line in lines[1:]:
            sha, size, name = line.split(" ", 2)
            digests[name] = (int(size), sha)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{marker} is damaged ({e})") from None
    return step, (digests if len(lines) > 1 else None)


def file_problems(folder: Path, digests: dict[str, tuple[int, str]], names: list[str]) -> list[str]:
    """What is wrong with the files ``names`` of ``folder`` against the checksums of its ``COMPLETE``."""
    problems = []
    for name in names:
        size, sha = digests[name]
        path = folder / name
        try:
            if path.stat().st_size != size:
                problems.append(f"{path} has {path.stat().st_size} bytes, {size} were written")
            elif file_digest(path)[1] != sha:
                problems.append(f"{path} does not match its checksum")
        except FileNotFoundError:
            problems.append(f"{path} is missing")
        except OSError as e:
            problems.append(f"{path} cannot be read ({e})")
    return problems


def layout_problems(folder: Path) -> list[str]:
    """Files a checkpoint without checksums lacks: DeepSpeed's model states, and each per-rank file for
    every rank that saved (one rank's optimizer shard deleted would otherwise export without a word)."""
    names = [p.name for p in folder.iterdir()]
    has_model = any(n.endswith("model_states.pt") for n in names)
    problems = [] if has_model else [f"{folder / 'mp_rank_00_model_states.pt'} is missing (no *model_states.pt)"]
    ranks = sorted(int(m.group(1)) for n in names if (m := _OUR_RANK_FILE.fullmatch(n)))
    families: dict[tuple[str, str], set[int]] = {}
    for n in names:
        if m := _RANK_FILE.fullmatch(n):
            families.setdefault((m.group(1), m.group(3)), set()).add(int(m.group(2)))
    world = max([len(ranks), *(max(r) + 1 for r in families.values())]) if (ranks or families) else 0
    expected = set(range(world))
    if ranks:
        problems += [f"{folder / f'rank{r:05d}_state.pt'} is missing" for r in sorted(expected - set(ranks))]
    for (head, tail), present in sorted(families.items()):
        problems += [f"{folder / f'{head}{r}{tail}'} is missing" for r in sorted(expected - present)]
    return problems


def checkpoint_problems(folder: Path, rank: int = 0, world: int = 1) -> list[str]:
    """What is wrong with a checkpoint folder; empty when it is intact.

    With ``world`` > 1, the part ``rank`` checks: every ``world``-th file, the marker and the layout on rank 0.
    """
    try:
        _, digests = read_marker(folder)
    except CheckpointError as e:
        return [str(e)] if rank == 0 else []
    if digests is None:
        return layout_problems(folder) if rank == 0 else []
    return file_problems(folder, digests, sorted(digests)[rank::world])


def resolve_checkpoint(source: str | Path) -> Path:
    """A run directory (its latest checkpoint), a checkpoints folder, or one checkpoint folder; verified.

    A damaged checkpoint (a file truncated, changed or missing) is a ``CheckpointError`` naming the files
    and the newest intact one: an export or evaluation never quietly uses older weights than asked for.
    """
    source = Path(source)
    for root in (None, source / "checkpoints", source):
        if root is None:
            ckpt = source if (source / COMPLETE).is_file() else None
        else:
            ckpt = root / latest_tag(root) if (root / LATEST).is_file() else None
        if ckpt is None:
            continue
        problems = checkpoint_problems(ckpt)
        if not problems:
            return ckpt
        intact = next(iter(intact_older(ckpt)), None)
        hint = f"; the newest intact checkpoint is {intact}: give that folder to use it" if intact else ""
        raise CheckpointError(f"{ckpt} is damaged: {list_problems(problems)}{hint}")
    raise FileNotFoundError(f"{source}: no complete checkpoint (expected a run dir, its checkpoints/ or a step_* folder)")


def intact_older(ckpt: Path):
    """The intact complete checkpoints beside ``ckpt`` older than it, newest first (checked lazily)."""
    if not _STEP_FOLDER.fullmatch(ckpt.name):
        return
    for p in reversed(step_folders(ckpt.parent)):
        if int(p.name[5:]) < int(ckpt.name[5:]) and not checkpoint_problems(p):
            yield p


def list_problems(problems: list[str], first: int = 3) -> str:
    more = f" (and {len(problems) - first} more)" if len(problems) > first else ""
    return "; ".join(problems[:first]) + more


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


# --- free space --------------------------------------------------------------------------------

class NoSpaceError(OSError):
    """A checkpoint does not fit where it is written (errno ENOSPC); the message names the folder and the bytes."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.ENOSPC, message)

    def __str__(self) -> str:
        return self.strerror


def free_bytes(folder: Path) -> int:
    """Bytes an unprivileged process may still write on ``folder``'s filesystem."""
    st = os.statvfs(folder)
    return st.f_bavail * st.f_frsize


def folder_bytes(folder: Path) -> int:
    return sum((folder / name).stat().st_size for name in checkpoint_files(folder))


def show_bytes(n: int) -> str:
    """``2.8 MB (2752891 bytes)``: readable, and exact for whoever compares it with ``df -B1``."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit} ({n} bytes)"
    return f"{n} bytes"
