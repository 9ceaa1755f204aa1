"""``pretrain bench faults``: inject every fault class of issue 17 into real commands and judge each outcome.

Each scenario runs the real ``pretrain`` command line in a subprocess (as a user would: its own process,
exit code and output) on data it makes, injects one fault, and sorts the result into one of:

- ``clean message``: the expected non-zero exit code and one message saying what is wrong, no traceback;
- ``recovered``: exit 0 and the check of what was recovered holds (e.g. the resumed run's losses equal an
  uninterrupted run's, bit for bit);
- ``not run``: the machine cannot inject it (mounting a tmpfs needs root);
- the failures: ``hang`` (killed at its time limit), ``traceback``, ``silent exit 0`` (a fault that should
  have stopped the command did not), ``wrong exit code``, ``unclear message``, ``lost work`` (a check of
  what must survive failed).

The result (JSON) and its table (markdown) are what ``benchmarks/bench-faults-*.{json,md}`` hold.
"""
from __future__ import annotations

import json
import os
import random
import re
import resource
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from pretrain.tools.bench.fault_cases import BAD_SAMPLES, tiny_run, write_config, write_shard

PRETRAIN = [sys.executable, "-m", "pretrain.tools.cli.main"]
TIME_LIMIT_S = 180.0  # one command; a longer one counts as a hang
GOOD_OUTCOMES = ("clean message", "recovered")
FAILURES = ("hang", "traceback", "silent exit 0", "wrong exit code", "unclear message", "lost work")


@dataclass
class Proc:
    rc: int | None  # None: killed at the time limit
    out: str
    seconds: float


def _plain_environment() -> dict[str, str]:
    """This process's environment without a launcher's rank variables: each command is a run of its own."""
    launcher = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")
    return {k: v for k, v in os.environ.items() if k not in launcher}


def run_cli(args: list[str], *, timeout: float = TIME_LIMIT_S, preexec: Callable[[], None] | None = None) -> Proc:
    """``pretrain ARGS`` in its own process, waited for up to ``timeout`` seconds."""
    env = _plain_environment()
    start = time.perf_counter()
    try:
        done = subprocess.run(PRETRAIN + args, capture_output=True, text=True, timeout=timeout, env=env,
                              preexec_fn=preexec)
        return Proc(done.returncode, done.stdout + done.stderr, time.perf_counter() - start)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode(errors="replace") + (e.stderr or b"").decode(errors="replace")
        return Proc(None, out, time.perf_counter() - start)


def start_cli(args: list[str]) -> subprocess.Popen:
    """``pretrain ARGS`` started in a session of its own (so that a signal can reach its whole group)."""
    return subprocess.Popen(PRETRAIN + args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=_plain_environment(), start_new_session=True)


def judge(proc: Proc, code: int, pattern: str, problems: list[str] = ()) -> dict[str, Any]:
    """One trial's outcome: what was expected (exit ``code``, a message matching ``pattern``), what happened."""
    last = next((line for line in reversed(proc.out.strip().splitlines()) if line.strip()), "")
    if proc.rc is None:
        outcome = "hang"
    elif "Traceback (most recent call last)" in proc.out:
        outcome = "traceback"
    elif proc.rc == 0 and code != 0:
        outcome = "silent exit 0"
    elif proc.rc != code:
        outcome = "wrong exit code"
    elif pattern and not re.search(pattern, proc.out):
        outcome = "unclear message"
    elif problems:
        outcome = "lost work"
    else:
        outcome = "recovered" if code == 0 else "clean message"
    return {"outcome": outcome, "exit_code": proc.rc, "expected_exit_code": code, "seconds": round(proc.seconds, 2),
            "message": last[-400:], "problems": list(problems)}


