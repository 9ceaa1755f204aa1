"""Errors in the data a command or run was given (as opposed to its config): the message names the file,
shard or sample, and the command line shows it as one line with its own exit code."""
from __future__ import annotations


class DataError(ValueError):
    """Shards or samples that cannot serve what was asked of them (e.g. unlabelled shards for a probe)."""
