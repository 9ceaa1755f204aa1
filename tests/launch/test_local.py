"""`pretrain launch local`: real 2-rank training runs, and the shutdown logic on small commands we control."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from pretrain.launch.local import launch_local, rank_environment, run_rank_commands, threads_per_rank
from tests.engine.conftest import tiny_config
from pretrain.tools.cli.main import build_parser


@pytest.fixture(scope="module")
def tiny_yaml(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pretrain.tools.demo.data import make_demo_data

    shards = tmp_path_factory.mktemp("launch_shards")
    make_demo_data(shards, scale=0.05, splits=["pretrain_2d"], progress=False)
    path = shards / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_config(shards), sort_keys=False))
    return path


def python(code: str, *args: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code), *args]


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie left for its reaper counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def wait_for_pids(files: list[Path], timeout: float = 20.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while not all(f.is_file() and f.read_text().strip() for f in files):
        assert time.monotonic() < deadline, f"ranks never wrote {files}"
        time.sleep(0.05)
    return [int(f.read_text()) for f in files]


# A rank that records its pid and that of a child in its process group (a DataLoader worker), then sleeps.
SLEEPER = """
    import os, subprocess, sys, time
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    open(sys.argv[1] + ".tmp", "w").write(f"{os.getpid()} {child.pid}")
    os.replace(sys.argv[1] + ".tmp", sys.argv[1])
    time.sleep(60)
