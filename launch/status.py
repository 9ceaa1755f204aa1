"""``pretrain launch status RUN_DIR_OR_SWEEP``: where each run of a job or sweep stands.

A run's state comes from three places, most reliable first: ``summary.json``
(written only when training reached its last step), the scheduler's queue
(pending or running now, including a requeued job waiting for its next
allocation), and the run's own event log (``launch/events.jsonl``: failures
with their reason). Progress (last step, last loss) is the last line of
``metrics.jsonl``.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from pretrain.launch.slurm_job import JOB_RECORD, SWEEP_RECORD, read_events

_RUNNING = {"RUNNING", "COMPLETING", "CONFIGURING", "STAGE_OUT", "SIGNALING", "RESIZING"}
_PENDING = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "SUSPENDED", "RESV_DEL_HOLD", "SPECIAL_EXIT"}


def queue_states(job_ids: list[str]) -> dict[str, tuple[str, str]]:
    """``{job_id: (STATE, reason)}`` for the jobs SLURM still knows, array tasks one by one (``123_4``)."""
    if not job_ids or shutil.which("squeue") is None:
        return {}
    bases = sorted({j.split("_")[0] for j in job_ids})
    proc = subprocess.run(["squeue", "-h", "-r", "-o", "%i|%T|%r", "-j", ",".join(bases)],
                          capture_output=True, text=True, timeout=60)
    states = {}
    for line in proc.stdout.splitlines():
        parts = line.strip().split("|")
        if len(parts) == 3:
            states[parts[0]] = (parts[1], parts[2])
    return states


def last_metrics(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return {}
    for line in reversed(path.read_text().splitlines()):
        try:
            return json.loads(line)
        except ValueError:
            continue
    return {}


def run_status(run_dir: Path, queue: dict[str, tuple[str, str]]) -> dict[str, Any]:
    """State, last step, last loss, job id and detail of one run directory."""
    record_path = run_dir / "launch" / JOB_RECORD
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    job_id = record.get("job_id")
    metrics = last_metrics(run_dir)
    out = {"run_dir": str(run_dir), "job_id": job_id, "step": metrics.get("step"), "loss": metrics.get("loss/total")}
    events = read_events(run_dir)
    summary_path = run_dir / "summary.json"
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        out.update(state="done", step=summary.get("steps"), loss=summary.get("final_loss"),
                   detail=f"kNN {summary['knn_final']:.4f}" if summary.get("knn_final") is not None else "")
        return out
    if job_id in queue:
        state, reason = queue[job_id]
        if state in _RUNNING:
            out.update(state="running", detail=f"attempt {sum(e['event'] == 'start' for e in events)}")
        elif state in _PENDING:
            detail = reason if reason and reason != "None" else ""
            if any(e["event"] in ("requeue", "stopped", "retry") for e in events):
                detail = f"requeued{'; ' + detail if detail else ''}"
            out.update(state="pending", detail=detail)
        else:
            out.update(state=state.lower(), detail=reason)
        return out
    failed = [e for e in events if e["event"] == "failed"]
    if failed:
        out.update(state="failed", detail=failed[-1].get("reason", ""))
    elif job_id is None:
        out.update(state="not submitted", detail=f"no {JOB_RECORD} in {run_dir / 'launch'}")
    else:
        logs = record.get("logs", "")
        last = events[-1]["event"] if events else "never started"
        out.update(state="failed", detail=f"job left the queue without finishing (last event: {last}); logs in {logs}")
    return out


def collect(path: str | Path) -> list[dict[str, Any]]:
    """Status rows of a run directory, or of every run of a sweep directory (``sweep.json``)."""
    path = Path(path)
    if (path / SWEEP_RECORD).is_file():
        runs = [Path(r["run_dir"]) for r in json.loads((path / SWEEP_RECORD).read_text())["runs"]]
    elif (path / "launch").is_dir() or (path / "metrics.jsonl").is_file():
        runs = [path]
    else:
        raise FileNotFoundError(f"{path} is neither a run directory (launch/, metrics.jsonl) nor a sweep ({SWEEP_RECORD})")
    job_ids = []
    for run in runs:
        record = run / "launch" / JOB_RECORD
        if record.is_file():
            job_ids.append(json.loads(record.read_text())["job_id"])
    queue = queue_states(job_ids)
    return [run_status(run, queue) for run in runs]


def format_table(rows: list[dict[str, Any]]) -> str:
    header = ("run", "state", "step", "loss", "job", "detail")
    lines = [header]
    for r in rows:
        loss = "" if r.get("loss") is None else f"{r['loss']:.4f}"
        step = "" if r.get("step") is None else str(r["step"])
        lines.append((Path(r["run_dir"]).name, r["state"], step, loss, r.get("job_id") or "", r.get("detail", "")))
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header) - 1)]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(line, widths)) + "  " + str(line[-1]) for line in lines)


def _status_cli(args: argparse.Namespace) -> int:
    try:
        rows = collect(args.path)
    except FileNotFoundError as e:
        print(f"pretrain launch status: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(rows, indent=2) if args.json else format_table(rows))
    return 0


def add_status_parser(launch_subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = launch_subparsers.add_parser("status", help="state, last step and loss of a run or of every run of a sweep")
    p.add_argument("path", help="a run directory or a sweep directory")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.set_defaults(func=_status_cli)
    return p
