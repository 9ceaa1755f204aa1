"""One trainer per run directory: a second is refused naming the first; a dead holder blocks nothing."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pretrain.engine import run_lock
from pretrain.tools.cli.main import EXIT_USAGE, main

HOLD = "import sys, time\nfrom pretrain.engine import run_lock\nrun_lock.acquire(sys.argv[1])\nprint('held', flush=True)\ntime.sleep(120)"


def _holder(run_dir: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_trainer_is_refused_before_it_writes_and_a_killed_holder_frees_the_directory(tiny_yaml: Path,
                                                                                          tmp_path: Path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    holder = _holder(run_dir)
    try:
        code = main(["train", str(tiny_yaml), f"train.run_dir={run_dir}", "train.steps=1", "--no-export"])
        err = capsys.readouterr().err
        assert code == EXIT_USAGE and f"pid {holder.pid} on " in err and "in use by a trainer" in err, err
        assert sorted(p.name for p in run_dir.iterdir()) == [run_lock.LOCK_NAME]  # nothing of the run written
    finally:
        os.kill(holder.pid, signal.SIGKILL)  # as a crash or kill -9 would
        holder.wait()
    # the lock file still names the dead holder, but the kernel dropped its lock
    assert f'"pid": {holder.pid}' in (run_dir / run_lock.LOCK_NAME).read_text()
    assert main(["train", str(tiny_yaml), f"train.run_dir={run_dir}", "train.steps=1", "--no-export"]) == 0
    assert (run_dir / "summary.json").exists()


def test_a_process_may_take_its_lock_twice_and_a_released_lock_serves_the_next(tmp_path: Path):
    run_lock.acquire(tmp_path)
    run_lock.acquire(tmp_path)  # the same process again: no deadlock
    run_lock.release_all()
    holder = _holder(tmp_path)  # another process can take it now
    try:
        with pytest.raises(run_lock.RunDirInUse, match=f"pid {holder.pid}"):
            run_lock.acquire(tmp_path)
    finally:
        holder.kill()
        holder.wait()
    deadline = time.monotonic() + 10
    while True:  # the kernel drops the dead holder's lock
        try:
            run_lock.acquire(tmp_path)
            break
        except run_lock.RunDirInUse:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    run_lock.release_all()
