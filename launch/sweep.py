"""Sweep files: a grid or a list of dotted overrides, one training run per point.

```yaml
name: lr-by-size        # run directories go under runs/<name>/ (default: the file's stem)
max_concurrent: 4       # array tasks running at once (optional)
meta: {}                # anything (optional, not read by launch): `pretrain scaling plan` records its plan here
grid:                   # every combination, the last key varying fastest
  model.preset: [nano, micro]
  optim.lr: [1.0e-4, 3.0e-4]
# or, instead of grid:
# points:
#   - {optim.lr: 1.0e-4}
#   - {optim.lr: 3.0e-4, train.steps: 2000}
```
"""
from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

_KEYS = {"name", "max_concurrent", "grid", "points", "meta"}  # meta: free-form, not read here (scaling plans)


@dataclass(frozen=True)
class SweepPoint:
    index: int
    overrides: list[str]
    shared: frozenset[str] = frozenset()  # overrides every point of the sweep has: left out of the name

    @property
    def name(self) -> str:
        """``003-optim.lr=3e-4,model.preset=nano`` (what sets the point apart), made safe as a folder name."""
        text = ",".join(o for o in self.overrides if o not in self.shared) or ",".join(self.overrides)
        return f"{self.index:03d}-" + re.sub(r"[^A-Za-z0-9_.=,+-]", "_", text)[:120]


@dataclass(frozen=True)
class Sweep:
    name: str
    points: list[SweepPoint]
    max_concurrent: int | None


def _override(key: Any, value: Any) -> str:
    # YAML ends a document holding a bare scalar with "...": not part of the value.
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6).removesuffix("...\n").strip()
    return f"{key}={text}"


def load_sweep(path: str | Path) -> Sweep:
    """Read and expand ``path``; errors name the file and the key at fault."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"sweep file not found: {path}")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a sweep file is a mapping with 'grid' or 'points'")
    unknown = sorted(set(raw) - _KEYS)
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {unknown}; a sweep file has {sorted(_KEYS)}")
    if ("grid" in raw) == ("points" in raw):
        raise ValueError(f"{path}: give exactly one of 'grid' (every combination) or 'points' (a list)")
    if "grid" in raw:
        grid = raw["grid"]
        if not isinstance(grid, dict) or not grid:
            raise ValueError(f"{path}: 'grid' must map dotted keys to lists of values")
        for key, values in grid.items():
            if not isinstance(values, list) or not values:
                raise ValueError(f"{path}: grid key '{key}' must have a non-empty list of values, got {values!r}")
        combos = itertools.product(*[[(k, v) for v in vs] for k, vs in grid.items()])
        overrides = [[_override(k, v) for k, v in combo] for combo in combos]
    else:
        points = raw["points"]
        if not isinstance(points, list) or not points:
            raise ValueError(f"{path}: 'points' must be a non-empty list of mappings of dotted keys to values")
        for i, point in enumerate(points):
            if not isinstance(point, dict) or not point:
                raise ValueError(f"{path}: points[{i}] must be a non-empty mapping of dotted keys to values, got {point!r}")
        overrides = [[_override(k, v) for k, v in point.items()] for point in points]
    limit = raw.get("max_concurrent")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ValueError(f"{path}: max_concurrent must be a positive integer, got {limit!r}")
    name = str(raw.get("name") or path.stem)
    shared = frozenset.intersection(*(frozenset(o) for o in overrides)) if len(overrides) > 1 else frozenset()
    return Sweep(name, [SweepPoint(i, o, shared) for i, o in enumerate(overrides)], limit)
