"""Build typed dataclasses from plain dicts, with errors that name the key.

The dataclasses are the schema. Values come from YAML and from dotted
command-line overrides; anything that does not fit the schema is an error
naming the full key and, for unknown keys, the closest valid one.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from typing import Any, Callable, Literal, Union, get_args, get_origin


class ConfigError(ValueError):
    """A config value or key does not fit the schema."""


# A field whose dataclass type depends on a sibling value (e.g. the objective's
# own config chosen by its name) declares a resolver in its metadata:
#   field(metadata={"resolve": lambda raw: SomeConfigClass})
RESOLVE = "resolve"


def closest(name: str, candidates: list[str]) -> str | None:
    match = difflib.get_close_matches(name, candidates, n=1, cutoff=0.4)
    return match[0] if match else None


def unknown_key_error(key: str, valid: list[str]) -> ConfigError:
    leaf = key.rsplit(".", 1)[-1]
    hint = closest(leaf, valid)
    suggestion = f"; did you mean '{key.rsplit('.', 1)[0] + '.' if '.' in key else ''}{hint}'?" if hint else ""
    return ConfigError(f"unknown config key '{key}'{suggestion} (valid here: {', '.join(sorted(valid))})")


def build(cls: type, raw: Any, prefix: str = "") -> Any:
    """Instantiate dataclass ``cls`` from ``raw`` (a dict), validating every key and type."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config key '{prefix or '<root>'}' must be a mapping, got {type(raw).__name__}: {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in raw:
        if key not in fields:
            raise unknown_key_error(_join(prefix, key), list(fields))
    kwargs = {}
    for name, f in fields.items():
        if name not in raw:
            continue
        resolver: Callable[[Any], type] | None = f.metadata.get(RESOLVE)
        if resolver is not None:
            kwargs[name] = build(resolver(raw[name], _join(prefix, name)), raw[name], _join(prefix, name))
        else:
            kwargs[name] = coerce(hints[name], raw[name], _join(prefix, name))
    try:
        obj = cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config section '{prefix or '<root>'}': {e}") from None
    return obj


def coerce(tp: Any, value: Any, key: str) -> Any:
    """``value`` checked (and losslessly converted) against type ``tp``."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(arg, value, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"config key '{key}' expects {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in get_args(tp):
            choices = ", ".join(repr(a) for a in get_args(tp))
            hint = closest(str(value), [str(a) for a in get_args(tp)])
            extra = f"; did you mean {hint!r}?" if hint else ""
            raise ConfigError(f"config key '{key}' must be one of {choices}, got {value!r}{extra}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' expects a list ({_type_name(tp)}), got {value!r}")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"config key '{key}' expects {len(args)} items, got {len(value)}: {value!r}")
            return tuple(coerce(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        item = args[0] if args else Any
        items = [coerce(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' expects a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}' expects true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"config key '{key}' expects an integer, got {value!r}")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"config key '{key}' expects a number, got {value!r}")
        if not math.isfinite(number):  # an inf lr or a NaN weight decay only shows up as NaN weights later
            raise ConfigError(f"config key '{key}' must be a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"config key '{key}' expects a string, got {value!r}")
    raise ConfigError(f"config key '{key}': unsupported schema type {tp!r}")


def check_range(key: str, value: float, low: float | None = None, high: float | None = None, *,
                low_open: bool = False) -> None:
    """ConfigError naming ``key`` unless low <= value <= high (low < value with ``low_open``)."""
    ok = (low is None or (value > low if low_open else value >= low)) and (high is None or value <= high)
    if not ok:
        bounds = ([f"{'>' if low_open else '>='} {low}"] if low is not None else []) + \
            ([f"<= {high}"] if high is not None else [])
        raise ConfigError(f"config key '{key}' must be {' and '.join(bounds)}, got {value}")


def check_fraction_pair(key: str, pair: tuple[float, float]) -> None:
    """A (low, high) range of fractions, e.g. a crop's kept area: 0 < low <= high <= 1."""
    low, high = pair
    if not 0.0 < low <= high <= 1.0:
        raise ConfigError(f"config key '{key}' must satisfy 0 < low <= high <= 1, got {list(pair)}")


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")
