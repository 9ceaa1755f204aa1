"""The training loop: any objective, DeepSpeed ZeRO 0-3, exact resume.

The trainer knows the objective contract only (``pretrain.objectives.base``:
data recipe, train_step/forward, parameter groups, schedules, after_step,
eval bundle, FLOPs); never a single method.
"""
from __future__ import annotations

import dataclasses
import gc
import json
import logging
import random
import sys
import time
from collections import defaultdict
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from pretrain import kernels
from pretrain.config import ConfigError, RunConfig, dump_config
from pretrain.data.stream import ShardStream, StreamSource, expand_shards, make_loader
from pretrain.data.transforms import eval_view
from pretrain.engine import checkpoint as ckpt
from pretrain.engine import run_lock
from pretrain.engine.compute import compute_record
from pretrain.engine.data_health import DataHealth
from pretrain.engine.preflight import check_batch_memory, check_shard_sets, upsampling_warnings
from pretrain.engine.distributed import DistInfo, setup_distributed, teardown_distributed
from pretrain.engine.ds_setup import PRECISION_DTYPES, build_optimizer, deepspeed_config, move_batch
from pretrain.engine.monitor import Monitor, StepTimer, memory_stats, peak_flops
from pretrain.engine.nonfinite import NonFiniteGuard, TrainingDiverged, weights_finite
from pretrain.engine.preemption import StopRequest
from pretrain.engine.threads import plan_threads
from pretrain.eval.collapse import embedding_scalars
from pretrain.eval.frozen import FrozenEvalData, evaluate_baselines, evaluate_encoder, gains
from pretrain.objectives import build_objective
from pretrain.objectives.base import BuildContext
from pretrain.optim.param_groups import apply_scales
from pretrain.optim.schedules import optimizer_schedules

log = logging.getLogger(__name__)


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _parameter_count(model: torch.nn.Module) -> int:
    # ZeRO-3 leaves each local parameter empty (numel 0); its full size is in ds_numel.
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())


def _kernel_choice() -> str:
    d = kernels.describe()
    return ", ".join(f"{op}={info['resolved']}" for op, info in d.items())


def _eval_view(sample: dict, *, size, channels: int, intensity: str) -> torch.Tensor:
    return eval_view(sample["image"], size, channels, intensity, key=sample["__key__"])


def build_train_stream(cfg: RunConfig, recipe, rank: int, world_size: int, start_batch: int) -> ShardStream:
    """The training stream of one rank, positioned ``start_batch`` micro-batches in.

    ``recipe`` is the objective's ``data_recipe()``: what the DataLoader workers receive.
    """
    if not cfg.data.train:
        raise ConfigError("config key 'data.train' is empty: give at least one shard set")
    sources = [StreamSource(expand_shards(s.shards), s.weight, s.name or f"source{i}") for i, s in enumerate(cfg.data.train)]
    return ShardStream(
        sources, batch_size=cfg.data.batch_size, transform=recipe.transform, collate=recipe.collate,
        seed=cfg.train.seed, rank=rank, world_size=world_size, shuffle_buffer=cfg.data.shuffle_buffer,
        resample=cfg.data.resample, start_batch=start_batch, num_workers=cfg.data.num_workers,
    )


