"""Turn a folder of image files into webdataset ``.tar`` shards plus ``manifest.json``.

    pretrain shards write SRC OUT [--labels CSV] [--splits TR,VA,TE [--group-by COLUMN] [--split-seed S]]
                                  [--samples-per-shard N] [--shard-mb MB] [--overwrite] [--no-progress]
    pretrain shards verify OUT

Files are visited in sorted relative-path order, so the same folder always
gives the same shards (tar members carry a fixed mtime: byte-identical
output). Each shard is written under ``<name>.tmp`` and renamed when
complete; the manifest is written last, so a folder with a manifest is whole.

Restartable: ``OUT/journal.jsonl`` (``tools/ingest/journal.py``) records the
settings and each completed shard. Rerunning the same command after a kill
continues where it stopped and ends with the shards and manifest an
uninterrupted run writes; other settings are refused, naming the one that
changed (``--overwrite`` starts over). The journal is deleted once every
manifest is written.

A file that cannot be read (damaged, no permission) is logged, listed under
``failed`` in the manifest with its reason, and skipped; so are folders that
cannot be listed, and FIFOs, sockets, devices and broken links, which are
never opened (a FIFO would block its reader forever).

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

import csv
import hashlib
import json
import logging
import os
import re
import stat
import sys
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from pretrain.data.codec import encode_sample
from pretrain.data.manifest import JOURNAL_NAME, MANIFEST_NAME, ManifestBuilder, file_sha256, write_manifest
from pretrain.data.privacy import hashed_key, load_salt, salt_fingerprint, salt_from_environment
from pretrain.data.readers import ReadError, parse_spacing, read_image_file
from pretrain.data.splits import SPLIT_NAMES, assign_split, parse_split_ratios
from pretrain.tools.ingest.journal import Journal, JournaledWriter, drop_unjournaled, restore
from pretrain.tools.ingest.shard_sink import ShardSink  # re-exported: tools/demo writes its shards with it

logger = logging.getLogger(__name__)

__all__ = ["ShardSink", "list_source_files", "read_labels_csv", "sample_key", "write_shards", "write_split_shards"]

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


def list_source_files(
    src: Path, exclude: tuple[Path, ...] = (), problems: list[tuple[str, str]] | None = None
) -> list[str]:
    """Relative POSIX paths of the candidate image files under ``src``, sorted.

    Hidden files and folders, ``.json`` sidecars and anything under ``exclude``
    (resolved paths: the output folder, the labels CSV) are left out. Only
    regular files (or links to them) are returned, so nothing else is ever
    opened: a FIFO blocks its reader forever. FIFOs, sockets, devices, broken
    links and subfolders that cannot be listed go to ``problems`` as
    ``(relative path, reason)`` when a list is given. Links to folders are not
    followed (they could loop).
    """
    excluded = {p.resolve() for p in exclude}
    excluded_names = {p.name for p in excluded}  # resolve() only on a name match: walks can be millions of files

    def keep(path: Path) -> bool:
        name = path.name
        return not name.startswith(".") and not (name in excluded_names and path.resolve() in excluded)

    found: list[str] = []
    noted: list[tuple[str, str]] = []
    folders = [src]
    while folders:
        folder = folders.pop()
        try:
            with os.scandir(folder) as listing:
                entries = list(listing)
        except OSError as e:
            if folder == src:
                raise
            noted.append((folder.relative_to(src).as_posix(), f"folder cannot be read ({e.strerror or e})"))
            continue
        for entry in entries:
            path = Path(entry.path)
            if not keep(path):
                continue
            try:
                if entry.is_dir(follow_symlinks=False):
                    folders.append(path)
                    continue
                regular, linked_folder = entry.is_file(), entry.is_symlink() and entry.is_dir()
            except OSError as e:
                noted.append((path.relative_to(src).as_posix(), f"cannot be examined ({e.strerror or e})"))
                continue
            if linked_folder or entry.name.lower().endswith(".json"):
                continue
            if regular:
                found.append(path.relative_to(src).as_posix())
            else:
                noted.append((path.relative_to(src).as_posix(), _not_regular(path)))
    if problems is not None:
        problems.extend(sorted(noted))
    return sorted(found)


def _not_regular(path: Path) -> str:
    """The reason a directory entry that is neither a folder nor a regular file is skipped unopened."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return "broken symbolic link (its target does not exist): skipped"
    kind = ("a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
            else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a special file")
    return f"not a regular file ({kind}): skipped without opening it"


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


def _prepare_out(out: Path, prefix: str, overwrite: bool, resuming: bool) -> None:
    """Make ``out``; refuse one holding another conversion's shards unless resuming this one or ``overwrite``."""
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out}: output path exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    if resuming:
        return  # the journal says which files to keep: drop_unjournaled
    old = sorted(out.glob("*.tar")) + [p for p in [out / MANIFEST_NAME] if p.exists()]
    if old and not overwrite:
        raise FileExistsError(
            f"{out} already holds shards ({len(old)} file(s): .tar and/or {MANIFEST_NAME}) and no unfinished "
            f"conversion's {JOURNAL_NAME}; pass overwrite=True (--overwrite) to replace them"
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
    shard of its own). Unreadable files (and special files, never opened) are
    logged, recorded under ``failed`` in the manifest, and skipped. An ``out``
    whose journal shows an unfinished conversion with the same settings is
    continued; other settings raise ``ValueError`` naming the one that changed.
    Refuses an ``out`` that already holds shards and no journal unless
    ``overwrite`` (which deletes its ``*.tar``, manifest and journal and starts over).
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
    problems: list[tuple[str, str]] = []
    files = list_source_files(src_path, exclude=(out_path,) + ((csv_path,) if csv_path else ()), problems=problems)
    if not files:
        raise ValueError(f"{src}: no candidate image files found")
    classes, rows = read_labels_csv(csv_path, src_path, set(files), group_by) if csv_path else (None, {})
    if group_by and len(rows) < len(files):
        logger.warning("%d of %d files are not in %s and have no %r: each is a group of its own",
                       len(files) - len(rows), len(files), csv_path, group_by)
    unusable = dict(problems)  # listed as failed without being opened
    inputs = sorted(files + list(unusable))
    settings = {  # a resume must use the same ones, or its shards would not be those of one uninterrupted run
        "source": str(src), "source_files": _fingerprint(inputs),
        "labels_csv_sha256": file_sha256(csv_path) if csv_path else None, "group_by": group_by,
        "salt_fingerprint": salt_fingerprint(salt_bytes) if salt_bytes is not None else None,
        "splits": ratios, "split_seed": split_seed if ratios else None,
        "max_samples_per_shard": max_samples_per_shard, "max_shard_bytes": max_shard_bytes, "prefix": prefix,
    }
    splits = [name for name in SPLIT_NAMES if ratios[name] > 0] if ratios else [None]
    folders = {name: out_path / name if name else out_path for name in splits}
    journal_path = out_path / JOURNAL_NAME
    resuming = journal_path.exists() and not overwrite
    # Only after the input checked out: nothing is lost on bad input. A journal with other settings is
    # refused before any file of its conversion is touched.
    journal = Journal(journal_path, settings, overwrite=False) if resuming else None
    for folder in folders.values():
        _prepare_out(folder, prefix, overwrite, resuming)
    if journal is None:
        journal = Journal(journal_path, settings, overwrite=True)

    builders = {name: ManifestBuilder(source=str(src), classes=classes) for name in splits}
    done = restore(journal, builders)
    writers = {}
    for name, folder in folders.items():
        drop_unjournaled(folder, {shard["name"] for shard in builders[name].shards}, prefix)
        writers[name] = JournaledWriter(folder, name, journal, builders[name], max_samples_per_shard,
                                        max_shard_bytes, prefix)
    todo = [rel for rel in inputs if rel not in done]
    if len(todo) < len(inputs):
        logger.info("resuming the conversion journaled in %s: %d of %d inputs left", journal_path, len(todo),
                    len(inputs))
    failed = len(journal.failures())
    bar = tqdm(todo, desc="shards", unit="file", file=sys.stderr, disable=not progress, dynamic_ncols=True,
               initial=len(inputs) - len(todo), total=len(inputs))
    try:
        with logging_redirect_tqdm():
            for rel in bar:
                row = rows.get(rel)
                group = row.group if row is not None and row.group else rel
                split = assign_split(f"{split_seed}\0{group}", ratios) if ratios else None
                extra = {"split": split} if split else {}
                if salt_bytes is not None:
                    extra["patient"] = hashed_key(salt_bytes, "patient:" + group)
                converted = _convert(src_path, rel, row, csv_path, extra, unusable.get(rel))
                if isinstance(converted, str):
                    builders[split].add_failure(rel, converted)
                    journal.append({"failed": converted, "key": rel, "split": split})
                    failed += 1
                    bar.set_postfix(failed=failed, refresh=False)
                else:
                    writers[split].write(rel, *converted)
        for writer in writers.values():
            writer.finish()
    except BaseException:
        for writer in writers.values():
            writer.sink.abort()
        raise
    finally:
        bar.close()
    manifests = {}
    for name, builder in builders.items():
        manifests[name] = builder.to_dict()
        write_manifest(folders[name], manifests[name])
    journal_path.unlink()  # every manifest is written: the conversion is whole and nothing is left to resume
    if failed:
        where = ", ".join(str(folders[name] / MANIFEST_NAME) for name in splits)
        logger.warning("%d of %d files could not be converted; see 'failed' in %s", failed, len(inputs), where)
    return manifests


