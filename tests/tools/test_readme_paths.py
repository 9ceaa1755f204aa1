"""The README's "Your own data" and "From a folder of DICOM studies" run as written, on generated data.

The commands are read out of README.md itself and run by bash in a scratch folder; only the input paths
(``/data/...``) point at generated files, and a ``pretrain`` shell function appends settings that shrink
the runs to seconds (a nano model, 2 steps, fewer bootstrap replicates). Everything else, including the
order of the commands and every option the README shows, is the README's.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import nibabel
import numpy as np
import pytest
from PIL import Image

from pretrain.storage.cache import extension_cache_dir
from tests.data.test_medical_shards import _write_ct_series

REPO = Path(__file__).resolve().parents[2]

# Scale only: appended to the README's own arguments, so later overrides win.
SHRINK = r'''
pretrain() {
  case "$1" in
    train) command pretrain "$@" model.preset=nano model.img_size=32 model.patch_size=8 model.act_checkpoint=false \
             objective.decoder_dim=32 objective.decoder_depth=1 objective.decoder_heads=2 data.batch_size=4 \
             data.num_workers=0 data.shuffle_buffer=16 train.steps=2 train.log_every=1 train.threads=1 \
             train.precision=fp32 train.zero_stage=0 train.progress=false ;;
    eval) command pretrain "$@" --protocols knn linear fewshot --bootstrap 20 --fewshot-seeds 1 ;;
    *) command pretrain "$@" ;;
  esac
}
'''


def readme_block(heading: str) -> str:
    """The first ```bash block under ``heading`` in README.md."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text[text.index(f"\n{heading}\n"):]
    match = re.search(r"```bash\n(.*?)```", section, re.S)
    assert match, f"no bash block under {heading!r}"
    return match.group(1)


def _png_folder(root: Path) -> None:
    """/data/cxr: 16-bit grey PNGs of 12 patients (3 images each, two classes) and labels.csv beside the run."""
    rng = np.random.default_rng(0)
    lines = ["path,label,patient"]
    for p in range(12):
        for i in range(3):
            rel = f"{'ward_a' if p % 2 else 'ward_b'}/p{p:02d}_{i}.png"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 4096, (48, 48), np.uint16)).save(root / rel)
            lines.append(f"{rel},{'effusion' if (p + i) % 2 else 'normal'},MRN{p:05d}")
    (root.parent.parent / "labels.csv").write_text("\n".join(lines) + "\n")


def _ct_folder(root: Path) -> None:
    """/data/ct_studies: axial CT series of 6 patients, one NIfTI volume, and reports.csv beside the run."""
    lines = ["path,report,label"]
    for p in range(6):
        folder = root / f"patient{p}" / "ct"
        _write_ct_series(folder, f"PID{p:04d}", f"Doe^{p}", [0.0, 2.5, 5.0, 7.5])
        lines.append(f"patient{p}/ct,{'Nodule in the right upper lobe.' if p % 2 else 'No acute findings.'},"
                     f"{'nodule' if p % 2 else 'normal'}")
    nii = root / "patient9" / "t1.nii.gz"
    nii.parent.mkdir(parents=True)
    nibabel.save(nibabel.Nifti1Image(np.random.default_rng(1).integers(0, 500, (40, 40, 12), np.int16),
                                     np.diag([-0.9, 0.9, 2.0, 1.0])), nii)
    (root.parent.parent / "reports.csv").write_text("\n".join(lines) + "\n")


def run_section(heading: str, work: tuple[Path, dict[str, str]]) -> Path:
    """Run the README's block under ``heading`` in the scratch folder (which holds ``data/``); returns it."""
    root, env = work
    script = root / "readme.sh"
    script.write_text("set -euo pipefail\n" + SHRINK + readme_block(heading).replace("/data/", f"{root}/data/"))
    done = subprocess.run(["bash", str(script)], cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return root


@pytest.fixture()
def work(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    (tmp_path / "configs").symlink_to(REPO / "configs")  # the README's configs/... paths are the repository's
    home = tmp_path / "home"
    home.mkdir()
    env = dict(os.environ, HOME=str(home), MEDPRETRAIN_CACHE=str(tmp_path / "cache"),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
               # the C++ op DeepSpeed builds is this environment's: reuse its build, not a 40 s rebuild
               TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR") or str(extension_cache_dir()))
    for key in ("MEDPRETRAIN_SALT", "MEDPRETRAIN_SALT_FILE", "RANK", "WORLD_SIZE", "MASTER_PORT", "MASTER_ADDR"):
        env.pop(key, None)
    return tmp_path, env


@pytest.mark.slow
def test_your_own_data_runs_as_written(work):
    _png_folder(work[0] / "data" / "cxr")
    root = run_section("## Your own data", work)
    counts = {s: json.loads((root / "shards" / "cxr" / s / "manifest.json").read_text())["num_samples"]
              for s in ("train", "val", "test")}
    assert sum(counts.values()) == 36 and counts["train"] > 0, counts
    summary = json.loads((root / "runs" / "cxr-mae" / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["eval"]["pretrained"]["linear"] is not None
    results = json.loads((root / "evals" / "cxr-mae" / "results.json").read_text())
    assert {"pretrained", "random_init", "raw_pixels"} <= set(results["subjects"])
    assert (root / "exports" / "cxr-mae" / "model.safetensors").is_file()


@pytest.mark.slow
def test_from_a_folder_of_dicom_studies_runs_as_written(work):
    _ct_folder(work[0] / "data" / "ct_studies")
    root = run_section("## From a folder of DICOM studies to a training run", work)
    manifest = json.loads((root / "shards" / "ct" / "train" / "manifest.json").read_text())
    assert manifest["num_samples"] > 0 and manifest["conversion"]["orientation"] == "SAR"
    assert (root / "home" / ".medpretrain_salt").stat().st_size > 16
    summary = json.loads((root / "runs" / "ct-mae-vitb" / "summary.json").read_text())
    assert summary["steps"] == 2
