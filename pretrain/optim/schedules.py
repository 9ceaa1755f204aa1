"""The one schedule mechanism: learning rate, weight decay, EMA momentum, temperatures.

Every per-step value is a :class:`Schedule`: an optional linear warm-up from
``warmup_from`` to ``value``, then ``cosine``, ``linear`` or ``constant`` from
``value`` to ``end`` over the remaining steps. Progress after warm-up is
``(step - warmup) / (total - warmup)``, as DINOv2's and timm's cosine
schedulers count it, so ``end`` is approached, not reached, at the last step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

SHAPES = ("cosine", "linear", "constant")


@dataclass(frozen=True)
class Schedule:
    value: float  # after warm-up
    end: float | None = None  # at the end of training; None: stays at ``value``
    shape: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = 0
    warmup_fraction: float = 0.0  # of the total steps, used when warmup_steps is 0
    warmup_from: float = 0.0

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"Schedule.shape must be one of {SHAPES}, got {self.shape!r}")
        if self.warmup_steps < 0 or not 0.0 <= self.warmup_fraction <= 1.0:
            raise ValueError(f"Schedule: warm-up must be >= 0 steps and a fraction in [0, 1], "
                             f"got {self.warmup_steps} and {self.warmup_fraction}")

    def warmup(self, total: int) -> int:
        return self.warmup_steps or int(self.warmup_fraction * total)

    def __call__(self, step: int, total: int) -> float:
        warmup = self.warmup(total)
        if step < warmup:
            return self.warmup_from + (self.value - self.warmup_from) * step / warmup
        end = self.value if self.end is None or self.shape == "constant" else self.end
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if self.shape == "linear":
            return self.value + (end - self.value) * progress
        return end + 0.5 * (self.value - end) * (1.0 + math.cos(math.pi * progress))


def optimizer_schedules(optim) -> dict[str, Schedule]:
    """Learning rate and weight decay of an ``OptimConfig``, the peaks the group scales multiply."""
    wd_end = optim.weight_decay if optim.weight_decay_end is None else optim.weight_decay_end
    return {
        "lr": Schedule(optim.lr, optim.min_lr, optim.schedule, warmup_steps=optim.warmup_steps),
        "weight_decay": Schedule(optim.weight_decay, wd_end, "cosine"),
    }
