"""What runs inside a SLURM allocation: one training rank per task.

submitit starts one Python process per task (``srun``) and calls a pickled
:class:`TrainTask`. The task turns SLURM's environment into the rendezvous the
trainer reads, replaces submitit's signal handlers with the trainer's
step-boundary stop, and decides what happens next:

- time limit ahead (USR2 from ``--signal``): all ranks checkpoint, rank 0
  requeues the job, the next allocation resumes from that checkpoint;
- SIGTERM (preempted, ``scontrol requeue``, ``scancel``): all ranks
  checkpoint and exit; SLURM itself decides whether the job comes back;
- an exception: the job is requeued at most ``max_retries`` times, each
  time with the reason in the log and in ``RUN_DIR/launch/events.jsonl``.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

EVENTS = "events.jsonl"
JOB_RECORD = "job.json"  # RUN_DIR/launch/job.json: the job id, written at submission
SWEEP_RECORD = "sweep.json"  # SWEEP_DIR/sweep.json: the points, their run dirs and array task ids
PORT_BASE, PORT_SPAN = 20000, 40000


def rendezvous_port(job_id: str, restart_count: int) -> int:
    """The rendezvous port every task of a job derives alike, without talking to the others.

    Another port per requeue, so a restarted job never meets its predecessor's
    socket; jobs sharing a node get different ports unless their ids collide modulo the span.
    """
    base = int(job_id.split("_")[0]) * 8 + restart_count
    return PORT_BASE + base % PORT_SPAN


def rendezvous_env(environ: dict[str, str], hostnames: Sequence[str]) -> dict[str, str]:
    """torch.distributed / DeepSpeed variables of this task from SLURM's: ranks, local rank, master."""
    world = int(environ["SLURM_NTASKS"])
    nodes = int(environ.get("SLURM_JOB_NUM_NODES", environ.get("SLURM_NNODES", "1")))
    restarts = int(environ.get("SLURM_RESTART_COUNT", "0"))
    return {
        "RANK": environ["SLURM_PROCID"],
        "LOCAL_RANK": environ["SLURM_LOCALID"],
        "WORLD_SIZE": str(world),
        "LOCAL_WORLD_SIZE": str(world // max(nodes, 1)),
        "NODE_RANK": environ.get("SLURM_NODEID", "0"),
        "MASTER_ADDR": hostnames[0],
        "MASTER_PORT": str(rendezvous_port(environ["SLURM_JOB_ID"], restarts)),
    }


def job_id_of(environ: dict[str, str]) -> str:
    """``123`` for a plain job, ``123_4`` for task 4 of array job 123 (as squeue and scontrol name them)."""
    array_id, task_id = environ.get("SLURM_ARRAY_JOB_ID"), environ.get("SLURM_ARRAY_TASK_ID")
    return f"{array_id}_{task_id}" if array_id and task_id else environ["SLURM_JOB_ID"]


def write_event(run_dir: Path, event: str, **fields: Any) -> None:
    """Append one line to ``RUN_DIR/launch/events.jsonl`` (one short ``O_APPEND`` write: lines never interleave)."""
    folder = run_dir / "launch"
    folder.mkdir(parents=True, exist_ok=True)
    line = json.dumps({"time": round(time.time(), 3), "event": event, **fields}) + "\n"
    fd = os.open(folder / EVENTS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def read_events(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "launch" / EVENTS
    if not path.is_file():
        return []
    events = []
    for line in path.read_text().splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:  # a line cut short by a kill
            continue
    return events


def _say(message: str) -> None:
    print(f"[medpretrain slurm] {message}", file=sys.stderr, flush=True)


def _claim(run_dir: Path, name: str) -> bool:
    """True for exactly one caller per ``name`` (an ``O_EXCL`` marker file): one rank acts for the job."""
    try:
        os.close(os.open(run_dir / "launch" / name, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        return True
    except FileExistsError:
        return False


def requeue(job_id: str) -> None:
    subprocess.run(["scontrol", "requeue", job_id], check=True, timeout=60, capture_output=True, text=True)


class TrainTask:
    """One SLURM task of ``pretrain train`` on the config saved at submission (picklable for submitit)."""

    def __init__(self, config_path: str | Path, run_dir: str | Path, max_retries: int, max_requeues: int) -> None:
        self.config_path = str(config_path)
        self.run_dir = str(run_dir)
        self.max_retries = max_retries
        self.max_requeues = max_requeues

    def __call__(self) -> dict[str, Any]:
        import submitit

        from pretrain.config import load_config
        from pretrain.engine import checkpoint as ckpt
        from pretrain.engine.preemption import StopRequest
        from pretrain.tools.run import train_and_export

        environ = dict(os.environ)
        os.environ.update(rendezvous_env(environ, submitit.JobEnvironment().hostnames))
        stop = StopRequest().install()  # before any DataLoader worker forks: they inherit it
        run_dir, rank = Path(self.run_dir), int(os.environ["RANK"])
        job_id, attempt = job_id_of(environ), int(environ.get("SLURM_RESTART_COUNT", "0"))
        cfg = load_config(self.config_path)
        if rank == 0:
            tag = ckpt.latest_tag(run_dir / "checkpoints")
            write_event(run_dir, "start", job_id=job_id, attempt=attempt, world_size=int(os.environ["WORLD_SIZE"]),
                        nodes=os.environ.get("SLURM_JOB_NODELIST"), resume_tag=tag)
        try:
            summary = train_and_export(cfg, stop)
        except Exception as error:
            self._after_failure(run_dir, job_id, attempt, rank, error)
            raise
        if rank == 0:
            self._after_run(run_dir, job_id, summary)
        return summary

    def _after_run(self, run_dir: Path, job_id: str, summary: dict[str, Any]) -> None:
        stopped_by = summary.get("interrupted")
        if stopped_by is None:
            write_event(run_dir, "done", job_id=job_id, step=summary["steps"], loss=summary["final_loss"])
            return
        if stopped_by == signal.SIGUSR2.name:  # the time limit is near: come back in a new allocation
            done = sum(e["event"] == "requeue" for e in read_events(run_dir))
            if done >= self.max_requeues:
                reason = f"time limit reached {done + 1} times; max_requeues={self.max_requeues}"
                write_event(run_dir, "failed", job_id=job_id, step=summary["steps"], reason=reason)
                _say(f"not requeued: {reason}")
                return
            write_event(run_dir, "requeue", job_id=job_id, step=summary["steps"], reason="time limit")
            _say(f"checkpointed step {summary['steps']} before the time limit; requeueing job {job_id}")
            requeue(job_id)
            return
        write_event(run_dir, "stopped", job_id=job_id, step=summary["steps"],
                    reason=f"{stopped_by} from SLURM (preempted, requeued or cancelled)")
        _say(f"checkpointed step {summary['steps']} on {stopped_by}; SLURM decides whether the job comes back")

    def _after_failure(self, run_dir: Path, job_id: str, attempt: int, rank: int, error: BaseException) -> None:
        reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:500]
        if not _claim(run_dir, f"failure-attempt{attempt}"):
            return  # another rank of this attempt already reported and decided
        retries = sum(e["event"] == "retry" for e in read_events(run_dir))
        if retries >= self.max_retries:
            write_event(run_dir, "failed", job_id=job_id, rank=rank, attempt=attempt, reason=reason)
            _say(f"rank {rank} failed: {reason}; not requeued (max_retries={self.max_retries} used up)")
            return
        write_event(run_dir, "retry", job_id=job_id, rank=rank, attempt=attempt, reason=reason)
        _say(f"rank {rank} failed: {reason}; requeueing (retry {retries + 1} of {self.max_retries})")
        try:
            requeue(job_id)
        except (OSError, subprocess.SubprocessError) as e:
            write_event(run_dir, "failed", job_id=job_id, rank=rank, attempt=attempt,
                        reason=f"{reason}; requeue failed: {e}")
