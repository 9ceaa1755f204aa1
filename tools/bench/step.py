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
bare step time. Process CPU time is recorded beside wall time: on a shared,
loaded machine it is the steadier of the two (it does not count the time the
process waits for a core). ``--profile N`` adds a cProfile of N steps per side.
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
from pretrain.tools.bench.common import BenchInputError, format_table, median, recorded_path
from pretrain.tools.bench.data import demo_shards

PROFILE_TOP = 25  # functions kept per list in the profile
ENGINE_PATHS = ("/deepspeed/", "/pretrain/engine/")  # where the trainer's own calls live


class BareLoop:
    """The reference: the objective and AdamW driven by hand, nothing else."""

    def __init__(self, cfg: RunConfig, device: torch.device, batch: dict[str, Any]) -> None:
        seed_all(cfg.train.seed)  # the trainer seeds the same way before building its objective
        self.model = build_objective(cfg).to(device)
        self.optimizer = build_optimizer(self.model.param_groups(), cfg.optim)
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


def differing_weights(a: torch.nn.Module, b: torch.nn.Module) -> list[str]:
    """Names of the state entries where ``a`` and ``b`` differ (missing on one side counts)."""
    sa, sb = a.state_dict(), b.state_dict()
    return sorted(name for name in sa.keys() | sb.keys()
                  if name not in sa or name not in sb or not torch.equal(sa[name].cpu(), sb[name].cpu()))


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


def time_steps(step: Callable[[], None], steps: int, device: torch.device, threads: int) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) per step over ``steps`` consecutive steps.

    CPU time counts every thread of this process and not the time it waits for a
    core, so on a shared, loaded machine it shows the work done more steadily.
    """
    torch.set_num_threads(threads)  # nothing may have changed it between the sides, but make sure
    _sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step()
    _sync(device)
    return (time.perf_counter() - wall) / steps, (time.process_time() - cpu) / steps


def profile_steps(step: Callable[[], None], steps: int, device: torch.device) -> dict[str, list[dict[str, Any]]]:
    """Where ``steps`` steps spend their time, per step, from cProfile.

    ``top``: the functions with the most cumulative time; ``engine``: the same for
    the calls inside DeepSpeed and ``pretrain/engine``, i.e. what the trainer adds.
    """
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(steps):
        step()
    _sync(device)
    profiler.disable()
    rows = []
    stats = pstats.Stats(profiler).stats  # type: ignore[attr-defined]  # {(file, line, name): (cc, nc, tt, ct, callers)}
    for (file, line, name), (_, calls, tottime, cumtime, _) in stats.items():
        rows.append({"function": f"{name} ({Path(file).name}:{line})", "path": file, "calls_per_step": calls / steps,
                     "self_ms_per_step": 1e3 * tottime / steps, "cumulative_ms_per_step": 1e3 * cumtime / steps})
    rows.sort(key=lambda r: r["cumulative_ms_per_step"], reverse=True)
    engine = [r for r in rows if any(part in r["path"] for part in ENGINE_PATHS)]
    return {"top": rows[:PROFILE_TOP], "engine": engine[:PROFILE_TOP]}


def step_config(config: str | Path, overrides: Sequence[str], batch_size: int | None, threads: int | None,
                scratch: Path) -> RunConfig:
    """The config both sides train: the user's, pinned to ZeRO-0 fp32 and a scratch run directory."""
    cfg = load_config(config, list(overrides))
    cfg.train.zero_stage, cfg.train.precision, cfg.train.grad_accum = 0, "fp32", 1
    cfg.train.run_dir = str(scratch / "run")
    cfg.eval.knn_train = cfg.eval.knn_val = None  # only steps are timed: the config's eval sets need not exist
    cfg.train.threads = threads or cfg.train.threads or torch.get_num_threads()
    if batch_size:
        cfg.data.batch_size = batch_size
    return cfg


def bench_shards(cfg: RunConfig, shards: str | None, scratch: Path) -> Path:
    """The shard set the fixed batch comes from: ``shards``, else a few demo samples of the model's dimensionality."""
    if shards:
        if not Path(shards).exists():
            raise FileNotFoundError(f"--shards: {shards} does not exist")
        return Path(shards)
    split = {2: "pretrain_2d", 3: "pretrain_3d"}.get(cfg.model.spatial_dims)
    if split is None:
        raise BenchInputError(f"no demo shards for model.spatial_dims={cfg.model.spatial_dims}: pass --shards")
    return demo_shards(scratch / "data", split, max(cfg.data.batch_size, 16))


def alternate(sides: dict[str, Callable[[], None]], *, rounds: int, steps: int, warmup: int, device: torch.device,
              threads: int) -> list[dict[str, Any]]:
    """Warm both sides up, then time ``steps`` steps of each per round, swapping who goes first."""
    for step in sides.values():
        time_steps(step, warmup, device, threads)
    per_round = []
    for r in range(rounds):
        order = ["bare", "trainer"] if r % 2 == 0 else ["trainer", "bare"]
        timed = {name: time_steps(sides[name], steps, device, threads) for name in order}
        (bare_wall, bare_cpu), (trainer_wall, trainer_cpu) = timed["bare"], timed["trainer"]
        per_round.append({"order": order, "bare_s_per_step": bare_wall, "trainer_s_per_step": trainer_wall,
                          "ratio": trainer_wall / bare_wall, "bare_cpu_s_per_step": bare_cpu,
                          "trainer_cpu_s_per_step": trainer_cpu})
    return per_round