def _fingerprint(inputs: list[str]) -> dict[str, Any]:
    """The candidate files' count and a hash of their paths: a resume must see the same files."""
    return {"count": len(inputs), "sha256": hashlib.sha256(json.dumps(inputs).encode("utf-8")).hexdigest()[:16]}


def _convert(
    src: Path, rel: str, row: LabelRow | None, csv_path: Path | None, extra: dict[str, Any], unusable: str | None
) -> tuple[dict[str, Any], list[int], str] | str:
    """``(tar members, image shape, dtype)`` of one file, or the reason it cannot be converted (logged)."""
    reason = unusable
    if reason is None:
        try:
            image, meta = read_image_file(src / rel, source=rel)
            if row is not None and row.spacing is not None:
                meta["spacing"] = parse_spacing(row.spacing, meta["spatial_dims"], where=f"{csv_path}:{row.line}")
        except (ReadError, ValueError) as e:
            reason = e.reason if isinstance(e, ReadError) else str(e)
        except OSError as e:  # no permission, I/O error, vanished: this file only, not the whole conversion
            reason = f"cannot be read ({e.strerror or e})"
    if reason is not None:
        logger.warning("skipping %s: %s", src / rel, reason)
        return reason
    meta["label"] = row.label if row is not None else None
    meta["label_name"] = row.label_name if row is not None else None
    meta.update(extra)
    members = encode_sample(sample_key(rel), image, meta, text=row.report if row is not None else None)
    return members, list(image.shape), str(image.dtype)
