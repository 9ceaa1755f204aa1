"""What a run costs and how large its model is: ``summary.json``'s "compute", the numbers scaling-law fits read.

C = model FLOPs per sample (the objective's own count, the one MFU uses: forward
and backward matmuls, attention included, MAE's visible tokens, DINO's crops,
CLIP's text tower) x samples seen. Parameter counts split off the embeddings
(patch / position / class / register / mask tokens, a text tower's token
embeddings), as scaling laws count N without them (Kaplan et al. 2020).
"""
from __future__ import annotations

from typing import Any

import torch

# A parameter is an embedding when one of its name's parts is one of these.
EMBEDDING_PARTS = frozenset({"patch_embed", "pos_embed", "cls_token", "reg_token", "mask_token", "decoder_pos_embed",
                             "embeddings"})


def _numel(p: torch.nn.Parameter) -> int:
    return int(getattr(p, "ds_numel", p.numel()))  # ZeRO-3 leaves the local tensor empty


def parameter_counts(module: torch.nn.Module) -> dict[str, int]:
    """{"total", "embedding", "non_embedding"} parameters of ``module`` (trainable or not)."""
    total = embedding = 0
    for name, p in module.named_parameters():
        n = _numel(p)
        total += n
        if EMBEDDING_PARTS.intersection(name.split(".")):
            embedding += n
    return {"total": total, "embedding": embedding, "non_embedding": total - embedding}


def compute_record(objective, cfg, steps: int, world_size: int) -> dict[str, Any]:
    """The run's compute after ``steps`` optimizer steps and the parameters of its headline encoder (of the
    whole objective when it has no encoder to evaluate)."""
    global_batch = cfg.data.batch_size * cfg.train.grad_accum * world_size
    samples = steps * global_batch
    per_sample = float(objective.flops_per_sample())
    tokens = int(objective.tokens_per_sample())
    try:
        name, encoder = objective.eval_bundle().headline
    except NotImplementedError:  # an objective with nothing to evaluate: its own parameters
        name, encoder = None, objective
    return {
        "flops_per_sample": per_sample, "tokens_per_sample": tokens, "global_batch": global_batch,
        "samples_seen": samples, "tokens_seen": samples * tokens, "compute_flops": per_sample * samples,
        "params": {"encoder": name, **parameter_counts(encoder), "objective_total": parameter_counts(objective)["total"]},
    }
