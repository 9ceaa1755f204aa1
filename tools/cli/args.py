"""argparse value types shared by every subcommand."""
from __future__ import annotations

import argparse
from typing import Any


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
