"""The journal that makes a conversion restartable, shared by the image and the DICOM / NIfTI writers.

``OUT/journal.jsonl`` starts with the conversion's settings; after each shard's
atomic rename one line records the shard and the samples it holds, and each
input that failed gets a line with its reason. A rerun with the same settings
rebuilds the manifests from these lines, deletes every shard the journal does
not list (a kill can land between a rename and its journal line) and converts
only what no line names, so the result is what an uninterrupted run writes.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from pretrain.data.manifest import JOURNAL_NAME, ManifestBuilder
from pretrain.tools.ingest.shard_sink import ShardSink

__all__ = ["JOURNAL_NAME", "Journal", "JournaledWriter", "drop_unjournaled", "restore"]


class Journal:
    """Append-only record of completed shards and failed inputs; the source of truth for resuming."""

    def __init__(self, path: Path, settings: dict[str, Any], overwrite: bool):
        self.path = path
        self.entries: list[dict[str, Any]] = []
        if path.exists() and not overwrite:
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    self.entries.append(json.loads(line))
                except json.JSONDecodeError:
                    break  # a line cut by a kill is the last one; what follows it never happened
            old = self.entries[0].get("settings") if self.entries and isinstance(self.entries[0], dict) else None
            if old != settings:
                raise ValueError(f"{path}: this unfinished conversion was started with other settings "
                                 f"({_changes(old, settings)}); rerun with the same ones to finish it, "
                                 "or pass overwrite=True (--overwrite) to start over")
            path.write_text("".join(json.dumps(e) + "\n" for e in self.entries), encoding="utf-8")
        else:
            self.entries = [{"settings": settings}]
            path.write_text(json.dumps(self.entries[0]) + "\n", encoding="utf-8")

    def append(self, entry: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.entries.append(entry)

    def shards(self) -> list[dict[str, Any]]:
        return [e for e in self.entries if "shard" in e]

    def failures(self) -> list[dict[str, Any]]:
        return [e for e in self.entries if "failed" in e]


def _changes(old: dict[str, Any] | None, new: dict[str, Any]) -> str:
    """Which settings differ, as ``name: was X, now Y``; says so when the first line cannot be read."""
    if not isinstance(old, dict):
        return "its first line, the settings, cannot be read"
    changed = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    return "; ".join(f"{k}: was {old.get(k)!r}, now {new.get(k)!r}" for k in changed)


class JournaledWriter:
    """One output folder's shard sink plus the samples of the shard being filled, journaled when it completes.

    Samples count in the manifest only once their shard is journaled, so the
    manifest rebuilt on a resume and the one of an uninterrupted run agree.
    """

    def __init__(self, out: Path, split: str | None, journal: Journal, builder: ManifestBuilder, max_samples: int,
                 max_bytes: int, prefix: str = "shard"):
        self.split = split
        self.journal, self.builder = journal, builder
        self.sink = ShardSink(out, prefix, max_samples, max_bytes, builder)
        self.sink.index = len(builder.shards)
        self.pending: list[tuple[str, list[int], str]] = []

    def write(self, key: str, members: dict[str, Any], shape: list[int], dtype: str) -> None:
        before = self.sink.index
        self.sink.write(members)
        if self.sink.index != before:
            self._record()
        self.pending.append((key, list(shape), dtype))

    def finish(self) -> None:
        before = self.sink.index
        self.sink.finish()
        if self.sink.index != before:
            self._record()

    def _record(self) -> None:
        shard = self.builder.shards[-1]
        for _, shape, dtype in self.pending:
            self.builder.add_sample(shape, dtype)
        self.journal.append({"shard": shard, "split": self.split, "samples": [list(p) for p in self.pending]})
        self.pending = []


def restore(journal: Journal, builders: dict[Any, ManifestBuilder]) -> set[str]:
    """Replay the journal into ``builders`` (by split); return the keys it holds (converted or failed)."""
    done: set[str] = set()
    for entry in journal.shards():
        shard, builder = entry["shard"], builders[entry["split"]]
        builder.add_shard(shard["name"], shard["samples"], shard["bytes"], shard["sha256"])
        for key, shape, dtype in entry["samples"]:
            builder.add_sample(shape, dtype)
            done.add(key)
    for entry in journal.failures():
        builders[entry["split"]].add_failure(entry["key"], entry["failed"])
        done.add(entry["key"])
    return done


def drop_unjournaled(folder: Path, keep: set[str], prefix: str = "shard") -> None:
    """Create ``folder``; delete its shards and ``.tmp`` files that are not in ``keep`` (never journaled)."""
    folder.mkdir(parents=True, exist_ok=True)
    for path in list(folder.glob(f"{prefix}-*.tar")) + list(folder.glob("*.tmp")):
        if path.name not in keep:  # written but never journaled (killed between rename and journal)
            path.unlink()
