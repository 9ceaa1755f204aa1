"""``pretrain launch slurm``: a training job (or a sweep as one job array) on a SLURM cluster through submitit.

The submitting side validates the whole config (every sweep point) before
anything is queued, saves each run's resolved config in its run directory
(``RUN_DIR/launch/config.yaml``: what the job will train, whatever happens to
the YAML file later), and hands submitit one :class:`pretrain.launch.slurm_job.TrainTask`
per run. One SLURM task per GPU; ``--dry-run`` prints the sbatch script
submitit would submit and queues nothing.
"""
from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from pretrain.launch.slurm_job import JOB_RECORD, SWEEP_RECORD, TrainTask
from pretrain.launch.status import queue_states
from pretrain.launch.sweep import SweepPoint, load_sweep

_TIME = re.compile(r"^(?:(?P<d>\d+)-)?(?P<a>\d+)(?::(?P<b>\d+))?(?::(?P<c>\d+))?$")


def time_minutes(value: str) -> int:
    """SLURM's time formats (``MM``, ``MM:SS``, ``HH:MM:SS``, ``D-HH``, ``D-HH:MM``, ``D-HH:MM:SS``) -> whole minutes."""
    m = _TIME.match(value.strip())
    if not m:
        raise ValueError(f"--time {value!r}: use minutes, HH:MM:SS or D-HH:MM:SS")
    days = int(m["d"] or 0)
    parts = [int(p) for p in (m["a"], m["b"], m["c"]) if p is not None]
    if m["d"] is not None:  # D-HH[:MM[:SS]]
        hours, minutes, seconds = (parts + [0, 0])[:3]
    elif len(parts) == 3:
        hours, minutes, seconds = parts
    else:  # MM or MM:SS
        hours, (minutes, seconds) = 0, (parts + [0])[:2]
    total = days * 1440 + hours * 60 + minutes + (1 if seconds else 0)
    if total < 1:
        raise ValueError(f"--time {value!r} is shorter than a minute")
    return total


@dataclass
class SlurmOptions:
    """The allocation of one run (or of each task of a sweep's array)."""

    time: str
    nodes: int = 1
    gpus_per_node: int = 0
    tasks_per_node: int | None = None  # default: one per GPU, or 1 on CPU-only nodes
    cpus_per_task: int | None = None
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    mem: str | None = None
    exclude: str | None = None
    dependency: str | None = None
    job_name: str = "medpretrain"
    signal_delay_s: int = 120
    max_retries: int = 1
    max_requeues: int = 20
    max_concurrent: int | None = None

    def ntasks_per_node(self) -> int:
        return self.tasks_per_node or max(self.gpus_per_node, 1)

    def check(self) -> None:
        if self.nodes < 1:
            raise ValueError(f"--nodes must be at least 1, got {self.nodes}")
        if self.gpus_per_node < 0:
            raise ValueError(f"--gpus-per-node must be >= 0, got {self.gpus_per_node}")
        if self.tasks_per_node is not None and self.gpus_per_node and self.tasks_per_node != self.gpus_per_node:
            raise ValueError(f"--tasks-per-node {self.tasks_per_node} with --gpus-per-node {self.gpus_per_node}: "
                             "training runs one task per GPU; leave --tasks-per-node out on GPU nodes")
        minutes = time_minutes(self.time)
        if self.signal_delay_s >= minutes * 60:
            raise ValueError(f"--signal-delay {self.signal_delay_s} s is not shorter than --time {self.time}")
        if self.max_retries < 0 or self.max_requeues < 0:
            raise ValueError("--max-retries and --max-requeues must be >= 0")

    def sbatch_parameters(self) -> dict[str, Any]:
        """submitit SlurmExecutor parameters for this allocation."""
        self.check()
        threads = self.cpus_per_task or 1
        params: dict[str, Any] = {
            "job_name": self.job_name,
            "time": time_minutes(self.time),
            "nodes": self.nodes,
            "ntasks_per_node": self.ntasks_per_node(),
            "signal_delay_s": self.signal_delay_s,
            "stderr_to_stdout": True,
            # One failing task ends the step at once instead of leaving its peers in a collective.
            "srun_args": ["--kill-on-bad-exit=1"],
            "setup": [f"export OMP_NUM_THREADS={threads}", "export PYTHONUNBUFFERED=1"],
            # Requeue (by us on a time limit, by SLURM on preemption) needs a requeueable job.
            "additional_parameters": {"requeue": True},
        }
        if self.gpus_per_node:
            params["gpus_per_node"] = self.gpus_per_node
        optional = {"cpus_per_task": self.cpus_per_task, "partition": self.partition, "account": self.account,
                    "qos": self.qos, "constraint": self.constraint, "mem": self.mem, "exclude": self.exclude,
                    "dependency": self.dependency}
        params.update({k: v for k, v in optional.items() if v is not None})
        if self.max_concurrent is not None:
            params["array_parallelism"] = self.max_concurrent
        return params


