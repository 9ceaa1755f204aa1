"""Objective registry: every module here that defines ``NAME`` is an objective."""
from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType
from typing import Any

from pretrain.config.typed import ConfigError, closest

_NON_OBJECTIVES = {"base"}


def _modules() -> dict[str, ModuleType]:
    found = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name in _NON_OBJECTIVES or info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        name = getattr(module, "NAME", None)
        if name:
            found[name] = module
    return found


def objective_module(name: str, key: str = "objective.name") -> ModuleType:
    modules = _modules()
    if name not in modules:
        hint = closest(str(name), list(modules))
        extra = f"; did you mean '{hint}'?" if hint else ""
        raise ConfigError(f"config key '{key}': unknown objective {name!r}{extra} (known: {', '.join(sorted(modules))})")
    return modules[name]


def objective_config_class(name: str, key: str = "objective.name") -> type:
    return objective_module(name, key).Config


def build_objective(run_cfg: Any):
    """The objective ``nn.Module`` for a resolved RunConfig."""
    return objective_module(run_cfg.objective.name).build(run_cfg)
