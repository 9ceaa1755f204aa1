"""``pretrain bench {data,step,kernels,shards,lvm-solver}``: benchmarks that write JSON results.

Every result holds the device, the library versions, the config and shapes
measured, the raw timings of every repeat and the summary numbers, and is
written to ``benchmarks/bench-<name>-<device>.json`` unless ``--out`` says
otherwise. The measurements live in :mod:`pretrain.tools.bench.data`,
:mod:`pretrain.tools.bench.step`, :mod:`pretrain.tools.bench.kernels`, :mod:`pretrain.tools.bench.shards` and
:mod:`pretrain.tools.bench.lvm_solver`; this module holds the command line and the shared
reporting.
"""
from __future__ import annotations

import json
import os
import platform
import re
import statistics
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Sequence

import torch


REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = REPO_ROOT / "configs" / "demo.yaml"
LVM_CONFIG = REPO_ROOT / "configs" / "lvm_med" / "demo.yaml"
VERSIONED_PACKAGES = ("torch", "deepspeed", "webdataset", "timm", "numpy")


class BenchInputError(ValueError):
    """A benchmark input (shard set, option) that cannot be measured; the message names it."""


# --- what every result records --------------------------------------------------------------
def recorded_path(path: str | Path) -> str:
    """A path as a committed result names it: relative to the repository, or only its last part when it lies
    elsewhere (a temporary folder, a user's data), so no result names this machine's folders."""
    resolved = Path(path).resolve()
    try:
        return str(resolved.relative_to(REPO_ROOT))
    except ValueError:
        return f".../{resolved.name}"


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo, else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def usable_cores() -> int:
    """Cores this process may run on (the affinity mask), not the machine's total."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def device_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "cpu_cores_usable": usable_cores(),
        "torch_threads": torch.get_num_threads(),
        "gpu": None,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_count"] = torch.cuda.device_count()
        info["cuda"] = torch.version.cuda
    return info


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages: other work on the machine skews every timing."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {"python": platform.python_version()}
    for name in VERSIONED_PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def device_tag() -> str:
    """File-name-safe name of where the benchmark ran: the GPU's name, else "cpu" (the result describes the CPU;
    a host name is not a device)."""
    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


def default_out(name: str) -> Path:
    return Path("benchmarks") / f"bench-{name}-{device_tag()}.json"


def new_result(name: str, options: dict[str, Any], load_before: list[float] | None) -> dict[str, Any]:
    """The common head of a result: benchmark name, time, options, device (with the load before
    and after the measurement), versions."""
    return {
        "benchmark": name,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "options": options,
        "device": {**device_info(), "load_average": {"before": load_before, "after": load_average()}},
        "versions": versions(),
    }


def write_result(result: dict[str, Any], out: str | Path) -> Path:
    """Write ``result`` as indented JSON (atomically: a half-written file never replaces a good one)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2, allow_nan=True) + "\n")
    tmp.replace(out)
    return out


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain fixed-width table: text left-aligned, numbers right-aligned, floats to 4 significant digits."""
    def cell(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    def align(v: Any, text: str, width: int) -> str:
        return text.ljust(width) if isinstance(v, str) else text.rjust(width)

    cells = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip(), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(align(v, c, w) for v, c, w in zip(row, cells_row, widths)).rstrip()
              for row, cells_row in zip(rows, cells)]
    return "\n".join(lines)