def sbatch_script(folder: str | Path, params: dict[str, Any], array_size: int | None = None,
                  python: str | None = None) -> str:
    """The sbatch script submitit writes for these parameters (an array of ``array_size`` tasks when given)."""
    from submitit.slurm.slurm import _make_sbatch_string  # the function submitit itself submits with

    command = " ".join([python or shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(str(folder))])
    return _make_sbatch_string(command=command, folder=folder, map_count=array_size, **params)


def _check_not_queued(run_dir: Path) -> None:
    """Refuse a run directory that a job still queued or running writes to: two jobs would mix their checkpoints."""
    record = run_dir / "launch" / JOB_RECORD
    if not record.is_file():
        return
    job_id = json.loads(record.read_text())["job_id"]
    state = queue_states([job_id]).get(job_id)
    if state is not None:
        raise ValueError(f"{run_dir} belongs to job {job_id}, still {state[0].lower()}: "
                         f"wait for it, `scancel {job_id}`, or choose another train.run_dir")


def _prepare_run(config: str | Path, overrides: Sequence[str], run_dir: Path | None) -> tuple[Path, Path]:
    """Validate ``config`` + ``overrides``; save the resolved config in its run dir; (run_dir, saved config)."""
    from pretrain.config import dump_config, load_config

    extra = [f"train.run_dir={run_dir}"] if run_dir is not None else []
    cfg = load_config(config, [*overrides, *extra])
    run_dir = Path(cfg.train.run_dir).resolve()
    _check_not_queued(run_dir)
    cfg.train.run_dir = str(run_dir)
    saved = run_dir / "launch" / "config.yaml"
    saved.parent.mkdir(parents=True, exist_ok=True)
    saved.write_text(dump_config(cfg))
    return run_dir, saved


def _executor(folder: Path, params: dict[str, Any]):
    import submitit

    executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=0)
    executor.update_parameters(**params)
    return executor


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def submit_run(config: str | Path, overrides: Sequence[str], options: SlurmOptions, *, dry_run: bool = False) -> dict[str, Any]:
    """Queue one training run; returns its record (job id, run dir, log folder), or the script on a dry run."""
    params = options.sbatch_parameters()
    if dry_run:
        from pretrain.config import load_config

        run_dir = Path(load_config(config, overrides).train.run_dir).resolve()
        return {"script": sbatch_script(run_dir / "launch" / "slurm", params)}
    run_dir, saved = _prepare_run(config, overrides, None)
    folder = run_dir / "launch" / "slurm"
    job = _executor(folder, params).submit(TrainTask(saved, run_dir, options.max_retries, options.max_requeues))
    record = {"job_id": str(job.job_id), "run_dir": str(run_dir), "logs": str(folder),
              "submitted": time.time(), "sbatch": params}
    _write_json(run_dir / "launch" / JOB_RECORD, record)
    return record


def submit_sweep(config: str | Path, overrides: Sequence[str], sweep_file: str | Path, options: SlurmOptions,
                 *, sweep_dir: str | Path | None = None, dry_run: bool = False) -> dict[str, Any]:
    """Queue every point of ``sweep_file`` as one job array, one run directory per point."""
    sweep = load_sweep(sweep_file)
    if options.max_concurrent is None and sweep.max_concurrent is not None:
        options.max_concurrent = sweep.max_concurrent
    params = options.sbatch_parameters()
    root = Path(sweep_dir or Path("runs") / sweep.name).resolve()
    points: list[SweepPoint] = sweep.points
    # Every point must be a valid config before anything is queued.
    from pretrain.config import load_config

    for point in points:
        try:
            load_config(config, [*overrides, *point.overrides, f"train.run_dir={root / point.name}"])
        except Exception as e:
            raise ValueError(f"{sweep_file}: point {point.index} ({' '.join(point.overrides)}): {e}") from None
        _check_not_queued(root / point.name)
    folder = root / "slurm"
    if dry_run:
        return {"script": sbatch_script(folder, params, array_size=len(points)), "points": [p.name for p in points]}
    tasks, runs = [], []
    for point in points:
        run_dir, saved = _prepare_run(config, [*overrides, *point.overrides], root / point.name)
        tasks.append(TrainTask(saved, run_dir, options.max_retries, options.max_requeues))
        runs.append({"index": point.index, "name": point.name, "overrides": point.overrides, "run_dir": str(run_dir)})
    executor = _executor(folder, params)
    with executor.batch():
        jobs = [executor.submit(task) for task in tasks]
    for run, job in zip(runs, jobs):
        run["job_id"] = str(job.job_id)
        _write_json(Path(run["run_dir"]) / "launch" / JOB_RECORD,
                    {"job_id": run["job_id"], "run_dir": run["run_dir"], "logs": str(folder), "submitted": time.time()})
    record = {"name": sweep.name, "sweep_file": str(Path(sweep_file).resolve()), "runs": runs,
              "array_job_id": runs[0]["job_id"].split("_")[0], "sbatch": params}
    _write_json(root / SWEEP_RECORD, record)
    return record


