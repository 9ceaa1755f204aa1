"""argparse pieces shared by every subcommand: the parser class, its help formatter, value types."""
from __future__ import annotations

import argparse
from typing import Any


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions kept as written (they are module docs); every option shows its default.

    An option whose help already names its default, a flag (``store_true``) and
    an option without a default are left as they are.
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            "default" in text.lower()
            or action.nargs == 0
            or default is None
            or default is argparse.SUPPRESS
            or default == []
        ):
            return text
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
        return f"{text} (default: {shown.replace('%', '%%')})".lstrip()


class Parser(argparse.ArgumentParser):
    """The ``pretrain`` parser; sub-commands inherit the class, so every ``--help`` uses ``HelpFormatter``."""

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


def positive_number(kind: type) -> Any:
    """An argparse type: a number of ``kind`` that must be > 0, with a message naming the text."""
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {kind.__name__}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its error message
    return parse
