"""How much of the training data the stream rejected, and when that is too much to go on.

Each DataLoader worker (slot) counts its own rejected samples by reason (see
:mod:`pretrain.data.sample_faults`) and reports the running counts with every
batch. The trainer keeps the latest report of each slot, sums them, and
stops the run with a diagnosis once the rejected share passes
``data.max_bad_fraction``: a data set that is mostly bad would otherwise
train on what is left, or spin, and the user would learn it from the loss.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from pretrain.data.errors import DataError

# Below this many samples seen (over all ranks) a share is too noisy to stop a run on, except at its end.
MIN_SAMPLES_TO_JUDGE = 100


class DataHealth:
    def __init__(self, max_bad_fraction: float) -> None:
        self.max_bad_fraction = max_bad_fraction
        self._slots: dict[int, dict[str, Any]] = {}

    def update(self, stats: dict[str, Any] | None) -> None:
        """Record one batch's ``_stream`` report; a stream that stopped on a data fault raises it here."""
        if not stats:
            return
        if "fatal" in stats:
            raise DataError(f"training data: {stats['fatal']}")
        self._slots[int(stats["slot"])] = stats

    def local(self) -> tuple[int, int, dict[str, int]]:
        """(good samples, rejected samples, rejected by reason) of this rank's slots."""
        good = sum(int(s.get("good_samples", 0)) for s in self._slots.values())
        bad = sum(int(s.get("bad_samples", 0)) for s in self._slots.values())
        reasons: dict[str, int] = {}
        for s in self._slots.values():
            for reason, n in (s.get("bad_by_reason") or {}).items():
                reasons[reason] = reasons.get(reason, 0) + int(n)
        return good, bad, reasons

    def scalars(self) -> dict[str, float]:
        """This rank's counts for the metrics log, summed over its slots (corrupt shards included)."""
        good, bad, reasons = self.local()
        out = {"data/corrupt_shards": float(sum(int(s.get("corrupt_shards", 0)) for s in self._slots.values())),
               "data/bad_samples": float(bad), **{f"data/bad_samples/{r}": float(n) for r, n in sorted(reasons.items())}}
        if good + bad:
            out["data/bad_fraction"] = bad / (good + bad)
        return out

    def check(self, device: torch.device, world_size: int, *, final: bool = False) -> None:
        """Raise :class:`DataError` on every rank alike when the rejected share over all ranks is too high
        (a collective call: every rank must make it at the same step)."""
        good, bad, reasons = self.local()
        counts = torch.tensor([good, bad], dtype=torch.float64, device=device)
        if world_size > 1:
            dist.all_reduce(counts)
        good_all, bad_all = (int(v) for v in counts.tolist())
        seen = good_all + bad_all
        if not bad_all or (seen < MIN_SAMPLES_TO_JUDGE and not final):
            return
        share = bad_all / seen
        if share <= self.max_bad_fraction:
            return
        last = next((s["last_error"] for s in self._slots.values() if s.get("last_error")), "")
        raise DataError(
            f"training data: {bad_all} of {seen} samples ({100 * share:.1f}%) were rejected, more than "
            f"data.max_bad_fraction={self.max_bad_fraction:g} (this rank, by reason: {reasons}); e.g. {last}. "
            "Fix or drop those samples (the log names them), or raise data.max_bad_fraction"
        )
