"""One trainer per run directory.

Two ``pretrain train`` processes on one run directory interleave their
checkpoints and metrics (one was seen dying mid-save, with metrics lines lost).
The main rank holds an exclusive ``flock`` on ``RUN_DIR/.lock`` while it
trains; a second trainer is refused with the holder's host, pid and start
time. The kernel drops the lock when its holder dies, however it dies (kill -9
included), so a stale lock file never blocks a resume.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from pretrain.config import ConfigError

LOCK_NAME = ".lock"
_held: dict[str, object] = {}  # run directory -> the open lock file of this process


class RunDirInUse(ConfigError):
    """Another live trainer holds the run directory."""


def acquire(run_dir: str | Path) -> None:
    """Take ``run_dir``'s lock for this process (idempotent); raises ``RunDirInUse`` naming the holder."""
    key = str(Path(run_dir).resolve())
    if key in _held:
        return
    f = open(Path(run_dir) / LOCK_NAME, "a+", encoding="utf-8")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip()
        f.close()
        try:
            info = json.loads(holder)
            who = f"pid {info['pid']} on {info['host']}, started {info['started']}"
        except (ValueError, KeyError, TypeError):
            who = "another process"
        raise RunDirInUse(f"config key 'train.run_dir': {run_dir} is in use by a trainer ({who}); wait for it to "
                          "finish or stop it, or give another train.run_dir") from None
    f.seek(0)
    f.truncate()
    f.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                        "started": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n")
    f.flush()
    _held[key] = f


def release_all() -> None:
    """Drop every lock this process holds (the file stays: the next trainer takes it over)."""
    while _held:
        _, f = _held.popitem()
        fcntl.flock(f, fcntl.LOCK_UN)
        f.close()
