"""Atomic, resumable checkpoints: DeepSpeed state + data position + RNG + config.

The layout (and everything that only reads it) is ``pretrain.storage.checkpoints``.

A checkpoint is written under ``<tag>.partial`` and renamed only after every
rank has finished, so a crash mid-write never leaves a broken "latest".
"""
from __future__ import annotations

import errno
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from pretrain.storage.checkpoints import (
    COMPLETE, LATEST, CheckpointError, NoSpaceError, atomic_write_text, checkpoint_files, checkpoint_problems, file_digest,
    folder_bytes, free_bytes, latest_tag, list_problems, marker_text, show_bytes, step_folders, tag_for,
)

log = logging.getLogger(__name__)

__all__ = ["COMPLETE", "LATEST", "latest_tag", "load_checkpoint", "resume_tag", "save_checkpoint", "tag_for"]

def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _rank_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _from_rank0(value):
    """Rank 0's ``value`` on every rank: decisions taken from files are taken once, so all ranks act alike."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _from_all(value) -> list:
    """Every rank's ``value``, in rank order, on every rank."""
    if not dist.is_initialized():
        return [value]
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def save_checkpoint(
    engine,
    ckpt_dir: str | Path,
    step: int,
    client_state: dict[str, Any],
    rank_state: dict[str, Any],
    config_yaml: str,
    keep: int,
) -> Path:
    """Save on every rank (collective); returns the final checkpoint folder.

    Raises ``NoSpaceError`` on every rank when the checkpoint would not fit or the disk fills while
    writing; the half-written folder is removed and the older checkpoints are untouched.
    """
    ckpt_dir = Path(ckpt_dir)
    rank, world = _rank_world()
    tag = tag_for(step)
    partial = ckpt_dir / f"{tag}.partial"
    needed, shortage = 0, None
    if rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)
        needed, shortage = _space_shortage(engine, ckpt_dir)
    needed, shortage = _from_rank0((needed, shortage))
    if shortage:
        raise NoSpaceError(shortage)

    failure = None
    try:
        engine.save_checkpoint(str(ckpt_dir), tag=partial.name, client_state=client_state, save_latest=False)
        torch.save(dict(rank_state, rng=rng_state()), partial / f"rank{rank:05d}_state.pt")
        if rank == 0:
            (partial / "config.yaml").write_text(config_yaml)
    except Exception as err:  # told to every rank below, so that none waits for the others forever
        failure = err
    reports = _from_all(None if failure is None else _write_failure(failure, rank, partial, needed))
    _stop_on_failure(reports, failure, partial, rank)

    # Every rank's files are written: hash them, each rank its share, for COMPLETE.
    names = _from_rank0(checkpoint_files(partial) if rank == 0 else None)
    try:
        mine = ({name: file_digest(partial / name) for name in names[rank::world]}, None)
    except OSError as err:
        mine = ({}, ("other", f"rank {rank} could not read back {partial}: {err}"))
    shares = _from_all(mine)
    final = ckpt_dir / tag
    outcome = None
    if rank == 0:
        outcome = next((problem for _, problem in shares if problem), None)
        if outcome is None:
            try:
                atomic_write_text(partial / COMPLETE, marker_text(step, {k: v for d, _ in shares for k, v in d.items()}))
                if final.exists():
                    shutil.rmtree(final)
                os.replace(partial, final)
                atomic_write_text(ckpt_dir / LATEST, tag + "\n")
            except OSError as err:
                outcome = _write_failure(err, 0, partial, needed)
        if outcome is None:
            _prune(ckpt_dir, keep)
        else:
            shutil.rmtree(partial, ignore_errors=True)
    outcome = _from_rank0(outcome)
    if outcome:
        raise NoSpaceError(outcome[1]) if outcome[0] == "space" else RuntimeError(outcome[1])
    return final


def _size_estimate(engine, ckpt_dir: Path) -> tuple[int, str]:
    """(bytes, what the guess is): the newest checkpoint's size, else parameters + fp32 masters and Adam moments."""
    previous = step_folders(ckpt_dir)
    if previous:
        return folder_bytes(previous[-1]), f"the size of {previous[-1].name}"
    module = getattr(engine, "module", None)
    params = list(module.parameters()) if module is not None else []
    numel = [getattr(p, "ds_numel", p.numel()) for p in params]  # ZeRO-3 keeps only a shard locally
    total = sum(n * p.element_size() for n, p in zip(numel, params))
    total += 12 * sum(n for n, p in zip(numel, params) if p.requires_grad)
    return total, "its parameters, with an fp32 copy and two Adam moments of the trained ones"


def _space_shortage(engine, ckpt_dir: Path) -> tuple[int, str | None]:
    """(bytes the checkpoint will take, about; a message when fewer are free)."""
    needed, basis = _size_estimate(engine, ckpt_dir)
    free = free_bytes(ckpt_dir)
    if free >= needed:
        return needed, None
    return needed, (f"not enough free space for a checkpoint in {ckpt_dir}: it needs about {show_bytes(needed)} ({basis}), "
            f"{show_bytes(free)} are free; free some space there (or lower train.keep_checkpoints) and run the "
            "same command to resume from the last checkpoint")


_WRITER_FAILURES = ("unexpected pos", "PytorchStreamWriter failed", "file write failed")


