"""`pretrain launch slurm` against a real one-node SLURM (tools/slurm_local_cluster.sh; CI starts it).

Skipped, with the reason, where `sbatch` is not installed. Each job here is a
real sbatch job: submitit pickles the task, srun starts one training rank
per task, ranks rendezvous from SLURM's environment over gloo.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pretrain.launch.slurm import SlurmOptions, submit_run, submit_sweep
from pretrain.launch.slurm_job import read_events
from pretrain.launch.status import collect
from pretrain.engine.checkpoint import tag_for

REPO = Path(__file__).resolve().parents[2]
CLUSTER_SCRIPT = REPO / "tools" / "slurm_local_cluster.sh"
JOB_TIMEOUT_S = 300.0

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    shutil.which("sbatch") is None,
    reason="SLURM is not installed here (no sbatch); `sudo tools/slurm_local_cluster.sh start` sets up a one-node cluster",
)]


@pytest.fixture(scope="module")
def cluster() -> None:
    """A healthy local cluster: started through the helper script when it is down and we may start it."""
    if subprocess.run(["bash", str(CLUSTER_SCRIPT), "status"], capture_output=True).returncode == 0:
        return
    if os.geteuid() != 0:
        pytest.skip("sbatch is installed but the local SLURM is down and starting it needs root")
    started = subprocess.run(["bash", str(CLUSTER_SCRIPT), "start"], capture_output=True, text=True)
    assert started.returncode == 0, f"could not start the local SLURM:\n{started.stdout}\n{started.stderr}"


@pytest.fixture(scope="module")
def slurm_yaml(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The trainer tests' tiny MAE run, long enough (300 steps of ~30 ms) to be interrupted in the middle."""
    from tests.engine.conftest import tiny_config
    from pretrain.tools.demo.data import make_demo_data

    shards = tmp_path_factory.mktemp("slurm_shards")
    make_demo_data(shards, scale=0.05, splits=["pretrain_2d"], progress=False)
    cfg = tiny_config(shards)
    cfg["train"].update(steps=300, ckpt_every=100, log_every=1)
    path = shards / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


TWO_RANKS = dict(time="10", tasks_per_node=2, cpus_per_task=1, max_retries=1)


