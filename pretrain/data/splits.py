"""Deterministic patient-level train/val/test assignment.

A patient's split is a pure function of its (salted) patient key and the
ratios, so every series, study and file of one patient lands in the same
split, in any order, on any machine, in a resumed run.
"""
from __future__ import annotations

import hashlib
import math
from typing import Mapping

SPLIT_NAMES = ("train", "val", "test")
DEFAULT_RATIOS = {"train": 1.0, "val": 0.0, "test": 0.0}


def parse_split_ratios(ratios: Mapping[str, float] | str | None) -> dict[str, float]:
    """Normalised ``{"train", "val", "test"}`` ratios summing to 1.

    Accepts a mapping (missing names are 0) or a string ``"0.8,0.1,0.1"``
    (train, val, test). ``None`` puts everything in train.
    """
    if ratios is None:
        return dict(DEFAULT_RATIOS)
    if isinstance(ratios, str):
        parts = [p for p in ratios.replace(" ", "").split(",") if p]
        if len(parts) != len(SPLIT_NAMES):
            raise ValueError(f"split ratios {ratios!r}: give three numbers train,val,test (e.g. 0.8,0.1,0.1)")
        try:
            ratios = dict(zip(SPLIT_NAMES, (float(p) for p in parts)))
        except ValueError:
            raise ValueError(f"split ratios {ratios!r} are not numbers") from None
    unknown = set(ratios) - set(SPLIT_NAMES)
    if unknown:
        raise ValueError(f"split ratios name unknown split(s) {sorted(unknown)}; use {', '.join(SPLIT_NAMES)}")
    values = {name: float(ratios.get(name, 0.0)) for name in SPLIT_NAMES}
    if not all(math.isfinite(v) and v >= 0 for v in values.values()) or sum(values.values()) <= 0:
        raise ValueError(f"split ratios {dict(ratios)} must be non-negative with a positive sum")
    total = sum(values.values())
    return {name: v / total for name, v in values.items()}


def patient_unit_interval(patient_key: str) -> float:
    """A uniform number in [0, 1) fixed by the patient key."""
    digest = hashlib.sha256(b"medpretrain-split\0" + patient_key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def assign_split(patient_key: str, ratios: Mapping[str, float]) -> str:
    """The split (``train``, ``val`` or ``test``) of one patient; ``ratios`` as from ``parse_split_ratios``."""
    u = patient_unit_interval(patient_key)
    edge = 0.0
    chosen = None
    for name in SPLIT_NAMES:
        share = ratios.get(name, 0.0)
        if share <= 0:
            continue
        chosen = name  # the last split with a share takes the rounding remainder
        edge += share
        if u < edge:
            return name
    if chosen is None:
        raise ValueError(f"split ratios {dict(ratios)} give no split a positive share")
    return chosen
