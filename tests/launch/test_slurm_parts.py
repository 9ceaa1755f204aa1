"""The SLURM launcher's parts that need no cluster: time formats, sweeps, rendezvous, status, the sbatch script."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pretrain.launch.slurm import SlurmOptions, submit_run, submit_sweep, time_minutes
from pretrain.launch.slurm_job import job_id_of, read_events, rendezvous_env, rendezvous_port, write_event
from pretrain.launch.status import collect, format_table
from pretrain.launch.sweep import load_sweep

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("text, minutes", [
    ("30", 30), ("90:30", 91), ("2:00:00", 120), ("1-00", 1440), ("1-12:30", 2190), ("0-00:00:30", 1), ("1:00:01", 61),
])
def test_time_formats(text, minutes):
    assert time_minutes(text) == minutes


@pytest.mark.parametrize("bad", ["", "1h", "2:00:00:00", "0", "-5"])
def test_bad_time_is_refused(bad):
    with pytest.raises(ValueError, match="--time"):
        time_minutes(bad)


def test_options_refuse_inconsistent_allocations():
    with pytest.raises(ValueError, match="one task per GPU"):
        SlurmOptions(time="60", gpus_per_node=8, tasks_per_node=4).check()
    with pytest.raises(ValueError, match="--signal-delay"):
        SlurmOptions(time="2", signal_delay_s=120).check()
    with pytest.raises(ValueError, match="--nodes"):
        SlurmOptions(time="60", nodes=0).check()
    assert SlurmOptions(time="60", gpus_per_node=4).ntasks_per_node() == 4
    assert SlurmOptions(time="60").ntasks_per_node() == 1
    assert SlurmOptions(time="60", tasks_per_node=2).ntasks_per_node() == 2


def test_grid_sweep_expands_every_combination(tmp_path):
    path = tmp_path / "sizes.yaml"
    path.write_text(yaml.safe_dump({"max_concurrent": 2, "grid": {"model.preset": ["nano", "micro"],
                                                                  "optim.lr": [1e-4, 3e-4, 1e-3]}}, sort_keys=False))
    sweep = load_sweep(path)
    assert sweep.name == "sizes" and sweep.max_concurrent == 2
    assert [p.overrides for p in sweep.points[:4]] == [
        ["model.preset=nano", "optim.lr=0.0001"], ["model.preset=nano", "optim.lr=0.0003"],
        ["model.preset=nano", "optim.lr=0.001"], ["model.preset=micro", "optim.lr=0.0001"]]
    assert len(sweep.points) == 6
    names = [p.name for p in sweep.points]
    assert len(set(names)) == 6 and all("/" not in n for n in names)
    assert names[0] == "000-model.preset=nano,optim.lr=0.0001"


def test_list_sweep_keeps_points_and_types(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"name": "pts", "points": [{"optim.lr": 1e-3}, {"train.steps": 20, "data.resample": True}]}, sort_keys=False))
    sweep = load_sweep(path)
    assert sweep.name == "pts" and sweep.max_concurrent is None
    assert [p.overrides for p in sweep.points] == [["optim.lr=0.001"], ["train.steps=20", "data.resample=true"]]
    # what every point sets is left out of the run names (a scaling plan repeats its base overrides)
    path.write_text(yaml.safe_dump({"points": [{"eval.every": 0, "train.steps": 10}, {"eval.every": 0, "train.steps": 20}]}))
    assert [p.name for p in load_sweep(path).points] == ["000-train.steps=10", "001-train.steps=20"]


@pytest.mark.parametrize("content, message", [
    ({"grid": {"optim.lr": [1]}, "points": [{"a": 1}]}, "exactly one"),
    ({}, "exactly one"),
    ({"grid": {"optim.lr": 3}}, "grid key 'optim.lr'"),
    ({"points": [{}]}, r"points\[0\]"),
    ({"grid": {"optim.lr": [1]}, "max_concurent": 2}, "unknown key"),
    ({"grid": {"optim.lr": [1]}, "max_concurrent": 0}, "max_concurrent"),
])
def test_bad_sweep_files_name_the_problem(tmp_path, content, message):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(content))
    with pytest.raises(ValueError, match=message) as info:
        load_sweep(path)
    assert str(path) in str(info.value)


def test_rendezvous_from_slurm_environment():
    env = {"SLURM_NTASKS": "16", "SLURM_JOB_NUM_NODES": "2", "SLURM_PROCID": "11", "SLURM_LOCALID": "3",
           "SLURM_NODEID": "1", "SLURM_JOB_ID": "4242"}
    got = rendezvous_env(env, ["gpu-a17", "gpu-a18"])
    assert got == {"RANK": "11", "LOCAL_RANK": "3", "WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8", "NODE_RANK": "1",
                   "MASTER_ADDR": "gpu-a17", "MASTER_PORT": str(rendezvous_port("4242", 0))}
    # A requeued job gets another port; every task of one attempt the same one; ports stay in range.
    assert rendezvous_port("4242", 1) != rendezvous_port("4242", 0)
    assert all(20000 <= rendezvous_port(str(j), r) < 60000 for j in range(0, 10**6, 9973) for r in range(3))
    assert job_id_of({"SLURM_JOB_ID": "77", "SLURM_ARRAY_JOB_ID": "70", "SLURM_ARRAY_TASK_ID": "7"}) == "70_7"
    assert job_id_of({"SLURM_JOB_ID": "77"}) == "77"


def _fake_run(root: Path, name: str, job_id: str, events: list[dict], metrics: list[dict], summary: dict | None = None) -> Path:
    run = root / name
    (run / "launch").mkdir(parents=True)
    (run / "launch" / "job.json").write_text(json.dumps({"job_id": job_id, "run_dir": str(run), "logs": "L"}))
    for e in events:
        write_event(run, **e)
    (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics) + '{"step": 9, "loss/to')
    if summary is not None:
        (run / "summary.json").write_text(json.dumps(summary))
    return run


def test_status_without_a_queue_reads_done_failed_and_lost_runs(tmp_path):
    done = _fake_run(tmp_path, "a", "1_0", [{"event": "start"}, {"event": "done"}],
                     [{"step": 5, "loss/total": 0.9}], {"steps": 10, "final_loss": 0.5, "knn_final": 0.75})
    failed = _fake_run(tmp_path, "b", "1_1", [{"event": "start"}, {"event": "retry", "reason": "x"},
                                              {"event": "start"}, {"event": "failed", "reason": "ValueError: bad shard"}],
                       [{"step": 3, "loss/total": 1.25}])
    lost = _fake_run(tmp_path, "c", "1_2", [{"event": "start"}], [{"step": 4, "loss/total": 1.5}])
    (tmp_path / "sweep.json").write_text(json.dumps({"runs": [{"run_dir": str(p)} for p in (done, failed, lost)]}))
    rows = collect(tmp_path)
    assert [(r["state"], r["step"], r["loss"]) for r in rows] == [("done", 10, 0.5), ("failed", 3, 1.25), ("failed", 4, 1.5)]
    assert rows[1]["detail"] == "ValueError: bad shard"
    assert "left the queue" in rows[2]["detail"] and "last event: start" in rows[2]["detail"]
    table = format_table(rows)
    assert "bad shard" in table and "0.5000" in table
    assert [e["event"] for e in read_events(failed)] == ["start", "retry", "start", "failed"]
    with pytest.raises(FileNotFoundError, match="neither a run directory"):
        collect(tmp_path / "a" / "launch" / "nowhere")


def test_dry_run_prints_a_multi_node_gpu_script(tmp_path, capsys):
    config = REPO / "configs" / "demo.yaml"
    opts = SlurmOptions(time="1-00:00:00", nodes=4, gpus_per_node=8, cpus_per_task=12, partition="gpu",
                        account="radiology", qos="high", constraint="h100", mem="480G", exclude="bad01",
                        dependency="afterok:1234")
    script = submit_run(config, [f"train.run_dir={tmp_path / 'run'}"], opts, dry_run=True)["script"]
    directives = [line for line in script.splitlines() if line.startswith("#SBATCH")]
    for flag in ["--nodes=4", "--gpus-per-node=8", "--ntasks-per-node=8", "--cpus-per-task=12", "--partition=gpu",
                 "--time=1440", "--account=radiology", "--qos=high", "--constraint=h100", "--mem=480G",
                 "--exclude=bad01", "--dependency=afterok:1234", "--signal=USR2@120", "--requeue"]:
        assert f"#SBATCH {flag}" in directives, (flag, directives)
    assert "srun" in script and "--kill-on-bad-exit=1" in script and "export OMP_NUM_THREADS=12" in script
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    assert not (tmp_path / "run").exists(), "a dry run must not create the run directory"


def test_dry_run_sweep_is_one_array_with_a_concurrency_limit(tmp_path):
    sweep = tmp_path / "s.yaml"
    sweep.write_text(yaml.safe_dump({"max_concurrent": 2, "grid": {"optim.lr": [1e-3, 2e-3, 3e-3]}}))
    out = submit_sweep(REPO / "configs" / "demo.yaml", [], sweep, SlurmOptions(time="30"), sweep_dir=tmp_path / "sw",
                       dry_run=True)
    assert "#SBATCH --array=0-2%2" in out["script"].splitlines()
    assert len(out["points"]) == 3 and not (tmp_path / "sw").exists()


def test_bad_point_is_refused_before_anything_is_queued(tmp_path):
    sweep = tmp_path / "s.yaml"
    sweep.write_text(yaml.safe_dump({"points": [{"optim.lr": 1e-3}, {"optim.lrr": 1e-3}]}))
    with pytest.raises(ValueError, match=r"point 1 .*did you mean 'optim.lr'"):
        submit_sweep(REPO / "configs" / "demo.yaml", [], sweep, SlurmOptions(time="30"), sweep_dir=tmp_path / "sw")
    assert not (tmp_path / "sw").exists()


def test_cli_dry_run_and_usage_errors(tmp_path):
    cli = [sys.executable, "-m", "pretrain.tools.cli.main", "launch", "slurm", str(REPO / "configs" / "demo.yaml")]
    ok = subprocess.run([*cli, "--time", "10", "--nodes", "2", "--gpus-per-node", "4", "--dry-run",
                         f"train.run_dir={tmp_path}/r"], capture_output=True, text=True, cwd=REPO)
    assert ok.returncode == 0, ok.stderr
    assert "#SBATCH --nodes=2" in ok.stdout and "#SBATCH --ntasks-per-node=4" in ok.stdout
    bad = subprocess.run([*cli, "--time", "1h", "--dry-run"], capture_output=True, text=True, cwd=REPO)
    assert bad.returncode == 2 and "--time '1h'" in bad.stderr
