"""``pretrain config explain [CONFIG] [overrides]``: every key with its type, value, default and doc."""
from __future__ import annotations

import argparse
from typing import Any


def _explain(args: argparse.Namespace) -> int:
    from pretrain.config import load_config
    from pretrain.config.explain import explain

    print(explain(load_config(args.config, args.overrides)))
    return 0


def add_config_parser(subparsers: Any) -> Any:
    parser = subparsers.add_parser("config", help="inspect run configs")
    actions = parser.add_subparsers(dest="config_command", required=True)
    e = actions.add_parser("explain", help="print every config key: type, value, default and what it means")
    e.add_argument("config", nargs="?", help="YAML run config (default: the built-in defaults)")
    e.add_argument("overrides", nargs="*", help="dotted overrides, e.g. objective.name=dino")
    e.set_defaults(func=_explain)
    return actions