class Trainer:
    """One training run in one process (one rank)."""

    def __init__(self, cfg: RunConfig, dist_info: DistInfo) -> None:
        import deepspeed

        self.cfg = cfg
        self.dist = dist_info
        self.run_dir = Path(cfg.train.run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        check_shard_sets(cfg)
        check_batch_memory(cfg)
        self.thread_plan = plan_threads(cfg.train.threads, cfg.data.num_workers)
        torch.set_num_threads(self.thread_plan.threads)
        if cfg.train.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
            # Deterministic mode NaN-fills every torch.empty; ZeRO-1/2 allocate their gradient buckets
            # (reduce_bucket_size, 5e8 elements) with torch.empty each step, which then costs seconds.
            # DeepSpeed writes those buffers before reading them, so the fill buys no determinism.
            torch.utils.deterministic.fill_uninitialized_memory = False
        kernels.configure(attention=cfg.kernels.attention, patch_embed=cfg.kernels.patch_embed)

        seed_all(cfg.train.seed)  # identical initial weights on every rank
        if getattr(cfg.objective, "init_from", "") and ckpt.latest_tag(self.ckpt_dir) is not None:
            # Resuming: the checkpoint holds every weight, the starting weights need not exist any more.
            cfg = dataclasses.replace(cfg, objective=dataclasses.replace(cfg.objective, init_from=""))
        objective = build_objective(cfg, BuildContext.from_dist(dist_info))  # checks init_from, text_model, ...
        if dist_info.is_main:  # only once the config's paths and the objective checked out
            self.run_dir.mkdir(parents=True, exist_ok=True)
            run_lock.acquire(self.run_dir)  # before anything of this run is written: one trainer per directory
            (self.run_dir / "config.yaml").write_text(dump_config(self.cfg))
        optimizer = build_optimizer(objective.param_groups(), cfg.optim)
        self.schedules = {**optimizer_schedules(cfg.optim), **objective.schedules()}
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=objective, optimizer=optimizer, config=deepspeed_config(cfg)
        )
        self.objective = self.engine.module
        if dist_info.world_size == 1 and cfg.train.zero_stage == 0:
            # Averaging gradients over a single rank changes nothing; skip the flatten + all-reduce + copy.
            self.engine.enable_backward_allreduce = False
        seed_all(cfg.train.seed + 1 + dist_info.rank)  # per-rank stream for dropout / drop-path

        self.step = 0
        self._plain_grad_norm: float | None = None
        self.history: dict[str, Any] = {"wall_seconds": 0.0}
        tag = ckpt.resume_tag(self.ckpt_dir)  # verified; the newest intact one on every rank
        if tag is not None:
            client, rank_state = ckpt.load_checkpoint(self.engine, self.ckpt_dir, tag)
            self.objective.load_rank_state(rank_state.get("objective", {}))
            self.step = int(client["step"])
            self.history = client["history"]
            # Another worker count, seed or batch size would silently resume on other samples.
            self._check_data_position(client["data"], self.ckpt_dir / tag)
        self.resumed = tag is not None
        self.data_health = DataHealth(cfg.data.max_bad_fraction)
        t = cfg.train
        self.guard = NonFiniteGuard(
            t.nonfinite_in_a_row, t.max_rollbacks, t.rollback_lr_scale, t.max_skipped_fraction,
            hint=f"lower optim.lr (now {cfg.optim.lr:g}) or optim.grad_clip (now {cfg.optim.grad_clip:g}), "
                 "or look for extreme values in the data (data/bad_samples counts what was rejected)")
        self.stream = self._build_stream()

    # --- data ---------------------------------------------------------------------------
    def _batches_consumed(self) -> int:
        """Micro-batches this rank's stream has delivered: the steps' plus those a rollback went past."""
        return self.step * self.cfg.train.grad_accum + int(self.history.get("batches_skipped", 0))

    def _build_stream(self) -> ShardStream:
        return build_train_stream(self.cfg, self.objective.data_recipe(), self.dist.rank, self.dist.world_size,
                                  self._batches_consumed())

    def _check_data_position(self, position: dict[str, Any], where: Path) -> None:
        """Refuse a resume that could not replay the same data (other workers, world size, seed, batch)."""
        d = self.cfg.data
        try:
            start = ShardStream.start_batch_from(
                position, num_workers=d.num_workers, world_size=self.dist.world_size,
                seed=self.cfg.train.seed, batch_size=d.batch_size,
            )
        except ValueError as e:  # a setting the checkpoint disagrees with: the user's to change back
            raise ConfigError(f"{where}: {e}") from None
        if start != self._batches_consumed():
            raise ConfigError(f"{where}: data position {start} batches does not match step {self.step} "
                             f"x grad_accum {self.cfg.train.grad_accum} (+ {self.history.get('batches_skipped', 0)} "
                             "passed by rollbacks); was train.grad_accum changed?")

    def _data_position(self) -> dict[str, Any]:
        return self.stream.position(self._batches_consumed())

    # --- evaluation ---------------------------------------------------------------------
    def _eval_data(self) -> FrozenEvalData | None:
        ev, model = self.cfg.eval, self.cfg.model
        if not (ev.knn_train and ev.knn_val):
            return None
        view = partial(_eval_view, size=model.img_size_tuple(), channels=model.in_chans, intensity=self.cfg.data.intensity)
        return FrozenEvalData(ev.knn_train, ev.knn_val, view, k=ev.k, temperature=ev.temperature,
                              batch_size=ev.batch_size, device=self.dist.device,
                              dtype=PRECISION_DTYPES[self.cfg.train.precision])

    def evaluate(self) -> dict[str, dict[str, Any]] | None:
        """kNN (class token, mean patch tokens, the method's pooling) and a linear probe of each encoder of
        the objective's eval bundle, the first being the run's headline."""
        data = self._eval_data()
        if data is None:
            return None
        bundle = self.objective.eval_bundle()
        pool = self.cfg.eval.pool or bundle.pool
        results = {name: evaluate_encoder(enc, data, pool) for name, enc in bundle.encoders.items()}
        next(iter(results.values())).update(self._image_text_eval(bundle, data))
        next(iter(results.values())).update(self._protocol_eval(bundle.headline[1]))
        return results

    def _protocol_eval(self, encoder) -> dict[str, Any]:
        """``eval.protocols`` (few-shot, dense probe) of ``encoder`` (None: raw pixels), with intervals."""
        ev, model = self.cfg.eval, self.cfg.model
        if not ev.protocols:
            return {}
        from pretrain.eval.suite import SuiteData, protocol_metrics

        grid = tuple(self.objective.eval_bundle().headline[1].grid_size())
        data = SuiteData(ev.knn_train, ev.knn_val, None, tuple(model.img_size_tuple()), model.in_chans,
                         self.cfg.data.intensity, grid=grid, batch_size=ev.batch_size, n_boot=ev.bootstrap,
                         seed=self.cfg.train.seed, device=self.dist.device,
                         dtype=PRECISION_DTYPES[self.cfg.train.precision])
        return protocol_metrics(encoder, data, tuple(ev.protocols))

    def _image_text_eval(self, bundle, data: FrozenEvalData) -> dict[str, Any]:
        """Zero-shot accuracy and Recall@K on the held-out set, for objectives with a shared embedding space."""
        if bundle.embed_image is None:
            return {}
        from pretrain.eval.image_text import evaluate_image_text

        return evaluate_image_text(bundle, data.val, data.view, batch_size=data.batch_size, device=data.device,
                                   dtype=data.dtype)

    def evaluate_baselines(self, monitor: Monitor) -> None:
        """Before the first step: the random-init encoder and raw pixels (on the encoder's output grid), kept
        in the run's history so every later result, and summary.json, stands beside them."""
        data = self._eval_data()
        if data is None:
            return
        bundle = self.objective.eval_bundle()
        baselines = evaluate_baselines(bundle.headline[1], data, self.cfg.eval.pool or bundle.pool, self.cfg.eval.baselines)
        baselines["random_init"].update(self._image_text_eval(bundle, data))
        baselines["random_init"].update(self._protocol_eval(bundle.headline[1]))
        if "raw_pixels" in baselines:
            baselines["raw_pixels"].update(self._protocol_eval(None))
        self.history["knn_init"] = baselines["random_init"]["knn"]
        self.history["eval_baselines"] = baselines
        for name, result in baselines.items():
            monitor.scalars(self.step, _eval_scalars(name, result))
        monitor.message("[eval] step 0: " + "; ".join(f"{n.replace('_', ' ')} {_describe(r)}" for n, r in baselines.items()))

    def _log_eval(self, monitor: Monitor, results: dict[str, dict[str, Any]] | None, label: str) -> float | None:
        """Log eval/<encoder>/... per encoder and eval/knn_top1, eval/linear for the headline; returns its kNN."""
        if not results:
            return None
        headline = next(iter(results.values()))
        scalars = {"eval/knn_top1": headline["knn"], "eval/linear": headline["linear"]}
        for name, result in results.items():
            scalars.update(_eval_scalars(name, result))
        monitor.scalars(self.step, scalars)
        monitor.message(f"[eval] {label}: " + "; ".join(f"{n} {_describe(r)}" for n, r in results.items()))
        return headline["knn"]

    # --- the loop -----------------------------------------------------------------------
    def fit(self, stop: StopRequest | None = None) -> dict[str, Any]:
        """Train to ``train.steps``; with ``stop``, end early (checkpointed) after the step where a signal was agreed."""
        cfg, t = self.cfg, self.cfg.train
        interrupted = None
        started = time.perf_counter()
        monitor = Monitor(self.run_dir / "tb", self.dist.is_main, t.steps, self.step, t.progress)
        metrics_file = open_metrics(self.run_dir / "metrics.jsonl", self.step) if self.dist.is_main else None
        peak = peak_flops(self.dist.device)
        flops_per_sample = self.objective.flops_per_sample()
        tokens_per_sample = self.objective.tokens_per_sample()
        monitor.message(
            f"[medpretrain] {cfg.objective.name} | {_parameter_count(self.objective) / 1e6:.2f}M params"
            f" | world {self.dist.world_size} ({self.dist.backend}) | ZeRO-{t.zero_stage} {t.precision}"
            f" | kernels {_kernel_choice()} | {'resuming at step ' + str(self.step) if self.resumed else 'from scratch'}"
        )
        monitor.message(self.thread_plan.describe())
        for warning in self.thread_plan.warnings + upsampling_warnings(cfg, self.objective.data_recipe().whole_view_size()):
            monitor.message(f"[medpretrain] warning: {warning}")
        if not self.resumed and cfg.eval.at_start:
            self.evaluate_baselines(monitor)

        loader = make_loader(self.stream, cfg.data.num_workers)
        gc.collect()  # before forking the workers: see teardown_distributed (an earlier run's engine, collected there)
        batches = iter(loader)
        timer = StepTimer()
        last_parts: dict[str, float] = {}
        batch = out = None
        try:
            while self.step < t.steps:
                values = self.set_schedules()
                lr = values["lr"]
                log_now = (self.step + 1) % t.log_every == 0 or self.step + 1 == t.steps
                parts, _, batch, out = self.train_step(batches, timer, measure_grad_norm=log_now)
                if parts:  # empty when the step was skipped for a non-finite loss
                    self.objective.after_step(self.step)
                self.step += 1
                timer.steps += 1
                rollback = self.guard.after_step(self.step, not parts, self.history)
                if rollback:
                    metrics_file = self._roll_back(rollback, monitor, metrics_file)
                    continue
                last = self.step == t.steps
                if log_now:
                    last_parts = self._reduce_parts(parts)
                    scalars = {f"loss/{k}" if k != "loss" else "loss/total": v for k, v in last_parts.items()}
                    scalars.update(self._step_scalars(values, timer, flops_per_sample, tokens_per_sample, peak))
                    if out is not None and self.dist.is_main:
                        scalars.update(embedding_scalars(out))  # collapse indicators of this rank's batch
                    scalars.update(self.data_health.scalars())
                    monitor.scalars(self.step, scalars)
                    if metrics_file is not None:
                        metrics_file.write(json.dumps({"step": self.step, **scalars}) + "\n")
                        metrics_file.flush()
                    timer.reset()
                    self.data_health.check(self.dist.device, self.dist.world_size)  # all ranks log at this step
                # the last logged loss (reduced over ranks); none before the first log step, not "nan"
                shown = {"loss": f"{last_parts['loss']:.4f}"} if "loss" in last_parts else {}
                monitor.advance(1, {**shown, "lr": f"{lr:.2e}"})
                if out is not None and ((t.image_log_every and self.step % t.image_log_every == 0) or last):
                    monitor.images(self.step, self.objective.visualize(batch, out))
                if cfg.eval.every and self.step % cfg.eval.every == 0 and not last:
                    self._log_eval(monitor, self.evaluate(), f"step {self.step}")
                interrupted = stop.agreed(self.dist.device) if stop is not None and not last else None
                if self.step % t.ckpt_every == 0 or last or interrupted:
                    if not weights_finite(self.engine.module.parameters(), self.dist.device, self.dist.world_size):
                        # never checkpoint (or export) non-finite weights: go back to the last good ones
                        metrics_file = self._roll_back(f"the weights are not finite at step {self.step}", monitor,
                                                       metrics_file)
                        if interrupted:
                            break
                        continue
                    self.history["wall_seconds"] += time.perf_counter() - started
                    started = time.perf_counter()
                    self.history["final_loss"] = last_parts.get("loss")
                    self.save()
                if interrupted:
                    monitor.message(f"[medpretrain] {interrupted.name} received: checkpointed step {self.step}, stopping")
                    break
            if not interrupted:
                self.data_health.check(self.dist.device, self.dist.world_size, final=True)
            final = None if interrupted else self.evaluate()
            self._log_eval(monitor, final, f"step {self.step}")
        finally:
            monitor.close()
            if metrics_file is not None:
                metrics_file.close()
            del batches
        return self._summary(final, time.perf_counter() - started, interrupted.name if interrupted else None)

    def _roll_back(self, reason: str, monitor: Monitor, metrics_file):
        """Reload the last checkpoint after ``reason`` (non-finite steps or weights) and go on past the batches
        that led there; raises TrainingDiverged when that is not allowed. Returns the reopened metrics file."""
        tag = ckpt.resume_tag(self.ckpt_dir)  # the newest intact one, the same on every rank
        self.guard.rollback_allowed(reason, self.history, None if tag is None else int(tag.split("_")[-1]))
        consumed, at_step = self._batches_consumed(), self.step
        rollbacks = list(self.history.get("rollbacks", []))
        client, rank_state = ckpt.load_checkpoint(self.engine, self.ckpt_dir, tag)
        self.objective.load_rank_state(rank_state.get("objective", {}))
        self.step, self.history = int(client["step"]), client["history"]
        rollbacks.append({"from_step": at_step, "to_step": self.step, "reason": reason})
        self.history["rollbacks"] = rollbacks
        self.history["batches_skipped"] = consumed - self.step * self.cfg.train.grad_accum
        self.guard.reset()
        lr_factor = self.guard.lr_factor(self.history)
        monitor.message(f"[medpretrain] warning: {reason}: rolled back to step {self.step} (rollback "
                        f"{len(rollbacks)} of at most {self.cfg.train.max_rollbacks}), going on past the batches of "
                        f"steps {self.step + 1}-{at_step}" + (f", lr x {lr_factor:g}" if lr_factor != 1 else ""))
        monitor.rewind(self.step)
        if metrics_file is None:
            return None
        metrics_file.close()
        return open_metrics(self.run_dir / "metrics.jsonl", self.step)

    def train_step(self, batches, timer: StepTimer | None = None, measure_grad_norm: bool = False):
        """One optimizer step over ``grad_accum`` micro-batches from ``batches``, through the objective's
        ``train_step`` (default: forward + backward per micro-batch).

        Returns (loss parts averaged over micro-batches, the stream's counters,
        the last batch, the last outputs). Schedules must already be set.
        """
        accum = self.cfg.train.grad_accum
        self._plain_grad_norm = None
        t0 = time.perf_counter()
        micro_batches, stream_stats = [], None
        for _ in range(accum):
            batch = next(batches)
            stream_stats = batch.pop("_stream", None)
            self.data_health.update(stream_stats)  # raises the stream's own data fault, if it stopped on one
            micro_batches.append(move_batch(batch, self.dist.device))
        t1 = time.perf_counter()
        outputs = self.objective.train_step(micro_batches, _EngineStepper(self, measure_grad_norm))
        parts: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), dtype=torch.float64))
        for out in outputs:
            for key, value in out.items():
                if not key.startswith("_"):
                    parts[key] += value.detach().double().cpu() / accum
        if timer is not None:
            timer.data += t1 - t0
            timer.compute += time.perf_counter() - t1
            timer.samples += self.cfg.data.batch_size * accum
        return parts, stream_stats, micro_batches[-1], outputs[-1] if outputs else None

    def _finite_on_every_rank(self, loss: torch.Tensor) -> bool:
        finite = torch.isfinite(loss.detach()).to(torch.int32).reshape(1)
        if self.dist.world_size > 1:
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        return bool(finite.item())

    def _skip_nonfinite(self, out: dict[str, torch.Tensor]) -> None:
        """Drop a micro-batch whose loss is not finite on some rank: no backward, no optimizer step.

        Every rank skips together (the check is all-reduced), so the weights and
        the optimizer's moments never see it. With grad_accum > 1 a dropped
        micro-batch would shift DeepSpeed's accumulation window for the rest of
        the run, so there it is an error (the last checkpoint is untouched).
        """
        parts = {k: float(v.detach().float()) for k, v in out.items() if not k.startswith("_") and v.numel() == 1}
        where = f"step {self.step + 1} (rank {self.dist.rank} parts: {parts})"
        if self.cfg.train.grad_accum > 1:
            raise TrainingDiverged(f"non-finite loss at {where}; skipping a step (and rolling back) needs "
                                   "train.grad_accum=1; the last checkpoint is untouched")
        self.history["skipped_nonfinite"] = self.history.get("skipped_nonfinite", 0) + 1
        print(f"[medpretrain] non-finite loss at {where}: step skipped "
              f"({self.history['skipped_nonfinite']} so far)", file=sys.stderr, flush=True)

    def _unpartitioned_grad_norm(self) -> float | None:
        """Pre-clip global grad norm where DeepSpeed does not report one (ZeRO-0 in fp32)."""
        if self.engine.zero_optimization_stage() > 0 or self.cfg.train.precision != "fp32":
            return None
        norms = [p.grad.detach().float().norm() for p in self.engine.module.parameters() if p.grad is not None]
        return float(torch.stack(norms).norm()) if norms else 0.0

    def set_schedules(self) -> dict[str, float]:
        """Every schedule's value for the coming step: lr and weight decay into the optimizer's groups
        (times each group's scales), the objective's own into the objective. Returns them all."""
        values = {name: schedule(self.step, self.cfg.train.steps) for name, schedule in self.schedules.items()}
        values["lr"] *= self.guard.lr_factor(self.history)  # lowered by rollbacks, where rollback_lr_scale < 1
        apply_scales(self.engine.optimizer.param_groups, values["lr"], values["weight_decay"])
        self.objective.set_schedules(self.step, {k: v for k, v in values.items() if k not in ("lr", "weight_decay")})
        return values

    def _reduce_parts(self, parts: dict[str, torch.Tensor]) -> dict[str, float]:
        """Loss parts averaged over ranks (one all-reduce per logged step)."""
        keys = sorted(parts)
        if not keys:  # every rank skipped this step together
            return {}
        values = torch.stack([parts[k] for k in keys]).to(self.dist.device)
        if self.dist.world_size > 1:
            dist.all_reduce(values)
            values /= self.dist.world_size
        return {k: float(v) for k, v in zip(keys, values.cpu())}

    def _step_scalars(self, values: dict[str, float], timer: StepTimer, flops_per_sample: float, tokens: int,
                      peak: float | None) -> dict[str, float]:
        scalars = {"optim/lr": values["lr"], "optim/weight_decay": values["weight_decay"],
                   **{f"schedule/{k}": v for k, v in values.items() if k not in ("lr", "weight_decay")},
                   **timer.rates(tokens, self.dist.world_size), **memory_stats(self.dist.device)}
        grad_norm = self.engine.get_global_grad_norm()
        if grad_norm is None:
            grad_norm = self._plain_grad_norm
        if grad_norm is not None:
            scalars["optim/grad_norm"] = float(grad_norm)
        if peak:
            per_device = scalars["perf/samples_per_s"] / self.dist.world_size
            scalars["perf/mfu"] = per_device * flops_per_sample / peak
        scalars["optim/skipped_nonfinite"] = self.history.get("skipped_nonfinite", 0)
        scalars.update(self.objective.log_scalars())
        return scalars

    def save(self) -> Path:
        client = {"step": self.step, "history": self.history, "data": self._data_position()}
        return ckpt.save_checkpoint(
            self.engine, self.ckpt_dir, self.step, client, {"objective": self.objective.rank_state()},
            dump_config(self.cfg), self.cfg.train.keep_checkpoints,
        )

    def _summary(self, final: dict[str, dict[str, Any]] | None, wall_tail: float, interrupted: str | None) -> dict[str, Any]:
        self.history["wall_seconds"] += wall_tail
        final_acc = next(iter(final.values()))["knn"] if final else None
        summary = {
            "run_dir": str(self.run_dir.resolve()),
            "objective": self.cfg.objective.name,
            "steps": self.step,
            "world_size": self.dist.world_size,
            "wall_seconds": round(self.history["wall_seconds"], 3),
            "final_loss": self.history.get("final_loss"),
            "knn_init": self.history.get("knn_init"),
            "knn_final": final_acc,
            "eval": _eval_summary(final, self.history.get("eval_baselines", {})),
            "compute": compute_record(self.objective, self.cfg, self.step, self.dist.world_size),
            "checkpoint": str((self.ckpt_dir / ckpt.tag_for(self.step)).resolve()),
            "tensorboard": str((self.run_dir / "tb").resolve()),
            "export": None,
            "interrupted": interrupted,
            "skipped_nonfinite": self.history.get("skipped_nonfinite", 0),
            "rollbacks": self.history.get("rollbacks", []),
            "bad_samples": self.data_health.local()[2],  # this rank's rejected samples by reason
        }
        if self.dist.is_main and not interrupted:
            write_summary(self.run_dir, summary)
        return summary


