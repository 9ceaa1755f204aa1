"""The objective contract (v2): everything the trainer may ask of a method.

An objective is one module in ``pretrain/objectives`` that registers
``(NAME, Config, build)`` with ``pretrain.config.registry``. ``build(run_cfg,
ctx)`` returns an :class:`Objective`, an ``nn.Module`` owning every module of
the method (backbone, heads, teacher, text tower). The trainer knows nothing
about any single method; it only calls what this file declares:

- ``data_recipe()``: the picklable CPU side (transform, collate, tokenizer),
  apart from the module, so DataLoader workers never carry weights;
- ``forward(batch)`` -> ``{"loss": scalar, <part>: scalar, ...}``;
- ``train_step(micro_batches, stepper)``: one optimizer step over all
  micro-batches; the default is forward + backward per micro-batch;
- ``param_groups()``: groups with ``lr_scale`` / ``wd_scale`` that the one
  schedule mechanism multiplies, never overwrites;
- ``schedules()`` / ``set_schedules(values)``: the method's per-step values
  (EMA momentum, teacher temperature), computed and logged by the trainer;
- ``after_step(step)``: no-grad updates after the optimizer step (EMA teacher);
- ``eval_bundle()``: the encoders evaluation and export use (each meets
  ``pretrain.models.encoder.Encoder``), the headline first, and for
  image-text methods the text encoder and tokenizer;
- ``rank_state`` / ``load_rank_state`` / ``restore_from_rank_states``: state
  DeepSpeed does not checkpoint (fp32 teacher shards);
- ``flops_per_sample()``: model FLOPs of forward + backward per sample, checked
  against ``torch.utils.flop_counter.FlopCounterMode``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Protocol

import torch
from torch import nn

from pretrain.config.typed import ConfigError
from pretrain.models.encoder import Encoder
from pretrain.optim.param_groups import decay_groups
from pretrain.optim.schedules import Schedule


@dataclass(frozen=True)
class BuildContext:
    """Where the objective runs: so a gathered loss never reaches into globals."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    group: Any = None  # torch.distributed process group of the data-parallel ranks; None = the default group

    @classmethod
    def from_dist(cls, info: Any, group: Any = None) -> "BuildContext":
        """From ``pretrain.engine.distributed.DistInfo``."""
        return cls(info.rank, info.world_size, info.device, group)


class DataRecipe:
    """The CPU side of an objective: plain Python and numpy/torch ops, no parameters.

    Instances are pickled into every DataLoader worker: keep them small (sizes,
    seeds, augmentation settings, a tokenizer), never a module or its weights.
    """

    def transform(self, sample: dict[str, Any]) -> dict[str, Any]:
        """One decoded sample -> model-ready tensors; randomness from ``sample['__seed__']``."""
        raise NotImplementedError(f"{type(self).__name__} must define transform()")

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        """A list of transformed samples -> one batch."""
        raise NotImplementedError(f"{type(self).__name__} must define collate()")

    def whole_view_size(self) -> tuple[int, ...] | None:
        """The size of the largest view made from (up to) a whole image, e.g. MAE's input or DINO's global crops;
        the trainer warns when the data's images are smaller (every one would be upsampled)."""
        return None


@dataclass
class EvalBundle:
    """What evaluation and export use from a trained objective.

    ``encoders`` maps a name to an image encoder; the first is the run's headline
    (DINO: teacher, then student). ``pool`` is the token pooling the method's
    features are meant to be read with. Image-text methods add their text side:
    the text tower and tokenizer (for export), and the shared embedding space
    (for zero-shot classification and retrieval).
    """

    encoders: dict[str, Encoder]
    pool: str = "cls"
    text_encoder: nn.Module | None = None
    tokenizer: Any = None
    embed_image: Callable[[torch.Tensor], torch.Tensor] | None = None  # views (B, C, ...) -> (B, E), L2-normalised
    embed_text: Callable[[list[str]], torch.Tensor] | None = None  # texts -> (B, E), L2-normalised
    class_prompts: Callable[[list[str]], dict[str, list[str]]] | None = None  # class names -> zero-shot prompts

    @property
    def headline(self) -> tuple[str, Encoder]:
        return next(iter(self.encoders.items()))


class Stepper(Protocol):
    """What ``Objective.train_step`` may do with the engine (the trainer supplies it)."""

    def forward(self, batch: dict[str, Any], **kwargs: Any) -> dict[str, torch.Tensor]:
        """The engine's forward (DeepSpeed's, so ZeRO-3 gathers and precision casts apply)."""

    def backward(self, loss: torch.Tensor, out: dict[str, torch.Tensor]) -> bool:
        """Backward of one micro-batch's loss and the engine's step; False when skipped as non-finite."""


