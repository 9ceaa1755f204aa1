"""Turn a folder of image files into webdataset ``.tar`` shards plus ``manifest.json``.

    pretrain shards write SRC OUT [--labels CSV] [--splits TR,VA,TE [--group-by COLUMN] [--split-seed S]]
                                  [--samples-per-shard N] [--shard-mb MB] [--overwrite] [--no-progress]
    pretrain shards verify OUT

Files are visited in sorted relative-path order, so the same folder always
gives the same shards (tar members carry a fixed mtime: byte-identical
output). Each shard is written under ``<name>.tmp`` and renamed when
complete; the manifest is written last, so a folder with a manifest is whole.
A file that cannot be read is logged, listed in the manifest and skipped.

The labels CSV has a ``path`` column (relative to SRC) and at least one of
``label`` (class name or index), ``report`` (free text, stored as the sample's
``.txt`` for image-text training) and a grouping column such as ``patient``.
With ``--splits`` the files go to ``OUT/train``, ``OUT/val`` and ``OUT/test``,
each with its manifest; a file's split is a seeded hash of its group (the
``--group-by`` column, else its own path), so all images of one patient land
in one split, and samples record ``split``. With a salt, they also record the
group's salted HMAC as ``patient`` (evaluation resamples patients by it).
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
from pretrain.data.privacy import hashed_key, load_salt, salt_from_environment
from pretrain.data.readers import ReadError, parse_spacing, read_image_file
from pretrain.data.splits import SPLIT_NAMES, assign_split, parse_split_ratios

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
    """One labels-CSV row: its line, class index and name, spacing override, report text and group (each or None)."""

    line: int
    label: int | None
    label_name: str | None
    spacing: list[float] | None
    report: str | None = None
    group: str | None = None


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


def read_labels_csv(
    csv_path: Path, src: Path, source_files: set[str], group_column: str | None = None
) -> tuple[list[str] | None, dict[str, LabelRow]]:
    """Parse a labels CSV into ``(classes, {relative path: LabelRow})``.

    Columns: ``path`` (relative to ``src``) and at least one of ``label`` (class
    name or integer; empty means unlabeled), ``report`` (free text) and
    ``group_column``; optional ``spacing``; others are ignored. Class names
    sort into indices; all-integer labels are their own indices.
    Raises ``ValueError`` naming the CSV file and line.
    """
    group_key = group_column.strip().lower() if group_column else None
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = {name.strip().lower(): name for name in reader.fieldnames or [] if name is not None}
            missing = [col for col in ("path",) + ((group_key,) if group_key else ()) if col not in header]
            if not missing and not {"label", "report"} & set(header) and not group_key:
                missing = ["label (or report)"]
            if missing:
                raise ValueError(
                    f"{csv_path}: labels CSV lacks column(s) {', '.join(missing)} (header: {reader.fieldnames})"
                )
            raw_rows = [(reader.line_num, row) for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise ValueError(f"{csv_path}: labels CSV is not readable: {e}") from e

    parsed: dict[str, tuple[int, str, list[float] | None]] = {}
    extra: dict[str, tuple[str | None, str | None]] = {}  # path -> (report, group)
    for line, row in raw_rows:
        cells = {col: (row.get(name) or "").strip() for col, name in header.items()}
        cells.setdefault("label", "")
        where = f"{csv_path}:{line}"
        rel = _normalise_csv_path(cells["path"], where)
        if rel in parsed:
            raise ValueError(f"{where}: path {rel!r} already listed on line {parsed[rel][0]}")
        if rel not in source_files:
            reason = "does not exist" if not (src / rel).exists() else "is not an image file that gets converted"
            raise ValueError(f"{where}: path {rel!r} {reason} under {src}")
        spacing = parse_spacing(cells["spacing"], None, where) if cells.get("spacing") else None
        if group_key and not cells[group_key]:
            raise ValueError(f"{where}: empty {group_column!r} (every listed file needs its group for --group-by)")
        parsed[rel] = (line, cells["label"], spacing)
        extra[rel] = (cells.get("report") or None, cells[group_key] if group_key else None)

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
        rel: LabelRow(line, index[label] if label else None, classes[index[label]] if label else None, spacing,
                      *extra[rel])
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
    group_by: str | None = None,
    salt: str | bytes | Path | None = None,
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
    ``group_by`` names a labels-CSV column (e.g. patient); with a ``salt`` (see ``load_salt``) each sample
    records the group's salted HMAC as its ``patient``.
    """
    return _write(src, out, None, labels_csv=labels_csv, group_by=group_by, salt=salt, split_seed=0,
                  max_samples_per_shard=max_samples_per_shard, max_shard_bytes=max_shard_bytes, prefix=prefix,
                  progress=progress, overwrite=overwrite)[None]


