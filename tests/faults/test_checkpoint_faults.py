"""Damaged, incomplete and unwritable checkpoints: resume falls back or stops with one clear message,
export refuses; nothing older is lost.

The fast tests drive the save protocol with the stand-in engine of ``tests.engine.test_checkpoint``
(real files, real ``torch.save``); the slow ones damage real DeepSpeed checkpoints of `pretrain train`.
"""
from __future__ import annotations

import errno
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pretrain.engine import checkpoint as ckpt
from pretrain.storage.checkpoints import CheckpointError, NoSpaceError, resolve_checkpoint
from pretrain.tools.cli.main import EXIT_CHECKPOINT, EXIT_USAGE, main
from tests.engine.conftest import PRETRAIN, run_ranks, train_args, tiny_yaml, demo_shards  # noqa: F401 (fixtures)
from tests.engine.test_checkpoint import _save, _step_folders

MODEL = "mp_rank_00_model_states.pt"


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


# --- checksums and fallback, in process ------------------------------------------------------

def test_a_truncated_newest_checkpoint_falls_back_to_the_newest_intact_one(tmp_path: Path, caplog):
    ckpt_dir = tmp_path / "checkpoints"
    for step in (2, 4, 6):
        _save(ckpt_dir, step, keep=3)
    _truncate(ckpt_dir / "step_00000006" / MODEL)
    with caplog.at_level("WARNING"):
        assert ckpt.resume_tag(ckpt_dir) == "step_00000004"
    assert f"{ckpt_dir / 'step_00000006' / MODEL} has 25 bytes, 50 were written" in caplog.text
    assert "resuming from step_00000004" in caplog.text
    # kept for inspection, out of the way of pruning and of the next resume
    assert _step_folders(ckpt_dir) == ["step_00000002", "step_00000004", "step_00000006.damaged"]
    assert ckpt.latest_tag(ckpt_dir) == "step_00000004"
    _save(ckpt_dir, 5, keep=1)
    assert _step_folders(ckpt_dir) == ["step_00000005", "step_00000006.damaged"]


def test_changed_bytes_of_the_same_size_are_found(tmp_path: Path):
    ckpt_dir = tmp_path / "checkpoints"
    _save(ckpt_dir, 2)
    rank_file = ckpt_dir / "step_00000002" / "rank00000_state.pt"
    data = bytearray(rank_file.read_bytes())
    data[-30] ^= 0xFF
    rank_file.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"no intact checkpoint in .*{rank_file} does not match its checksum"):
        ckpt.resume_tag(ckpt_dir)


def test_with_no_intact_checkpoint_resume_and_export_name_the_files(tmp_path: Path, capsys):
    run = tmp_path / "run"
    ckpt_dir = run / "checkpoints"
    for step in (2, 4):
        _save(ckpt_dir, step)
    (ckpt_dir / "step_00000004" / MODEL).unlink()
    _truncate(ckpt_dir / "step_00000002" / "rank00000_state.pt")
    with pytest.raises(CheckpointError) as err:
        ckpt.resume_tag(ckpt_dir)
    assert f"{ckpt_dir / 'step_00000004' / MODEL} is missing" in str(err.value)
    assert f"{ckpt_dir / 'step_00000002' / 'rank00000_state.pt'} has" in str(err.value)
    assert _step_folders(ckpt_dir) == ["step_00000002", "step_00000004"], "a refused resume moves nothing"

    assert main(["export", str(run), str(tmp_path / "export")]) == EXIT_CHECKPOINT
    out = capsys.readouterr().err.strip()
    assert out.count("\n") == 0 and f"{ckpt_dir / 'step_00000004' / MODEL} is missing" in out, out
    assert not (tmp_path / "export").exists()


def test_export_of_a_damaged_latest_refuses_and_points_at_the_intact_one(tmp_path: Path):
    ckpt_dir = tmp_path / "checkpoints"
    for step in (2, 4):
        _save(ckpt_dir, step)
    _truncate(ckpt_dir / "step_00000004" / MODEL)
    with pytest.raises(CheckpointError, match=r"step_00000004 is damaged: .* the newest intact checkpoint is .*step_00000002"):
        resolve_checkpoint(ckpt_dir)
    assert resolve_checkpoint(ckpt_dir / "step_00000002") == ckpt_dir / "step_00000002"


