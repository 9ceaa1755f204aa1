"""LVM-Med through the real trainer: two ranks equal one rank accumulating the same groups, SIGKILL resumes
exactly, and the paper's ResNet-50 config trains.

Groups never span ranks or micro-batches, so 2 ranks x 1 micro-batch of one group and 1 rank x 2 accumulated
micro-batches see the same groups (stream slot s serves rank s in the first, micro-batch s in the second) with
the same noise (drawn from each sample's seed): the same gradient, averaged over ranks in one, over
micro-batches in the other. The loss is a discrete Hamming fraction, so the continuous affinity margin is
compared too.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.engine.conftest import config_file, loss_curve, run_ranks, tiny_config, train_args
from tests.engine.test_resume import _kill_and_resume

pytestmark = pytest.mark.slow  # every test here starts training processes

STEPS = 6
RANKS_VS_ACCUM_RTOL = 1e-5


def _margins(run_dir: Path) -> list[float]:
    rows = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        rows[row["step"]] = row["loss/affinity_margin"]
    return [rows[s] for s in sorted(rows)]


@pytest.fixture(scope="module")
def lvm_yaml(tmp_path_factory, demo_shards: Path) -> Path:
    cfg = tiny_config(demo_shards)
    cfg["objective"] = {"name": "lvm_med", "group_size": 8, "knn": 3, "embed_dim": 32, "gcn_width": 32,
                        "views": {"global_size": [32, 32], "flip_axes": [-1]},
                        "solver": {"iterations": 10, "swap_passes": 2}}
    cfg["model"]["drop_path_rate"] = 0.0
    return config_file(tmp_path_factory, "lvm_tiny", cfg)


def test_two_ranks_give_the_curve_of_one_rank_accumulating_the_same_groups(lvm_yaml, tmp_path):
    ranks, accum = tmp_path / "ranks", tmp_path / "accum"
    common = [f"train.steps={STEPS}"]
    run_ranks(train_args(lvm_yaml, ranks, *common, "train.zero_stage=2", "data.num_workers=1"), 2, tmp_path).assert_clean()
    run_ranks(train_args(lvm_yaml, accum, *common, "train.grad_accum=2", "data.num_workers=2"), 1, tmp_path).assert_clean()
    assert loss_curve(ranks, STEPS) == pytest.approx(loss_curve(accum, STEPS), rel=RANKS_VS_ACCUM_RTOL)
    two, one = _margins(ranks), _margins(accum)
    assert two == pytest.approx(one, rel=RANKS_VS_ACCUM_RTOL, abs=1e-7), (two, one)
    assert len(set(two)) > 1  # the encoder changed between steps


def test_sigkilled_lvm_med_run_resumes_exactly(lvm_yaml, tmp_path):
    _kill_and_resume(lvm_yaml, tmp_path, 1, "train.grad_accum=2")
    assert _margins(tmp_path / "crashed")[-5:] == _margins(tmp_path / "uninterrupted")[-5:]


def test_the_papers_resnet50_config_trains_a_few_steps(demo_shards: Path, tmp_path):
    from pretrain.tools.cli.main import main

    run = tmp_path / "run"
    overrides = [f"train.run_dir={run}", f"data.train={demo_shards / 'pretrain_2d'}", "data.batch_size=16",
                 "data.num_workers=0", "model.img_size=64", "objective.views.global_size=[64,64]", "train.steps=2",
                 "train.log_every=1", "train.precision=fp32", "train.zero_stage=0", "train.progress=false",
                 "train.threads=1", "--no-export"]
    assert main(["train", "configs/lvm_med/cxr_resnet50.yaml", *overrides]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 2 and 0.0 <= summary["final_loss"] <= 1.0
    assert summary["compute"]["flops_per_sample"] > 0