def _write_failure(err: Exception, rank: int, partial: Path, needed: int) -> tuple[str, str]:
    """(kind, one-line message) for a failed write: "space" when it reads as a full disk or a file-size limit.

    torch's writer reports a short write as ``[enforce fail at inline_container.cc] unexpected pos``,
    without errno: free space is measured and said, so that the message points at the likely cause.
    """
    first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    code = getattr(err, "errno", None)
    if code not in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT) and not any(m in str(err) for m in _WRITER_FAILURES):
        return "other", f"rank {rank} failed writing {partial}: {type(err).__name__}: {first_line}"
    free = free_bytes(partial.parent)
    why = {errno.EFBIG: "a file went over a file-size limit (ulimit -f, the filesystem's largest file)",
           errno.EDQUOT: "the disk quota is used up"}.get(code, "the disk is full, or a file went over a size "
                                                          "limit (quota, ulimit -f)")
    return "space", (f"writing the checkpoint {partial} failed on rank {rank} ({first_line}): out of space? {why}; "
                     f"{show_bytes(free)} free in {partial.parent}, a checkpoint needs about {show_bytes(needed)}. "
                     "The half-written checkpoint is removed and the older ones are untouched: free some space "
                     "and run the same command to resume")


def _stop_on_failure(reports: list, failure: Exception | None, partial: Path, rank: int) -> None:
    """After the write: when any rank failed, remove the half checkpoint and raise on every rank."""
    failed = [r for r in reports if r is not None]
    if not failed:
        return
    if rank == 0:
        shutil.rmtree(partial, ignore_errors=True)  # gives the failed write's bytes back
    kind, message = next((r for r in failed if r[0] == "space"), failed[0])
    if kind == "space":
        raise NoSpaceError(message) from failure
    if failure is not None:
        raise failure
    raise RuntimeError(message)


def _prune(ckpt_dir: Path, keep: int) -> None:
    # A .partial may hold COMPLETE (crash between the marker and the rename): it is no checkpoint
    # and must not take the place of a real one among the ``keep`` newest.
    complete = step_folders(ckpt_dir)
    for old in complete[: max(0, len(complete) - keep)]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in ckpt_dir.glob("step_*.partial"):
        shutil.rmtree(stale, ignore_errors=True)


def resume_tag(ckpt_dir: str | Path) -> str | None:
    """The checkpoint to resume from, the same on every rank (collective once process groups exist).

    The latest one when its files match the checksums of its ``COMPLETE``; else, with a warning naming
    what is damaged, the newest intact older one, and the damaged ones are moved aside to
    ``<tag>.damaged`` (kept for inspection, out of the way of pruning). None when there is no
    checkpoint; ``CheckpointError`` when none is intact. Each rank checks its share of the files.
    """
    ckpt_dir = Path(ckpt_dir)
    rank, world = _rank_world()
    candidates: list[str] | str = []
    if rank == 0:
        try:
            latest = latest_tag(ckpt_dir)
            candidates = [] if latest is None else [latest] + [
                p.name for p in reversed(step_folders(ckpt_dir)) if int(p.name[5:]) < int(latest[5:])]
        except CheckpointError as err:
            candidates = str(err)
    candidates = _from_rank0(candidates)
    if isinstance(candidates, str):
        raise CheckpointError(candidates)
    damaged: list[tuple[str, list[str]]] = []
    for tag in candidates:
        problems = [p for share in _from_all(checkpoint_problems(ckpt_dir / tag, rank, world)) for p in share]
        if not problems:
            break
        damaged.append((tag, problems))
    else:
        if damaged:
            raise CheckpointError(f"no intact checkpoint in {ckpt_dir}: "
                                  + "; ".join(f"{tag}: {list_problems(problems)}" for tag, problems in damaged))
        return None
    if damaged and rank == 0:
        for bad, problems in damaged:
            aside = next(ckpt_dir / f"{bad}.damaged{n or ''}" for n in range(1000)
                         if not (ckpt_dir / f"{bad}.damaged{n or ''}").exists())
            os.replace(ckpt_dir / bad, aside)
            log.warning("checkpoint %s is damaged (%s): resuming from %s instead; the damaged one is kept as %s",
                        ckpt_dir / bad, list_problems(problems), tag, aside)
        atomic_write_text(ckpt_dir / LATEST, tag + "\n")
    _from_rank0(None)  # no rank reads the folder before rank 0 has moved the damaged ones aside
    return tag


def load_checkpoint(engine, ckpt_dir: str | Path, tag: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load the engine state of ``tag``; returns (client_state, this rank's state) and restores RNG."""
    ckpt_dir = Path(ckpt_dir)
    rank = dist.get_rank() if dist.is_initialized() else 0
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    rank_file = ckpt_dir / tag / f"rank{rank:05d}_state.pt"
    saved = len(list((ckpt_dir / tag).glob("rank*_state.pt")))
    # Checked on every rank from the files alone (no collective), so all ranks fail together
    # instead of some loading and waiting forever for the others; a smaller world would also
    # load silently and then read a different split of the data.
    if saved != world_size or not rank_file.is_file():
        raise RuntimeError(
            f"{ckpt_dir / tag} was saved by {saved} ranks, this run has {world_size}: "
            "resume with the world size it was saved with, or start a new train.run_dir"
        )
    try:
        path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_lr_scheduler_states=False)
        rank_state = torch.load(rank_file, weights_only=False)
    except Exception as err:  # a checkpoint without checksums may still hold a damaged file
        raise CheckpointError(f"{ckpt_dir / tag} cannot be loaded: {type(err).__name__}: {err}") from err
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint {ckpt_dir / tag}")
    set_rng_state(rank_state.pop("rng"))
    log.info("resumed from %s", ckpt_dir / tag)
    return client_state or {}, rank_state
