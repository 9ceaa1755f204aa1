"""The ``pretrain launch`` subcommand group: how a training job starts."""
from __future__ import annotations

import argparse

from pretrain.tools.cli.args import Parser
from pretrain.launch.local import add_local_parser
from pretrain.launch.slurm import add_slurm_parser
from pretrain.launch.status import add_status_parser


class OverridesAnywhereParser(Parser):
    """A launcher's parser that takes dotted overrides after options too: ``CONFIG --nproc 2 optim.lr=3e-4``.

    Plain argparse fills a ``nargs="*"`` positional once, so overrides written
    after an option would be rejected; here every leftover ``key=value`` word
    joins ``overrides``, and anything else stays an error.
    """

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        namespace, extras = super().parse_known_args(args, namespace)
        if hasattr(namespace, "overrides"):
            late = [word for word in extras if "=" in word and not word.startswith("-")]
            namespace.overrides = list(namespace.overrides or []) + late
            extras = [word for word in extras if word not in late]
        return namespace, extras


def add_launch_parser(subparsers: argparse._SubParsersAction) -> argparse._SubParsersAction:
    """Register ``pretrain launch`` (local, slurm, status); returns the group so more launchers can join it."""
    launch = subparsers.add_parser("launch", help="start training jobs on this machine or a SLURM cluster; follow them")
    group = launch.add_subparsers(dest="launch_command", required=True, parser_class=OverridesAnywhereParser)
    add_local_parser(group)
    add_slurm_parser(group)
    add_status_parser(group)
    return group
