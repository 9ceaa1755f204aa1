"""`pretrain bench faults`: its judge sorts outcomes as the report says, and a few of its scenarios run clean."""
from __future__ import annotations

import pytest

from pretrain.tools.bench.faults import FAILURES, SCENARIOS, Proc, faults_markdown, judge, run_faults_bench


@pytest.mark.parametrize("proc, code, pattern, problems, outcome", [
    (Proc(None, "", 180.0), 3, "", [], "hang"),
    (Proc(1, "Traceback (most recent call last):\n  ...\nValueError: x", 1.0), 3, "", [], "traceback"),
    (Proc(0, "done", 1.0), 3, "", [], "silent exit 0"),
    (Proc(1, "pretrain: error: x", 1.0), 2, "", [], "wrong exit code"),
    (Proc(2, "pretrain: error: something", 1.0), 2, "optim.lr", [], "unclear message"),
    (Proc(0, "done", 1.0), 0, "", ["checkpoints changed"], "lost work"),
    (Proc(2, "pretrain: error: config key 'optim.lr'", 1.0), 2, r"optim\.lr", [], "clean message"),
    (Proc(0, "done", 1.0), 0, "", [], "recovered"),
])
def test_judge_sorts_each_outcome(proc, code, pattern, problems, outcome):
    assert judge(proc, code, pattern, problems)["outcome"] == outcome


@pytest.mark.slow
def test_disk_full_fifo_and_bad_config_files_end_in_clean_messages(tmp_path):
    # the CLI end of a full disk (exit 5, one line naming the free space), which the checkpoint tests check
    # in-process, and of the config-file and FIFO faults
    result = run_faults_bench(tmp_path, only=["disk_full", "fifo_shard", "config_files"])
    rows = result["trials"]
    assert {r["scenario"] for r in rows} == {"disk_full", "fifo_shard", "config_files"} <= set(SCENARIOS)
    assert [r for r in rows if r["outcome"] != "clean message"] == []
    assert result["summary"]["failures"] == 0 and all(result["summary"][f] == 0 for f in FAILURES)
    (disk,) = [r for r in rows if r["scenario"] == "disk_full"]
    assert disk["exit_code"] == 5 and "<scratch>" in disk["message"] and str(tmp_path) not in disk["message"]
    table = faults_markdown({**result, "device": {"cpu": "test"}})
    assert table.count("| clean message |") == len(rows)
