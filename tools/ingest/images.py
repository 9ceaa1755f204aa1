"""Turn a folder of image files into webdataset ``.tar`` shards plus ``manifest.json``.

    pretrain shards write SRC OUT [--labels CSV] [--samples-per-shard N] [--shard-mb MB]
                                  [--overwrite] [--no-progress]
    pretrain shards verify OUT

Files are visited in sorted relative-path order, so the same folder always
gives the same shards (tar members carry a fixed mtime: byte-identical
output). Each shard is written under ``<name>.tmp`` and renamed when
complete; the manifest is written last, so a folder with a manifest is whole.
A file that cannot be read is logged, listed in the manifest and skipped.
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import logging
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

import webdataset
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from pretrain.data.codec import encode_sample
from pretrain.data.manifest import MANIFEST_NAME, ManifestBuilder, write_manifest
from pretrain.data.readers import ReadError, parse_spacing, read_image_file

logger = logging.getLogger(__name__)

_TAR_BLOCK = 512
_TAR_RECORD = 20 * _TAR_BLOCK  # tarfile pads a closed archive to whole records
_TAR_END = 2 * _TAR_BLOCK
_TAR_MTIME = 0  # fixed so that identical input gives byte-identical shards
_KEY_STEM_CHARS = 80  # keeps member names under tar's 100-char field (no extra PAX headers)
_INTEGER_LABEL = re.compile(r"[+-]?\d+")
_SHARD_PREFIX = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
_MAX_INTEGER_LABEL = 100_000  # integer labels are class indices; larger ones are almost surely IDs


@dataclass(frozen=True)
class LabelRow:
    """One labels-CSV row: its line, class index and name (or None), spacing override (or None)."""

    line: int
    label: int | None
    label_name: str | None
    spacing: list[float] | None


def sample_key(rel_path: str) -> str:
    """Stable webdataset key for a relative path: readable stem plus a hash that keeps it unique.

    webdataset splits member names at the first '.', and '/' would make folders,
    so both (and anything else unusual) become '_'.
    """
    stem = re.sub(r"[^A-Za-z0-9_-]", "_", rel_path)[:_KEY_STEM_CHARS]
    return f"{stem}-{hashlib.sha1(rel_path.encode('utf-8')).hexdigest()[:10]}"


def list_source_files(src: Path, exclude: tuple[Path, ...] = ()) -> list[str]:
    """Relative POSIX paths of the candidate image files under ``src``, sorted.

    Hidden files and folders, ``.json`` sidecars and anything under ``exclude``
    (resolved paths: the output folder, the labels CSV) are left out.
    """
    excluded = {p.resolve() for p in exclude}
    excluded_names = {p.name for p in excluded}  # resolve() only on a name match: walks can be millions of files

    def keep(path: Path) -> bool:
        name = path.name
        return not name.startswith(".") and not (name in excluded_names and path.resolve() in excluded)

    found = []
    for root, dirs, files in os.walk(src):
        root_path = Path(root)
        dirs[:] = [d for d in dirs if keep(root_path / d)]
        for name in files:
            path = root_path / name
            if keep(path) and not name.lower().endswith(".json"):
                found.append(path.relative_to(src).as_posix())
    return sorted(found)


def read_labels_csv(csv_path: Path, src: Path, source_files: set[str]) -> tuple[list[str] | None, dict[str, LabelRow]]:
    """Parse a labels CSV into ``(classes, {relative path: LabelRow})``.

    Columns: ``path`` (relative to ``src``), ``label`` (class name or integer;
    empty means unlabeled), optional ``spacing``; others are ignored. Class
    names sort into indices; all-integer labels are their own indices.
    Raises ``ValueError`` naming the CSV file and line.
    """
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = {name.strip().lower(): name for name in reader.fieldnames or [] if name is not None}
            missing = [col for col in ("path", "label") if col not in header]
            if missing:
                raise ValueError(
                    f"{csv_path}: labels CSV lacks column(s) {', '.join(missing)} (header: {reader.fieldnames})"
                )
            raw_rows = [(reader.line_num, row) for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise ValueError(f"{csv_path}: labels CSV is not readable: {e}") from e

    parsed: dict[str, tuple[int, str, list[float] | None]] = {}
    for line, row in raw_rows:
        cells = {col: (row.get(name) or "").strip() for col, name in header.items()}
        where = f"{csv_path}:{line}"
        rel = _normalise_csv_path(cells["path"], where)
        if rel in parsed:
            raise ValueError(f"{where}: path {rel!r} already listed on line {parsed[rel][0]}")
        if rel not in source_files:
            reason = "does not exist" if not (src / rel).exists() else "is not an image file that gets converted"
            raise ValueError(f"{where}: path {rel!r} {reason} under {src}")
        spacing = parse_spacing(cells["spacing"], None, where) if cells.get("spacing") else None
        parsed[rel] = (line, cells["label"], spacing)

    names = {label for _, label, _ in parsed.values() if label}
    if not names:
        classes, index = None, {}
    elif all(_INTEGER_LABEL.fullmatch(n) for n in names):
        for line, label, _ in parsed.values():
            if label and not 0 <= int(label) < _MAX_INTEGER_LABEL:
                raise ValueError(
                    f"{csv_path}:{line}: integer label {label} is not a class index in [0, {_MAX_INTEGER_LABEL}); "
                    "use class names instead"
                )
        index = {n: int(n) for n in names}
        classes = [str(i) for i in range(max(index.values()) + 1)]
    else:
        classes = sorted(names)
        index = {n: i for i, n in enumerate(classes)}
    rows = {
        rel: LabelRow(line, index[label] if label else None, classes[index[label]] if label else None, spacing)
        for rel, (line, label, spacing) in parsed.items()
    }
    return classes, rows


def _normalise_csv_path(value: str, where: str) -> str:
    if not value:
        raise ValueError(f"{where}: empty path")
    path = PurePosixPath(value.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts:
        raise ValueError(f"{where}: path {value!r} must be relative to the source folder, without '..'")
    return path.as_posix()


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


def _prepare_out(out: Path, prefix: str, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out}: output path exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    old = sorted(out.glob("*.tar")) + [p for p in [out / MANIFEST_NAME] if p.exists()]
    if old and not overwrite:
        raise FileExistsError(
            f"{out} already holds shards ({len(old)} file(s): .tar and/or {MANIFEST_NAME}); "
            "pass overwrite=True (--overwrite) to replace them"
        )
    # Leftovers of an interrupted run are never complete shards: always drop them.
    for path in old + sorted(out.glob(f"{prefix}-*.tar.tmp")):
        path.unlink()


def check_conversion_args(src: str | Path, out: str | Path, max_samples: int, max_bytes: int) -> tuple[Path, Path]:
    """(src, out) as paths after the checks every conversion makes before it touches ``out``."""
    src_path, out_path = Path(src), Path(out)
    if not src_path.is_dir():
        raise FileNotFoundError(f"{src}: source folder does not exist")
    if out_path.exists() and out_path.resolve() == src_path.resolve():
        raise ValueError(f"{out}: output folder must differ from the source folder")
    if max_samples < 1 or max_bytes < 1:
        raise ValueError("max_samples_per_shard and max_shard_bytes must be positive")
    return src_path, out_path


def write_shards(
    src: str | Path,
    out: str | Path,
    *,
    labels_csv: str | Path | None = None,
    max_samples_per_shard: int = 1000,
    max_shard_bytes: int = 256 * 2**20,
    prefix: str = "shard",
    progress: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Convert every image file under ``src`` into shards in ``out``; return the manifest.

    A shard closes when the next sample would pass ``max_samples_per_shard``
    or ``max_shard_bytes`` (a single sample larger than the byte limit gets a
    shard of its own). Unreadable files are logged, recorded under
    ``failed`` in the manifest, and skipped. Refuses an ``out`` that already
    holds shards unless ``overwrite`` (which deletes its ``*.tar`` and manifest).
    """
    src_path, out_path = check_conversion_args(src, out, max_samples_per_shard, max_shard_bytes)
    if not _SHARD_PREFIX.fullmatch(prefix):
        # Braces, dots and slashes would clash with webdataset's "{000000..000009}" URL patterns.
        raise ValueError(f"shard prefix {prefix!r} may hold only letters, digits, '_' and '-'")

    csv_path = Path(labels_csv) if labels_csv is not None else None
    files = list_source_files(src_path, exclude=(out_path,) + ((csv_path,) if csv_path else ()))
    if not files:
        raise ValueError(f"{src}: no candidate image files found")
    classes, rows = read_labels_csv(csv_path, src_path, set(files)) if csv_path else (None, {})
    _prepare_out(out_path, prefix, overwrite)  # only after the input checked out: nothing is lost on bad input

    builder = ManifestBuilder(source=str(src), classes=classes)
    sink = ShardSink(out_path, prefix, max_samples_per_shard, max_shard_bytes, builder)
    bar = tqdm(files, desc="shards", unit="file", file=sys.stderr, disable=not progress, dynamic_ncols=True)
    try:
        with logging_redirect_tqdm():
            for rel in bar:
                members = _convert(src_path, rel, rows.get(rel), csv_path, builder)
                if members is None:
                    bar.set_postfix(failed=len(builder.failed), refresh=False)
                else:
                    sink.write(members)
        sink.finish()
    except BaseException:
        sink.abort()
        raise
    finally:
        bar.close()
    manifest = builder.to_dict()
    write_manifest(out_path, manifest)
    if builder.failed:
        failed, manifest_path = len(builder.failed), out_path / MANIFEST_NAME
        logger.warning("%d of %d files could not be converted; see 'failed' in %s", failed, len(files), manifest_path)
    return manifest


def _convert(
    src: Path, rel: str, row: LabelRow | None, csv_path: Path | None, builder: ManifestBuilder
) -> dict[str, Any] | None:
    """Tar members for one file, or None after recording why it could not be read."""
    try:
        image, meta = read_image_file(src / rel, source=rel)
        if row is not None and row.spacing is not None:
            meta["spacing"] = parse_spacing(row.spacing, meta["spatial_dims"], where=f"{csv_path}:{row.line}")
    except (ReadError, ValueError) as e:
        reason = e.reason if isinstance(e, ReadError) else str(e)
        logger.warning("skipping %s: %s", src / rel, reason)
        builder.add_failure(rel, reason)
        return None
    meta["label"] = row.label if row is not None else None
    meta["label_name"] = row.label_name if row is not None else None
    builder.add_sample(image.shape, str(image.dtype))
    return encode_sample(sample_key(rel), image, meta)


