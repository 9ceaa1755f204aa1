"""Exponential moving average of a student into a teacher of the same structure, in fp32, under any ZeRO stage.

The update touches only what this rank holds. Under ZeRO-3 each parameter
lives as a flat shard (``ds_tensor``) and the student's and teacher's shards
of one parameter cover the same elements (DeepSpeed splits every parameter
alike by its size), so ``teacher_shard <- m * teacher_shard + (1 - m) *
student_shard`` needs no communication. Small parameters that ZeRO-3 keeps
whole on every rank (``ds_persist``) are also updated in their full copy,
which DeepSpeed would otherwise only refresh at the next optimizer step.

The teacher's values accumulate in fp32 even when the module runs in bf16:
at momentum 0.996+ a bf16 EMA rounds most updates away and stalls. When the
parameters already are fp32 the parameters themselves are the accumulators.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


def local_views(p: nn.Parameter) -> list[torch.Tensor]:
    """What this rank holds of ``p``: the tensor itself, or its ZeRO-3 shard (plus its full copy when persistent)."""
    shard = getattr(p, "ds_tensor", None)
    if shard is None:
        return [p.data]
    views = [shard.data]
    if getattr(p, "ds_persist", False) and p.data.numel() == p.ds_numel:
        views.append(p.data)
    return views


class EMATeacher:
    """``update(m)``: teacher <- m * teacher + (1 - m) * student, parameter by parameter, local data only."""

    def __init__(self, student: nn.Module, teacher: nn.Module) -> None:
        s_named, t_named = dict(student.named_parameters()), dict(teacher.named_parameters())
        if s_named.keys() != t_named.keys():
            only = sorted(set(s_named) ^ set(t_named))[:5]
            raise ValueError(f"EMATeacher: student and teacher differ in parameters, e.g. {only}")
        self.names = sorted(s_named)
        self._student = [s_named[n] for n in self.names]
        self._teacher = [t_named[n] for n in self.names]
        for p in self._teacher:
            p.requires_grad_(False)
        self._master: list[torch.Tensor] | None = None

    def _accumulators(self) -> list[torch.Tensor]:
        """fp32 accumulators, one per local view of each teacher parameter (made on first use, after ZeRO set-up)."""
        if self._master is None:
            views = [v for p in self._teacher for v in local_views(p)]
            self._master = [v if v.dtype == torch.float32 else v.float() for v in views]
        return self._master

    @torch.no_grad()
    def update(self, momentum: float) -> None:
        master = iter(self._accumulators())
        for s, t in zip(self._student, self._teacher):
            for s_view, t_view in zip(local_views(s), local_views(t)):
                acc = next(master)
                acc.mul_(momentum).add_(s_view.float(), alpha=1.0 - momentum)
                if acc is not t_view:
                    t_view.copy_(acc)

    def _layout(self) -> list[tuple[str, str, list[int]]]:
        """(parameter name, "full" or "shard", full shape) of each accumulator, in order."""
        out = []
        for name, p in zip(self.names, self._teacher):
            shape = list(getattr(p, "ds_shape", p.shape))
            kinds = ["shard", "full"] if hasattr(p, "ds_tensor") else ["full"]
            out += [(name, kind, shape) for kind in kinds[: len(local_views(p))]]
        return out

    def state_dict(self) -> dict[str, Any]:
        """This rank's fp32 teacher values (its shards under ZeRO-3): per-rank checkpoint state."""
        return {"names": self.names, "layout": self._layout(),
                "master": [m.detach().cpu().clone() for m in self._accumulators()]}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["names"] != self.names:
            raise ValueError("EMATeacher: the checkpoint's teacher has other parameters than this model's")
        master = self._accumulators()
        if [tuple(m.shape) for m in state["master"]] != [tuple(m.shape) for m in master]:
            raise ValueError("EMATeacher: the checkpoint's teacher shards have other shapes (another world size?)")
        views = [v for p in self._teacher for v in local_views(p)]
        for acc, saved, view in zip(master, state["master"], views):
            acc.copy_(saved)
            if acc is not view:
                view.copy_(acc)


def merge_rank_states(states: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Full fp32 teacher tensors by parameter name from every rank's :meth:`EMATeacher.state_dict` (rank order).

    A parameter some rank holds whole is taken from rank 0; ZeRO-3 shards are
    concatenated in rank order (each covers the next slice of the flattened
    parameter; the last is padded) and cut to the parameter's size.
    """
    full: dict[str, torch.Tensor] = {}
    shards: dict[str, list[torch.Tensor]] = {}
    shapes: dict[str, list[int]] = {}
    for rank, state in enumerate(states):
        for (name, kind, shape), value in zip(state["layout"], state["master"]):
            shapes[name] = shape
            if kind == "full":
                if rank == 0:
                    full[name] = value.float().reshape(shape)
            elif name not in full:
                shards.setdefault(name, []).append(value.float().reshape(-1))
    for name, parts in shards.items():
        if name not in full:
            numel = math.prod(shapes[name])
            full[name] = torch.cat(parts)[:numel].reshape(shapes[name])
    return full
