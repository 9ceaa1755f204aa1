"""``pretrain bench data``: samples/s per core of the 2D and 3D training loaders.

Each loader is the trainer's: a ``ShardStream`` with the transform and collate
of the objective that ``build_objective`` makes from the config, behind
``make_loader``. With one DataLoader worker one core decodes, transforms and
collates, so its samples/s is the loader's cost per core; PyTorch runs every
worker with one intra-op thread. Timing starts after a few warm-up batches
(worker start and the shuffle buffer filling) and counts the samples that
arrive within a fixed time budget, several times in a row.
"""
from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import torch

from pretrain.config import RunConfig, load_config
from pretrain.config.schema import SourceConfig
from pretrain.data.codec import decode_sample
from pretrain.data.stream import ShardStream, expand_shards, make_loader, read_tar_samples
from pretrain.engine.trainer import build_train_stream
from pretrain.objectives import build_objective
from pretrain.tools.bench.common import BenchInputError, format_table, median, recorded_path
from pretrain.tools.demo.data import SPLITS, make_demo_data

# What each loader measures on top of the config: the demo split it reads by default
# and the model fields that shape its transform (crop size, patch grid of the MAE mask).
LOADERS: dict[int, tuple[str, list[str]]] = {
    2: ("pretrain_2d", []),
    3: ("pretrain_3d", ["model.spatial_dims=3", "model.img_size=32", "model.patch_size=8"]),
}


def demo_shards(scratch: Path, split: str, samples: int, progress: bool = False) -> Path:
    """Generate ``samples`` samples of a demo split under ``scratch``; returns the shard folder."""
    make_demo_data(scratch, scale=samples / SPLITS[split][2], splits=[split], progress=progress)
    return scratch / split


def training_stream(cfg: RunConfig, objective: Any, num_workers: int) -> ShardStream:
    """The stream the trainer builds for rank 0 of 1 at step 0, with ``num_workers`` workers."""
    return build_train_stream(replace(cfg, data=replace(cfg.data, num_workers=num_workers)), objective.data_recipe(), 0, 1, 0)


def first_sample(urls: list[str], objective: Any, where: str) -> dict[str, Any]:
    """Shape and dtype of the first stored sample, after checking the objective's transform takes it.

    The stream skips samples its transform rejects, so a shard set of the wrong
    dimensionality would otherwise spin forever instead of failing.
    """
    def damaged(url: str, reason: str) -> None:
        raise BenchInputError(f"{where}: shard {url} is unreadable: {reason}")

    raw = next(iter(read_tar_samples(urls[0], damaged)), None)
    if raw is None:
        raise BenchInputError(f"{where}: shard {urls[0]} holds no sample")
    try:
        sample = decode_sample(raw)
        objective.data_recipe().transform({**sample, "__seed__": 0, "__epoch__": 0, "__source__": "bench"})
    except ValueError as e:
        raise BenchInputError(f"{where}: the loader cannot use sample {raw.get('__key__')!r}: {e}") from None
    return {"key": sample["__key__"], "shape": list(sample["image"].shape), "dtype": str(sample["image"].dtype)}


def measure_loader(stream: ShardStream, num_workers: int, *, seconds: float, repeats: int,
                   warmup_batches: int) -> dict[str, Any]:
    """Samples/s of one loader: ``repeats`` consecutive windows of ``seconds`` after a warm-up."""
    batches = iter(make_loader(stream, num_workers))
    start = time.perf_counter()
    for _ in range(warmup_batches):
        batch = next(batches)
    warmup_s = time.perf_counter() - start
    shapes = {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in batch.items() if isinstance(v, torch.Tensor)}
    rates, windows = [], []
    for _ in range(repeats):
        samples, start = 0, time.perf_counter()
        while True:
            next(batches)
            samples += stream.batch_size
            elapsed = time.perf_counter() - start
            if elapsed >= seconds:
                break
        rates.append(samples / elapsed)
        windows.append({"samples": samples, "seconds": elapsed})
    del batches  # stops the workers before the next loader starts its own
    rate = median(rates)
    return {"num_workers": num_workers, "warmup_s": warmup_s, "batch": shapes, "windows": windows,
            "samples_per_s": rates, "samples_per_s_median": rate, "samples_per_s_per_worker": rate / num_workers}


