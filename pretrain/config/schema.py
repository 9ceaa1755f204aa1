"""The run config: typed dataclasses are the schema, YAML files set values.

One YAML file is one reproducible run. The objective section is typed by the
objective's own dataclass, chosen by ``objective.name``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from pretrain.config.registry import objective_entry
from pretrain.config.typed import RESOLVE, ConfigError
from pretrain.models.backbones import ModelConfig


@dataclass
class SourceConfig:
    """One shard set of the training mixture."""

    shards: str | list[str]  # folder with manifest.json, brace pattern, glob, or a list of them
    weight: float = 1.0
    name: str = ""


@dataclass
class DataConfig:
    train: list[SourceConfig] = field(default_factory=list)
    batch_size: int = 32  # per rank and per micro-batch
    num_workers: int = 2
    shuffle_buffer: int = 1000
    resample: bool = False
    intensity: Literal["zscore", "range", "none"] = "zscore"  # per-image intensity normalisation


@dataclass
class OptimConfig:
    lr: float = 1.5e-4
    min_lr: float = 0.0
    warmup_steps: int = 0
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    weight_decay: float = 0.05
    weight_decay_end: float | None = None
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping


@dataclass
class TrainConfig:
    steps: int = 1000  # optimizer steps
    grad_accum: int = 1
    seed: int = 0
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    zero_stage: int = 0
    deterministic: bool = False  # torch.use_deterministic_algorithms
    run_dir: str = "runs/default"
    log_every: int = 10
    image_log_every: int = 0  # 0: only at the end
    ckpt_every: int = 500
    keep_checkpoints: int = 2
    progress: bool = True
    export_on_end: bool = True
    threads: int = 0  # torch intra-op threads per rank; 0 leaves torch's default

    def __post_init__(self) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"config key 'train.zero_stage' must be 0, 1, 2 or 3, got {self.zero_stage}")
        for name in ("steps", "grad_accum", "log_every", "ckpt_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ConfigError(f"config key 'train.{name}' must be >= 1, got {getattr(self, name)}")


@dataclass
class EvalConfig:
    knn_train: str | None = None  # labelled shards: the kNN memory bank
    knn_val: str | None = None  # labelled shards: the queries
    every: int = 0  # steps between evaluations during training; 0: start and end only
    at_start: bool = True  # evaluate the random-init encoder before training
    k: int = 20
    temperature: float = 0.07
    pool: Literal["cls", "mean", "cls+mean"] | None = None  # None: the objective's choice
    batch_size: int = 64


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
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: Any = field(default_factory=_default_objective, metadata={RESOLVE: _objective_config_class})
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    kernels: KernelsConfig = field(default_factory=KernelsConfig)
