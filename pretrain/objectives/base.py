"""The objective contract: everything the trainer may ask of a method.

An objective is one module in ``pretrain/objectives`` defining ``NAME``,
``Config`` (a dataclass with a ``name`` field) and ``build(run_cfg)``. It owns
every module of its method (backbone, heads, teacher, text tower). The trainer
knows nothing about any single method.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn


class Objective(nn.Module):
    """Base class; subclasses implement the CPU side, the loss and the hooks."""

    #: pooling of the encoder's tokens that suits this method's features in kNN eval
    eval_pool: str = "cls"

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype DeepSpeed gave the parameters (bf16/fp16/fp32); inputs are cast to it."""
        return next(self.parameters()).dtype

    # --- CPU side: runs in DataLoader workers, must not touch parameters -------------
    def transform(self, sample: dict[str, Any]) -> dict[str, Any]:
        """One decoded sample -> model-ready tensors; randomness from ``sample['__seed__']``."""
        raise NotImplementedError(f"{type(self).__name__} must define transform()")

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        """A list of transformed samples -> one batch."""
        raise NotImplementedError(f"{type(self).__name__} must define collate()")

    # --- device side -------------------------------------------------------------------
    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:  # type: ignore[override]
        """``{"loss": scalar, <part>: scalar, ...}``; every entry is logged."""
        raise NotImplementedError(f"{type(self).__name__} must define forward()")

    def set_progress(self, step: int, total_steps: int) -> None:
        """Called before every optimizer step: per-step schedules (temperatures, momenta)."""

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """No-grad updates after the optimizer step (EMA teacher, centers)."""

    def encoder(self) -> nn.Module:
        """The backbone that export uses (and evaluation, unless ``eval_encoders`` says more)."""
        raise NotImplementedError(f"{type(self).__name__} must define encoder()")

    def eval_encoders(self) -> dict[str, nn.Module]:
        """Encoders to evaluate by name; the first is the run's headline (e.g. teacher and student)."""
        return {"": self.encoder()}

    def rank_state(self) -> dict[str, Any]:
        """State of this rank that DeepSpeed does not checkpoint (e.g. fp32 teacher shards)."""
        return {}

    def load_rank_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`rank_state` returned, after the engine's own state is loaded."""

    def restore_from_rank_states(self, states: list[dict[str, Any]]) -> set[str]:
        """Outside training (export, eval): rebuild full tensors from every rank's :meth:`rank_state`.

        Returns the parameter names (as in ``state_dict``) it restored.
        """
        return set()

    def flops_per_sample(self) -> float:
        """Model FLOPs (forward + backward) per training sample, for MFU."""
        raise NotImplementedError(f"{type(self).__name__} must define flops_per_sample()")

    def tokens_per_sample(self) -> int:
        """Tokens the backbone processes per sample, for tokens/s."""
        return 0

    @torch.no_grad()
    def visualize(self, batch: dict[str, Any], outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Images to log, ``{tag: (3|1, H, W) float in [0, 1]}``; empty by default."""
        return {}

    def log_scalars(self) -> dict[str, float]:
        """Extra per-step scalars the method wants logged (schedules, temperatures)."""
        return {}