def bench_loader(dims: int, cfg: RunConfig, shards: Path, generated: bool, workers: Sequence[int], *,
                 seconds: float, repeats: int, warmup_batches: int) -> dict[str, Any]:
    """Every worker count of one loader (2D or 3D) on one shard set."""
    cfg.data.train = [SourceConfig(shards=str(shards))]
    torch.manual_seed(cfg.train.seed)
    objective = build_objective(cfg)
    urls = expand_shards(str(shards))
    m = cfg.model
    entry: dict[str, Any] = {
        "dims": dims, "shards": recorded_path(shards), "generated_demo_shards": generated, "num_shards": len(urls),
        "stored_sample": first_sample(urls, objective, f"{dims}D shard set {shards}"),
        "objective": cfg.objective.name, "batch_size": cfg.data.batch_size, "shuffle_buffer": cfg.data.shuffle_buffer,
        "model": {"spatial_dims": m.spatial_dims, "img_size": m.img_size, "patch_size": m.patch_size,
                  "in_chans": m.in_chans},
        "runs": [],
    }
    for n in workers:
        stream = training_stream(cfg, objective, n)
        entry["runs"].append(measure_loader(stream, n, seconds=seconds, repeats=repeats, warmup_batches=warmup_batches))
    return entry


def run_data_bench(*, config: str | Path, overrides: Sequence[str] = (), shards_2d: str | None = None,
                   shards_3d: str | None = None, dims: Sequence[int] = (2, 3), workers: Sequence[int] = (1, 2),
                   seconds: float = 10.0, repeats: int = 3, warmup_batches: int = 3, batch_size: int | None = None,
                   demo_samples: int = 1000, scratch: Path, progress: bool = False) -> dict[str, Any]:
    """Measure the loaders of ``dims``; returns the config, raw runs and summary of the result.

    Shard sets not given are generated as demo shards under ``scratch``.
    """
    given = {2: shards_2d, 3: shards_3d}
    loaders, summary = [], {}
    for d in sorted(set(dims)):
        split, shape_overrides = LOADERS[d]
        extra = [f"data.batch_size={batch_size}"] if batch_size else []
        cfg = load_config(config, [*shape_overrides, *overrides, *extra])
        if cfg.model.spatial_dims != d:
            raise BenchInputError(f"the {d}D loader needs model.spatial_dims={d}; the overrides set {cfg.model.spatial_dims}")
        if given[d]:
            shards, generated = Path(given[d]), False
            if not shards.exists():
                raise FileNotFoundError(f"--shards-{d}d: {shards} does not exist")
        else:
            shards, generated = demo_shards(scratch, split, demo_samples, progress), True
        entry = bench_loader(d, cfg, shards, generated, sorted(set(workers)), seconds=seconds, repeats=repeats,
                             warmup_batches=warmup_batches)
        loaders.append(entry)
        runs = entry["runs"]
        summary[f"{d}d"] = {
            "samples_per_s_per_core": runs[0]["samples_per_s_per_worker"],
            **{f"workers_{r['num_workers']}": {"samples_per_s": r["samples_per_s_median"],
                                               "samples_per_s_per_worker": r["samples_per_s_per_worker"]}
               for r in runs},
        }
    return {
        "config": {"config_file": recorded_path(config), "overrides": list(overrides), "seconds": seconds, "repeats": repeats,
                   "warmup_batches": warmup_batches, "workers": sorted(set(workers)), "demo_samples": demo_samples},
        "loaders": loaders,
        "summary": summary,
    }


def print_data_summary(result: dict[str, Any]) -> None:
    rows = []
    for entry in result["loaders"]:
        stored = entry["stored_sample"]
        crop = entry["runs"][0]["batch"]["image"]["shape"][1:]
        for run in entry["runs"]:
            rates = run["samples_per_s"]
            rows.append([f"{entry['dims']}D", f"{'x'.join(map(str, stored['shape']))} {stored['dtype']}",
                         "x".join(map(str, crop)), entry["batch_size"], run["num_workers"], run["samples_per_s_median"],
                         run["samples_per_s_per_worker"], f"{min(rates):.4g}-{max(rates):.4g}"])
    print(format_table(["loader", "stored", "crop", "batch", "workers", "samples/s", "per worker", "range"], rows))