"""


def sleeper_pids(path: Path, timeout: float = 20.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while not path.is_file():
        assert time.monotonic() < deadline, f"the sleeping rank never wrote {path}"
        time.sleep(0.05)
    return [int(p) for p in path.read_text().split()]


@pytest.mark.slow
def test_two_ranks_train_to_the_end(tiny_yaml: Path, tmp_path: Path):
    run_dir = tmp_path / "run"
    code = launch_local(tiny_yaml, [f"train.run_dir={run_dir}", "train.steps=3", "train.ckpt_every=3",
                                    "train.export_on_end=true"], 2, log_dir=tmp_path / "logs")
    logs = "\n".join(f"--- rank{r} ---\n" + (tmp_path / "logs" / f"rank{r}.log").read_text() for r in range(2))
    assert code == 0, logs
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 3
    assert sorted(p.name for p in Path(summary["checkpoint"]).glob("rank*_state.pt")) == [
        "rank00000_state.pt", "rank00001_state.pt"]
    assert "terminate called" not in logs
    assert summary["export"] == str((run_dir / "export").resolve()) and (run_dir / "export" / "config.json").is_file()


@pytest.mark.slow
def test_bad_shard_path_fails_every_rank_with_the_path_in_each_log(tiny_yaml: Path, tmp_path: Path, capfd):
    missing = tmp_path / "no_such_shards"
    code = launch_local(tiny_yaml, [f"train.run_dir={tmp_path / 'run'}", f"data.train={missing}"], 2,
                        log_dir=tmp_path / "logs", grace=20)
    assert code != 0
    err = capfd.readouterr().err
    # Which rank fails first, and how (exit 1, or an abort when its peer vanished), is a race: any is right.
    assert re.search(r"rank [01] failed first \((exit code|signal) ", err), err
    for rank in range(2):
        assert str(missing) in (tmp_path / "logs" / f"rank{rank}.log").read_text(), rank


@pytest.mark.slow
def test_first_failure_stops_the_others_within_the_grace_period(tmp_path: Path, capfd):
    started = time.monotonic()
    code = run_rank_commands([python("import sys, time; time.sleep(0.5); sys.exit(3)"),
                              python(SLEEPER, str(tmp_path / "pids"))], grace=1.0)
    elapsed = time.monotonic() - started
    assert code == 3
    assert elapsed < 1.0 + 5.0, elapsed
    assert not any(alive(pid) for pid in sleeper_pids(tmp_path / "pids")), "rank 1 or its child outlived the job"
    assert "rank 0 failed" in capfd.readouterr().err


@pytest.mark.slow
def test_a_rank_ignoring_sigterm_is_killed(tmp_path: Path):
    stubborn = """
        import os, signal, sys, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        open(sys.argv[1], "w").write(str(os.getpid()))
        time.sleep(60)
    """
    pid_file = tmp_path / "pid"
    started = time.monotonic()
    code = run_rank_commands([python(stubborn, str(pid_file)),
                              python("import sys, time; time.sleep(1); sys.exit(5)")],
                             grace=0.3, term_timeout=0.3)
    assert code == 5
    assert time.monotonic() - started < 8.0
    assert not alive(int(pid_file.read_text()))


def test_all_ranks_succeeding_exits_zero_and_logs_per_rank(tmp_path: Path, capfd):
    code = run_rank_commands([python("import os; print('hello from', os.environ['RANK'], os.environ['WORLD_SIZE'])")] * 3,
                             log_dir=tmp_path / "logs", master_port=29999)
    assert code == 0
    for rank in range(3):
        assert (tmp_path / "logs" / f"rank{rank}.log").read_text() == f"hello from {rank} 3\n"
    out = capfd.readouterr().out
    assert "hello from 0 3" in out and "hello from 1" not in out  # only rank 0 echoes to the console


@pytest.mark.slow
def test_sigterm_to_the_launcher_ends_every_rank(tmp_path: Path):
    launcher = f"""
        import sys
        from pretrain.launch.local import run_rank_commands
        sleeper = [sys.executable, "-c", {textwrap.dedent(SLEEPER)!r}]
        sys.exit(run_rank_commands([sleeper + [{str(tmp_path / 'pids0')!r}], sleeper + [{str(tmp_path / 'pids1')!r}]],
                                   grace=0.5, term_timeout=2.0))
    """
    proc = subprocess.Popen(python(launcher), stderr=subprocess.PIPE, text=True)
    try:
        pids = sleeper_pids(tmp_path / "pids0") + sleeper_pids(tmp_path / "pids1")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=15)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "forwarding it to every rank" in err
    assert not [pid for pid in pids if alive(pid)], "ranks or their children outlived the launcher"


def test_rank_environment():
    env = rank_environment(1, 4, 12345, {"PATH": "/bin"})
    assert {k: env[k] for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")} == {
        "RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "4",
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "12345"}
    assert env["OMP_NUM_THREADS"] == str(max(1, len(os.sched_getaffinity(0)) // 4)) == str(threads_per_rank(4))
    assert rank_environment(0, 4, 1, {"OMP_NUM_THREADS": "7"})["OMP_NUM_THREADS"] == "7"  # a user's choice stays


def test_bad_arguments_are_clear_errors(tmp_path: Path, tiny_yaml: Path):
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        launch_local(tmp_path / "missing.yaml", [], 2)
    with pytest.raises(ValueError, match="--nproc"):
        launch_local(tiny_yaml, [], 0)
    with pytest.raises(ValueError, match="grace"):
        run_rank_commands([python("pass")], grace=-1)


def test_cli_parses_launch_local():
    args = build_parser().parse_args(["launch", "local", "c.yaml", "--nproc", "2", "optim.lr=1e-3", "--grace", "5",
                                      "--log-dir", "logs", "train.steps=4"])
    assert (args.config, args.overrides, args.nproc, args.grace, args.log_dir, args.master_port) == (
        "c.yaml", ["optim.lr=1e-3", "train.steps=4"], 2, 5.0, "logs", None)


def test_cli_rejects_unknown_options():
    with pytest.raises(SystemExit):
        build_parser().parse_args(["launch", "local", "c.yaml", "--nproc", "2", "--bogus", "x=1"])


def test_more_ranks_than_gpus_is_refused_before_starting(tiny_yaml: Path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ValueError, match="--nproc 4 needs 4 GPUs .* 2 are visible"):
        launch_local(tiny_yaml, [], 4)


def test_cli_reports_bad_arguments_without_a_traceback(tiny_yaml: Path, capsys):
    from pretrain.tools.cli.main import main

    assert main(["launch", "local", str(tiny_yaml), "--nproc", "0"]) == 2
    assert "--nproc must be at least 1" in capsys.readouterr().err
