"""The suite's results as a markdown table, and several runs' results side by side.

One row per protocol (and few-shot setting) with its headline metric: each
subject's value and confidence interval, then the pretrained encoder's gain
over random init with the paired bootstrap's interval and p-value.
"""
from __future__ import annotations

from typing import Any

HEADLINES = ("accuracy", "auroc_macro", "mean_dice", "i2t_r5")  # the first a protocol reports is its headline
SECONDARY = {"accuracy": "balanced_accuracy", "mean_dice": "mean_iou", "i2t_r5": "t2i_r5"}


def headline(entry: dict[str, Any]) -> str:
    metrics = next(v["metrics"] for k, v in entry.items() if k != "comparison")
    return next((m for m in HEADLINES if m in metrics), next(iter(metrics)))


def _pct(d: dict[str, float]) -> str:
    return f"{100 * d['value']:.1f} [{100 * d['low']:.1f}, {100 * d['high']:.1f}]"


def _gain(c: dict[str, float]) -> str:
    p = c["p"]
    return f"{100 * c['diff']:+.1f} [{100 * c['low']:+.1f}, {100 * c['high']:+.1f}], p {'< 0.001' if p < 1e-3 else f'= {p:.3f}'}"


def markdown_table(result: dict[str, Any], baseline: str = "random_init") -> str:
    """The table of one suite result (``pretrain.eval.suite.run_suite``)."""
    subjects = result["subjects"]
    level = round(100 * result["bootstrap"]["level"])
    head = subjects[0]
    cols = ["protocol", "metric", *[s.replace("_", " ") for s in reversed(subjects)], f"{head} − {baseline.replace('_', ' ')}"]
    lines = [f"| {' | '.join(cols)} |", "|" + " --- |" * len(cols)]
    for protocol, entry in result["protocols"].items():
        metric = headline(entry)
        cells = [protocol, metric.replace("_", " ")]
        for s in reversed(subjects):
            m = entry.get(s, {}).get("metrics", {}).get(metric)
            spread = entry.get(s, {}).get("spread", {}).get(metric)
            cells.append("—" if m is None else _pct(m) + (f" ±{100 * spread:.1f}" if spread else ""))
        c = entry.get("comparison", {}).get(baseline, {}).get(metric)
        cells.append("—" if c is None else _gain(c))
        lines.append(f"| {' | '.join(cells)} |")
    note = (f"Values in %, {level} % bootstrap intervals ({result['bootstrap']['replicates']} replicates) over the "
            f"{result['report_split']} set; ± is the spread over few-shot draws; the last column is a paired "
            "bootstrap on the same resampled samples.")
    return "\n".join(lines) + "\n\n" + note + "\n"


def compare_table(results: dict[str, dict[str, Any]]) -> str:
    """Several runs' headline subject side by side, one column per run (name -> suite result)."""
    names = list(results)
    protocols = list(dict.fromkeys(p for r in results.values() for p in r["protocols"]))
    cols = ["protocol", "metric", *names]
    lines = [f"| {' | '.join(cols)} |", "|" + " --- |" * len(cols)]
    for protocol in protocols:
        entries = [r["protocols"].get(protocol) for r in results.values()]
        metric = headline(next(e for e in entries if e))
        cells = [protocol, metric.replace("_", " ")]
        for r, e in zip(results.values(), entries):
            m = (e or {}).get(r["subjects"][0], {}).get("metrics", {}).get(metric)
            cells.append("—" if m is None else _pct(m))
        lines.append(f"| {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"
