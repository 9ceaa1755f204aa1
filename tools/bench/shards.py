"""``pretrain bench shards``: DICOM-to-shard conversion throughput (files/s, MB/s).

Builds CT series from pydicom's own ``CT_small.dcm`` (one file per slice, file
names unrelated to slice order, as scanners write them), then converts the
folder with ``write_medical_shards`` once per worker count, side by side in
one run.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any, Sequence

from pretrain.tools.bench.common import format_table, median

SALT = "medpretrain-bench-salt-not-secret"


def make_ct_folder(out: Path, series: int, slices: int) -> tuple[int, int]:
    """``series`` CT series of ``slices`` files each under ``out``; returns (files, bytes)."""
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    template = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    files = nbytes = 0
    for s in range(series):
        folder = out / f"patient{s:04d}" / "ct"
        folder.mkdir(parents=True, exist_ok=True)
        template.PatientID, template.SeriesInstanceUID = f"P{s:04d}", generate_uid()
        template.StudyInstanceUID = generate_uid()
        for i in range(slices):
            template.SOPInstanceUID = generate_uid()
            template.ImagePositionPatient = [0.0, 0.0, 2.5 * i]
            path = folder / f"{(i * 7919) % 100003:06d}"
            template.save_as(path)
            files += 1
            nbytes += path.stat().st_size
    return files, nbytes


def run_shards_bench(*, series: int, slices: int, workers: Sequence[int], repeats: int, scratch: Path) -> dict[str, Any]:
    from pretrain.tools.ingest.medical import write_medical_shards

    src = scratch / "dicom"
    files, nbytes = make_ct_folder(src, series, slices)
    runs = []
    for n in workers:
        seconds = []
        for r in range(repeats):
            out = scratch / f"out-{n}-{r}"
            start = time.perf_counter()
            write_medical_shards(src, out, salt=SALT, workers=n, progress=False)
            seconds.append(time.perf_counter() - start)
            shutil.rmtree(out)
        best = median(seconds)
        runs.append({"workers": n, "seconds": seconds, "files_per_s": files / best, "mb_per_s": nbytes / 2**20 / best})
    return {"input": {"series": series, "slices_per_series": slices, "files": files, "mbytes": nbytes / 2**20},
            "runs": runs}


def print_shards_summary(result: dict[str, Any]) -> None:
    rows = [(r["workers"], f"{r['files_per_s']:.0f}", f"{r['mb_per_s']:.1f}") for r in result["runs"]]
    print(format_table(["workers", "files/s", "MB/s"], rows))
