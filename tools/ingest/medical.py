"""DICOM series, NIfTI volumes and image files to per-split webdataset shards.

    pretrain shards medical SRC OUT [--reports CSV|JSONL] [--splits 0.8,0.1,0.1]
                                    [--spacing D H W] [--preset ct_lung|ct_soft_tissue|ct_bone|mri]
                                    [--workers N] [--samples-per-shard N] [--shard-mb MB]
                                    [--nifti-4d samples|channels] [--salt-file PATH] [--overwrite] [--no-progress]

Files are recognised by content (DICOM preamble or a forced DICOM parse) or by
name (``.nii``/``.nii.gz``, and the PNG/JPEG/TIFF/NPY the plain writer reads).
DICOM files group into series; each series, multi-frame file, NIfTI or image
file is one sample keyed by ``hmac-sha256(salt, uid or path)``. Patients
(DICOM PatientID; else the report's ``patient``; else the file's top folder)
go whole into ``OUT/train``, ``OUT/val`` or ``OUT/test``, each with its own
manifest.json. No UID, name or path of a sample reaches the shards.

Every volume whose geometry is known is stored in one orientation, RAS
canonical (``"SAR"`` in our ``(C, D, H, W)`` order, ``pretrain.data.orientation``),
whether it came from DICOM or NIfTI. A 4-D NIfTI file (fMRI, DWI, several echoes) is, by the
explicit ``nifti_4d`` choice recorded in each manifest's ``conversion``,
either one sample per volume (``samples``, the default: each records its
``time_point``) or one sample with the volumes as channels (``channels``).

Restartable: ``OUT/journal.jsonl`` (``tools/ingest/journal.py``, shared with
the image writer) records each completed shard with the samples it holds
(appended after the shard's atomic rename). A rerun with the
same settings drops any shard the journal does not list and converts only the
samples no journaled shard holds, so a killed run resumes with no duplicate
and no partial shard. Bad inputs are logged with their folder or path (the
console is the only place that names them) and skipped; in the output folder
(manifests' ``failed``, ``OUT/skipped.json``, the journal) they appear by their
salted key with the reason, paths redacted, since folder and file names
identify patients as often as DICOM tags do. FIFOs, sockets, devices, broken
links and folders that cannot be listed are never opened: they go to
``OUT/skipped.json`` with their reason.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import shutil
import sys
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path, PurePosixPath
from typing import Any, Iterator, Sequence

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from pretrain.data.codec import encode_sample
from pretrain.data.dicom import SeriesError, group_series, has_dicom_preamble, load_dicom_series, read_dicom_header
from pretrain.data.manifest import ManifestBuilder, file_sha256, write_manifest
from pretrain.data.nifti import NiftiError, is_nifti_path, load_nifti, time_points
from pretrain.data.orientation import CANONICAL
from pretrain.data.privacy import hashed_key, load_salt, safe_metadata, salt_fingerprint
from pretrain.data.readers import SUPPORTED_SUFFIXES, ReadError, read_image_file
from pretrain.data.splits import SPLIT_NAMES, assign_split, parse_split_ratios
from pretrain.tools.ingest.medical_inputs import PRESETS, ReportsTable, apply_preset, read_reports, resample
from pretrain.tools.ingest.images import check_conversion_args, list_source_files
from pretrain.tools.ingest.journal import JOURNAL_NAME, Journal, JournaledWriter, drop_unjournaled, restore

logger = logging.getLogger(__name__)

SKIPPED_NAME = "skipped.json"
NIFTI_4D = ("samples", "channels")  # a 4-D NIfTI file: one sample per volume, or its volumes as channels
_PREFIX = "shard"


@dataclasses.dataclass(frozen=True)
class WorkItem:
    """One sample to convert. Holds source paths in memory only; ``where`` is for messages."""

    key: str
    split: str
    kind: str  # "dicom", "nifti" or "image"
    paths: tuple[str, ...]
    root: str  # SRC
    where: str
    text: str | None
    label: int | None
    label_name: str | None
    patient: str = ""  # the salted patient key (a pseudonym): evaluation resamples patients by it
    time_point: int | None = None  # the one volume of a 4-D NIfTI file this sample is


def plan_items(
    src: Path, files: Sequence[str], salt: bytes, ratios: dict[str, float], reports: ReportsTable | None, pool: Any,
    nifti_4d: str = "samples",
) -> tuple[list[WorkItem], list[dict[str, str]]]:
    """Sort ``files`` into work items (sorted by key) and unrecognised files ``[{path, reason}]``."""
    items, skipped, maybe_dicom = [], [], []
    for rel in files:
        if is_nifti_path(rel):
            item = _file_item(src, rel, "nifti", salt, ratios, reports)
            count = _time_points(src / rel) if nifti_4d == "samples" else 1
            items += [item] if count == 1 else [
                dataclasses.replace(item, key=hashed_key(salt, f"path:{rel}#t{t}"), time_point=t,
                                    where=f"{rel} (time point {t})") for t in range(count)]
        elif PurePosixPath(rel).suffix.lower() in SUPPORTED_SUFFIXES:
            items.append(_file_item(src, rel, "image", salt, ratios, reports))
        else:
            maybe_dicom.append(rel)
    paths = [str(src / r) for r in maybe_dicom]
    scanned = pool.map(read_dicom_header, paths, chunksize=32) if pool else map(read_dicom_header, paths)
    headers = []
    for rel, header in zip(maybe_dicom, scanned):
        if header is None:
            skipped.append({"path": rel, "key": hashed_key(salt, "path:" + rel),
                            "reason": "not DICOM, NIfTI or a supported image file"})
        else:
            headers.append(dataclasses.replace(header, path=rel))  # keys must not depend on where SRC lives
    for group, members in group_series(headers).items():
        first = members[0]
        rels = sorted(h.path for h in members)
        folders = sorted({str(PurePosixPath(r).parent) for r in rels})
        row = reports.find(first.series_uid, first.study_uid, rels + folders) if reports else None
        patient = first.patient_id or (row.patient if row else None) or first.study_uid or folders[0]
        key = hashed_key(salt, "dicom:" + group)
        where = f"DICOM series {key} in folder {', '.join(folders)}"
        items.append(_item(key, hashed_key(salt, "patient:" + patient), ratios, "dicom",
                           tuple(str(src / r) for r in rels), src, where, row))
    items.sort(key=lambda item: item.key)
    return items, skipped


def _time_points(path: Path) -> int:
    """Volumes along a NIfTI file's 4th axis; 1 when its header cannot be read (loading then says why)."""
    try:
        return time_points(path)
    except Exception:  # noqa: BLE001 - the conversion of this file reports the reason
        return 1


