"""Exact resume: a run SIGKILLed between checkpoints and restarted ends where an uninterrupted one does.

The restart is the very same command in the same run folder: the trainer
finds ``checkpoints/latest`` by itself, restores the DeepSpeed state, the RNG
and the data position (DataLoader worker included), and must then produce,
step for step, the losses of the run that never stopped.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from pretrain.engine.checkpoint import COMPLETE, LATEST
from tests.engine.conftest import RankGroup, loss_curve, read_losses, run_ranks, train_args

pytestmark = pytest.mark.slow  # every test here starts training processes

STEPS = 30
CKPT_EVERY = 10
# Observed: bit-identical losses (difference 0.0) for 1 rank and for 2 ranks with ZeRO-2.
RESUME_ATOL = 1e-6
DETERMINISTIC = [f"train.steps={STEPS}", f"train.ckpt_every={CKPT_EVERY}", "train.deterministic=true",
                 "data.num_workers=1"]


def _latest_step(run_dir: Path) -> int | None:
    pointer = run_dir / "checkpoints" / LATEST
    if not pointer.is_file():
        return None
    return int(pointer.read_text().strip().removeprefix("step_"))


def _past_first_checkpoint(run_dir: Path):
    """True once a checkpoint is complete and training has logged a step after it: time to kill."""

    def ready() -> bool:
        latest = _latest_step(run_dir)
        if latest is None or not (run_dir / "metrics.jsonl").is_file():
            return False
        try:
            return max(read_losses(run_dir), default=0) > latest
        except json.JSONDecodeError:  # caught a line half-written
            return False

    return ready


def _kill_and_resume(config: Path, work: Path, world_size: int, *overrides: str) -> None:
    args = DETERMINISTIC + list(overrides)
    full, crashed = work / "uninterrupted", work / "crashed"
    run_ranks(train_args(config, full, *args), world_size, work).assert_clean()

    group = RankGroup(train_args(config, crashed, *args), world_size, work)
    try:
        assert group.wait(until=_past_first_checkpoint(crashed)), group.results().describe()
    finally:
        group.close()  # SIGKILL to every rank and its DataLoader worker
    resume_at = _latest_step(crashed)
    assert resume_at is not None and resume_at % CKPT_EVERY == 0 and resume_at < STEPS
    assert not (crashed / "summary.json").exists(), "the run finished before it was killed"
    assert (crashed / "checkpoints" / f"step_{resume_at:08d}" / COMPLETE).is_file()
    lost = max(read_losses(crashed)) - resume_at
    assert lost >= 1, "the kill must fall between checkpoints, so that the restart redoes lost steps"

    restarted = run_ranks(train_args(config, crashed, *args), world_size, work)
    restarted.assert_clean()
    assert f"resuming at step {resume_at}" in restarted.outputs[0]

    # read_losses keeps the last record per step: the restart's for every step after resume_at.
    expected, got = loss_curve(full, STEPS), loss_curve(crashed, STEPS)
    diffs = [abs(a - b) for a, b in zip(expected, got)]
    assert max(diffs) <= RESUME_ATOL, (
        f"resumed at {resume_at}: worst step {1 + diffs.index(max(diffs))} differs by {max(diffs):.3e}\n{expected}\n{got}"
    )
    summaries = [json.loads((d / "summary.json").read_text()) for d in (full, crashed)]
    assert [s["steps"] for s in summaries] == [STEPS, STEPS]
    assert abs(summaries[0]["final_loss"] - summaries[1]["final_loss"]) <= RESUME_ATOL
    assert summaries[1]["final_loss"] == pytest.approx(got[-1], abs=1e-12)


def test_sigkilled_run_resumes_exactly_one_process(tiny_yaml: Path, tmp_path: Path):
    _kill_and_resume(tiny_yaml, tmp_path, 1)


def test_sigkilled_run_resumes_exactly_two_processes_zero2(tiny_yaml: Path, tmp_path: Path):
    _kill_and_resume(tiny_yaml, tmp_path, 2, "train.zero_stage=2")