def summarize(per_round: list[dict[str, Any]], batch_size: int) -> tuple[dict[str, list[float]], dict[str, float]]:
    """(raw per-round lists, summary numbers) of the alternating rounds."""
    keys = ("bare_s_per_step", "trainer_s_per_step", "bare_cpu_s_per_step", "trainer_cpu_s_per_step")
    raw = {key: [r[key] for r in per_round] for key in keys}
    bare, train = median(raw["bare_s_per_step"]), median(raw["trainer_s_per_step"])
    bare_cpu, train_cpu = median(raw["bare_cpu_s_per_step"]), median(raw["trainer_cpu_s_per_step"])
    ratios = [r["ratio"] for r in per_round]
    return raw, {
        "bare_step_s": bare, "trainer_step_s": train, "overhead_ratio": train / bare,
        "overhead_pct": 100 * (train / bare - 1), "round_ratio_median": median(ratios),
        "round_ratio_min": min(ratios), "round_ratio_max": max(ratios),
        "bare_cpu_step_s": bare_cpu, "trainer_cpu_step_s": train_cpu, "overhead_ratio_cpu": train_cpu / bare_cpu,
        "bare_samples_per_s": batch_size / bare, "trainer_samples_per_s": batch_size / train,
    }


def run_step_bench(*, config: str | Path, overrides: Sequence[str] = (), batch_size: int | None = None,
                   rounds: int = 10, steps: int = 5, warmup: int = 3, threads: int | None = None,
                   shards: str | None = None, profile_steps_per_side: int = 0, scratch: Path) -> dict[str, Any]:
    """Time both sides alternately; returns the config, per-round numbers, summary (and profile)."""
    cfg = step_config(config, overrides, batch_size, threads, scratch)
    source = bench_shards(cfg, shards, scratch)
    cfg.data.train = [SourceConfig(shards=str(source))]
    dist_info = setup_distributed()
    try:
        trainer = Trainer(cfg, dist_info)
        batch = fixed_batch(trainer)
        bare_loop = BareLoop(cfg, dist_info.device, batch)
        differing = differing_weights(bare_loop.model, trainer.objective)
        if differing:  # the comparison would be between two different models
            raise RuntimeError(f"the bare loop and the trainer start from different weights: {differing[:5]}")
        sides = {"bare": bare_loop.step, "trainer": TrainerLoop(trainer, batch).step}
        per_round = alternate(sides, rounds=rounds, steps=steps, warmup=warmup, device=dist_info.device,
                              threads=cfg.train.threads)
        profile = ({name: profile_steps(step, profile_steps_per_side, dist_info.device) for name, step in sides.items()}
                   if profile_steps_per_side > 0 else None)
        params = sum(p.numel() for p in trainer.objective.parameters())
    finally:
        teardown_distributed()

    raw, summary = summarize(per_round, cfg.data.batch_size)
    m = cfg.model
    result: dict[str, Any] = {
        "config": {
            "config_file": recorded_path(config), "overrides": list(overrides), "objective": cfg.objective.name,
            "model": {"preset": m.preset, "spatial_dims": m.spatial_dims, "img_size": m.img_size,
                      "patch_size": m.patch_size, "embed_dim": m.embed_dim, "depth": m.depth, "num_heads": m.num_heads},
            "parameters": params, "batch_size": cfg.data.batch_size,
            "batch": {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in batch.items()
                      if isinstance(v, torch.Tensor)},
            "shards": recorded_path(source), "zero_stage": 0, "precision": "fp32", "grad_clip": cfg.optim.grad_clip,
            "device": str(dist_info.device), "torch_threads": cfg.train.threads, "rounds": rounds,
            "steps_per_round": steps, "warmup_steps": warmup, "same_initial_weights": True,
        },
        "rounds": per_round,
        "raw": raw,
        "summary": summary,
        "overhead_ratio": summary["overhead_ratio"],  # the headline number, also at the top level
    }
    if profile is not None:
        result["profile"] = {"steps_per_side": profile_steps_per_side, **profile}
    return result


def print_step_summary(result: dict[str, Any]) -> None:
    rows = [[i, r["order"][0], 1e3 * r["bare_s_per_step"], 1e3 * r["trainer_s_per_step"], r["ratio"],
             1e3 * r["bare_cpu_s_per_step"], 1e3 * r["trainer_cpu_s_per_step"]] for i, r in enumerate(result["rounds"])]
    s = result["summary"]
    rows.append(["median", "", 1e3 * s["bare_step_s"], 1e3 * s["trainer_step_s"], s["overhead_ratio"],
                 1e3 * s["bare_cpu_step_s"], 1e3 * s["trainer_cpu_step_s"]])
    headers = ["round", "first", "bare ms", "trainer ms", "trainer/bare", "bare cpu ms", "trainer cpu ms"]
    print(format_table(headers, rows))
    print(f"overhead: {s['overhead_pct']:+.2f}% wall (overhead_ratio {s['overhead_ratio']:.4f}), "
          f"{100 * (s['overhead_ratio_cpu'] - 1):+.2f}% CPU time; per-round ratios "
          f"{s['round_ratio_min']:.3f}-{s['round_ratio_max']:.3f}, median {s['round_ratio_median']:.3f}")
    if "profile" in result:
        rows = [[r["function"], r["calls_per_step"], r["cumulative_ms_per_step"], r["self_ms_per_step"]]
                for r in result["profile"]["trainer"]["engine"][:12]]
        print("\nwhere the trainer's own calls spend time (cProfile, per step):")
        print(format_table(["function", "calls", "cum ms", "self ms"], rows))