def _legacy_two_rank_zero2(folder: Path) -> None:
    """A 2-rank ZeRO-2 checkpoint as written before checksums: COMPLETE holds the step alone."""
    folder.mkdir(parents=True)
    for name in [MODEL, "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt",
                 "rank00000_state.pt", "rank00001_state.pt", "config.yaml"]:
        (folder / name).write_bytes(b"x")
    (folder / ckpt.COMPLETE).write_text("4\n")


def test_checkpoints_without_checksums_still_resolve(tmp_path: Path):
    ckpt_dir = tmp_path / "checkpoints"
    _legacy_two_rank_zero2(ckpt_dir / "step_00000004")
    (ckpt_dir / ckpt.LATEST).write_text("step_00000004\n")
    assert ckpt.resume_tag(ckpt_dir) == "step_00000004"
    assert resolve_checkpoint(tmp_path) == ckpt_dir / "step_00000004"


@pytest.mark.parametrize("lost", ["zero_pp_rank_1_mp_rank_00_optim_states.pt", "rank00000_state.pt", MODEL])
def test_a_checkpoint_without_checksums_missing_one_rank_file_is_refused(tmp_path: Path, lost: str):
    ckpt_dir = tmp_path / "checkpoints"
    _legacy_two_rank_zero2(ckpt_dir / "step_00000004")
    (ckpt_dir / ckpt.LATEST).write_text("step_00000004\n")
    (ckpt_dir / "step_00000004" / lost).unlink()
    with pytest.raises(CheckpointError, match=f"step_00000004 is damaged: .*{lost}"):
        resolve_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match=f"no intact checkpoint .*{lost}"):
        ckpt.resume_tag(ckpt_dir)


# --- free space ------------------------------------------------------------------------------

def test_a_checkpoint_that_cannot_fit_is_refused_before_writing(tmp_path: Path):
    ckpt_dir = tmp_path / "checkpoints"
    _save(ckpt_dir, 2)
    # The estimate is the previous checkpoint's size: a sparse file makes it larger than the disk, costing nothing.
    st = os.statvfs(ckpt_dir)
    with open(ckpt_dir / "step_00000002" / "notes.bin", "wb") as f:
        f.truncate(2 * st.f_bavail * st.f_frsize + (1 << 30))
    with pytest.raises(NoSpaceError) as err:
        _save(ckpt_dir, 4)
    message = str(err.value)
    assert err.value.errno == errno.ENOSPC and isinstance(err.value, OSError)
    assert f"not enough free space for a checkpoint in {ckpt_dir}" in message and "the size of step_00000002" in message
    needed, free = map(int, re.search(r"needs about .*?\((\d+) bytes\).*?\((\d+) bytes\) are free", message).groups())
    assert needed > free > 0, message
    assert _step_folders(ckpt_dir) == ["step_00000002"] and ckpt.latest_tag(ckpt_dir) == "step_00000002"


# Saves step 4 with the file-size limit the parent gives, SIGXFSZ ignored so that a write over it fails
# (EFBIG) instead of killing the process, as on a full disk; prints what was raised.
FULL_DISK_SAVE = r'''
import json, resource, signal, sys
from pathlib import Path
import torch
from pretrain.engine import checkpoint as ckpt

ckpt_dir, how, limit = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])

class BigEngine:
    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        folder = Path(save_dir) / tag
        folder.mkdir(parents=True, exist_ok=True)
        if how == "torch.save":  # as DeepSpeed writes its files
            torch.save({"module": {"w": torch.zeros(1 << 18)}}, folder / "mp_rank_00_model_states.pt")
        else:
            (folder / "mp_rank_00_model_states.pt").write_bytes(b"0" * (1 << 20))

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
try:
    ckpt.save_checkpoint(BigEngine(), ckpt_dir, 4, {"step": 4}, {}, "steps: 4\n", 2)
except Exception as e:
    print(json.dumps({"type": type(e).__name__, "errno": getattr(e, "errno", None), "message": str(e)}))
'''