def _file_item(
    src: Path, rel: str, kind: str, salt: bytes, ratios: dict[str, float], reports: ReportsTable | None
) -> WorkItem:
    row = reports.find(paths=[rel]) if reports else None
    parts = PurePosixPath(rel).parts
    patient = (row.patient if row else None) or (parts[0] if len(parts) > 1 else rel)
    return _item(hashed_key(salt, "path:" + rel), hashed_key(salt, "patient:" + patient), ratios, kind,
                 (str(src / rel),), src, rel, row)


def _item(key: str, patient_key: str, ratios: dict[str, float], kind: str, paths: tuple[str, ...], root: Path,
          where: str, row: Any) -> WorkItem:
    return WorkItem(key, assign_split(patient_key, ratios), kind, paths, str(root), where,
                    row.text if row else None, row.label if row else None, row.label_name if row else None,
                    patient_key)


def convert_item(item: WorkItem, target_spacing: Sequence[float] | None, preset: str | None) -> dict[str, Any]:
    """Read, resample and map one item; ``{"ok": members, shape, dtype}`` or ``{"failed": reason}``."""
    try:
        if item.kind == "dicom":
            image, meta = load_dicom_series(item.paths)
        elif item.kind == "nifti":
            image, meta = load_nifti(item.paths[0], time_point=item.time_point)
        else:
            image, meta = read_image_file(item.paths[0])
            meta = dict(meta, kind="image", modality=None, body_part=None, orientation=None, rescale_applied=False)
        image, meta = resample(image, meta, target_spacing)
        image, meta = apply_preset(image, meta, preset)
    except (SeriesError, NiftiError, ReadError, ValueError) as e:
        reason = getattr(e, "reason", None) or str(e)
    except Exception as e:  # noqa: BLE001 - one odd file (decoder bug, broken tag) must not stop a million-file run
        reason = f"unexpected {type(e).__name__}: {e}"
    else:
        meta = safe_metadata(dict(meta, label=item.label, label_name=item.label_name, split=item.split,
                                  patient=item.patient or None))
        members = encode_sample(item.key, image, meta, item.text)
        return {"ok": members, "shape": list(image.shape), "dtype": str(image.dtype)}
    return {"failed": reason.replace(item.root.rstrip("/") + "/", "")}