def _options(args: argparse.Namespace) -> SlurmOptions:
    return SlurmOptions(
        time=args.time, nodes=args.nodes, gpus_per_node=args.gpus_per_node, tasks_per_node=args.tasks_per_node,
        cpus_per_task=args.cpus_per_task, partition=args.partition, account=args.account, qos=args.qos,
        constraint=args.constraint, mem=args.mem, exclude=args.exclude, dependency=args.dependency,
        job_name=args.job_name, signal_delay_s=args.signal_delay, max_retries=args.max_retries,
        max_requeues=args.max_requeues, max_concurrent=args.max_concurrent,
    )


def _launch_slurm_cli(args: argparse.Namespace) -> int:
    try:
        options = _options(args)
        if args.sweep:
            record = submit_sweep(args.config, args.overrides, args.sweep, options, sweep_dir=args.sweep_dir,
                                  dry_run=args.dry_run)
        else:
            record = submit_run(args.config, args.overrides, options, dry_run=args.dry_run)
    except (ValueError, FileNotFoundError) as e:
        print(f"pretrain launch slurm: error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(record["script"])
        return 0
    if args.sweep:
        follow = Path(record["runs"][0]["run_dir"]).parent
        print(f"submitted array job {record['array_job_id']} with {len(record['runs'])} runs under {follow}")
        for run in record["runs"]:
            print(f"  {run['job_id']:>12}  {run['run_dir']}")
    else:
        follow = record["run_dir"]
        print(f"submitted job {record['job_id']}; run directory {follow} (logs in {record['logs']})")
    print(f"follow it with: pretrain launch status {follow}")
    return 0


def add_slurm_parser(launch_subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``pretrain launch slurm`` under the ``launch`` subcommand group."""
    p = launch_subparsers.add_parser("slurm", help="train on a SLURM cluster (one task per GPU) through submitit")
    p.add_argument("config", help="YAML config of the run (as for `pretrain train`)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=3e-4 train.run_dir=runs/x")
    p.add_argument("--time", required=True, help="time limit per allocation: minutes, HH:MM:SS or D-HH:MM:SS")
    p.add_argument("--nodes", type=int, default=1, help="nodes per allocation")
    p.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node; one task (rank) per GPU")
    p.add_argument("--tasks-per-node", type=int, help="ranks per node on CPU-only nodes (default 1)")
    p.add_argument("--cpus-per-task", type=int, help="CPU cores per rank (also its OMP_NUM_THREADS)")
    for flag in ("partition", "account", "qos", "constraint", "mem", "exclude", "dependency"):
        p.add_argument(f"--{flag}", help=f"sbatch --{flag}")
    p.add_argument("--job-name", default="medpretrain", help="SLURM job name")
    p.add_argument("--signal-delay", type=int, default=120,
                   help="seconds before the time limit at which the job checkpoints and requeues itself (default 120)")
    p.add_argument("--max-retries", type=int, default=1, help="requeues after a failure before giving up (default 1)")
    p.add_argument("--max-requeues", type=int, default=20, help="requeues on reaching the time limit (default 20)")
    p.add_argument("--sweep", help="SWEEP.yaml: a grid or list of overrides, run as one job array")
    p.add_argument("--sweep-dir", help="folder of the sweep's run directories (default runs/<sweep name>)")
    p.add_argument("--max-concurrent", type=int, help="array tasks running at once (default: the sweep file's, else all)")
    p.add_argument("--dry-run", action="store_true", help="print the sbatch script and queue nothing")
    p.set_defaults(func=_launch_slurm_cli)
    return p
