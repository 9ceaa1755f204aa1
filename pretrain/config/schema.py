"""The run config: typed dataclasses are the schema, YAML files set values.

One YAML file is one reproducible run. The objective section is typed by the
objective's own dataclass, chosen by ``objective.name``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from pretrain.config.registry import objective_entry
from pretrain.config.typed import RESOLVE, ConfigError, check_range
from pretrain.models.backbones import ModelConfig


@dataclass
class SourceConfig:
    """One shard set of the training mixture."""

    shards: str | list[str]  # folder with manifest.json, brace pattern, glob, or a list of them
    weight: float = 1.0  # relative sampling weight in the mixture (>= 0; normalised over the sources)
    name: str = ""  # label in logs and in each sample's __source__; "" gives source<index>

    def __post_init__(self) -> None:
        if self.weight < 0:
            raise ValueError(f"weight must be >= 0, got {self.weight}")


@dataclass
class DataConfig:
    train: list[SourceConfig] = field(default_factory=list)  # the training mixture: one entry per shard set
    batch_size: int = 32  # per rank and per micro-batch
    num_workers: int = 2  # DataLoader workers per rank (0: main process); resuming needs the same count
    shuffle_buffer: int = 1000  # samples in each worker's shuffle buffer; 0 or 1: no sample-level shuffling
    resample: bool = False  # draw shards with replacement instead of shuffled passes (epochs) over them
    intensity: Literal["zscore", "range", "none"] = "zscore"  # per-image intensity normalisation
    # Rejected samples (bad shape, dtype, NaN/inf, undecodable; counted in data/bad_samples/<reason>) may be at
    # most this share of those read; more stops the run with a diagnosis (checked at log steps and at the end).
    max_bad_fraction: float = 0.05
    # Train on a shard folder whose `pretrain shards write` has not finished (a journal but no manifest, or a
    # .tar.tmp): false refuses it, since it holds only part of the data; rerunning the command finishes it.
    allow_incomplete_shards: bool = False

    def __post_init__(self) -> None:
        check_range("data.batch_size", self.batch_size, 1)
        check_range("data.max_bad_fraction", self.max_bad_fraction, 0, 1)
        check_range("data.num_workers", self.num_workers, 0)
        check_range("data.shuffle_buffer", self.shuffle_buffer, 0)
        if self.train and not sum(s.weight for s in self.train) > 0:
            raise ConfigError("config key 'data.train': the mixture weights sum to 0; give one source a weight > 0")


# Far above any useful lr or weight decay; near float32's 3.4e38, torch's optimizer arithmetic (lr / bias
# correction) overflows with a RuntimeError instead of training.
MAX_OPTIM_VALUE = 1e30


@dataclass
class OptimConfig:
    lr: float = 1.5e-4  # peak AdamW learning rate after warm-up (times each param group's lr_scale)
    min_lr: float = 0.0  # lr the schedule decays towards by the last step (unused by constant)
    warmup_steps: int = 0  # optimizer steps of linear warm-up from 0 to lr
    schedule: Literal["cosine", "linear", "constant"] = "cosine"  # lr decay after warm-up, lr to min_lr
    weight_decay: float = 0.05  # AdamW decoupled weight decay at step 0 (times each group's wd_scale)
    weight_decay_end: float | None = None  # weight decay at the end, by a cosine; None: weight_decay throughout
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW (beta1, beta2) decay rates of the moment estimates
    eps: float = 1e-8  # AdamW epsilon added to the denominator
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping

    def __post_init__(self) -> None:
        for name in ("lr", "min_lr", "warmup_steps", "weight_decay", "grad_clip"):
            check_range(f"optim.{name}", getattr(self, name), 0)
        for name in ("lr", "min_lr", "weight_decay"):
            check_range(f"optim.{name}", getattr(self, name), high=MAX_OPTIM_VALUE)
        if self.weight_decay_end is not None:
            check_range("optim.weight_decay_end", self.weight_decay_end, 0)
        check_range("optim.eps", self.eps, 0, low_open=True)
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"config key 'optim.betas' must be two numbers in [0, 1), got {list(self.betas)}")


@dataclass
class TrainConfig:
    steps: int = 1000  # optimizer steps
    grad_accum: int = 1  # micro-batches per optimizer step (global batch: batch_size x grad_accum x ranks)
    seed: int = 0  # seeds the initial weights, data order, augmentations and masks
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # DeepSpeed training precision; also the kNN eval dtype
    zero_stage: int = 0  # DeepSpeed ZeRO stage: shards 0 nothing, 1 optimizer states, 2 + gradients, 3 + params
    deterministic: bool = False  # torch.use_deterministic_algorithms
    run_dir: str = "runs/default"  # output folder: config.yaml, checkpoints/, tb/, metrics.jsonl, export/
    log_every: int = 10  # steps between scalar logs (TensorBoard, metrics.jsonl); the last step is always logged
    image_log_every: int = 0  # steps between TensorBoard images of the objective; 0: only at the end
    ckpt_every: int = 500  # steps between checkpoints; the last step and a stop signal always save one
    keep_checkpoints: int = 2  # newest complete checkpoints kept; older ones are deleted
    progress: bool = True  # tqdm progress bar on rank 0's stderr
    export_on_end: bool = True  # export the encoder to <run_dir>/export when the run finishes (not interrupted)
    threads: int = 0  # torch intra-op threads per rank; 0 leaves torch's default
    # Non-finite steps (README, "When training is not finite"): a step whose loss is NaN/inf is skipped.
    nonfinite_in_a_row: int = 3  # skipped steps in a row that roll back to the last checkpoint (as do NaN weights)
    max_rollbacks: int = 2  # rollbacks per run (each goes on past the batches that led to it); then exit 6
    rollback_lr_scale: float = 1.0  # lr multiplier per rollback (cumulative), e.g. 0.5; 1 keeps the schedule
    max_skipped_fraction: float = 0.1  # more of the steps so far skipped (judged from step 20) stops the run (exit 6)

    def __post_init__(self) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"config key 'train.zero_stage' must be 0, 1, 2 or 3, got {self.zero_stage}")
        for name in ("steps", "grad_accum", "log_every", "ckpt_every", "keep_checkpoints", "nonfinite_in_a_row"):
            if getattr(self, name) < 1:
                raise ConfigError(f"config key 'train.{name}' must be >= 1, got {getattr(self, name)}")
        check_range("train.max_rollbacks", self.max_rollbacks, 0)
        check_range("train.rollback_lr_scale", self.rollback_lr_scale, 0, 1, low_open=True)
        check_range("train.max_skipped_fraction", self.max_skipped_fraction, 0, 1)


TRAINING_PROTOCOLS = ("fewshot", "segment")


@dataclass
class EvalConfig:
    knn_train: str | None = None  # labelled shards: the kNN memory bank
    knn_val: str | None = None  # labelled shards: the queries
    every: int = 0  # steps between evaluations during training; 0: start and end only
    at_start: bool = True  # evaluate the random-init encoder before training (the baseline every result is set beside)
    baselines: bool = True  # with at_start: also the raw-pixel baseline (the view averaged to the encoder's output grid)
    k: int = 20  # neighbours per query in the weighted kNN vote
    temperature: float = 0.07  # each neighbour's vote weighs exp(cosine similarity / temperature)
    pool: Literal["cls", "mean", "cls+mean"] | None = None  # None: the objective's choice
    batch_size: int = 64  # images per encoder forward while extracting features, per rank
    # More of the evaluation suite's frozen protocols at each evaluation, on the same sets, for the headline
    # encoder and its baselines, with bootstrap intervals: fewshot (k shots, label fractions), segment (dense
    # probe: needs masks). kNN and the linear probe always run.
    protocols: list[str] = field(default_factory=list)
    bootstrap: int = 200  # replicates per interval of those protocols

    def __post_init__(self) -> None:
        unknown = sorted(set(self.protocols) - set(TRAINING_PROTOCOLS))
        if unknown:
            raise ConfigError(f"config key 'eval.protocols': {unknown} cannot run during training; choose from "
                              f"{list(TRAINING_PROTOCOLS)} (fine-tuning: `pretrain eval finetune` on a checkpoint)")
        if self.bootstrap < 1:
            raise ConfigError(f"config key 'eval.bootstrap' must be >= 1, got {self.bootstrap}")


@dataclass
class KernelsConfig:
    """The one place that picks kernel backends (``pretrain.kernels.describe()`` says what runs)."""

    attention: str = "auto"  # auto (best that can run: PyTorch SDPA unless measured otherwise) or a backend name
    patch_embed: str = "auto"  # auto or a backend name

    def __post_init__(self) -> None:
        from pretrain import kernels

        for op in ("attention", "patch_embed"):
            choices = ["auto", *kernels.backend_names(op)]
            if getattr(self, op) not in choices:
                raise ConfigError(f"config key 'kernels.{op}' must be one of {', '.join(choices)}, "
                                  f"got {getattr(self, op)!r}")


def _objective_config_class(raw: Any, key: str) -> type:
    name = raw.get("name", "mae") if isinstance(raw, dict) else None
    if name is None:
        raise ConfigError(f"config key '{key}' must be a mapping with a 'name'")
    return objective_entry(name, key=f"{key}.name").config_class


def _default_objective() -> Any:
    return objective_entry("mae").config_class()


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)  # the backbone (encoder) architecture
    # the pretraining objective; objective.name (mae, dino, ...) picks the schema of its other keys
    objective: Any = field(default_factory=_default_objective, metadata={RESOLVE: _objective_config_class})
    data: DataConfig = field(default_factory=DataConfig)  # training data: shard mixture, batching, loading
    optim: OptimConfig = field(default_factory=OptimConfig)  # AdamW and its lr / weight-decay schedules
    train: TrainConfig = field(default_factory=TrainConfig)  # the loop: steps, precision, ZeRO, logging, checkpoints
    eval: EvalConfig = field(default_factory=EvalConfig)  # kNN evaluation of the frozen encoder(s)
    kernels: KernelsConfig = field(default_factory=KernelsConfig)  # kernel backends (attention, patch embedding)
