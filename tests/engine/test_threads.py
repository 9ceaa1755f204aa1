"""The thread plan: from the cores this process may use, the ranks sharing them and train.threads."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from pretrain.engine.threads import busy_cores, plan_threads


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for key in ("SLURM_CPUS_PER_TASK", "SLURM_NTASKS_PER_NODE", "LOCAL_WORLD_SIZE", "OMP_NUM_THREADS"):
        monkeypatch.delenv(key, raising=False)


def test_the_affinity_mask_bounds_the_threads():
    """A process pinned to one core (as taskset or a container does) plans one thread, whatever the machine has."""
    code = ("import os; os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]}); "
            "from pretrain.engine.threads import plan_threads; p = plan_threads(0, 2); "
            "print(p.threads, p.cores, p.cores_from)")
    env = {k: v for k, v in os.environ.items() if k not in ("SLURM_CPUS_PER_TASK", "OMP_NUM_THREADS")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    assert out.split() == ["1", "1", "CPU", "affinity"]


def test_local_ranks_share_the_cores(monkeypatch):
    cores = len(os.sched_getaffinity(0))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(cores))
    plan = plan_threads(0, 1)
    assert plan.threads == 1 and plan.ranks_here == cores
    assert not any("oversubscribe" in w for w in plan.warnings)


def test_slurm_cpus_per_task_is_per_rank(monkeypatch):
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "3")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    plan = plan_threads(0, 2)
    assert (plan.threads, plan.cores, plan.ranks_here, plan.cores_from) == (3, 3, 1, "SLURM_CPUS_PER_TASK")


def test_train_threads_and_omp_num_threads_win_and_oversubscription_is_named(monkeypatch):
    cores = len(os.sched_getaffinity(0))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert plan_threads(0, 0).threads == 1 and "OMP_NUM_THREADS" in plan_threads(0, 0).chosen_by
    plan = plan_threads(cores + 3, 0)
    assert plan.threads == cores + 3 and plan.chosen_by == "train.threads"
    assert any("oversubscribe" in w and f"train.threads={cores}" in w for w in plan.warnings), plan.warnings
    assert "threads: %d per rank (train.threads)" % (cores + 3) in plan.describe()


def test_cores_other_processes_keep_busy_are_measured_and_named():
    cores = sorted(os.sched_getaffinity(0))
    spin = "import os, time\nos.sched_setaffinity(0, {%d})\nend = time.time() + 3\nwhile time.time() < end: pass"
    spinners = [subprocess.Popen([sys.executable, "-c", spin % c]) for c in cores]
    try:
        time.sleep(0.5)  # let them start spinning
        busy = busy_cores()
    finally:
        for p in spinners:
            p.kill()
            p.wait()
    assert busy is not None and busy[1] == len(cores) and busy[0] >= 0.8 * len(cores), busy
    if len(cores) > 1:
        plan = plan_threads(0, 0, busy=busy)
        assert any("other processes keep" in w and "train.threads=1" in w for w in plan.warnings), plan.warnings


def test_the_busy_warning_follows_the_free_cores():
    cores = len(os.sched_getaffinity(0))
    assert plan_threads(0, 0, busy=(0.0, cores)).warnings == []
    if cores > 1:
        assert any("other processes keep" in w for w in plan_threads(0, 0, busy=(float(cores), cores)).warnings)
    assert not any("other processes" in w for w in plan_threads(1, 0, busy=(float(cores), cores)).warnings)  # 1 thread


def test_several_tasks_on_a_slurm_node_are_not_measured_against_each_other(monkeypatch):
    """Tasks of one job start together: their imports would read as other processes' load."""
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "2")
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "4(x2)")
    plan = plan_threads(0, 0)
    assert plan.busy is None and plan.threads == 2 and plan.ranks_here == 1
    # a task whose mask is the whole node's allocation still plans from its own cpus-per-task
    assert plan_threads(0, 0, busy=(2.0, 8)).warnings == []  # 6 of its 8 visible cores are free
