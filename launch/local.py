"""``pretrain launch local``: N ranks of ``pretrain train`` on this machine.

Each rank is a separate OS process in its own process group (so its DataLoader
workers die with it), with the rendezvous environment that
``pretrain.engine.distributed.setup_distributed`` reads. The launcher waits for
all of them; once one fails, the others get a grace period to fail by
themselves (a collective usually raises on the survivors), then SIGTERM, then
SIGKILL, so a dead rank never turns into a job hanging in a collective.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Callable, Iterator, Sequence

from pretrain.engine.distributed import free_port
from pretrain.engine.threads import usable_cores

POLL_S = 0.05
TERM_TIMEOUT_S = 10.0  # after SIGTERM, how long a rank may take to exit before SIGKILL
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def threads_per_rank(nproc: int) -> int:
    """CPU cores available to this process, shared evenly among ``nproc`` ranks (at least 1 each)."""
    return max(1, usable_cores()[0] // nproc)


def rank_environment(rank: int, world_size: int, master_port: int, base: dict[str, str]) -> dict[str, str]:
    """``base`` plus what one local rank needs: rank variables, rendezvous, threads, unbuffered output."""
    env = dict(base)
    env.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(master_port),
    )
    # Without a cap every rank starts one thread per core and they fight over the cores.
    env.setdefault("OMP_NUM_THREADS", str(threads_per_rank(world_size)))
    # Log files and the console show each line as it is printed, not at exit.
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def describe_exit(code: int) -> str:
    """'exit code 3' or 'signal SIGKILL' for a Popen return code."""
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


def shell_exit_code(code: int) -> int:
    """A Popen return code as a process exit status: death by signal N becomes 128 + N, as shells report it."""
    return 128 - code if code < 0 else code


def _console_fd() -> int:
    """The file descriptor of this process's stdout (1 when sys.stdout was replaced by an in-memory stream)."""
    try:
        return sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is an OSError
        return 1


def _tee(source: IO[bytes], log: IO[bytes], console_fd: int) -> None:
    """Copy a rank's output to its log file and to the console until the rank (and its children) close it."""
    for chunk in iter(lambda: source.read1(65536), b""):  # type: ignore[attr-defined]
        log.write(chunk)
        log.flush()
        view = memoryview(chunk)
        while view:
            view = view[os.write(console_fd, view):]
    source.close()


class LocalRanks:
    """Started rank processes, one process group each, and the means to watch and stop them.

    ``commands[r]`` and ``envs[r]`` are rank r's argv and environment. Without
    ``log_dir`` ranks inherit this process's stdout/stderr; with it rank r writes
    ``log_dir/rank{r}.log`` (stdout and stderr together), and rank 0 is also
    copied to the console when ``echo_rank0``.
    """

    def __init__(self, commands: Sequence[Sequence[str]], envs: Sequence[dict[str, str]], *,
                 log_dir: str | Path | None = None, echo_rank0: bool = True, cwd: str | Path | None = None) -> None:
        if len(commands) != len(envs):
            raise ValueError(f"{len(commands)} commands but {len(envs)} environments: one of each per rank")
        if not commands:
            raise ValueError("no rank to start: give at least one command")
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self.procs: list[subprocess.Popen] = []
        self.first_failure: tuple[int, int] | None = None  # (rank, return code) of the first rank seen failing
        self._logs: list[IO[bytes]] = []
        self._tees: list[threading.Thread] = []
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
        try:
            for rank, (argv, env) in enumerate(zip(commands, envs)):
                self._start(rank, list(argv), env, echo_rank0, cwd)
        except BaseException:
            self.close()
            raise

    def _start(self, rank: int, argv: list[str], env: dict[str, str], echo: bool, cwd: str | Path | None) -> None:
        stdout: int | IO[bytes] | None = None
        log = None
        if self.log_dir is not None:
            log = open(self.log_dir / f"rank{rank}.log", "wb")
            self._logs.append(log)
            stdout = subprocess.PIPE if rank == 0 and echo else log
        proc = subprocess.Popen(
            argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=stdout,
            stderr=subprocess.STDOUT if log is not None else None, start_new_session=True,
        )
        self.procs.append(proc)
        if stdout is subprocess.PIPE:
            tee = threading.Thread(target=_tee, args=(proc.stdout, log, _console_fd()),
                                   name=f"rank{rank}-tee", daemon=True)
            tee.start()
            self._tees.append(tee)

    @property
    def world_size(self) -> int:
        return len(self.procs)

    def poll(self) -> list[int | None]:
        """Return codes so far (None: still running), noting the first rank seen failing."""
        codes = [proc.poll() for proc in self.procs]
        if self.first_failure is None:
            failed = [(rank, code) for rank, code in enumerate(codes) if code not in (None, 0)]
            if failed:
                self.first_failure = failed[0]
        return codes

    def all_exited(self) -> bool:
        return all(code is not None for code in self.poll())

    def signal(self, sig: int, *, include_exited: bool = False) -> None:
        """Send ``sig`` to the process group of every running rank (or every rank: leftover children too)."""
        for proc in self.procs:
            if include_exited or proc.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, sig)

    def wait(self, timeout: float | None = None, hurry: Callable[[], bool] | None = None) -> bool:
        """Wait up to ``timeout`` seconds (None: forever) for every rank to exit; True when all have.

        Returns early (False) once ``hurry()`` holds.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.all_exited():
            if (deadline is not None and time.monotonic() >= deadline) or (hurry is not None and hurry()):
                return False
            time.sleep(POLL_S)
        return True

    def stop(self, grace: float, term_timeout: float = TERM_TIMEOUT_S, hurry: Callable[[], bool] | None = None) -> None:
        """Let ranks exit by themselves for ``grace`` s, then SIGTERM, then SIGKILL after ``term_timeout`` s.

        ``hurry()`` turning true skips straight to SIGKILL (a second Ctrl-C).
        """
        if self.wait(grace, hurry):
            return
        if hurry is None or not hurry():
            self.signal(signal.SIGTERM)
            if self.wait(term_timeout, hurry):
                return
        self.kill()

    def kill(self) -> None:
        """SIGKILL every rank's process group, children of ranks already gone included, and reap the ranks."""
        self.signal(signal.SIGKILL, include_exited=True)
        for proc in self.procs:
            proc.wait()

    def close(self) -> None:
        """Kill whatever is left, finish copying output and close the log files."""
        self.kill()
        for tee in self._tees:
            tee.join(timeout=5.0)
        for log in self._logs:
            log.close()


