"""``pretrain eval suite`` and ``pretrain eval compare`` end to end on a real (tiny) run, as a user calls them."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from pretrain.config import load_config
from pretrain.objectives.base import EvalBundle
from tests.eval.test_features import write_shard

PRETRAIN = [sys.executable, "-m", "pretrain.tools.cli.main"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A 16-px MAE run of 6 steps on quadrant shards, and labelled train / val shards with masks and patients."""
    from pretrain.engine.trainer import train

    root = tmp_path_factory.mktemp("suite")
    shards = {"pre": write_shard(root / "pre.tar", 64, 7), "train": write_shard(root / "train.tar", 64, 0, patient_every=2),
              "val": write_shard(root / "val.tar", 40, 1, patient_every=2)}
    cfg = load_config(None, [
        "model.spatial_dims=2", "model.img_size=16", "model.patch_size=4", "model.in_chans=1", "model.embed_dim=32",
        "model.depth=2", "model.num_heads=2", "model.pos_embed=sincos", "objective.name=mae",
        "objective.decoder_dim=16", "objective.decoder_depth=1", "objective.decoder_heads=2",
        f"data.train={shards['pre']}", "data.batch_size=16", "data.num_workers=0", "train.steps=6",
        "train.log_every=1", "train.progress=false", "train.threads=1", f"train.run_dir={root / 'run'}",
        f"eval.knn_train={shards['train']}", f"eval.knn_val={shards['val']}", "eval.every=3",
        "eval.protocols=[fewshot,segment]", "eval.bootstrap=50", "train.export_on_end=false"])
    train(cfg)
    return root, shards


