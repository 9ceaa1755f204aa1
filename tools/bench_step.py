"""``pretrain bench step``: the trainer's step time against a bare PyTorch loop.

Both sides train the same objective (same config, same seed, so the same
initial weights) on the same collated batch, built once from the trainer's own
stream, so data loading is excluded from both:

- bare: ``forward -> loss.backward() -> clip_grad_norm_ -> AdamW.step() -> zero_grad``
  with the trainer's parameter groups;
- trainer: ``Trainer.set_schedules() -> Trainer.train_step() -> objective.after_step()``
  through the DeepSpeed engine (ZeRO-0, fp32, one process).

The sides run alternately in one process with the same torch thread count:
after a warm-up, each round times ``steps`` steps of one side and then of the
other, swapping the order every round, so drift in the machine's load hits
both alike. ``overhead_ratio`` is the median trainer step time over the median
bare step time.
"""
from __future__ import annotations

import cProfile
import pstats
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from pretrain.config import RunConfig, load_config
from pretrain.config.schema import SourceConfig
from pretrain.data.stream import make_loader
from pretrain.engine.distributed import setup_distributed, teardown_distributed
from pretrain.engine.ds_setup import build_optimizer, move_batch
from pretrain.engine.trainer import Trainer, seed_all
from pretrain.objectives import build_objective
from tools.bench import BenchInputError, format_table, median
from tools.bench_data import demo_shards

PROFILE_TOP = 25  # functions kept per side in the profile


class BareLoop:
    """The reference: the objective and AdamW driven by hand, nothing else."""

    def __init__(self, cfg: RunConfig, device: torch.device, batch: dict[str, Any]) -> None:
        seed_all(cfg.train.seed)  # the trainer seeds the same way before building its objective
        self.model = build_objective(cfg).to(device)
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.grad_clip = cfg.optim.grad_clip
        self.batch = batch

    def step(self) -> None:
        out = self.model(self.batch)
        out["loss"].backward()
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


class TrainerLoop:
    """One optimizer step of a real ``Trainer``, as ``Trainer.fit`` takes it, on a fixed batch."""

    def __init__(self, trainer: Trainer, batch: dict[str, Any]) -> None:
        self.trainer = trainer
        self.batches = _repeat(batch)

    def step(self) -> None:
        t = self.trainer
        t.set_schedules()
        t.train_step(self.batches)
        t.objective.after_step(t.step)
        t.step += 1


def _repeat(batch: dict[str, Any]) -> Iterator[dict[str, Any]]:
    while True:
        yield dict(batch)  # a fresh dict: train_step pops "_stream" from what it gets


def fixed_batch(trainer: Trainer) -> dict[str, Any]:
    """One collated batch from the trainer's stream (through its loader), on the trainer's device."""
    batches = iter(make_loader(trainer.stream, trainer.cfg.data.num_workers))
    batch = next(batches)
    del batches  # stops the loader's workers
    batch.pop("_stream", None)
    return move_batch(batch, trainer.dist.device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step: Callable[[], None], steps: int, device: torch.device, threads: int) -> float:
    """Seconds per step over ``steps`` consecutive steps."""
    torch.set_num_threads(threads)  # nothing may have changed it between the sides, but make sure
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return (time.perf_counter() - start) / steps


def profile_steps(step: Callable[[], None], steps: int, device: torch.device) -> list[dict[str, Any]]:
    """The ``PROFILE_TOP`` functions with the most cumulative time over ``steps`` steps, per step."""
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(steps):
        step()
    _sync(device)
    profiler.disable()
    stats = pstats.Stats(profiler)
    rows = []
    for (file, line, name), (_, calls, tottime, cumtime, _) in stats.stats.items():  # type: ignore[attr-defined]
        rows.append({"function": f"{name} ({Path(file).name}:{line})", "path": file, "calls_per_step": calls / steps,
                     "self_ms_per_step": 1e3 * tottime / steps, "cumulative_ms_per_step": 1e3 * cumtime / steps})
    rows.sort(key=lambda r: r["cumulative_ms_per_step"], reverse=True)
    return rows[:PROFILE_TOP]


def step_config(config: str | Path, overrides: Sequence[str], batch_size: int | None, threads: int | None,
                scratch: Path) -> RunConfig:
    """The config both sides train: the user's, pinned to ZeRO-0 fp32 and a scratch run directory."""
    cfg = load_config(config, list(overrides))
    cfg.train.zero_stage, cfg.train.precision, cfg.train.grad_accum = 0, "fp32", 1
    cfg.train.run_dir = str(scratch / "run")
    cfg.train.threads = threads or cfg.train.threads or torch.get_num_threads()
    if batch_size:
        cfg.data.batch_size = batch_size
    return cfg