def _wait(predicate, what: str, timeout: float = JOB_TIMEOUT_S, run_dir: Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    logs = ""
    if run_dir is not None:
        for log in sorted((run_dir / "launch" / "slurm").glob("*.out")):
            logs += f"\n--- {log.name} ---\n{log.read_text()[-3000:]}"
    squeue = subprocess.run(["squeue"], capture_output=True, text=True).stdout
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\nsqueue:\n{squeue}{logs}")


def _done(run_dir: Path) -> dict | None:
    path = run_dir / "summary.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _recorded_done(run_dir: Path) -> bool:
    """The launcher has recorded "done": after the export, which comes after the trainer's summary.json."""
    return any(e["event"] == "done" for e in read_events(run_dir))


def _losses(run_dir: Path) -> dict[int, float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {rec["step"]: rec["loss/total"] for rec in map(json.loads, lines)}


def _last_step(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return 0
    steps = [json.loads(line)["step"] for line in path.read_text().splitlines() if line.endswith("}")]
    return max(steps, default=0)


@pytest.fixture(scope="module")
def reference_run(cluster, slurm_yaml: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One uninterrupted 2-rank job to its final checkpoint."""
    run_dir = tmp_path_factory.mktemp("slurm") / "reference"
    record = submit_run(slurm_yaml, [f"train.run_dir={run_dir}", "train.export_on_end=true"], SlurmOptions(**TWO_RANKS))
    _wait(lambda: _recorded_done(run_dir), f"job {record['job_id']} to finish", run_dir=run_dir)
    return run_dir


def test_job_trains_with_one_rank_per_task_to_its_final_checkpoint(reference_run: Path):
    summary = _done(reference_run)
    assert summary["steps"] == 300 and summary["world_size"] == 2
    assert (reference_run / "checkpoints" / tag_for(300) / "COMPLETE").is_file()
    assert (reference_run / "launch" / "config.yaml").is_file() and (reference_run / "config.yaml").is_file()
    logs = sorted(p.name for p in (reference_run / "launch" / "slurm").glob("*_log.out"))
    job_id = json.loads((reference_run / "launch" / "job.json").read_text())["job_id"]
    assert f"{job_id}_0_log.out" in logs and f"{job_id}_1_log.out" in logs
    assert "world 2 (gloo)" in (reference_run / "launch" / "slurm" / f"{job_id}_0_log.out").read_text()
    assert [e["event"] for e in read_events(reference_run)] == ["start", "done"]
    [row] = collect(reference_run)
    assert row["state"] == "done" and row["step"] == 300 and row["loss"] == summary["final_loss"]
    # train.export_on_end is honoured under SLURM as under `pretrain train`: rank 0 exports once
    assert (reference_run / "export" / "model.safetensors").is_file()
    assert summary["export"] == str((reference_run / "export").resolve())


@pytest.mark.parametrize("interrupt", ["scontrol-requeue", "time-limit-signal"])
def test_interrupted_job_resumes_to_the_same_final_loss(interrupt, reference_run, slurm_yaml, tmp_path):
    """SIGTERM from `scontrol requeue` (SLURM requeues), or USR2 as before a time limit (the job requeues itself)."""
    run_dir = tmp_path / "run"
    job_id = submit_run(slurm_yaml, [f"train.run_dir={run_dir}"], SlurmOptions(**TWO_RANKS))["job_id"]
    _wait(lambda: _last_step(run_dir) >= 20, "training to pass step 20", run_dir=run_dir)
    if interrupt == "scontrol-requeue":
        subprocess.run(["scontrol", "requeue", job_id], check=True)
    else:  # what SLURM sends --signal-delay seconds before the time limit
        subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
    # waiting for summary.json alone would race the "done" event recorded after it
    _wait(lambda: _recorded_done(run_dir), f"job {job_id} to come back and finish", run_dir=run_dir)
    summary = _done(run_dir)

    events = read_events(run_dir)
    kinds = [e["event"] for e in events]
    assert kinds == ["start", "stopped" if interrupt == "scontrol-requeue" else "requeue", "start", "done"], events
    stopped_at = events[1]["step"]
    assert 20 <= stopped_at < 300
    assert events[2]["resume_tag"] == tag_for(stopped_at) and events[2]["attempt"] == 1
    assert summary["steps"] == 300
    assert summary["final_loss"] == _done(reference_run)["final_loss"]
    assert _losses(run_dir) == _losses(reference_run)


def test_failing_job_is_retried_a_bounded_number_of_times(cluster, slurm_yaml, tmp_path):
    run_dir = tmp_path / "run"
    missing = tmp_path / "no_such_shards"
    args = [f"train.run_dir={run_dir}", f"data.train={missing}"]
    job_id = submit_run(slurm_yaml, args, SlurmOptions(**TWO_RANKS))["job_id"]
    # A second job into a run directory whose job is still queued or running is refused before it writes anything.
    saved = (run_dir / "launch" / "config.yaml").read_text()
    with pytest.raises(ValueError, match=f"belongs to job {job_id}"):
        submit_run(slurm_yaml, [*args, "optim.lr=1.0"], SlurmOptions(**TWO_RANKS))
    assert (run_dir / "launch" / "config.yaml").read_text() == saved
    _wait(lambda: any(e["event"] == "failed" for e in read_events(run_dir)), "the retried job to fail for good",
          run_dir=run_dir)
    _wait(lambda: not subprocess.run(["squeue", "-h", "-j", job_id], capture_output=True, text=True).stdout.strip(),
          f"job {job_id} to leave the queue")
    kinds = [e["event"] for e in read_events(run_dir)]
    assert kinds == ["start", "retry", "start", "failed"]
    [row] = collect(run_dir)
    assert row["state"] == "failed" and "no_such_shards" in row["detail"]
    assert not (run_dir / "summary.json").exists()


def test_sweep_runs_as_one_array_with_a_concurrency_limit_and_reports_status(cluster, slurm_yaml, tmp_path):
    sweep_file = tmp_path / "lr.yaml"
    sweep_file.write_text(yaml.safe_dump({"name": "lr", "max_concurrent": 2,
                                          "grid": {"optim.lr": [1e-3, 3e-3, 1e-2]}}))
    sweep_dir = tmp_path / "sweep"
    record = submit_sweep(slurm_yaml, ["train.steps=8"], sweep_file,
                          SlurmOptions(time="10", cpus_per_task=1), sweep_dir=sweep_dir)
    array_id = record["array_job_id"]
    assert [r["job_id"] for r in record["runs"]] == [f"{array_id}_{i}" for i in range(3)]
    shown = subprocess.run(["scontrol", "show", "job", array_id], capture_output=True, text=True).stdout
    assert "ArrayTaskThrottle=2" in shown, shown

    def all_done():
        rows = collect(sweep_dir)
        return rows if all(r["state"] == "done" for r in rows) else None

    rows = _wait(all_done, f"array job {array_id} to finish")
    assert [r["step"] for r in rows] == [8, 8, 8]
    assert len({r["loss"] for r in rows}) == 3, "three learning rates gave identical losses"
    for run, lr in zip(record["runs"], [1e-3, 3e-3, 1e-2]):
        assert yaml.safe_load((Path(run["run_dir"]) / "config.yaml").read_text())["optim"]["lr"] == lr
    cli = subprocess.run([sys.executable, "-m", "pretrain.tools.cli.main", "launch", "status", str(sweep_dir)],
                         capture_output=True, text=True, cwd=REPO)
    assert cli.returncode == 0, cli.stderr
    lines = cli.stdout.strip().splitlines()
    assert len(lines) == 4 and all(" done " in line for line in lines[1:]), cli.stdout


def test_dry_run_script_is_accepted_by_sbatch_for_a_multi_node_gpu_job(cluster, slurm_yaml, tmp_path):
    """The local cluster has a `gpu` partition of two 8-GPU cloud nodes: sbatch --test-only validates against it."""
    options = SlurmOptions(time="2-00:00:00", nodes=2, gpus_per_node=8, cpus_per_task=8, partition="gpu", mem="400G")
    script = submit_run(slurm_yaml, [f"train.run_dir={tmp_path / 'run'}"], options, dry_run=True)["script"]
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    checked = subprocess.run(["sbatch", "--test-only", str(path)], capture_output=True, text=True)
    assert checked.returncode == 0 and "to start at" in checked.stderr + checked.stdout, checked.stderr
    assert "gpunode[1-2]" in checked.stderr + checked.stdout
    # One GPU too many per node is refused by the same check: it would catch a wrong script.
    options.gpus_per_node = 9
    path.write_text(submit_run(slurm_yaml, [f"train.run_dir={tmp_path / 'run'}"], options, dry_run=True)["script"])
    assert subprocess.run(["sbatch", "--test-only", str(path)], capture_output=True, text=True).returncode != 0