def _results(
    items: list[WorkItem], pool: ProcessPoolExecutor | None, args: tuple
) -> Iterator[tuple[WorkItem, dict[str, Any]]]:
    """Conversion results in item order; a bounded window of futures keeps memory flat."""
    if pool is None:
        for item in items:
            yield item, convert_item(item, *args)
        return
    window: collections.deque[tuple[WorkItem, Future]] = collections.deque()
    depth = 4 * (pool._max_workers or 1)
    for item in items:
        window.append((item, pool.submit(convert_item, item, *args)))
        if len(window) >= depth:
            done, future = window.popleft()
            yield done, future.result()
    while window:
        done, future = window.popleft()
        yield done, future.result()


def write_medical_shards(
    src: str | Path,
    out: str | Path,
    *,
    reports: str | Path | None = None,
    split_ratios: dict[str, float] | str | None = None,
    target_spacing: Sequence[float] | None = None,
    preset: str | None = None,
    workers: int | None = None,
    max_samples_per_shard: int = 256,
    max_shard_bytes: int = 1024 * 2**20,
    salt: str | bytes | Path | None = None,
    nifti_4d: str = "samples",
    progress: bool = True,
    overwrite: bool = False,
) -> dict[str, dict[str, Any]]:
    """Convert everything under ``src`` into ``out/{train,val,test}`` shards; return ``{split: manifest}``.

    ``workers``: processes for conversion (``None``: all CPUs; ``0``: in this
    process). ``salt``: see ``pretrain.data.privacy.load_salt``. Resumes an
    interrupted run in ``out`` (same settings and salt required) unless
    ``overwrite``, which starts over. Splits with a zero ratio get no folder.
    """
    src_path, out_path = check_conversion_args(src, out, max_samples_per_shard, max_shard_bytes)
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"unknown intensity preset {preset!r}; choose one of {', '.join(PRESETS)}")
    if target_spacing is not None and (len(target_spacing) != 3 or not all(float(t) > 0 for t in target_spacing)):
        raise ValueError(f"target spacing {target_spacing!r} must be three positive numbers [d, h, w] in mm")
    if nifti_4d not in NIFTI_4D:
        raise ValueError(f"4-D NIfTI handling {nifti_4d!r}: choose {' or '.join(NIFTI_4D)}")
    salt_bytes = load_salt(salt)
    ratios = parse_split_ratios(split_ratios)
    table = read_reports(reports) if reports is not None else None
    reports_path = (Path(reports),) if reports is not None else ()
    problems: list[tuple[str, str]] = []  # FIFOs, devices, unreadable folders: listed, never opened
    files = list_source_files(src_path, exclude=(out_path,) + reports_path, problems=problems)
    if not files:
        raise ValueError(f"{src}: no candidate files found")
    settings = {
        "salt_fingerprint": salt_fingerprint(salt_bytes),  # HMAC tag of the salt: checks a resume uses the same one
        "ratios": ratios,
        "target_spacing": None if target_spacing is None else [float(t) for t in target_spacing],
        "preset": preset,
        "reports_sha256": file_sha256(reports) if reports is not None else None,
        "max_samples_per_shard": max_samples_per_shard,
        "max_shard_bytes": max_shard_bytes,
        "orientation": CANONICAL,
        "nifti_4d": nifti_4d,
    }
    out_path.mkdir(parents=True, exist_ok=True)
    if overwrite:
        for name in SPLIT_NAMES:
            shutil.rmtree(out_path / name, ignore_errors=True)
    journal = Journal(out_path / JOURNAL_NAME, settings, overwrite)

    workers = (os.cpu_count() or 1) if workers is None else workers
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    pool = ProcessPoolExecutor(workers) if workers > 0 else None
    try:
        items, skipped = plan_items(src_path, files, salt_bytes, ratios, table, pool, nifti_4d)
        skipped += [{"path": rel, "key": hashed_key(salt_bytes, "path:" + rel), "reason": reason}
                    for rel, reason in problems]
        return _write_items(src_path, out_path, items, skipped, journal, table, ratios, pool,
                            (settings["target_spacing"], preset), max_samples_per_shard, max_shard_bytes, progress)
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


