"""``ShardSink``: samples into ``<prefix>-NNNNNN.tar`` files, each written under ``.tmp`` and renamed when whole."""
from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path
from typing import Any, BinaryIO

import webdataset

from pretrain.data.manifest import ManifestBuilder

_TAR_BLOCK = 512
_TAR_RECORD = 20 * _TAR_BLOCK  # tarfile pads a closed archive to whole records
_TAR_END = 2 * _TAR_BLOCK
_TAR_MTIME = 0  # fixed so that identical input gives byte-identical shards


class _HashingFile:
    """Write-only file wrapper that hashes and counts what passes through."""

    def __init__(self, f: BinaryIO):
        self._f = f
        self.sha256 = hashlib.sha256()
        self.bytes = 0

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.bytes += len(data)
        return self._f.write(data)


class ShardSink:
    """Writes samples into ``<prefix>-NNNNNN.tar`` files, opening the next when a limit would be passed."""

    def __init__(self, out: Path, prefix: str, max_samples: int, max_bytes: int, builder: ManifestBuilder):
        self.out, self.prefix, self.builder = out, prefix, builder
        self.max_samples, self.max_bytes = max_samples, max_bytes
        self.index = 0
        self._file: BinaryIO | None = None
        self._hashing: _HashingFile | None = None
        self._tar: webdataset.TarWriter | None = None
        self._samples = 0
        self._member_bytes = 0

    @property
    def _name(self) -> str:
        return f"{self.prefix}-{self.index:06d}.tar"

    def write(self, members: dict[str, Any]) -> None:
        size = sum(_TAR_BLOCK + _round_up(len(v), _TAR_BLOCK) for k, v in members.items() if not k.startswith("_"))
        if self._tar is not None and (
            self._samples + 1 > self.max_samples
            or _round_up(self._member_bytes + size + _TAR_END, _TAR_RECORD) > self.max_bytes
        ):
            self.finish()
        if self._tar is None:
            self._open()
        self._tar.write(members)
        self._samples += 1
        self._member_bytes += size

    def _open(self) -> None:
        self._file = open(self.out / (self._name + ".tmp"), "wb")
        self._hashing = _HashingFile(self._file)
        self._tar = webdataset.TarWriter(self._hashing, encoder=False, mtime=_TAR_MTIME)
        self._samples = self._member_bytes = 0

    def finish(self) -> None:
        """Complete the open shard (if any): close, sync, rename to its final name, record it."""
        if self._tar is None:
            return
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.out / (self._name + ".tmp"), self.out / self._name)
        self.builder.add_shard(self._name, self._samples, self._hashing.bytes, self._hashing.sha256.hexdigest())
        self._tar = self._file = self._hashing = None
        self.index += 1

    def abort(self) -> None:
        """Drop the shard being written, leaving completed shards alone."""
        if self._file is None:
            return
        # Close the tar stream while its file is still open, or its finaliser writes to a closed file later.
        with contextlib.suppress(Exception):
            self._tar.close()
        self._file.close()
        (self.out / (self._name + ".tmp")).unlink(missing_ok=True)
        self._tar = self._file = self._hashing = None


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple
