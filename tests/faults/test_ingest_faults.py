"""Faults of `pretrain shards write` on image folders, and of shard folders that training reads (issue 17, item 5).

Each test reproduces one observed fault with the real thing (a kill -9 of a real conversion, a FIFO, a file
that cannot be read) and checks it now ends in one clear message or in a recovery.
"""
from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pretrain.config import load_config
from pretrain.data.errors import DataError
from pretrain.data.manifest import JOURNAL_NAME, MANIFEST_NAME, read_manifest, unfinished_conversion
from pretrain.data.shardlists import expand_shards
from pretrain.engine.preflight import check_shard_sets
from pretrain.tools.cli.main import EXIT_DATA, main
from pretrain.tools.ingest.images import write_shards, write_split_shards

REPO = Path(__file__).resolve().parents[2]
DEMO = str(REPO / "configs" / "demo.yaml")
CLI = [sys.executable, "-m", "pretrain.tools.cli.main"]
NO_EVAL = ["eval.knn_train=", "eval.knn_val="]


def _pngs(folder: Path, count: int, folders: int = 1) -> None:
    rng = np.random.default_rng(0)
    for i in range(count):
        path = folder / f"d{i % folders:02d}" / f"img{i:05d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (8, 8), np.uint8)).save(path)


def _shards(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.tar"))}


def _listing(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.slow
def test_killed_conversion_is_refused_by_training_and_resumes_to_the_uninterrupted_shards(tmp_path: Path, capsys):
    src, out, clean = tmp_path / "src", tmp_path / "out", tmp_path / "clean"
    _pngs(src, 1200, folders=4)  # 120 shards of 10: enough fsyncs that the kill lands mid-way
    args = ["shards", "write", str(src), "--samples-per-shard", "10", "--no-progress"]
    assert main(args[:3] + [str(clean)] + args[3:]) == 0
    capsys.readouterr()

    proc = subprocess.Popen(CLI + args[:3] + [str(out)] + args[3:], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    journal = out / JOURNAL_NAME
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if journal.exists() and journal.read_text().count('{"shard": ') >= 1:  # the prefix is "shard" too
            break
        time.sleep(0.005)
    running = proc.poll() is None
    os.killpg(proc.pid, signal.SIGKILL)  # no cleanup runs
    stderr = proc.communicate()[1].decode()
    assert running, f"the conversion ended before it was killed: {stderr}"
    assert not (out / MANIFEST_NAME).exists(), "the conversion finished before it was killed"
    assert 1 <= len(_shards(out)) < len(_shards(clean))

    # Training on the half-written folder is refused before the run directory exists, saying how to finish it.
    run_dir = tmp_path / "run"
    code = main(["train", DEMO, f"data.train={out}", *NO_EVAL, f"train.run_dir={run_dir}", "train.steps=1",
                 "--no-export"])
    err = capsys.readouterr().err.strip()
    assert code == EXIT_DATA and "Traceback" not in err, err
    err = err.splitlines()[-1]  # the one line of ours, after any of torch's start-up warnings
    assert err.startswith("pretrain: data error: config key 'data.train':"), err
    assert str(out) in err and "rerunning the same `pretrain shards write` command" in err, err
    assert "data.allow_incomplete_shards" in err and not run_dir.exists()

    # A rerun with another setting is refused, naming the setting, and touches nothing.
    before = _listing(out)
    changed = subprocess.run(CLI + args[:3] + [str(out), "--samples-per-shard", "11", "--no-progress"],
                             capture_output=True, text=True, timeout=120)
    assert changed.returncode != 0 and "Traceback" not in changed.stderr, changed.stderr
    assert "max_samples_per_shard: was 10, now 11" in changed.stderr and "--overwrite" in changed.stderr
    assert _listing(out) == before

    # The same command finishes it: the shards and manifest of an uninterrupted run, byte for byte.
    resumed = subprocess.run(CLI + args[:3] + [str(out)] + args[3:], capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert read_manifest(out) == read_manifest(clean)
    assert _shards(out) == _shards(clean)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in clean.iterdir())  # no journal, no .tmp
    assert unfinished_conversion(out) is None


def _unreadable_file(src: Path) -> None:
    """src/locked.png that cannot be read: chmod 000, or (as root, who reads it anyway) an I/O error."""
    locked = src / "locked.png"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(locked)
    locked.chmod(0)
    try:
        with open(locked, "rb"):
            pass
    except PermissionError:
        return
    if not Path("/proc/self/mem").exists():
        pytest.skip("running as root (chmod 000 does not stop reading) and no /proc/self/mem for an I/O error")
    locked.unlink()
    locked.symlink_to("/proc/self/mem")  # reading its offset 0 fails with EIO in whichever process reads it


def test_an_unreadable_file_is_listed_as_failed_and_the_rest_converted(tmp_path: Path, capsys):
    src, out = tmp_path / "src", tmp_path / "out"
    _pngs(src, 3)
    _unreadable_file(src)
    assert main(["shards", "write", str(src), str(out), "--no-progress"]) == 0
    assert "3 samples, 1 failed" in capsys.readouterr().out
    manifest = read_manifest(out)
    assert [f["path"] for f in manifest["failed"]] == ["locked.png"]
    assert manifest["failed"][0]["reason"].startswith("cannot be read (")


def test_an_unreadable_subfolder_is_listed_as_failed(tmp_path: Path):
    src = tmp_path / "src"
    _pngs(src, 4, folders=2)
    (src / "d01").chmod(0)
    try:
        os.listdir(src / "d01")
        pytest.skip("running as root: chmod 000 does not stop root listing a folder, and no other unlistable "
                    "folder can be made without a special file system")
    except PermissionError:
        pass
    try:
        manifest = write_shards(src, tmp_path / "out", progress=False)
    finally:
        (src / "d01").chmod(0o755)  # so that pytest can delete it
    assert manifest["num_samples"] == 2
    assert manifest["failed"] == [{"path": "d01", "reason": "folder cannot be read (Permission denied)"}]


def test_fifos_and_broken_links_in_an_image_folder_are_listed_never_opened(tmp_path: Path):
    src, out = tmp_path / "src", tmp_path / "out"
    _pngs(src, 2)
    os.mkfifo(src / "pipe.png")  # would block the image reader
    os.mkfifo(src / "pipe")  # would block the DICOM probe that runs on files with no suffix
    (src / "gone.png").symlink_to(src / "no_such_file.png")
    done = subprocess.run(CLI + ["shards", "write", str(src), str(out), "--no-progress"],
                          capture_output=True, text=True, timeout=120)  # a hang fails here, not forever
    assert done.returncode == 0, done.stderr
    failed = {f["path"]: f["reason"] for f in read_manifest(out)["failed"]}
    assert failed["pipe.png"] == failed["pipe"] == "not a regular file (a FIFO): skipped without opening it"
    assert failed["gone.png"].startswith("broken symbolic link")
    assert read_manifest(out)["num_samples"] == 2


@pytest.fixture()
def finished(tmp_path: Path) -> Path:
    src, out = tmp_path / "src", tmp_path / "finished"
    _pngs(src, 6)
    write_shards(src, out, max_samples_per_shard=2, progress=False)
    return out


def test_a_fifo_named_tar_in_a_shard_folder_is_an_error_naming_it(finished: Path, tmp_path: Path):
    plain = tmp_path / "plain"  # shards, no manifest: read by their names
    plain.mkdir()
    for shard in finished.glob("*.tar"):
        shutil.copy(shard, plain / shard.name)
    os.mkfifo(plain / "shard-000009.tar")
    listed = tmp_path / "listed"  # a manifest that lists a shard which is a FIFO
    shutil.copytree(finished, listed)
    (listed / "shard-000001.tar").unlink()
    os.mkfifo(listed / "shard-000001.tar")
    for spec in (str(plain), str(plain / "*.tar"), str(listed), [str(listed / "shard-000001.tar")]):
        with pytest.raises(DataError, match=r"shard-00000[19]\.tar: this shard is not a regular file \(a FIFO\)"):
            expand_shards(spec)


@pytest.mark.slow
def test_training_on_a_fifo_shard_exits_with_a_data_error_instead_of_blocking(finished: Path, tmp_path: Path):
    os.mkfifo(finished / "shard-000007.tar")
    shutil.move(finished / MANIFEST_NAME, tmp_path / MANIFEST_NAME)  # plain shards, named by the folder's *.tar
    run_dir = tmp_path / "run"
    done = subprocess.run(CLI + ["train", DEMO, f"data.train={finished}", *NO_EVAL, f"train.run_dir={run_dir}",
                                 "train.steps=1", "--no-export"],
                          capture_output=True, text=True, timeout=300)  # it blocked forever at step 0
    err = done.stderr.strip().splitlines()[-1]
    assert done.returncode == EXIT_DATA and "Traceback" not in done.stderr, done.stderr
    assert err.startswith("pretrain: data error: config key 'data.train':") and "shard-000007.tar" in err, err
    assert not run_dir.exists()


def test_training_refuses_a_folder_with_a_partly_written_shard_unless_allowed(finished: Path, caplog):
    (finished / "shard-000003.tar.tmp").write_bytes(b"a conversion is writing this shard")
    cfg = load_config(DEMO, [f"data.train={finished}", *NO_EVAL])
    with pytest.raises(DataError, match="unfinished shard conversion .*partly written shard shard-000003.tar.tmp"):
        check_shard_sets(cfg)
    allowed = load_config(DEMO, [f"data.train={finished}", *NO_EVAL, "data.allow_incomplete_shards=true"])
    with caplog.at_level(logging.WARNING, logger="pretrain.engine.trainer"):
        check_shard_sets(allowed)
    assert "unfinished shard conversion" in caplog.text and str(finished) in caplog.text


def test_training_refuses_a_split_folder_whose_journal_has_no_manifest_yet(tmp_path: Path):
    src, out = tmp_path / "src", tmp_path / "out"
    _pngs(src, 12)
    write_split_shards(src, out, "0.5,0.5,0", progress=False)
    (out / JOURNAL_NAME).write_text('{"settings": {}}\n')  # as a kill between the train and val manifests leaves
    (out / "val" / MANIFEST_NAME).unlink()
    check_shard_sets(load_config(DEMO, [f"data.train={out / 'train'}", *NO_EVAL]))  # whole: its manifest is there
    with pytest.raises(DataError, match=f"config key 'eval.knn_val': {out / 'val'} is an unfinished .*{JOURNAL_NAME}"):
        check_shard_sets(load_config(DEMO, [f"data.train={out / 'train'}", f"eval.knn_train={out / 'train'}",
                                            f"eval.knn_val={out / 'val'}"]))


def test_plain_shard_folders_lists_and_globs_still_train(finished: Path, tmp_path: Path):
    plain = tmp_path / "plain"  # shards someone else made: no manifest, no journal, no .tmp
    plain.mkdir()
    for shard in finished.glob("*.tar"):
        shutil.copy(shard, plain / shard.name)
    for spec in (str(plain), str(plain / "shard-{000000..000002}.tar"), str(plain / "*.tar")):
        check_shard_sets(load_config(DEMO, [f"data.train={spec}", *NO_EVAL]))
    assert unfinished_conversion(plain) is None and unfinished_conversion(finished) is None


def test_a_fifo_in_a_nifti_folder_is_skipped_never_opened(tmp_path: Path):
    import json

    import nibabel

    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    nibabel.save(nibabel.Nifti1Image(np.zeros((4, 4, 3), np.int16), np.eye(4)), src / "t1.nii.gz")
    os.mkfifo(src / "pipe")  # no suffix: the DICOM probe would open it and wait forever
    env = dict(os.environ, MEDPRETRAIN_SALT="test-salt-0123456789abcdef")
    done = subprocess.run(CLI + ["shards", "write", str(src), str(out), "--workers", "0", "--no-progress"],
                          capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    assert "pipe: not a regular file (a FIFO)" in done.stderr
    skipped = json.loads((out / "skipped.json").read_text())
    assert [s["reason"] for s in skipped] == ["not a regular file (a FIFO): skipped without opening it"]


def test_an_interrupted_split_conversion_resumes_to_the_uninterrupted_splits(tmp_path: Path, monkeypatch):
    import pretrain.tools.ingest.images as images

    src, out, clean = tmp_path / "src", tmp_path / "out", tmp_path / "clean"
    _pngs(src, 40)
    os.mkfifo(src / "a_pipe.png")  # sorts first: a failure journaled before the crash is listed once, in its place
    kwargs = dict(max_samples_per_shard=3, progress=False)
    write_split_shards(src, clean, "0.5,0.5,0", **kwargs)
    real, calls = images.encode_sample, []

    def crash_on_the_25th(*args, **kw):  # a crash with shards of both splits done and both half-filled
        calls.append(1)
        if len(calls) == 25:
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(images, "encode_sample", crash_on_the_25th)
    with pytest.raises(KeyboardInterrupt):
        write_split_shards(src, out, "0.5,0.5,0", **kwargs)
    monkeypatch.setattr(images, "encode_sample", real)
    journal = (out / JOURNAL_NAME).read_text()
    assert journal.count('{"failed": ') == 1 and journal.count('{"shard": ') >= 4
    assert all(unfinished_conversion(out / split) for split in ("train", "val"))
    with pytest.raises(ValueError, match=r"split_seed: was 0, now 1.*--overwrite"):
        write_split_shards(src, out, "0.5,0.5,0", split_seed=1, **kwargs)
    write_split_shards(src, out, "0.5,0.5,0", **kwargs)
    for split in ("train", "val"):
        assert read_manifest(out / split) == read_manifest(clean / split)
        assert _shards(out / split) == _shards(clean / split)
    assert not (out / JOURNAL_NAME).exists()
