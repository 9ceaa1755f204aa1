"""Objectives: one module each, registered with ``pretrain.config.registry``."""
from __future__ import annotations

from typing import Any

from pretrain.config.registry import objective_entry
from pretrain.objectives.base import BuildContext


def build_objective(run_cfg: Any, ctx: BuildContext | None = None):
    """The objective ``nn.Module`` for a resolved RunConfig (``ctx``: a single CPU process by default)."""
    return objective_entry(run_cfg.objective.name).build(run_cfg, ctx or BuildContext())
