"""`pretrain bench data` and `pretrain bench step`: end to end through the CLI, on tiny budgets."""
from __future__ import annotations

import copy
import json
import math
import statistics

import pytest
import torch

from pretrain.tools.bench.common import REPO_ROOT, default_out, format_table
from pretrain.tools.bench.step import differing_weights, summarize
from pretrain.tools.cli.main import main
from pretrain.tools.demo.data import make_demo_data

HEAD_KEYS = {"benchmark", "created", "options", "device", "versions", "config", "summary"}
VERSION_KEYS = {"python", "torch", "deepspeed", "webdataset", "timm", "numpy"}
TINY_DATA = ["data.shuffle_buffer=4", "data.batch_size=4", "--seconds", "0.2", "--repeats", "2",
             "--warmup-batches", "1", "--quiet"]


def read(path) -> dict:
    result = json.loads(path.read_text())
    assert HEAD_KEYS <= set(result)
    assert VERSION_KEYS <= set(result["versions"])
    assert result["versions"]["torch"] and result["versions"]["python"]
    assert result["device"]["cpu_cores"] >= 1 and result["device"]["torch_threads"] >= 1
    return result


def test_bench_data_generates_demo_shards_and_measures_both_loaders(tmp_path, capsys):
    out = tmp_path / "data.json"
    assert main(["bench", "data", *TINY_DATA, "--demo-samples", "16", "--workers", "1", "--out", str(out)]) == 0
    result = read(out)
    assert result["benchmark"] == "data"
    by_dims = {entry["dims"]: entry for entry in result["loaders"]}
    assert set(by_dims) == {2, 3}
    assert by_dims[2]["stored_sample"]["shape"] == [1, 64, 64] and by_dims[2]["stored_sample"]["dtype"] == "uint16"
    assert by_dims[3]["stored_sample"]["shape"] == [1, 32, 32, 32] and by_dims[3]["stored_sample"]["dtype"] == "int16"
    # the MAE transform of each loader: crops at the model's size, one mask noise value per patch
    assert by_dims[2]["runs"][0]["batch"]["image"]["shape"] == [4, 1, 64, 64]
    assert by_dims[2]["runs"][0]["batch"]["mask_noise"]["shape"] == [4, 64]
    assert by_dims[3]["runs"][0]["batch"]["image"]["shape"] == [4, 1, 32, 32, 32]
    assert by_dims[3]["runs"][0]["batch"]["mask_noise"]["shape"] == [4, 64]
    for entry in by_dims.values():
        assert entry["generated_demo_shards"] is True
        (run,) = entry["runs"]
        assert len(run["samples_per_s"]) == 2 and all(r > 0 for r in run["samples_per_s"])
        for window, rate in zip(run["windows"], run["samples_per_s"]):
            assert window["samples"] % 4 == 0 and window["seconds"] >= 0.2
            assert rate == pytest.approx(window["samples"] / window["seconds"])
        assert run["samples_per_s_median"] == pytest.approx(statistics.median(run["samples_per_s"]))
    assert result["summary"]["2d"]["samples_per_s_per_core"] == by_dims[2]["runs"][0]["samples_per_s_per_worker"]
    assert result["summary"]["3d"]["workers_1"]["samples_per_s"] > 0
    printed = capsys.readouterr().out
    assert "samples/s" in printed and str(out) in printed


def test_bench_data_reads_given_shards_with_two_workers(tmp_path):
    make_demo_data(tmp_path / "shards", scale=16 / 8000, splits=["pretrain_2d"], progress=False)
    out = tmp_path / "data.json"
    argv = ["bench", "data", *TINY_DATA, "--dims", "2", "--workers", "1,2", "--shards-2d",
            str(tmp_path / "shards" / "pretrain_2d"), "--out", str(out)]
    assert main(argv) == 0
    result = read(out)
    (entry,) = result["loaders"]
    assert entry["generated_demo_shards"] is False and entry["shards"] == ".../pretrain_2d"
    # a committed result names no folder of the machine it ran on, and no host
    assert str(tmp_path) not in out.read_text() and str(REPO_ROOT) not in out.read_text()
    assert result["config"]["config_file"] == "configs/demo.yaml" and result["options"]["out"] == ".../data.json"
    assert "hostname" not in result["device"]
    one, two = entry["runs"]
    assert (one["num_workers"], two["num_workers"]) == (1, 2)
    assert two["samples_per_s_per_worker"] == pytest.approx(two["samples_per_s_median"] / 2)


def test_bench_data_rejects_shards_of_the_wrong_dimensionality(tmp_path, capsys):
    make_demo_data(tmp_path, scale=8 / 1500, splits=["pretrain_3d"], progress=False)
    argv = ["bench", "data", *TINY_DATA, "--dims", "2", "--shards-2d", str(tmp_path / "pretrain_3d"),
            "--out", str(tmp_path / "never.json")]
    assert main(argv) == 2  # and not a loader that skips every sample forever
    err = capsys.readouterr().err
    assert "2D shard set" in err and "pretrain_3d" in err
    assert not (tmp_path / "never.json").exists()


def test_bench_data_missing_shards_is_a_clear_error(tmp_path, capsys):
    assert main(["bench", "data", "--dims", "2", "--shards-2d", str(tmp_path / "nope")]) == 2
    assert "--shards-2d" in capsys.readouterr().err


def test_bench_data_rejects_a_bad_worker_list():
    with pytest.raises(SystemExit):
        main(["bench", "data", "--workers", "1,x"])
    with pytest.raises(SystemExit):
        main(["bench", "data", "--dims", "4"])