def run_step_bench(*, config: str | Path, overrides: Sequence[str] = (), batch_size: int | None = None,
                   rounds: int = 7, steps: int = 10, warmup: int = 3, threads: int | None = None,
                   shards: str | None = None, profile_steps_per_side: int = 0, scratch: Path) -> dict[str, Any]:
    """Time both sides alternately; returns the config, per-round numbers, summary (and profile)."""
    cfg = step_config(config, overrides, batch_size, threads, scratch)
    if shards:
        if not Path(shards).exists():
            raise FileNotFoundError(f"--shards: {shards} does not exist")
        source = Path(shards)
    else:
        split = {2: "pretrain_2d", 3: "pretrain_3d"}.get(cfg.model.spatial_dims)
        if split is None:
            raise BenchInputError(f"no demo shards for model.spatial_dims={cfg.model.spatial_dims}: pass --shards")
        source = demo_shards(scratch / "data", split, max(cfg.data.batch_size, 16))
    cfg.data.train = [SourceConfig(shards=str(source))]

    dist_info = setup_distributed()
    try:
        trainer = Trainer(cfg, dist_info)
        batch = fixed_batch(trainer)
        sides = {"bare": BareLoop(cfg, dist_info.device, batch).step, "trainer": TrainerLoop(trainer, batch).step}
        n_threads = cfg.train.threads
        for step in sides.values():
            time_steps(step, warmup, dist_info.device, n_threads)
        per_round = []
        for r in range(rounds):
            order = ["bare", "trainer"] if r % 2 == 0 else ["trainer", "bare"]
            timed = {name: time_steps(sides[name], steps, dist_info.device, n_threads) for name in order}
            per_round.append({"order": order, "bare_s_per_step": timed["bare"], "trainer_s_per_step": timed["trainer"],
                              "ratio": timed["trainer"] / timed["bare"]})
        profile = ({name: profile_steps(step, profile_steps_per_side, dist_info.device) for name, step in sides.items()}
                   if profile_steps_per_side > 0 else None)
        params = sum(p.numel() for p in trainer.objective.parameters())
    finally:
        teardown_distributed()

    bare = [r["bare_s_per_step"] for r in per_round]
    train = [r["trainer_s_per_step"] for r in per_round]
    ratio = median(train) / median(bare)
    m = cfg.model
    result: dict[str, Any] = {
        "config": {
            "config_file": str(config), "overrides": list(overrides), "objective": cfg.objective.name,
            "model": {"preset": m.preset, "spatial_dims": m.spatial_dims, "img_size": m.img_size,
                      "patch_size": m.patch_size, "embed_dim": m.embed_dim, "depth": m.depth,
                      "num_heads": m.num_heads},
            "parameters": params, "batch_size": cfg.data.batch_size,
            "batch": {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in batch.items()
                      if isinstance(v, torch.Tensor)},
            "shards": str(source), "zero_stage": 0, "precision": "fp32", "grad_clip": cfg.optim.grad_clip,
            "device": str(dist_info.device), "torch_threads": n_threads, "rounds": rounds,
            "steps_per_round": steps, "warmup_steps": warmup,
        },
        "rounds": per_round,
        "raw": {"bare_s_per_step": bare, "trainer_s_per_step": train},
        "summary": {
            "bare_step_s": median(bare), "trainer_step_s": median(train), "overhead_ratio": ratio,
            "overhead_pct": 100 * (ratio - 1), "round_ratio_median": median([r["ratio"] for r in per_round]),
            "round_ratio_min": min(r["ratio"] for r in per_round), "round_ratio_max": max(r["ratio"] for r in per_round),
            "bare_samples_per_s": cfg.data.batch_size / median(bare),
            "trainer_samples_per_s": cfg.data.batch_size / median(train),
        },
        "overhead_ratio": ratio,  # the headline number, also at the top level
    }
    if profile is not None:
        result["profile"] = {"steps_per_side": profile_steps_per_side, **profile}
    return result


def print_step_summary(result: dict[str, Any]) -> None:
    rows = [[i, r["order"][0], 1e3 * r["bare_s_per_step"], 1e3 * r["trainer_s_per_step"], r["ratio"]]
            for i, r in enumerate(result["rounds"])]
    s = result["summary"]
    rows.append(["median", "", 1e3 * s["bare_step_s"], 1e3 * s["trainer_step_s"], s["overhead_ratio"]])
    print(format_table(["round", "first", "bare ms/step", "trainer ms/step", "trainer/bare"], rows))
    print(f"overhead: {s['overhead_pct']:+.2f}%  (overhead_ratio {s['overhead_ratio']:.4f})")
