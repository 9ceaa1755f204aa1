"""YAML files + dotted command-line overrides -> a validated RunConfig."""
from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import yaml

from pretrain.config.schema import RunConfig
from pretrain.config.typed import ConfigError, build

BASE_KEY = "base"  # a YAML file may start from another: `base: ../demo.yaml` (relative to itself)


class DuplicateKeyError(yaml.YAMLError):
    """A mapping gives one key twice."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, but a key given twice in one mapping is an error (PyYAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise DuplicateKeyError(f"key {key!r} is given twice (lines {seen[key].start_mark.line + 1} "
                                        f"and {key_node.start_mark.line + 1})")
            seen[key] = key_node
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The YAML mapping at ``path`` with its ``base`` chain merged underneath."""
    path = Path(path).resolve()
    if path in _seen:
        raise ConfigError(f"{path}: 'base' chain loops back to itself")
    try:
        raw = yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a config file must be a mapping at the top level")
    base = raw.pop(BASE_KEY, None)
    if base is None:
        return raw
    return deep_merge(read_yaml(path.parent / base, _seen + (path,)), raw)


def deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def apply_override(raw: dict[str, Any], override: str) -> None:
    """Apply one ``a.b.c=value`` override in place; the value is parsed as YAML."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} must look like key.path=value")
    dotted, text = override.split("=", 1)
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {override!r}: value is not valid YAML: {e}") from None
    parts = dotted.strip().split(".")
    node: Any = raw
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            node = node[_list_index(part, node, parts[: i + 1])]
            continue
        if not isinstance(node.get(part), (dict, list)):
            node[part] = {}
        node = node[part]
    last = parts[-1]
    if isinstance(node, list):
        node[_list_index(last, node, parts)] = value
    else:
        node[last] = value


def _list_index(part: str, node: list, parts: list[str]) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"override key '{'.'.join(parts)}': '{part}' is not an index of a list of {len(node)}")
    return int(part)


def normalise_sources(raw: dict[str, Any]) -> None:
    """``data.train`` may be given as a path or a list of paths: turn them into source mappings."""
    data = raw.get("data")
    if not isinstance(data, dict) or "train" not in data:
        return
    train = data["train"]
    if isinstance(train, (str, dict)):
        train = [train]
    if isinstance(train, list):
        data["train"] = [{"shards": s} if isinstance(s, str) else s for s in train]


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    raw = read_yaml(path) if path is not None else {}
    normalise_sources(raw)  # so that overrides can address data.train.<i>.<key>
    for override in overrides:
        apply_override(raw, override)
    normalise_sources(raw)
    return build(RunConfig, raw)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    return _plain(dataclasses.asdict(cfg))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def dump_config(cfg: Any) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