def write_split_shards(
    src: str | Path,
    out: str | Path,
    split_ratios: dict[str, float] | str,
    *,
    labels_csv: str | Path | None = None,
    group_by: str | None = None,
    salt: str | bytes | Path | None = None,
    split_seed: int = 0,
    max_samples_per_shard: int = 1000,
    max_shard_bytes: int = 256 * 2**20,
    prefix: str = "shard",
    progress: bool = True,
    overwrite: bool = False,
) -> dict[str, dict[str, Any]]:
    """As ``write_shards``, into ``out/train``, ``out/val``, ``out/test`` (those with a share); ``{split: manifest}``.

    A file's split is a hash of ``split_seed`` and its group: the ``group_by``
    column of the labels CSV (all images of one patient share a split), else
    its own path. The same files, ratios and seed always give the same splits. With a ``salt`` and
    ``group_by``, samples record the group's salted HMAC as ``patient`` (evaluation resamples patients by it).
    """
    ratios = parse_split_ratios(split_ratios)
    return _write(src, out, ratios, labels_csv=labels_csv, group_by=group_by, salt=salt, split_seed=split_seed,
                  max_samples_per_shard=max_samples_per_shard, max_shard_bytes=max_shard_bytes, prefix=prefix,
                  progress=progress, overwrite=overwrite)


def _write(
    src: str | Path, out: str | Path, ratios: dict[str, float] | None, *, labels_csv: str | Path | None,
    group_by: str | None, salt: str | bytes | Path | None, split_seed: int, max_samples_per_shard: int,
    max_shard_bytes: int, prefix: str, progress: bool, overwrite: bool,
) -> dict[str | None, dict[str, Any]]:
    src_path, out_path = check_conversion_args(src, out, max_samples_per_shard, max_shard_bytes)
    if not _SHARD_PREFIX.fullmatch(prefix):
        # Braces, dots and slashes would clash with webdataset's "{000000..000009}" URL patterns.
        raise ValueError(f"shard prefix {prefix!r} may hold only letters, digits, '_' and '-'")
    if group_by and labels_csv is None:
        raise ValueError(f"grouping by {group_by!r} needs a labels CSV (--labels) with that column")
    # A patient column holds identifiers (MRNs are few enough to try them all): samples record one only as
    # an HMAC under a secret salt, the pseudonym the medical path writes; without a salt, none is recorded.
    salt_bytes = load_salt(salt) if group_by and (salt is not None or salt_from_environment()) else None

    csv_path = Path(labels_csv) if labels_csv is not None else None
    files = list_source_files(src_path, exclude=(out_path,) + ((csv_path,) if csv_path else ()))
    if not files:
        raise ValueError(f"{src}: no candidate image files found")
    classes, rows = read_labels_csv(csv_path, src_path, set(files), group_by) if csv_path else (None, {})
    if group_by and len(rows) < len(files):
        logger.warning("%d of %d files are not in %s and have no %r: each is a group of its own",
                       len(files) - len(rows), len(files), csv_path, group_by)
    splits = [name for name in SPLIT_NAMES if ratios[name] > 0] if ratios else [None]
    folders = {name: out_path / name if name else out_path for name in splits}
    for folder in folders.values():  # only after the input checked out: nothing is lost on bad input
        _prepare_out(folder, prefix, overwrite)

    builders = {name: ManifestBuilder(source=str(src), classes=classes) for name in splits}
    sinks = {name: ShardSink(folders[name], prefix, max_samples_per_shard, max_shard_bytes, builders[name])
             for name in splits}
    bar = tqdm(files, desc="shards", unit="file", file=sys.stderr, disable=not progress, dynamic_ncols=True)
    failed = 0
    try:
        with logging_redirect_tqdm():
            for rel in bar:
                row = rows.get(rel)
                group = row.group if row is not None and row.group else rel
                split = assign_split(f"{split_seed}\0{group}", ratios) if ratios else None
                extra = {"split": split} if split else {}
                if salt_bytes is not None:
                    extra["patient"] = hashed_key(salt_bytes, "patient:" + group)
                members = _convert(src_path, rel, row, csv_path, builders[split], extra)
                if members is None:
                    failed += 1
                    bar.set_postfix(failed=failed, refresh=False)
                else:
                    sinks[split].write(members)
        for sink in sinks.values():
            sink.finish()
    except BaseException:
        for sink in sinks.values():
            sink.abort()
        raise
    finally:
        bar.close()
    manifests = {}
    for name, builder in builders.items():
        manifests[name] = builder.to_dict()
        write_manifest(folders[name], manifests[name])
    if failed:
        where = ", ".join(str(folders[name] / MANIFEST_NAME) for name in splits)
        logger.warning("%d of %d files could not be converted; see 'failed' in %s", failed, len(files), where)
    return manifests


def _convert(
    src: Path, rel: str, row: LabelRow | None, csv_path: Path | None, builder: ManifestBuilder, extra: dict[str, Any]
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
    meta.update(extra)
    builder.add_sample(image.shape, str(image.dtype))
    return encode_sample(sample_key(rel), image, meta, text=row.report if row is not None else None)


