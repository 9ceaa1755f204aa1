"""From a RunConfig to a DeepSpeed engine: config dict, optimizer, batches on the device."""
from __future__ import annotations

from typing import Any

import torch

from pretrain.optim.param_groups import apply_scales

PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def deepspeed_config(cfg) -> dict[str, Any]:
    """DeepSpeed's JSON config for a RunConfig (we own the schedule and the logging)."""
    t = cfg.train
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "zero_optimization": {"stage": t.zero_stage},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }
    if cfg.optim.grad_clip > 0:
        ds["gradient_clipping"] = cfg.optim.grad_clip
    if t.precision == "bf16":
        ds["bf16"] = {"enabled": True}
    elif t.precision == "fp16":
        ds["fp16"] = {"enabled": True, "initial_scale_power": 16, "loss_scale_window": 1000}
    if t.zero_stage == 3:
        # Gather the full parameters for save_16bit_model and keep the reductions small on CPU.
        ds["zero_optimization"].update({"stage3_gather_16bit_weights_on_model_save": True})
    return ds


def build_optimizer(groups: list[dict[str, Any]], optim) -> torch.optim.Optimizer:
    """AdamW over the objective's groups; each starts at its scales times the peak values
    (the trainer sets both every step from the schedules)."""
    apply_scales(groups, optim.lr, optim.weight_decay)
    return torch.optim.AdamW(groups, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps)


def move_batch(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Tensors to the device; the objective casts to its compute dtype where it wants to."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