def _eval_scalars(name: str, result: dict[str, Any]) -> dict[str, float]:
    return {f"eval/{name}/{k}": v for k, v in result.items() if isinstance(v, float) and k != "linear_weight_decay"}


def _describe(result: dict[str, Any]) -> str:
    knn = ", ".join(f"{k[4:] or 'pool'} {v:.3f}" for k, v in result.items() if k.startswith("knn_"))
    text = f"kNN {knn or format(result['knn'], '.3f')} | linear {result['linear']:.3f} ({result['linear_features']})"
    if "zeroshot" in result:
        text += f" | zero-shot {result['zeroshot']:.3f}"
    if "segment/mean_dice" in result:
        text += f" | dense probe Dice {result['segment/mean_dice']:.3f}"
    if "fewshot/k1/accuracy" in result:
        text += f" | 1-shot {result['fewshot/k1/accuracy']:.3f}"
    if "i2t_r5" in result:
        text += f" | R@5 i2t {result['i2t_r5']:.3f} t2i {result['t2i_r5']:.3f} ({result['retrieval_pairs']} pairs)"
    return text


def _eval_summary(final: dict[str, dict[str, Any]] | None, baselines: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """summary.json's "eval": the headline encoder beside its baselines and by how much it beats the better one."""
    if not final and not baselines:
        return None
    summary: dict[str, Any] = dict(baselines)
    if final:
        name, headline = next(iter(final.items()))
        summary.update(pretrained=dict(headline, encoder=name), gain_over_baselines=gains(headline, baselines))
        if len(final) > 1:
            summary["encoders"] = final
    return summary


def open_metrics(path: Path, resume_step: int):
    """``metrics.jsonl`` for appending, without the lines the interrupted run logged after ``resume_step``."""
    if path.is_file():
        kept = [line for line in path.read_text().splitlines() if _logged_step(line) <= resume_step]
        ckpt.atomic_write_text(path, "".join(line + "\n" for line in kept))
    return open(path, "a")


def _logged_step(line: str) -> float:
    """The step of one metrics line; a line cut short by a kill counts as after any resume point."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")


def write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    ckpt.atomic_write_text(Path(run_dir) / "summary.json", json.dumps(summary, indent=2) + "\n")


def train(cfg: RunConfig, stop: StopRequest | None = None) -> dict[str, Any]:
    """Run (or resume) one training run; returns the summary also written to ``summary.json``.

    With ``stop`` the run may end early, checkpointed, with ``summary["interrupted"]``
    naming the signal; the summary file is then not written (the run is not over).
    """
    dist_info = setup_distributed()
    try:
        summary = Trainer(cfg, dist_info).fit(stop)
    except BaseException:
        # A failing rank must not wait in a barrier for ranks that are still training:
        # that hangs the whole job and hides the error. Leave without one.
        teardown_distributed(barrier=False)
        raise
    finally:
        run_lock.release_all()
    teardown_distributed()
    return summary


class _EngineStepper:
    """What an objective's ``train_step`` may do: the engine's forward, and backward + step per micro-batch."""

    def __init__(self, trainer: Trainer, measure_grad_norm: bool) -> None:
        self.trainer, self.measure_grad_norm = trainer, measure_grad_norm

    def forward(self, batch: dict[str, Any], **kwargs: Any) -> dict[str, torch.Tensor]:
        return self.trainer.engine(batch, **kwargs)

    def backward(self, loss: torch.Tensor, out: dict[str, torch.Tensor]) -> bool:
        t, engine = self.trainer, self.trainer.engine
        if not t._finite_on_every_rank(loss):
            t._skip_nonfinite(out)
            return False
        engine.backward(loss)
        if self.measure_grad_norm and engine.is_gradient_accumulation_boundary():
            t._plain_grad_norm = t._unpartitioned_grad_norm()
        engine.step()
        return True
