"""Shared fixtures of the trainer tests: tiny demo shards, a tiny config, N ranks of `pretrain train`.

Every run here is a real `pretrain train` started as separate OS processes
(one per rank, gloo over 127.0.0.1), exactly as a launcher would start them,
so the tests see what a user sees: exit codes, output and the run folder.
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import yaml

from pretrain.launch.local import LocalRanks, rank_environment
from pretrain.engine.distributed import free_port

# `python -m pretrain.tools.cli.main` is the `pretrain` console command, without relying on the venv's bin/ being on PATH.
PRETRAIN = [sys.executable, "-m", "pretrain.tools.cli.main"]
DEMO_SPLITS = ["pretrain_2d", "knn_train_2d", "knn_val_2d"]
RUN_TIMEOUT_S = 240.0
FAILURE_GRACE_S = 10.0  # after one rank fails, how long the others may take to fail by themselves

# Substrings that mean a rank died badly even when its exit code looks fine.
FATAL_MARKERS = ("terminate called", "Segmentation fault", "core dumped")


def tiny_config(shards: Path) -> dict:
    """A run that trains in well under a second per step on one CPU core, and whose loss falls in 10 steps."""
    return {
        "model": {"preset": "nano", "spatial_dims": 2, "img_size": 32, "patch_size": 8, "in_chans": 1,
                  "pos_embed": "sincos"},
        "objective": {"name": "mae", "mask_ratio": 0.75, "decoder_dim": 32, "decoder_depth": 1,
                      "decoder_heads": 2, "norm_pix_loss": True},
        "data": {"train": str(shards / "pretrain_2d"), "batch_size": 8, "num_workers": 0, "shuffle_buffer": 64},
        "optim": {"lr": 3.0e-3, "min_lr": 1.0e-4, "warmup_steps": 2, "weight_decay": 0.05, "grad_clip": 1.0},
        "train": {"steps": 10, "seed": 0, "precision": "fp32", "zero_stage": 0, "log_every": 1,
                  "ckpt_every": 1000, "progress": False, "export_on_end": False, "threads": 1},
        "eval": {"knn_train": None, "knn_val": None, "at_start": False},
    }


@pytest.fixture(scope="session")
def demo_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 2D demo splits at 5% scale (400 pretraining images in one shard), made once per session."""
    from pretrain.tools.demo.data import make_demo_data

    out = tmp_path_factory.mktemp("demo_shards")
    make_demo_data(out, scale=0.05, splits=DEMO_SPLITS, progress=False)
    return out


def config_file(tmp_path_factory: pytest.TempPathFactory, name: str, cfg: dict) -> Path:
    """``cfg`` written as ``<name>.yaml`` in a fresh temporary folder."""
    path = tmp_path_factory.mktemp(f"{name}_config") / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@pytest.fixture(scope="session")
def tiny_yaml(tmp_path_factory: pytest.TempPathFactory, demo_shards: Path) -> Path:
    """The tiny config as a YAML file; tests vary it with dotted overrides."""
    return config_file(tmp_path_factory, "tiny", tiny_config(demo_shards))


@dataclass
class RankResults:
    """What the ranks of one run left behind: exit codes (rank order) and combined stdout+stderr."""

    returncodes: list[int]
    outputs: list[str]

    def describe(self) -> str:
        return "\n".join(f"--- rank {r} (exit {code}) ---\n{out[-4000:]}"
                         for r, (code, out) in enumerate(zip(self.returncodes, self.outputs)))

    def assert_clean(self) -> None:
        """Every rank exited 0 and none aborted at interpreter exit."""
        assert all(code == 0 for code in self.returncodes), self.describe()
        for rank, out in enumerate(self.outputs):
            for marker in FATAL_MARKERS:
                assert marker not in out, f"rank {rank} printed {marker!r}\n{self.describe()}"


