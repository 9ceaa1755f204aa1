"""Ctrl-C and SIGTERM to a plain `pretrain train`: a checkpoint at the next step boundary, a non-zero exit
that says how to resume, and the rerun continues from there."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from pretrain.engine import checkpoint as ckpt
from tests.engine.conftest import PRETRAIN, read_losses, train_args


def _interrupt_after_steps(args: list[str], run_dir: Path, sig: signal.Signals, steps: int) -> tuple[int, str]:
    # its own session: the signal goes to the whole process group, loader workers included, as a terminal's
    # Ctrl-C and a scheduler's SIGTERM do (a worker it killed used to crash the run: exit 1, no checkpoint)
    proc = subprocess.Popen(PRETRAIN + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        metrics = run_dir / "metrics.jsonl"
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= steps):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.05)
        os.killpg(proc.pid, sig)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
        proc.wait()
    return proc.returncode, err


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_checkpoints_the_step_and_the_rerun_resumes(tiny_yaml: Path, tmp_path: Path, sig):
    run_dir = tmp_path / "run"
    args = train_args(tiny_yaml, run_dir, "train.steps=400", "train.ckpt_every=1000", "data.num_workers=1")
    code, err = _interrupt_after_steps(args, run_dir, sig, steps=3)
    assert code == 128 + sig, err[-3000:]
    tag = ckpt.latest_tag(run_dir / "checkpoints")
    assert tag is not None, "no checkpoint: the steps since the start were lost"
    step = int(tag.split("_")[1])
    assert 3 <= step < 400 and f"stopped by {sig.name} after step {step}" in err and "to resume" in err
    assert "Traceback" not in err and not (run_dir / "summary.json").exists()

    done = subprocess.run(PRETRAIN + train_args(tiny_yaml, run_dir, f"train.steps={step + 2}", "train.ckpt_every=1000",
                                                "data.num_workers=1"),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resuming at step {step}" in done.stderr
    assert sorted(read_losses(run_dir))[-1] == step + 2


def test_the_requeue_signal_wins_and_a_second_ctrl_c_stops_at_once():
    import torch

    from pretrain.engine.preemption import StopRequest

    stop = StopRequest()
    stop._record(signal.SIGINT, None)
    stop._record(signal.SIGTERM, None)
    assert stop.agreed(torch.device("cpu")) == signal.SIGTERM
    stop._record(signal.SIGUSR2, None)
    stop._record(signal.SIGTERM, None)
    assert stop.agreed(torch.device("cpu")) == signal.SIGUSR2  # a time limit asks for a requeue: it wins

    previous = signal.getsignal(signal.SIGINT)
    try:
        stop = StopRequest()
        stop._record(signal.SIGINT, None)
        with pytest.raises(KeyboardInterrupt):
            stop._record(signal.SIGINT, None)
    finally:
        signal.signal(signal.SIGINT, previous)
