"""metrics.jsonl on resume: lines after the checkpoint (and a line cut by a kill) are dropped."""
from __future__ import annotations

import json

from pretrain.engine.trainer import open_metrics


def test_resume_drops_lines_logged_after_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss/total": 1.0 / s}) + "\n" for s in range(1, 8)) + '{"step": 8, "lo')
    with open_metrics(path, resume_step=5) as f:
        f.write(json.dumps({"step": 6, "loss/total": 0.5}) + "\n")
    steps = [json.loads(line)["step"] for line in path.read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert json.loads(path.read_text().splitlines()[-1])["loss/total"] == 0.5


def test_fresh_run_starts_an_empty_log(tmp_path):
    with open_metrics(tmp_path / "metrics.jsonl", resume_step=0) as f:
        f.write("{}\n")
    assert (tmp_path / "metrics.jsonl").read_text() == "{}\n"