@pytest.mark.parametrize("how", ["torch.save", "write"])
def test_a_disk_that_fills_during_a_save_says_so_and_keeps_the_older_checkpoints(tmp_path: Path, how: str):
    ckpt_dir = tmp_path / "checkpoints"
    _save(ckpt_dir, 2)
    before = {p.name: p.read_bytes() for p in (ckpt_dir / "step_00000002").iterdir()}
    proc = subprocess.run([sys.executable, "-c", FULL_DISK_SAVE, str(ckpt_dir), how, str(256 << 10)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip(), proc.stderr[-3000:]
    raised = json.loads(proc.stdout.strip().splitlines()[-1])
    assert raised["type"] == "NoSpaceError" and raised["errno"] == errno.ENOSPC, raised
    assert f"writing the checkpoint {ckpt_dir / 'step_00000004.partial'} failed on rank 0" in raised["message"]
    assert "out of space?" in raised["message"] and f"free in {ckpt_dir}" in raised["message"]
    if how == "write":
        assert "file-size limit" in raised["message"], raised["message"]
    assert _step_folders(ckpt_dir) == ["step_00000002"], "no half checkpoint is left behind"
    assert ckpt.latest_tag(ckpt_dir) == "step_00000002"
    assert {p.name: p.read_bytes() for p in (ckpt_dir / "step_00000002").iterdir()} == before
    assert ckpt.resume_tag(ckpt_dir) == "step_00000002"


# --- end to end, real DeepSpeed checkpoints ---------------------------------------------------

@pytest.mark.slow
def test_a_truncated_real_checkpoint_is_refused_by_export_and_skipped_by_resume(tiny_yaml: Path, tmp_path: Path, capsys):
    run = tmp_path / "run"
    overrides = ["train.ckpt_every=2", "train.keep_checkpoints=3"]
    run_ranks(train_args(tiny_yaml, run, "train.steps=4", *overrides), 1, tmp_path).assert_clean()
    damaged = run / "checkpoints" / "step_00000004" / MODEL
    _truncate(damaged)  # today: a raw PytorchStreamReader error, and step 2 never used

    assert main(["export", str(run), str(tmp_path / "export")]) == EXIT_CHECKPOINT
    assert f"{damaged} has" in capsys.readouterr().err

    results = run_ranks(train_args(tiny_yaml, run, "train.steps=6", *overrides), 1, tmp_path)
    results.assert_clean()
    out = results.outputs[0]
    assert f"checkpoint {damaged.parent} is damaged ({damaged} has" in out and "resuming at step 2" in out, out[-3000:]
    assert _step_folders(run / "checkpoints") == ["step_00000002", "step_00000004", "step_00000004.damaged",
                                                  "step_00000006"]
    assert ckpt.resume_tag(run / "checkpoints") == "step_00000006"


@pytest.mark.slow
def test_a_zero2_checkpoint_missing_one_ranks_optimizer_file_is_refused_on_every_rank(tiny_yaml: Path, tmp_path: Path,
                                                                                       capsys):
    run = tmp_path / "run"
    args = ["train.steps=2", "train.ckpt_every=2", "train.zero_stage=2"]
    run_ranks(train_args(tiny_yaml, run, *args), 2, tmp_path).assert_clean()
    lost = run / "checkpoints" / "step_00000002" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    lost.unlink()  # today: exported with exit 0

    assert main(["export", str(run), str(tmp_path / "export")]) == EXIT_CHECKPOINT
    assert f"{lost} is missing" in capsys.readouterr().err
    # Both ranks find it (each checks its share, the verdict is shared) and stop alike; none hangs.
    results = run_ranks(train_args(tiny_yaml, run, "train.steps=4", *args[1:]), 2, tmp_path)
    assert results.returncodes == [EXIT_CHECKPOINT] * 2, results.describe()
    for out in results.outputs:
        assert "pretrain: checkpoint error: no intact checkpoint" in out and f"{lost} is missing" in out, out[-3000:]
        assert "Traceback" not in out


@pytest.mark.slow
def test_train_then_export_refuses_a_diverged_run(tiny_yaml: Path, tmp_path: Path):
    """lr 1e30 (the config refuses inf and more than 1e30): weights finite but too large to compute with; NaN weights: test_export."""
    run = tmp_path / "run"
    proc = subprocess.run([*PRETRAIN, "train", str(tiny_yaml), f"train.run_dir={run}", "train.steps=3", "optim.lr=1e30",
                           "optim.grad_clip=0",
                           "train.export_on_end=true"], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == EXIT_USAGE, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"pretrain: error: trained 3 steps in {run}, but not exported: "), last
    assert "gives NaN or inf features" in last and "largest weight is" in last, last
    assert not (run / "export").exists() and (run / "checkpoints" / "step_00000003").is_dir()