def test_bench_step_compares_trainer_and_bare_loop(tmp_path, single_process, capsys):
    out = tmp_path / "step.json"
    argv = ["bench", "step", "model.preset=nano", "data.shuffle_buffer=4", "data.num_workers=0", "--batch-size", "4",
            "--rounds", "3", "--steps", "1", "--warmup", "1", "--threads", "1", "--profile", "1", "--out", str(out)]
    assert main(argv) == 0
    result = read(out)
    assert result["benchmark"] == "step"
    cfg = result["config"]
    assert cfg["model"]["embed_dim"] == 64 and cfg["batch_size"] == 4 and cfg["torch_threads"] == 1
    assert cfg["batch"]["image"]["shape"] == [4, 1, 64, 64]
    assert (cfg["zero_stage"], cfg["precision"], cfg["same_initial_weights"]) == (0, "fp32", True)
    assert [r["order"][0] for r in result["rounds"]] == ["bare", "trainer", "bare"]
    bare, trainer = result["raw"]["bare_s_per_step"], result["raw"]["trainer_s_per_step"]
    assert len(bare) == len(trainer) == 3 and min(bare + trainer) > 0
    ratio = result["overhead_ratio"]
    assert math.isfinite(ratio) and ratio > 0
    assert result["summary"]["overhead_ratio"] == ratio == pytest.approx(statistics.median(trainer) / statistics.median(bare))
    engine_calls = [row["function"] for row in result["profile"]["trainer"]["engine"]]
    assert any(name.startswith("train_step ") for name in engine_calls)
    assert not any("deepspeed" in row["path"] for row in result["profile"]["bare"]["top"])
    assert "overhead" in capsys.readouterr().out
    assert not torch.distributed.is_initialized()  # torn down at the end


def test_differing_weights_names_what_differs():
    torch.manual_seed(0)
    a = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.LayerNorm(2))
    b = copy.deepcopy(a)
    assert differing_weights(a, b) == []
    with torch.no_grad():
        b[1].bias[0] += 1e-6
    assert differing_weights(a, b) == ["1.bias"]
    assert differing_weights(a, torch.nn.Sequential(a[0])) == ["1.bias", "1.weight"]


def test_summary_numbers_follow_the_rounds():
    rounds = [{"order": ["bare", "trainer"], "bare_s_per_step": b, "trainer_s_per_step": t, "ratio": t / b,
               "bare_cpu_s_per_step": b / 2, "trainer_cpu_s_per_step": t / 2}
              for b, t in [(1.0, 1.1), (2.0, 2.0), (1.5, 1.2)]]
    raw, summary = summarize(rounds, batch_size=8)
    assert raw["bare_s_per_step"] == [1.0, 2.0, 1.5]
    assert summary["bare_step_s"] == 1.5 and summary["trainer_step_s"] == 1.2
    assert summary["overhead_ratio"] == pytest.approx(0.8) and summary["overhead_pct"] == pytest.approx(-20.0)
    assert summary["overhead_ratio_cpu"] == pytest.approx(0.8)
    assert summary["round_ratio_median"] == pytest.approx(1.0) and summary["round_ratio_max"] == pytest.approx(1.1)
    assert summary["bare_samples_per_s"] == pytest.approx(8 / 1.5)


def test_format_table_and_default_out():
    table = format_table(["name", "value"], [["a", 1.234567], ["bb", 10]]).splitlines()
    assert table == ["name  value", "----  -----", "a     1.235", "bb       10"]
    path = default_out("step")
    assert path.parent.name == "benchmarks" and path.name.startswith("bench-step-") and path.suffix == ".json"
    assert " " not in path.name


def test_bench_shards_converts_built_dicom_series_per_worker_count(tmp_path, capsys):
    out = tmp_path / "shards.json"
    assert main(["bench", "shards", "--series", "2", "--slices", "3", "--workers", "1,2", "--repeats", "1",
                 "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["input"]["files"] == 6 and result["input"]["mbytes"] > 0
    assert [r["workers"] for r in result["runs"]] == [1, 2]
    assert all(r["files_per_s"] > 0 and r["mb_per_s"] > 0 for r in result["runs"])
    assert "files/s" in capsys.readouterr().out


def test_bench_lvm_solver_reports_gaps_recovery_and_cost(tmp_path, capsys):
    out = tmp_path / "lvm.json"
    assert main(["bench", "lvm-solver", "model.preset=nano", "--sizes", "4,16", "--instances", "6", "--restarts", "2",
                 "--sigmas", "0.25", "--batch-sizes", "16,32", "--repeats", "1",
                 "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = {r["n"]: r for r in result["optimality"]["rows"] if r["instances"] == "training_like"}
    assert rows[4]["reference"].startswith("exact") and "restarts" in rows[16]["reference"]
    for row in result["optimality"]["rows"]:
        assert row["solver"]["mean_gap"] >= -1e-12  # never above the exact optimum or the stronger search
        assert row["solver"]["mean_gap"] <= row["linear_assignment_only"]["mean_gap"]
    assert result["planted"]["rows"][0]["recovered"] == 1.0  # little noise: every order recovered
    cost = result["step_cost"]
    assert [r["batch_size"] for r in cost["rows"]] == [16, 32] and cost["linear_fit"]["step_s"]["seconds_per_sample"] > 0
    assert cost["config"] == "configs/lvm_med/demo.yaml"  # relative to the repository, no local path
    assert "planted matchings" in capsys.readouterr().out
