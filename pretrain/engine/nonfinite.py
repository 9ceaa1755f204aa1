"""When training stops being finite: skip, roll back, or stop with a diagnosis.

A step whose loss is NaN or inf on some rank is skipped by every rank (the
trainer's backward). One such step is noise; several in a row mean the weights
or the optimizer's moments are already broken, and every later step would be
skipped too: the run would "finish" with exit 0 having learned nothing. The
guard turns that into one of two outcomes:

- **roll back** (``train.nonfinite_in_a_row`` skipped steps in a row, or
  non-finite weights found before a checkpoint): reload the last checkpoint and
  go on past the batches that led to the divergence, as PaLM's training did
  after loss spikes, with the lr times ``train.rollback_lr_scale`` (cumulative);
  at most ``train.max_rollbacks`` times.
- **stop** (rollbacks used up, no checkpoint to go back to, or more than
  ``train.max_skipped_fraction`` of the steps skipped): :class:`TrainingDiverged`,
  which the command line shows as one message with exit code 6. The run's
  checkpoints are left as they were: none holds non-finite weights.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.distributed as dist

# Below this many steps a skipped share is too noisy to stop a run on.
MIN_STEPS_TO_JUDGE = 20


class TrainingDiverged(RuntimeError):
    """The run cannot go on with finite weights; the message says what was seen and what to change."""


def weights_finite(params: Iterable[torch.Tensor], device: torch.device, world_size: int) -> bool:
    """Whether every weight is finite on every rank (all-reduced: ZeRO-3 ranks hold different partitions)."""
    flags = [torch.isfinite(p.detach()).all() for p in params if p.numel()]
    ok = torch.stack(flags).all() if flags else torch.tensor(True)
    ok = ok.to(device=device, dtype=torch.int32).reshape(1)
    if world_size > 1:
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item())


class NonFiniteGuard:
    """Counts skipped steps and says when to roll back; the rollbacks themselves live in the run's history
    (``history["rollbacks"]``), so a resumed run knows how many it has used."""

    def __init__(self, nonfinite_in_a_row: int, max_rollbacks: int, lr_scale: float, max_skipped_fraction: float,
                 hint: str = "") -> None:
        self.nonfinite_in_a_row, self.max_rollbacks = nonfinite_in_a_row, max_rollbacks
        self.lr_scale, self.max_skipped_fraction = lr_scale, max_skipped_fraction
        self.hint = hint
        self.in_a_row = 0

    def after_step(self, step: int, skipped: bool, history: dict[str, Any]) -> str | None:
        """After optimizer step ``step`` (1-based): a rollback reason, or None to go on. Raises
        :class:`TrainingDiverged` when too many of the steps so far were skipped."""
        self.in_a_row = self.in_a_row + 1 if skipped else 0
        total = int(history.get("skipped_nonfinite", 0))
        if step >= MIN_STEPS_TO_JUDGE and total > self.max_skipped_fraction * step:
            raise TrainingDiverged(
                f"{total} of the first {step} steps had a non-finite loss and were skipped, more than "
                f"train.max_skipped_fraction={self.max_skipped_fraction:g}; {self.hint}")
        if self.in_a_row >= self.nonfinite_in_a_row:
            return f"{self.in_a_row} steps in a row (to step {step}) had a non-finite loss"
        return None

    def rollback_allowed(self, reason: str, history: dict[str, Any], checkpoint_step: int | None) -> None:
        """Raise :class:`TrainingDiverged` unless the run may roll back to ``checkpoint_step``."""
        used = len(history.get("rollbacks", []))
        if checkpoint_step is None:
            raise TrainingDiverged(f"{reason}, and the run has no checkpoint to roll back to; {self.hint}")
        if used >= self.max_rollbacks:
            raise TrainingDiverged(f"{reason}, after {used} rollback(s) (train.max_rollbacks={self.max_rollbacks}); "
                                   f"the checkpoints up to step {checkpoint_step} hold finite weights; {self.hint}")

    def lr_factor(self, history: dict[str, Any]) -> float:
        """The lr multiplier after the rollbacks recorded in ``history``."""
        return self.lr_scale ** len(history.get("rollbacks", []))

    def reset(self) -> None:
        self.in_a_row = 0