@contextlib.contextmanager
def _record_signals(received: list[int]) -> Iterator[None]:
    """While inside, SIGINT/SIGTERM append to ``received`` instead of ending this process (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, lambda signum, _frame: received.append(signum)) for sig in FORWARDED_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _say(message: str) -> None:
    print(f"pretrain launch: {message}", file=sys.stderr, flush=True)


def run_rank_commands(commands: Sequence[Sequence[str]], *, master_port: int | None = None,
                      log_dir: str | Path | None = None, grace: float = 30.0, env: dict[str, str] | None = None,
                      term_timeout: float = TERM_TIMEOUT_S, cwd: str | Path | None = None) -> int:
    """Run ``commands[r]`` as local rank r of a ``len(commands)``-process job and supervise it to the end.

    ``env`` is added to this process's environment for every rank. Returns 0 when
    every rank exits 0; else the exit status of the first rank seen failing (a
    death by signal N as 128 + N); or 128 + N when this launcher got signal N
    (SIGINT/SIGTERM, forwarded to every rank) before any rank failed.
    """
    if grace < 0 or term_timeout < 0:
        raise ValueError(f"grace ({grace}) and term_timeout ({term_timeout}) must be >= 0 seconds")
    world_size = len(commands)
    port = master_port if master_port is not None else free_port()
    base = {**os.environ, **(env or {})}
    envs = [rank_environment(rank, world_size, port, base) for rank in range(world_size)]
    received: list[int] = []
    interrupted_by: int | None = None
    with _record_signals(received):
        ranks = LocalRanks(commands, envs, log_dir=log_dir)
        try:
            while not ranks.all_exited():
                if ranks.first_failure is not None:
                    rank, code = ranks.first_failure
                    _say(f"rank {rank} failed ({describe_exit(code)}); "
                         f"giving the other ranks {grace:g} s to exit before stopping them")
                    break
                if received:
                    interrupted_by = received[0]
                    _say(f"got {signal.Signals(interrupted_by).name}; forwarding it to every rank")
                    ranks.signal(interrupted_by)
                    break
                time.sleep(POLL_S)
            ranks.stop(grace, term_timeout, hurry=lambda: len(received) > (1 if interrupted_by else 0))
        finally:
            ranks.close()
    codes = [proc.returncode for proc in ranks.procs]
    if interrupted_by is not None:
        # No rank had failed when the signal came (failures are checked first): whatever
        # the ranks then exited with, the job was interrupted.
        _say(f"stopped by {signal.Signals(interrupted_by).name}; rank exit codes {codes}")
        return 128 + interrupted_by
    if ranks.first_failure is not None:
        rank, code = ranks.first_failure
        _say(f"rank {rank} failed first ({describe_exit(code)}); rank exit codes {codes}")
        return shell_exit_code(code)
    return 0


def check_gpu_count(nproc: int) -> None:
    """On a GPU machine rank r takes visible device r: fail before starting when there are fewer than ``nproc``."""
    import torch

    if torch.cuda.is_available() and torch.cuda.device_count() < nproc:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        raise ValueError(f"--nproc {nproc} needs {nproc} GPUs (one per rank) but {torch.cuda.device_count()} are visible"
                         + (f" (CUDA_VISIBLE_DEVICES={visible})" if visible is not None else ""))


def train_command(config: str | Path, overrides: Sequence[str]) -> list[str]:
    """argv of one rank of ``pretrain train CONFIG [overrides]``, run by this interpreter."""
    return [sys.executable, "-m", "pretrain.tools.cli.main", "train", str(config), *overrides]


def launch_local(config: str | Path, overrides: Sequence[str], nproc: int, *, master_port: int | None = None,
                 log_dir: str | Path | None = None, grace: float = 30.0, env: dict[str, str] | None = None) -> int:
    """Train ``config`` (with dotted ``overrides``) in ``nproc`` processes on this machine; returns the exit status.

    On CPU every rank uses gloo; on GPUs rank r uses device r of those visible.
    See :func:`run_rank_commands` for output, failure handling and exit status.
    """
    if nproc < 1:
        raise ValueError(f"--nproc must be at least 1, got {nproc}")
    if not Path(config).is_file():
        raise FileNotFoundError(f"config file not found: {config}")
    if "CUDA_VISIBLE_DEVICES" not in (env or {}):
        check_gpu_count(nproc)
    return run_rank_commands([train_command(config, overrides)] * nproc, master_port=master_port,
                             log_dir=log_dir, grace=grace, env=env)


def sweep_point_overrides(sweep_file: str, index: int, sweep_dir: str | None) -> list[str]:
    """Point ``index`` of a sweep as overrides, its run directory where ``launch slurm`` would put it; the
    sweep's record (``sweep.json``, every point) is written beside, as ``launch slurm`` writes it."""
    import json

    from pretrain.launch.slurm_job import SWEEP_RECORD
    from pretrain.launch.sweep import load_sweep

    sweep = load_sweep(sweep_file)
    if not 0 <= index < len(sweep.points):
        raise ValueError(f"--point {index}: {sweep_file} has points 0..{len(sweep.points) - 1}")
    root = Path(sweep_dir or Path("runs") / sweep.name).resolve()
    runs = [{"index": p.index, "name": p.name, "overrides": p.overrides, "run_dir": str(root / p.name)}
            for p in sweep.points]
    root.mkdir(parents=True, exist_ok=True)
    (root / SWEEP_RECORD).write_text(json.dumps({"name": sweep.name, "sweep_file": str(Path(sweep_file).resolve()),
                                                 "runs": runs, "launcher": "local"}, indent=2) + "\n")
    point = sweep.points[index]
    return [*point.overrides, f"train.run_dir={root / point.name}"]