def test_training_runs_the_asked_protocols_beside_its_baselines(tiny_run):
    """eval.protocols: few-shot and the dense probe at every evaluation, in TensorBoard and summary.json."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root, _ = tiny_run
    ev = json.loads((root / "run" / "summary.json").read_text())["eval"]
    for name in ("pretrained", "random_init", "raw_pixels"):
        r = ev[name]
        assert 0.0 <= r["segment/mean_dice"] <= 1.0 and 0.0 <= r["fewshot/k1/accuracy"] <= 1.0, (name, r)
        low, high = r["intervals"]["segment/mean_dice"]
        assert low <= r["segment/mean_dice"] <= high
    # raw pixels carry no position: they cannot tell the left-quadrant mask from the right one
    assert ev["pretrained"]["segment/mean_dice"] > ev["raw_pixels"]["segment/mean_dice"] + 0.2
    acc = EventAccumulator(str(root / "run" / "tb")).Reload()
    steps = [e.step for e in acc.Scalars("eval/encoder/segment/mean_dice")]
    assert steps == [3, 6], steps
    assert {"eval/random_init/fewshot/k4/accuracy", "eval/raw_pixels/segment/dice/left"} <= set(acc.Tags()["scalars"])


def _cli(*args, cwd=None):
    return subprocess.run([*PRETRAIN, *map(str, args)], capture_output=True, text=True, timeout=600, cwd=cwd)


def test_suite_writes_every_protocol_with_intervals_and_compare_tables_them(tiny_run):
    root, shards = tiny_run
    out = root / "eval"
    args = ["eval", "suite", root / "run", "--train", shards["train"], "--val", shards["val"], "--out", out,
            "--protocols", "knn", "linear", "fewshot", "segment", "finetune", "--bootstrap", "200",
            "--fewshot-seeds", "2", "--finetune-steps", "8", "--cache-dir", root / "cache",
            "--finetune-override", "train.threads=1", "--finetune-override", "data.num_workers=0"]
    first = _cli(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    result = json.loads((out / "results.json").read_text())
    assert result["subjects"] == ["pretrained", "random_init", "raw_pixels"] and result["report_split"] == "val"
    table = result["protocols"]
    assert {"knn", "linear", "segment", "finetune", "fewshot/k1", "fewshot/p1"} <= set(table)
    assert "raw_pixels" not in table["finetune"]  # pixels have nothing to fine-tune
    for protocol, entry in table.items():
        for subject in set(entry) - {"comparison"}:
            for name, m in entry[subject]["metrics"].items():
                assert m["low"] <= m["value"] <= m["high"], (protocol, subject, name, m)
        for baseline, diffs in entry["comparison"].items():
            assert all(0.0 <= d["p"] <= 1.0 and d["low"] <= d["diff"] <= d["high"] for d in diffs.values())
    assert table["knn"]["pretrained"]["n"] == 40
    assert {"mean_dice", "mean_iou", "dice/left"} <= set(table["segment"]["pretrained"]["metrics"])
    # the linear probe chose among DINOv2's feature sets, on a held-out part of --train (no --test given)
    assert table["linear"]["pretrained"]["choice"]["features"] in {"cls", "mean", "cls+mean", "last4+mean"}
    md = (out / "results.md").read_text()
    assert "| finetune | accuracy |" in md and "| raw pixels | random init | pretrained |" in md
    for name in ("pretrained", "random_init"):
        assert json.loads((out / "finetune" / name / "summary.json").read_text())["steps"] == 8
    # the same command again: features from the cache, fine-tuning runs reused, the same numbers
    stamp = {p: p.stat().st_mtime_ns for p in (root / "cache").rglob("*") if p.is_file()}
    again = _cli(*args[:-4], "--out", root / "eval2", *args[-4:])
    assert again.returncode == 0, again.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in (root / "cache").rglob("*") if p.is_file()} == stamp
    second = json.loads((root / "eval2" / "results.json").read_text())
    assert second["protocols"]["knn"] == table["knn"] and second["protocols"]["linear"] == table["linear"]

    shown = _cli("eval", "compare", out, root / "eval2" / "results.json")
    assert shown.returncode == 0, shown.stderr
    assert str(out) in shown.stdout and "knn" in shown.stdout


def test_bad_invocations_get_one_clear_message(tiny_run):
    root, shards = tiny_run
    no_out = _cli("eval", "linear", root / "run", "--train", shards["train"], "--val", shards["val"])
    assert no_out.returncode != 0 and "give --out DIR" in no_out.stderr and "Traceback" not in no_out.stderr
    missing = _cli("eval", "compare", root / "nowhere")
    assert missing.returncode != 0 and "no results.json" in missing.stderr and "Traceback" not in missing.stderr
    no_masks = write_shard(root / "nomask.tar", 16, 3, masks=False)
    seg = _cli("eval", "segment", root / "run", "--train", no_masks, "--val", shards["val"], "--out", root / "e3",
               "--no-baselines", "--no-cache")
    assert seg.returncode != 0 and "needs masks" in seg.stderr and "Traceback" not in seg.stderr


def test_zero_shot_and_retrieval_predictions_from_an_image_text_bundle(tmp_path):
    """An embedding space with known answers: images embed as their bright quadrant, reports as the quadrant
    they name, so zero-shot and Recall@1 are exact; a report naming the wrong quadrant is never retrieved."""
    from pretrain.eval.image_text import image_text_predictions
    from pretrain.eval.suite import SuiteData

    spec = write_shard(tmp_path / "v.tar", 24, 0)
    data = SuiteData("", spec, None, (16, 16), 1, "zscore", grid=(4, 4))

    def embed_image(x):
        q = x[:, 0].reshape(len(x), 2, 8, 2, 8).mean((2, 4)).flatten(1)
        return torch.nn.functional.one_hot(q.argmax(1), 4).float()

    def embed_text(texts):
        return torch.nn.functional.one_hot(torch.tensor([int(t.split()[-1][-1]) for t in texts]), 4).float()

    bundle = EvalBundle({"encoder": torch.nn.Identity()}, embed_image=embed_image, embed_text=embed_text,
                        class_prompts=lambda names: {n: [f"quadrant {n}"] for n in names})
    preds = image_text_predictions(bundle, spec, data.view, ("zeroshot", "retrieval"), batch_size=8)
    everyone = np.arange(24)
    assert preds["zeroshot"].metric_fn(everyone)["accuracy"] == 1.0
    hits = preds["retrieval"].metric_fn(everyone)
    assert hits["i2t_r1"] == 1.0 and hits["t2i_r1"] == 1.0 and preds["retrieval"].choice["pairs"] == 24
