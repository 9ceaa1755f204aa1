"""Train, then export: the one end-of-run path of every entry point (``pretrain train``,
``launch local`` ranks, ``launch slurm`` tasks), so ``train.export_on_end`` means the same everywhere."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pretrain.engine.preemption import StopRequest
from pretrain.engine.trainer import train, write_summary


def train_and_export(cfg, stop: StopRequest | None = None, export: bool = True) -> dict[str, Any]:
    """Run (or resume) ``cfg``; on rank 0 of a finished run, export the encoder when the config asks."""
    summary = train(cfg, stop)
    finished = summary.get("interrupted") is None
    if finished and export and cfg.train.export_on_end and int(os.environ.get("RANK", "0")) == 0:
        from pretrain.tools.export.encoder import ExportError, export_encoder

        run_dir = Path(cfg.train.run_dir)
        try:
            summary["export"] = str(export_encoder(run_dir, run_dir / "export").resolve())
        except ExportError as err:  # the training itself is done and kept: say so beside why nothing was exported
            raise ExportError(f"trained {summary['steps']} steps in {run_dir}, but not exported: {err}") from err
        write_summary(run_dir, summary)
    return summary
