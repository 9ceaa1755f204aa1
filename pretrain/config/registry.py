"""Objectives register themselves here; the schema looks them up by name and imports none of them.

Each objective module calls :func:`register_objective` at import. Lookups
import every module of the packages in :data:`OBJECTIVE_PACKAGES` once, plus
any module another distribution names under the ``medpretrain.objectives``
entry-point group, so a third-party objective is one installed module.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from importlib import metadata
from typing import Any, Callable

from pretrain.config.typed import ConfigError, closest

OBJECTIVE_PACKAGES = ("pretrain.objectives",)
ENTRY_POINT_GROUP = "medpretrain.objectives"


@dataclass(frozen=True)
class ObjectiveEntry:
    name: str
    config_class: type  # dataclass with a ``name`` field
    build: Callable[..., Any]  # build(run_cfg, ctx) -> Objective


_OBJECTIVES: dict[str, ObjectiveEntry] = {}
_discovered = False


def register_objective(name: str, config_class: type, build: Callable[..., Any]) -> None:
    _OBJECTIVES[name] = ObjectiveEntry(name, config_class, build)


def _discover() -> None:
    global _discovered
    if _discovered:
        return
    _discovered = True
    for package_name in OBJECTIVE_PACKAGES:
        package = importlib.import_module(package_name)
        for info in pkgutil.iter_modules(package.__path__):
            if not info.name.startswith("_"):
                importlib.import_module(f"{package_name}.{info.name}")
    for entry in metadata.entry_points(group=ENTRY_POINT_GROUP):
        entry.load()


def objectives() -> dict[str, ObjectiveEntry]:
    _discover()
    return dict(_OBJECTIVES)


def objective_entry(name: Any, key: str = "objective.name") -> ObjectiveEntry:
    known = objectives()
    if not isinstance(name, str) or name not in known:
        hint = closest(str(name), list(known))
        extra = f"; did you mean '{hint}'?" if hint else ""
        raise ConfigError(f"config key '{key}': unknown objective {name!r}{extra} (known: {', '.join(sorted(known))})")
    return known[name]
