"""Every ``pretrain`` sub-command explains itself: each option has help, and ``--help`` shows its true default."""
from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from pretrain.tools.cli.main import build_parser


def _parsers(parser: argparse.ArgumentParser, path: str = "pretrain"):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                if sub.prog != "pretrain export push" or name == "export-push":  # the alias is visited once
                    yield from _parsers(sub, f"{path} {name}")


PARSERS = dict(_parsers(build_parser()))


REPO = Path(__file__).resolve().parents[2]


def _default_texts(default) -> set[str]:
    """The ways a help text may write ``default``: lists space- or comma-joined, floats short, repository files
    relative to the repository."""
    if isinstance(default, (list, tuple)):
        texts = set()
        for fmt in (str, lambda v: f"{v:g}" if isinstance(v, float) else str(v)):
            texts |= {" ".join(map(fmt, default)), ",".join(map(fmt, default))}
        return texts
    texts = {str(default)}
    if isinstance(default, float):
        texts.add(f"{default:g}")
    if isinstance(default, str) and Path(default).is_absolute() and Path(default).is_relative_to(REPO):
        texts.add(Path(default).relative_to(REPO).as_posix())
    return texts


def _shown_default(action: argparse.Action) -> bool:
    return not (action.nargs == 0 or action.default in (None, argparse.SUPPRESS) or action.default == [])


def test_the_walk_reaches_every_command_group():
    names = set(PARSERS)
    for expected in ("pretrain train", "pretrain eval suite", "pretrain shards medical", "pretrain launch slurm",
                     "pretrain bench lvm-solver", "pretrain scaling fit", "pretrain export-push", "pretrain config explain"):
        assert expected in names


@pytest.mark.parametrize("name", sorted(PARSERS))
def test_every_option_has_help_and_its_default(name):
    parser = PARSERS[name]
    parser.format_help()  # the whole page renders (a stray % in any help once broke `pretrain eval --help`)
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        label = action.option_strings[0] if action.option_strings else action.dest
        assert action.help and action.help != argparse.SUPPRESS, f"{name} {label}: no help"
        if _shown_default(action):
            text = parser._get_formatter()._expand_help(action)  # this option's own line, as --help prints it
            shown = "|".join(re.escape(t) for t in _default_texts(action.default))
            assert re.search(rf"default:? ({shown})\b", text), f"{name} {label}: default {action.default!r} not shown"


def test_a_default_the_help_writes_by_hand_is_not_repeated():
    text = PARSERS["pretrain shards write"].format_help()
    assert text.count("default: 1000") == 1 and "(default: 1000) (default" not in text


@pytest.mark.parametrize("name", sorted(n for n, p in PARSERS.items()
                                        if any(isinstance(a, argparse._SubParsersAction) for a in p._actions)))
def test_a_command_group_lists_every_sub_command_with_its_help(name):
    parser = PARSERS[name]
    text = parser.format_help()
    (group,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    listed = {c.dest for c in group._choices_actions}
    hidden = {n for n, p in group.choices.items() if n == "export-push"}  # reached as `pretrain export push`
    assert set(group.choices) - hidden <= listed, f"{name}: sub-commands without help: {set(group.choices) - listed}"
    for choice in listed:
        assert re.search(rf"^\s+{re.escape(choice)}\s", text, re.M), f"{name} --help does not list {choice}"


def test_shards_write_names_every_input_it_reads():
    text = " ".join(PARSERS["pretrain shards write"].format_help().split())
    for word in (".png", ".npy", "DICOM", "NIfTI", "--reports", "--splits", "--group-by", "$MEDPRETRAIN_SALT_FILE"):
        assert word in text, word
