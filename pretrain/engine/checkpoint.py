"""Atomic, resumable checkpoints: DeepSpeed state + data position + RNG + config.

The layout (and everything that only reads it) is ``pretrain.storage.checkpoints``.

A checkpoint is written under ``<tag>.partial`` and renamed only after every
rank has finished, so a crash mid-write never leaves a broken "latest".
"""
from __future__ import annotations

import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from pretrain.storage.checkpoints import COMPLETE, LATEST, atomic_write_text, latest_tag, tag_for

log = logging.getLogger(__name__)

__all__ = ["COMPLETE", "LATEST", "latest_tag", "load_checkpoint", "save_checkpoint", "tag_for"]

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


def save_checkpoint(
    engine,
    ckpt_dir: str | Path,
    step: int,
    client_state: dict[str, Any],
    rank_state: dict[str, Any],
    config_yaml: str,
    keep: int,
) -> Path:
    """Save on every rank (collective); returns the final checkpoint folder."""
    ckpt_dir = Path(ckpt_dir)
    rank = dist.get_rank() if dist.is_initialized() else 0
    tag = tag_for(step)
    partial = f"{tag}.partial"
    if rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(ckpt_dir / partial, ignore_errors=True)
    _barrier()
    engine.save_checkpoint(str(ckpt_dir), tag=partial, client_state=client_state, save_latest=False)
    torch.save(dict(rank_state, rng=rng_state()), ckpt_dir / partial / f"rank{rank:05d}_state.pt")
    _barrier()
    final = ckpt_dir / tag
    if rank == 0:
        (ckpt_dir / partial / "config.yaml").write_text(config_yaml)
        atomic_write_text(ckpt_dir / partial / COMPLETE, f"{step}\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(ckpt_dir / partial, final)
        atomic_write_text(ckpt_dir / LATEST, tag + "\n")
        _prune(ckpt_dir, keep)
    _barrier()
    return final


def _prune(ckpt_dir: Path, keep: int) -> None:
    # A .partial may hold COMPLETE (crash between the marker and the rename): it is no checkpoint
    # and must not take the place of a real one among the ``keep`` newest.
    complete = sorted(p for p in ckpt_dir.glob("step_*") if p.suffix != ".partial" and (p / COMPLETE).is_file())
    for old in complete[: max(0, len(complete) - keep)]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in ckpt_dir.glob("step_*.partial"):
        shutil.rmtree(stale, ignore_errors=True)


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
    path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_lr_scheduler_states=False)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint {ckpt_dir / tag}")
    rank_state = torch.load(rank_file, weights_only=False)
    set_rng_state(rank_state.pop("rng"))
    log.info("resumed from %s", ckpt_dir / tag)
    return client_state or {}, rank_state