def _write_items(src: Path, out: Path, items: list[WorkItem], skipped: list[dict[str, str]], journal: Journal,
                 table: ReportsTable | None, ratios: dict[str, float], pool: Any, args: tuple,
                 max_samples: int, max_bytes: int, progress: bool) -> dict[str, dict[str, Any]]:
    classes = table.classes if table else None
    # Output files name inputs by their salted keys only: folder and file names can identify patients.
    source = f"medical conversion, salt fingerprint {journal.entries[0]['settings']['salt_fingerprint']}"
    conversion = {key: journal.entries[0]["settings"].get(key) for key in ("orientation", "nifti_4d")}
    builders = {s: ManifestBuilder(source=source, classes=classes, conversion=conversion)
                for s in SPLIT_NAMES if ratios[s] > 0}
    done = restore(journal, builders)
    writers = {}
    for split, builder in builders.items():
        drop_unjournaled(out / split, {shard["name"] for shard in builder.shards}, _PREFIX)
        writers[split] = JournaledWriter(out / split, split, journal, builder, max_samples, max_bytes, _PREFIX)
    for entry in skipped:
        logger.warning("skipping %s: %s", src / entry["path"], entry["reason"])

    todo = [item for item in items if item.key not in done]
    bar = tqdm(total=len(items), initial=len(items) - len(todo), desc="medical shards", unit="sample",
               file=sys.stderr, disable=not progress, dynamic_ncols=True)
    try:
        with logging_redirect_tqdm():
            for item, result in _results(todo, pool, args):
                if "failed" in result:
                    logger.warning("skipping %s: %s", item.where, result["failed"])
                    reason = redact(result["failed"], src, item.paths)
                    builders[item.split].add_failure(item.key, reason)
                    journal.append({"failed": reason, "key": item.key, "split": item.split})
                else:
                    writers[item.split].write(item.key, result["ok"], result["shape"], result["dtype"])
                bar.update(1)
        for writer in writers.values():
            writer.finish()
    except BaseException:
        for writer in writers.values():
            writer.sink.abort()
        raise
    finally:
        bar.close()
    manifests = {}
    for split, builder in builders.items():
        manifests[split] = builder.to_dict()
        write_manifest(out / split, manifests[split])
    kept = [{"key": e["key"], "reason": e["reason"]} for e in skipped]
    (out / SKIPPED_NAME).write_text(json.dumps(kept, indent=2) + "\n", encoding="utf-8")
    return manifests


def redact(reason: str, src: Path, paths: Sequence[str]) -> str:
    """A failure reason fit for the output folder: the input's paths and folders replaced by ``<input>``."""
    names = {str(src)}
    for path in paths:
        rel = PurePosixPath(Path(path).relative_to(src).as_posix()) if Path(path).is_relative_to(src) else None
        names.update({str(path), str(Path(path).parent)})
        if rel is not None:
            names.update({str(rel), *(str(parent) for parent in rel.parents if str(parent) != ".")})
    for name in sorted(names, key=len, reverse=True):
        reason = reason.replace(name, "<input>")
    return reason


def holds_medical_files(src: str | Path) -> bool:
    """Whether ``src`` holds any NIfTI or DICOM file (DICOM recognised by content, with or without .dcm)."""
    for rel in list_source_files(Path(src)):
        path = Path(src) / rel
        if is_nifti_path(path) or has_dicom_preamble(path) or (not path.suffix and read_dicom_header(path)):
            return True
    return False


