"""How many intra-op threads each rank uses, from the cores this process may run on.

torch's default counts the machine's cores. Under SLURM (``--cpus-per-task``), ``taskset`` or with several
ranks per machine that oversubscribes the cores, and on a machine other jobs keep busy even one rank's
threads wait on each other: measured on 2 busy cores, the demo fell to 0.2-0.5 steps/s with torch's
2 threads and held 2.6-5 steps/s with 1 (on the idle machine 2 threads were faster, 296 vs 230 samples/s).
So the plan is printed at start, with a warning when it oversubscribes the cores or other processes keep
them busy (measured over a quarter second while this process waits: a load average would count this
process's own start-up).
"""
from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class ThreadPlan:
    threads: int  # intra-op threads per rank
    chosen_by: str  # what set it
    cores: int  # cores this rank's process may use
    cores_from: str  # where that count came from
    ranks_here: int  # ranks sharing those cores (1 under SLURM: its count is per task already)
    workers: int  # DataLoader worker processes per rank (one thread each)
    busy: float | None  # cores' worth of the measured cores other processes kept busy at start, where measured
    measured: int = 0  # how many cores that was measured over (the affinity mask)

    @property
    def warnings(self) -> list[str]:
        out = []
        per_rank = max(1, self.cores // self.ranks_here)
        if self.threads > per_rank:
            out.append(f"{self.ranks_here} rank(s) x {self.threads} threads oversubscribe the {self.cores} usable "
                       f"core(s) ({self.cores_from}): train.threads={per_rank} fits them")
        free = None if self.busy is None else min(self.cores, self.measured - self.busy)
        if free is not None and self.threads > 1 and self.threads > free + 0.5:
            out.append(f"other processes keep {self.busy:.1f} of this process's {self.measured} cores busy: "
                       f"{self.threads} threads per rank would wait on each other; "
                       f"train.threads={max(1, round(free))} may be faster")
        return out

    def describe(self) -> str:
        return (f"[medpretrain] threads: {self.threads} per rank ({self.chosen_by}) | {self.cores} usable core(s) "
                f"({self.cores_from}) shared by {self.ranks_here} rank(s) | {self.workers} loader worker(s) per rank")


def usable_cores() -> tuple[int, str, bool]:
    """(cores, where the count came from, whether it is per rank already)."""
    slurm = os.environ.get("SLURM_CPUS_PER_TASK", "")
    if slurm.isdigit() and int(slurm) > 0:
        return int(slurm), "SLURM_CPUS_PER_TASK", True
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)), "CPU affinity", False
    return os.cpu_count() or 1, "cpu_count", False


def busy_cores(cores: set[int] | None = None, interval: float = 0.25) -> tuple[float, int] | None:
    """(cores' worth in use, cores measured) over ``cores`` (default: this process's affinity) for
    ``interval`` seconds while this process sleeps: what other processes take from a run about to start.
    None where it cannot be measured."""
    try:
        import psutil

        cores = cores if cores is not None else (os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None)
        per_cpu = psutil.cpu_percent(interval=interval, percpu=True)
    except Exception:  # noqa: BLE001 - no /proc, a sandbox: no measurement, no warning
        return None
    chosen = [p for i, p in enumerate(per_cpu) if cores is None or i in cores]
    return sum(chosen) / 100.0, len(chosen)


def ranks_on_this_machine() -> int:
    """``LOCAL_WORLD_SIZE`` (our launchers set it), else SLURM's tasks on this node, else 1."""
    for key in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"):
        head = os.environ.get(key, "").split("(")[0]  # SLURM writes "2(x3)" for 2 tasks on each of 3 nodes
        if head.isdigit() and int(head) > 0:
            return int(head)
    return 1


def plan_threads(requested: int, workers: int, busy: tuple[float, int] | None = None) -> ThreadPlan:
    """``requested`` (``train.threads``) when > 0, else ``$OMP_NUM_THREADS`` (the launchers set it per rank),
    else the usable cores shared by the ranks on this machine. ``busy``: a ``busy_cores()`` reading (measured
    here when None, unless several ranks share the machine: starting together, they would count each other)."""
    cores, cores_from, per_rank = usable_cores()
    local_ranks = ranks_on_this_machine()
    ranks_here = 1 if per_rank else local_ranks  # SLURM's count is per task already
    omp = os.environ.get("OMP_NUM_THREADS", "")
    if requested > 0:
        threads, chosen_by = requested, "train.threads"
    elif omp.isdigit() and int(omp) > 0:
        threads, chosen_by = int(omp), "OMP_NUM_THREADS; train.threads overrides it"
    else:
        threads, chosen_by = max(1, cores // ranks_here), "the usable cores per rank; train.threads overrides it"
    if busy is None and threads > 1 and local_ranks == 1:
        busy = busy_cores()
    return ThreadPlan(threads, chosen_by, cores, cores_from, ranks_here, workers,
                      None if busy is None else busy[0], 0 if busy is None else busy[1])