# --- what the scenarios share ------------------------------------------------------------------------------
class Workspace:
    """A scratch folder with good shards and tiny configs."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.good = write_shard(root / "good" / "shard-000000.tar", 256, {}).parent
        self._n = 0

    def fresh(self, name: str) -> Path:
        self._n += 1
        path = self.root / f"{self._n:03d}-{name}"
        path.mkdir(parents=True)
        return path

    def config(self, folder: Path, shards: Path | None = None, **sections) -> str:
        return write_config(folder / "config.yaml", tiny_run(shards or self.good, folder / "run", **sections))


def _losses(run_dir: Path) -> list[tuple[int, float]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [(r["step"], r["loss/total"]) for r in map(json.loads, path.read_text().splitlines()) if "loss/total" in r]


def _wait_for_step(proc: subprocess.Popen, run_dir: Path, step: int, timeout: float = TIME_LIMIT_S) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end and proc.poll() is None:
        if any(s >= step for s, _ in _losses(run_dir)):
            return True
        time.sleep(0.05)
    return False


def _complete_checkpoints(run_dir: Path) -> list[str]:
    folder = run_dir / "checkpoints"
    return sorted(p.name for p in folder.glob("step_*") if (p / "COMPLETE").is_file()) if folder.is_dir() else []


# --- the scenarios -------------------------------------------------------------------------------------------
Scenario = Callable[[Workspace, random.Random], list[dict[str, Any]]]
SCENARIOS: dict[str, tuple[str, str, Scenario]] = {}  # name -> (fault class, fault, run)


def scenario(name: str, fault_class: str, fault: str):
    def register(run: Scenario) -> Scenario:
        SCENARIOS[name] = (fault_class, fault, run)
        return run
    return register


@scenario("bad_samples", "sample", "one of each bad-sample kind (see rows) among 256 good samples")
def _bad_samples(ws: Workspace, rng: random.Random) -> list[dict[str, Any]]:
    folder = ws.fresh("bad_samples")
    kinds = sorted(BAD_SAMPLES)
    planted = {2 + 3 * i: BAD_SAMPLES[k][0]() for i, k in enumerate(kinds)}
    shards = write_shard(folder / "shards" / "shard-000000.tar", 256, planted).parent
    proc = run_cli(["train", ws.config(folder, shards, data={"max_bad_fraction": 0.5})])
    summary = folder / "run" / "summary.json"
    skipped = json.loads(summary.read_text())["skipped_nonfinite"] if summary.is_file() else None
    rows = []
    for i, kind in zip(planted, kinds):
        named = re.search(rf"\({BAD_SAMPLES[kind][1]}, .*bad{i:05d}", proc.out) is not None
        problems = [] if skipped == 0 else [f"{skipped} steps skipped"]
        row = judge(proc, 0, "", problems if named else problems + [f"bad{i:05d} not named as {BAD_SAMPLES[kind][1]}"])
        rows.append({"case": kind, **row})
    return rows


@scenario("too_many_bad_samples", "sample", "a quarter of the samples NaN (data.max_bad_fraction 0.05)")
def _too_many_bad(ws: Workspace, rng: random.Random) -> list[dict[str, Any]]:
    folder = ws.fresh("too_many_bad")
    nan = BAD_SAMPLES["nan_image"][0]
    shards = write_shard(folder / "shards" / "s.tar", 256, {i: nan() for i in range(0, 256, 4)}).parent
    return [judge(run_cli(["train", ws.config(folder, shards)]), 3, r"max_bad_fraction=0\.05")]


@scenario("all_nan_data", "sample", "every image all NaN")
def _all_nan(ws: Workspace, rng: random.Random) -> list[dict[str, Any]]:
    folder = ws.fresh("all_nan")
    nan = BAD_SAMPLES["nan_image"][0]
    shards = write_shard(folder / "shards" / "s.tar", 300, {i: nan() for i in range(300)}).parent
    return [judge(run_cli(["train", ws.config(folder, shards)]), 3, r"samples in a row were rejected")]


@scenario("fifo_shard", "data", "a FIFO named shard-000001.tar beside a good shard")
def _fifo_shard(ws: Workspace, rng: random.Random) -> list[dict[str, Any]]:
    folder = ws.fresh("fifo_shard")
    shards = write_shard(folder / "shards" / "shard-000000.tar", 64, {}).parent
    os.mkfifo(shards / "shard-000001.tar")
    return [judge(run_cli(["train", ws.config(folder, shards)], timeout=60), 3, r"shard-000001\.tar")]


@scenario("truncated_shard", "data", "a shard cut in half beside a good one")
def _truncated_shard(ws: Workspace, rng: random.Random) -> list[dict[str, Any]]:
    folder = ws.fresh("truncated_shard")
    shards = write_shard(folder / "shards" / "shard-000000.tar", 128, {}).parent
    cut = write_shard(shards / "shard-000001.tar", 128, {}, seed=1)
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2 + 100])
    return [judge(run_cli(["train", ws.config(folder, shards)]), 0, r"corrupt shard .*shard-000001\.tar")]


CONFIG_FAULTS = {  # override -> what the message must name
    "optim.lr=.inf": "optim.lr", "optim.weight_decay=.nan": "optim.weight_decay", "data.batch_size=-4": "batch_size",
    "data.num_workers=-1": "num_workers", "objective.crop_scale=[-1,0]": "crop_scale",
    "data.batch_size=1000000000": "batch_size", "optim.lr=1e400": "optim.lr", "train.steps=0": "train.steps",
}


@scenario("config_values", "config", "impossible or non-finite values (see rows)")
def _config_values(ws: Workspace, rng: random.Random) -> list[dict[str, Any]]:
    folder = ws.fresh("config_values")
    config = ws.config(folder)
    return [{"case": o, **judge(run_cli(["train", config, o]), 2, re.escape(key))} for o, key in CONFIG_FAULTS.items()]


@scenario("config_files", "config", "bad config files and shard sets (see rows)")
def _config_files(ws: Workspace, rng: random.Random) -> list[dict[str, Any]]:
    folder = ws.fresh("config_files")
    config = ws.config(folder)
    dup = folder / "duplicate.yaml"
    dup.write_text(Path(config).read_text() + "optim:\n  lr: 1.0\n")
    (folder / "empty").mkdir()
    weights = folder / "weights.yaml"
    weights.write_text(Path(config).read_text().replace(f"train: {ws.good}", f"train:\n  - shards: {ws.good}\n    weight: -1"))
    rows = [{"case": "duplicate YAML key", **judge(run_cli(["train", str(dup)]), 2, r"optim")},
            {"case": "missing shard set", **judge(run_cli(["train", config, f"data.train={folder}/nope"]), 2, "nope")},
            {"case": "empty shard folder", **judge(run_cli(["train", config, f"data.train={folder}/empty"]), 2, "empty")},
            {"case": "negative mixture weight", **judge(run_cli(["train", str(weights)]), 2, "weight")}]
    (folder / "afile").write_text("x")
    rows.append({"case": "run directory is a file",
                 **judge(run_cli(["train", config, f"train.run_dir={folder}/afile"]), 5, "afile")})
    return rows


@scenario("resume_with_other_batch_size", "config", "resume a run with another data.batch_size")
def _resume_other_batch(ws: Workspace, rng: random.Random) -> list[dict[str, Any]]:
    folder = ws.fresh("resume_batch")
    config = ws.config(folder, train={"steps": 2})
    first = run_cli(["train", config])
    if first.rc != 0:
        return [judge(first, 0, "")]
    before = _complete_checkpoints(folder / "run")
    proc = run_cli(["train", config, "train.steps=4", "data.batch_size=4"])
    lost = [] if _complete_checkpoints(folder / "run") == before else ["checkpoints changed"]
    return [judge(proc, 2, r"batch_size=8.*batch_size=4", lost)]


@scenario("diverging_lr", "divergence", "optim.lr=1e30: the weights turn NaN after a few steps")
def _diverging_lr(ws: Workspace, rng: random.Random) -> list[dict[str, Any]]:
    folder = ws.fresh("diverging_lr")
    proc = run_cli(["train", ws.config(folder, optim={"lr": 1e30, "warmup_steps": 0},
                                       train={"steps": 12, "export_on_end": True})])
    lost = ["exported"] if (folder / "run" / "export").exists() else []
    return [judge(proc, 6, r"non-finite loss.*lower optim\.lr", lost)]


def _reference_losses(ws: Workspace, steps: int) -> list[tuple[int, float]]:
    folder = ws.fresh("reference")
    run_cli(["train", ws.config(folder, train={"steps": steps, "ckpt_every": 2})])
    return _losses(folder / "run")


@scenario("kill_9", "interruption", "SIGKILL at a random step, then the same command")
def _kill_9(ws: Workspace, rng: random.Random, trials: int = 3) -> list[dict[str, Any]]:
    return _interrupted(ws, rng, signal.SIGKILL, trials, -signal.SIGKILL)


@scenario("sigterm", "interruption", "SIGTERM (as a scheduler sends) at a random step, then the same command")
def _sigterm(ws: Workspace, rng: random.Random) -> list[dict[str, Any]]:
    return _interrupted(ws, rng, signal.SIGTERM, 1, 128 + signal.SIGTERM)


def _interrupted(ws: Workspace, rng: random.Random, sig: signal.Signals, trials: int, first_rc: int) -> list[dict]:
    steps = 12
    reference = _reference_losses(ws, steps)
    rows = []
    for _ in range(trials):
        at = rng.randrange(1, steps - 1)
        folder = ws.fresh(f"{sig.name.lower()}_at_{at}")
        config = ws.config(folder, train={"steps": steps, "ckpt_every": 2})
        proc = start_cli(["train", config])
        _wait_for_step(proc, folder / "run", at)
        os.killpg(proc.pid, sig)
        out, _ = proc.communicate(timeout=TIME_LIMIT_S)
        resumed = run_cli(["train", config])
        problems = [] if _losses(folder / "run") == reference else ["resumed losses differ from the uninterrupted run's"]
        if proc.returncode != first_rc:
            problems.append(f"the interrupted run exited {proc.returncode}, not {first_rc}")
        rows.append({"case": f"at step {at}", **judge(resumed, 0, "", problems)})
    return rows


@scenario("two_trainers", "concurrency", "a second pretrain train on a run directory in use")
def _two_trainers(ws: Workspace, rng: random.Random) -> list[dict[str, Any]]:
    folder = ws.fresh("two_trainers")
    config = ws.config(folder, train={"steps": 100_000, "ckpt_every": 50})
    first = start_cli(["train", config])
    _wait_for_step(first, folder / "run", 1)
    second = run_cli(["train", config])
    os.killpg(first.pid, signal.SIGTERM)  # the first one stops as a scheduler would stop it: checkpointed
    first.communicate(timeout=TIME_LIMIT_S)
    problems = [] if first.returncode == 128 + signal.SIGTERM else [f"the first trainer exited {first.returncode}"]
    steps = [s for s, _ in _losses(folder / "run")]
    if not steps or steps != list(range(1, steps[-1] + 1)):
        problems.append("metrics lines lost or mixed")
    if first.returncode is not None and first.returncode != 0 and not _complete_checkpoints(folder / "run"):
        problems.append("no checkpoint of the first trainer")
    return [judge(second, 2, r"in use by a trainer \(pid", problems)]


@scenario("damaged_checkpoints", "checkpoint", "the newest checkpoint damaged (see rows), then resume")
def _damaged_checkpoints(ws: Workspace, rng: random.Random) -> list[dict[str, Any]]:
    rows = []
    for case in ("garbage latest pointer", "truncated model file", "a file deleted"):
        folder = ws.fresh("damaged")
        config = ws.config(folder, train={"steps": 6, "ckpt_every": 2})
        run_cli(["train", config])
        newest = folder / "run" / "checkpoints" / "step_00000006"
        if case == "garbage latest pointer":
            (folder / "run" / "checkpoints" / "latest").write_bytes(b"\xff\xfe\x00garbage")
        else:
            victim = max((p for p in newest.rglob("*.pt")), key=lambda p: p.stat().st_size)
            if case == "truncated model file":
                victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
            else:
                victim.unlink()
        proc = run_cli(["train", config, "train.steps=8"])
        resumed_from = 6 if case == "garbage latest pointer" else 4
        ok = [s for s, _ in _losses(folder / "run")] == list(range(1, 9))
        problems = [] if ok else ["the resumed run's steps are not 1..8"]
        rows.append({"case": case, **judge(proc, 0, "" if resumed_from == 6 else r"step_00000004", problems)})
    return rows


@scenario("export_damaged", "checkpoint", "export a checkpoint with a file missing, and one with NaN weights")
def _export_damaged(ws: Workspace, rng: random.Random) -> list[dict[str, Any]]:
    import torch

    folder = ws.fresh("export_damaged")
    config = ws.config(folder, train={"steps": 2})
    run_cli(["train", config])
    ckpt = folder / "run" / "checkpoints" / "step_00000002"
    model = next(ckpt.rglob("mp_rank_00_model_states.pt"))
    state = torch.load(model, weights_only=False)
    rows = []
    for case in ("a file missing", "NaN weights"):
        if case == "a file missing":
            optim = next(ckpt.rglob("*optim_states.pt"), None) or model
            saved = optim.read_bytes()
            optim.unlink()
            rows.append({"case": case, **judge(run_cli(["export", str(folder / "run"), str(folder / "x1")]), 4,
                                               r"missing|damaged")})
            optim.write_bytes(saved)
        else:
            poisoned = dict(state, module={k: v.float() * float("nan") for k, v in state["module"].items()})
            torch.save(poisoned, model)
            (ckpt / "COMPLETE").write_text("2\n")  # the damage a checksum would catch: here, a marker without them
            rows.append({"case": case, **judge(run_cli(["export", str(folder / "run"), str(folder / "x2")]), 2,
                                               r"NaN|non-finite")})
    return rows


@scenario("disk_full", "environment", "the file size limit (RLIMIT_FSIZE) reached while writing a checkpoint")
def _disk_full(ws: Workspace, rng: random.Random) -> list[dict[str, Any]]:
    folder = ws.fresh("disk_full")
    config = ws.config(folder, train={"steps": 4, "ckpt_every": 2})

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (512 * 1024, 512 * 1024))

    proc = run_cli(["train", config], preexec=limit)
    half = [p.name for p in (folder / "run" / "checkpoints").glob("step_*") if not (p / "COMPLETE").is_file()] \
        if (folder / "run" / "checkpoints").is_dir() else []
    return [judge(proc, 5, r"environment error:.*(space|size)", [f"incomplete {h} left" for h in half])]


@scenario("small_or_read_only_disk", "environment", "a run directory on a tmpfs too small for a checkpoint, and on "
                                                       "a read-only one (needs root to mount)")
def _small_or_read_only_disk(ws: Workspace, rng: random.Random) -> list[dict[str, Any]]:
    rows = []
    for case, options, code, pattern in (
            ("tmpfs of 2 MB", "size=2m", 5, r"environment error:.*(space|free)"),
            ("read-only tmpfs", "ro,size=1m", 5, r"environment error:.*read-only")):
        folder = ws.fresh("tmpfs")
        mount = folder / "mnt"
        mount.mkdir()
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount)], capture_output=True,
                                 text=True)
        if mounted.returncode != 0:
            rows.append({"case": case, "outcome": "not run", "exit_code": None, "expected_exit_code": code,
                         "seconds": 0.0, "message": f"mount failed: {mounted.stderr.strip()[:200]}", "problems": []})
            continue
        try:
            config = ws.config(folder, train={"steps": 4, "ckpt_every": 2, "run_dir": str(mount / "run")})
            rows.append({"case": case, **judge(run_cli(["train", config]), code, pattern)})
        finally:
            subprocess.run(["umount", str(mount)], capture_output=True)
    return rows


@scenario("shards_write_killed", "ingestion", "pretrain shards write of a PNG folder killed (SIGKILL), then rerun")
def _shards_write_killed(ws: Workspace, rng: random.Random) -> list[dict[str, Any]]:
    from PIL import Image

    folder = ws.fresh("shards_write")
    src = folder / "src"
    src.mkdir()
    gen = np.random.default_rng(0)
    for i in range(600):
        Image.fromarray((gen.random((48, 48)) * 255).astype(np.uint8)).save(src / f"img{i:04d}.png")
    os.mkfifo(src / "pipe.png")  # never opened: listed as failed
    args = ["shards", "write", str(src), str(folder / "out"), "--samples-per-shard", "20", "--no-progress"]
    proc = start_cli(args)
    end = time.monotonic() + TIME_LIMIT_S
    while time.monotonic() < end and proc.poll() is None and len(list((folder / "out").glob("*.tar"))) < 3:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    resumed = run_cli(args)
    whole = run_cli(["shards", "write", str(src), str(folder / "whole"), "--samples-per-shard", "20", "--no-progress"])
    problems = []
    shard_bytes = {p.name: p.read_bytes() for p in (folder / "out").glob("*.tar")}
    if shard_bytes != {p.name: p.read_bytes() for p in (folder / "whole").glob("*.tar")}:
        problems.append("the resumed shards differ from an uninterrupted conversion's")
    manifest = folder / "out" / "manifest.json"
    if not manifest.is_file() or "pipe.png" not in manifest.read_text():
        problems.append("the FIFO is not listed as failed")
    if whole.rc != 0:
        problems.append(f"the uninterrupted conversion exited {whole.rc}")
    return [judge(resumed, 0, "", problems)]


@scenario("rank_killed", "interruption", "one of 2 ranks (launch local) killed with SIGKILL mid-run, then rerun")
def _rank_killed(ws: Workspace, rng: random.Random) -> list[dict[str, Any]]:
    import psutil

    folder = ws.fresh("rank_killed")
    config = ws.config(folder, train={"steps": 16, "ckpt_every": 4})
    args = ["launch", "local", "--nproc", "2", "--grace", "10", config]
    launcher = start_cli(args)
    _wait_for_step(launcher, folder / "run", 6)
    started = time.monotonic()
    ranks = [c for c in psutil.Process(launcher.pid).children(recursive=True) if "train" in " ".join(c.cmdline())]
    victim = next((r for r in ranks if "RANK" in r.environ() and r.environ()["RANK"] == "1"), ranks[-1] if ranks else None)
    if victim is not None:
        victim.kill()
    launcher.communicate(timeout=TIME_LIMIT_S)
    stopped_in = time.monotonic() - started
    problems = [] if launcher.returncode not in (0, None) else [f"the launcher exited {launcher.returncode}"]
    if stopped_in > 60:
        problems.append(f"the other rank took {stopped_in:.0f} s to stop")
    resumed = run_cli(args)
    if [s for s, _ in _losses(folder / "run")][-1:] != [16]:
        problems.append("the rerun did not reach step 16")
    return [{"case": f"stopped in {stopped_in:.1f} s", **judge(resumed, 0, "", problems)}]


# --- the run and its report -------------------------------------------------------------------------------
def run_faults_bench(scratch: Path, only: list[str] | None = None, seed: int = 0, kill_trials: int = 3
                     ) -> dict[str, Any]:
    rng = random.Random(seed)
    ws = Workspace(scratch)
    rows = []
    for name, (fault_class, fault, run) in SCENARIOS.items():
        if only and name not in only:
            continue
        started = time.perf_counter()
        trials = run(ws, rng, kill_trials) if name == "kill_9" else run(ws, rng)
        for trial in trials:  # a committed result names no folder of the machine it ran on
            trial["message"] = trial["message"].replace(str(scratch), "<scratch>")
            trial["problems"] = [p.replace(str(scratch), "<scratch>") for p in trial["problems"]]
            rows.append({"scenario": name, "class": fault_class, "fault": fault, **trial})
        print(f"[faults] {name}: {', '.join(t['outcome'] for t in trials)} ({time.perf_counter() - started:.0f} s)",
              file=sys.stderr, flush=True)
    counts = {o: sum(r["outcome"] == o for r in rows) for o in GOOD_OUTCOMES + FAILURES + ("not run",)}
    return {"trials": rows, "summary": {"trials": len(rows), "scenarios": len({r["scenario"] for r in rows}),
                                        "classes": sorted({r["class"] for r in rows}), **counts,
                                        "failures": sum(counts[f] for f in FAILURES)}}


def faults_markdown(result: dict[str, Any]) -> str:
    s = result["summary"]
    lines = [f"# Fault injection: {s['trials']} trials of {s['scenarios']} scenarios",
             "", f"Created {result.get('created', '')} by `pretrain bench faults` on {result['device'].get('cpu', '')}.",
             "", f"**{s['clean message']} clean messages, {s['recovered']} recoveries, {s['failures']} failures** "
             f"({', '.join(f'{f}: {s[f]}' for f in FAILURES)}); {s['not run']} not run (see the rows).", "",
             "| class | scenario | case | outcome | exit (expected) | s | message or problem |",
             "|---|---|---|---|---|---|---|"]
    for r in result["trials"]:
        text = "; ".join(r["problems"]) or r["message"]
        text = text.replace("|", "\\|").replace("\n", " ")[:160]
        lines.append(f"| {r['class']} | {r['scenario']} | {r.get('case', '')} | {r['outcome']} | "
                     f"{r['exit_code']} ({r['expected_exit_code']}) | {r['seconds']:.1f} | {text} |")
    return "\n".join(lines) + "\n"