class RankGroup:
    """``world_size`` processes of ``pretrain <args>``, one per rank, started by the local launcher's machinery.

    ``args`` may be a function of the rank, to give one rank a different command line.

    Output goes to files (a full pipe would block a rank). Each rank is its own process
    group, so killing a rank kills its DataLoader workers too, as a crashed node would lose them.
    """

    def __init__(self, args: list[str] | Callable[[int], list[str]], world_size: int, cwd: Path,
                 env: dict[str, str] | None = None) -> None:
        self.world_size = world_size
        self.log_dir = Path(cwd) / f"rank_logs_{time.monotonic_ns()}"
        # CPU tests: one thread per rank on a 2-core machine, and no GPU even where one exists.
        base = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", **(env or {})}
        port = free_port()
        envs = [rank_environment(rank, world_size, port, base) for rank in range(world_size)]
        commands = [PRETRAIN + list(args(rank) if callable(args) else args) for rank in range(world_size)]
        self.ranks = LocalRanks(commands, envs, log_dir=self.log_dir, echo_rank0=False, cwd=cwd)

    def wait(self, timeout: float = RUN_TIMEOUT_S, until: Callable[[], bool] | None = None,
             grace: float = FAILURE_GRACE_S) -> bool:
        """Wait until every rank has exited, or ``until()`` holds (then True; the ranks keep running).

        Once a rank exits non-zero the others get ``grace`` seconds to exit by themselves
        and are then killed (exit code -9), so a failure never turns into a hang in a
        collective; a run past ``timeout`` is killed and fails the test.
        """
        deadline = time.monotonic() + timeout
        kill_at = None
        while True:
            all_exited = self.ranks.all_exited()
            if until is not None and until():
                return True
            if all_exited:
                return False
            if kill_at is None and self.ranks.first_failure is not None:
                kill_at = time.monotonic() + grace
            if kill_at is not None and time.monotonic() > kill_at:
                self.kill()
                return False
            if time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"ranks still running after {timeout:.0f} s; killed\n{self.results().describe()}")
            time.sleep(0.02)

    def kill(self) -> None:
        """SIGKILL every rank still running, with its children, and reap them."""
        self.ranks.kill()

    def results(self) -> RankResults:
        """Exit codes so far (-1 for a rank still running) and each rank's output."""
        outputs = [(self.log_dir / f"rank{r}.log").read_text(errors="replace") for r in range(self.world_size)]
        codes = [-1 if code is None else code for code in self.ranks.poll()]
        return RankResults(codes, outputs)

    def close(self) -> None:
        self.ranks.close()


def run_ranks(args: list[str] | Callable[[int], list[str]], world_size: int, cwd: Path, timeout: float = RUN_TIMEOUT_S,
              env: dict[str, str] | None = None) -> RankResults:
    """Start ``world_size`` ranks of ``pretrain <args>``, wait for all (killing all if one fails), return results."""
    group = RankGroup(args, world_size, cwd, env)
    try:
        group.wait(timeout)
        return group.results()
    finally:
        group.close()


def train_args(config: Path, run_dir: Path, *overrides: str) -> list[str]:
    """``pretrain train`` arguments for ``config`` writing to ``run_dir``."""
    return ["train", str(config), f"train.run_dir={run_dir}", *overrides, "--no-export"]


def read_losses(run_dir: Path) -> dict[int, float]:
    """step -> total loss, from the run's metrics.jsonl (one line per logged step; a resumed run appends)."""
    losses: dict[int, float] = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        losses[record["step"]] = record["loss/total"]
    return losses


def loss_curve(run_dir: Path, steps: int) -> list[float]:
    """The loss of steps 1..steps; fails when a step is missing from the log."""
    losses = read_losses(run_dir)
    missing = [s for s in range(1, steps + 1) if s not in losses]
    assert not missing, f"{run_dir}/metrics.jsonl lacks steps {missing}"
    return [losses[s] for s in range(1, steps + 1)]