class Objective(nn.Module):
    """Base class; subclasses implement the recipe, the loss and the hooks they need."""

    def __init__(self, ctx: BuildContext) -> None:
        super().__init__()
        self.ctx = ctx

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype DeepSpeed gave the parameters (bf16/fp16/fp32); inputs are cast to it."""
        return next(self.parameters()).dtype

    # --- data side ------------------------------------------------------------------------
    def data_recipe(self) -> DataRecipe:
        raise NotImplementedError(f"{type(self).__name__} must define data_recipe()")

    # --- device side ----------------------------------------------------------------------
    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:  # type: ignore[override]
        """``{"loss": scalar, <part>: scalar, ...}``; every entry without a leading ``_`` is logged."""
        raise NotImplementedError(f"{type(self).__name__} must define forward()")

    def train_step(self, micro_batches: Iterable[dict[str, Any]], stepper: Stepper) -> list[dict[str, torch.Tensor]]:
        """One optimizer step; returns the outputs of the micro-batches that were not skipped.

        Override for methods that need every micro-batch of a step at once (a
        contrastive loss over a feature cache spanning gradient accumulation).
        """
        outputs = []
        for batch in micro_batches:
            out = stepper.forward(batch)
            if stepper.backward(out["loss"], out):
                outputs.append(out)
        return outputs

    def param_groups(self) -> list[dict[str, Any]]:
        """Optimizer groups: ``params``, ``name``, ``lr_scale``, ``wd_scale`` (default: decay / no decay)."""
        return decay_groups(self)

    def schedules(self) -> dict[str, Schedule]:
        """Named per-step values of the method (logged as ``schedule/<name>``)."""
        return {}

    def set_schedules(self, step: int, values: dict[str, float]) -> None:
        """Called before every optimizer step with the values of :meth:`schedules` at ``step``."""

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """No-grad updates after the optimizer step (EMA teacher, centers)."""

    def eval_bundle(self) -> EvalBundle:
        raise NotImplementedError(f"{type(self).__name__} must define eval_bundle()")

    def rank_state(self) -> dict[str, Any]:
        """State of this rank that DeepSpeed does not checkpoint (e.g. fp32 teacher shards)."""
        return {}

    def load_rank_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`rank_state` returned, after the engine's own state is loaded."""

    def restore_from_rank_states(self, states: list[dict[str, Any]]) -> set[str]:
        """Outside training (export, eval): rebuild full tensors from every rank's :meth:`rank_state`.

        Returns the parameter names (as in ``state_dict``) it restored.
        """
        return set()

    def flops_per_sample(self) -> float:
        """Model FLOPs (forward + backward) per training sample, for MFU and scaling laws."""
        raise NotImplementedError(f"{type(self).__name__} must define flops_per_sample()")

    def tokens_per_sample(self) -> int:
        """Tokens the backbone processes per sample, for tokens/s."""
        return 0

    @torch.no_grad()
    def visualize(self, batch: dict[str, Any], outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Images to log, ``{tag: (3|1, H, W) float in [0, 1]}``; empty by default."""
        return {}

    def log_scalars(self) -> dict[str, float]:
        """Extra per-step scalars the method wants logged."""
        return {}


# --- shared by objectives -------------------------------------------------------------------
def check_view_fits_patches(key: str, size: tuple[int, ...], backbone: nn.Module) -> None:
    """ConfigError naming ``key`` unless a view of ``size`` tiles into the backbone's patches (ViT only)."""
    patch = getattr(backbone, "patch_size", None)
    if patch is not None and (len(size) != len(patch) or any(s % p for s, p in zip(size, patch))):
        raise ConfigError(f"config key '{key}': {list(size)} must have one size per spatial axis "
                          f"({len(patch)}), each a multiple of the patch {list(patch)}")


def load_init_weights(backbone: nn.Module, source: str, model_name: str) -> dict | None:
    """``objective.init_from``: load weights from ``source`` into ``backbone``; the load report, or None
    without a source. ViTs go through ``load_pretrained`` (timm / DINOv2 / MONAI names, channel, patch and
    position adaptation); other backbones load their own state dict (under any of ``PREFIXES``) strictly."""
    if not source:
        return None
    from pretrain.models.pretrained import PREFIXES, load_pretrained, read_state_dict

    if model_name == "vit":
        return load_pretrained(backbone, source)
    try:
        state = read_state_dict(source)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"config key 'objective.init_from': {e}") from e
    target = backbone.state_dict()
    prefix = max(PREFIXES, key=lambda p: sum(k[len(p):] in target for k in state if k.startswith(p)))
    mine = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix) and k[len(prefix):] in target}
    missing = sorted(set(target) - set(mine))
    wrong = sorted(k for k, v in mine.items() if v.shape != target[k].shape)
    if missing or wrong:
        raise ConfigError(f"config key 'objective.init_from': {source} does not hold this {model_name!r} backbone's "
                          f"weights: {len(missing)} missing (e.g. {missing[:3]}), {len(wrong)} of another shape "
                          f"(e.g. {wrong[:3]})")
    backbone.load_state_dict(mine, strict=True)
    return {"loaded": len(mine), "prefix": prefix}