def _launch_local_cli(args: argparse.Namespace) -> int:
    try:
        overrides = list(args.overrides)
        if (args.sweep is None) != (args.point is None):
            raise ValueError("--sweep and --point go together: the point of the sweep file to run")
        if args.sweep:
            overrides += sweep_point_overrides(args.sweep, args.point, args.sweep_dir)
        return launch_local(args.config, overrides, args.nproc, master_port=args.master_port,
                            log_dir=args.log_dir, grace=args.grace)
    except ValueError as e:  # bad launcher arguments: a usage error, not a traceback
        print(f"pretrain launch local: error: {e}", file=sys.stderr)
        return 2


def add_local_parser(launch_subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``pretrain launch local`` under the ``launch`` subcommand group."""
    p = launch_subparsers.add_parser("local", help="train in N processes on this machine (one per GPU, or gloo on CPU)")
    p.add_argument("config", help="YAML config of the run (as for `pretrain train`)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=3e-4 train.steps=100")
    p.add_argument("--nproc", type=int, required=True, help="number of ranks (processes) to start")
    p.add_argument("--master-port", type=int, help="rendezvous port on 127.0.0.1 (default: a free one)")
    p.add_argument("--log-dir", help="write DIR/rank{i}.log per rank; only rank 0 also goes to the console")
    p.add_argument("--grace", type=float, default=30.0,
                   help="seconds the other ranks get to exit after one fails, before SIGTERM/SIGKILL (default 30)")
    p.add_argument("--sweep", help="SWEEP.yaml: run one of its points (--point), in the run directory launch slurm "
                   "would give it")
    p.add_argument("--point", type=int, help="index of the sweep point to run")
    p.add_argument("--sweep-dir", help="folder of the sweep's run directories (default runs/<sweep name>)")
    p.set_defaults(func=_launch_local_cli)
    return p
