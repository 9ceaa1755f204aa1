"""Per-step schedules (learning rate, weight decay, momenta, temperatures)."""
from __future__ import annotations

import math


def cosine_with_warmup(step: int, total: int, peak: float, final: float, warmup: int = 0, start: float = 0.0) -> float:
    """Linear warm-up from ``start`` to ``peak`` over ``warmup`` steps, then cosine to ``final`` at ``total``."""
    if warmup > 0 and step < warmup:
        return start + (peak - start) * step / warmup
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    return final + 0.5 * (peak - final) * (1.0 + math.cos(math.pi * progress))


def lr_at(step: int, total: int, optim) -> float:
    """The optimizer's learning rate at ``step`` for an ``OptimConfig``."""
    if optim.schedule == "constant":
        return optim.lr * step / optim.warmup_steps if step < optim.warmup_steps else optim.lr
    return cosine_with_warmup(step, total, optim.lr, optim.min_lr, optim.warmup_steps)
