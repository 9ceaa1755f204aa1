"""A Hugging Face text encoder with a projection: the text side of image–text objectives.

Any ``transformers`` encoder (BERT, PubMedBERT, CXR-BERT, RoBERTa, ...) given
by a local folder or a hub name; a local folder is read with
``local_files_only`` so nothing is fetched. Its token states are pooled
(``cls``: the first token; ``mean``: over the attention mask; ``last``: the
last non-padding token, for decoder-style models) and projected to the shared
embedding width. Lower layers can be frozen (``freeze_layers``: the
embeddings count as layer 0) or the whole transformer (``freeze``); the
projection always trains.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from torch import nn

TextPool = Literal["cls", "mean", "last"]


def _local(name_or_path: str) -> bool:
    return Path(name_or_path).expanduser().is_dir()


# The dropout fields of the common encoder configs (BERT / RoBERTa / ELECTRA, DistilBERT, others).
_DROPOUT_FIELDS = ("hidden_dropout_prob", "attention_probs_dropout_prob", "dropout", "attention_dropout")


def load_transformer(name_or_path: str, *, dropout: float | None = None) -> nn.Module:
    """``AutoModel`` of ``name_or_path`` with its weights; ``dropout`` replaces every dropout probability its
    config names."""
    from transformers import AutoConfig, AutoModel

    local = _local(name_or_path)
    try:
        config = AutoConfig.from_pretrained(name_or_path, local_files_only=local)
        if dropout is not None:
            for name in _DROPOUT_FIELDS:
                if hasattr(config, name):
                    setattr(config, name, dropout)
        return AutoModel.from_pretrained(name_or_path, config=config, local_files_only=local)
    except OSError as e:
        where = "folder" if local else "hub name (not a local folder; offline runs need a folder)"
        raise ValueError(f"objective.text_model {name_or_path!r}: cannot load a transformers model from this "
                         f"{where}: {e}") from None


def save_transformer(model: nn.Module, folder: Path) -> None:
    """``save_pretrained`` as safetensors, without transformers 5's progress bar per shard."""
    from transformers.utils import logging as hf_logging

    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(folder, safe_serialization=True)
    finally:
        if bar:
            hf_logging.enable_progress_bar()


def load_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name_or_path, local_files_only=_local(name_or_path))
    except OSError as e:
        raise ValueError(f"objective.text_model {name_or_path!r}: no tokenizer there: {e}") from None


def _layers(transformer: nn.Module) -> list[nn.Module]:
    """The transformer's block list (``encoder.layer`` for BERT-likes, ``layers`` / ``h`` for others)."""
    for path in ("encoder.layer", "encoder.layers", "layers", "h", "transformer.layer"):
        module = transformer
        for part in path.split("."):
            module = getattr(module, part, None)
            if module is None:
                break
        if isinstance(module, nn.ModuleList):
            return list(module)
    return []


class TextTower(nn.Module):
    """tokens -> (B, embed_dim) unnormalised text embedding."""

    def __init__(self, name_or_path: str, *, embed_dim: int, pool: TextPool = "cls",
                 projection: Literal["linear", "mlp"] = "linear", freeze: bool = False, freeze_layers: int = 0,
                 dropout: float | None = None) -> None:
        super().__init__()
        self.transformer = load_transformer(name_or_path, dropout=dropout)
        self.pool = pool
        width = self.transformer.config.hidden_size
        if projection == "linear":
            self.proj = nn.Linear(width, embed_dim, bias=False)
        else:
            hidden = (width + embed_dim) // 2
            self.proj = nn.Sequential(nn.Linear(width, hidden, bias=False), nn.GELU(), nn.Linear(hidden, embed_dim, bias=False))
        for m in self.proj.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=width ** -0.5)
        if freeze:
            self.transformer.requires_grad_(False)
        elif freeze_layers:
            layers = _layers(self.transformer)
            if freeze_layers > len(layers) + 1:
                raise ValueError(f"objective.freeze_text_layers={freeze_layers}: the text model has "
                                 f"{len(layers)} layers (+1 for the embeddings)")
            self.transformer.get_input_embeddings().requires_grad_(False)
            if getattr(self.transformer, "embeddings", None) is not None:  # BERT-likes: positions, types, norm too
                self.transformer.embeddings.requires_grad_(False)
            for layer in layers[: freeze_layers - 1]:
                layer.requires_grad_(False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        states = self.transformer(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.pool == "cls":
            pooled = states[:, 0]
        elif self.pool == "mean":
            m = attention_mask.unsqueeze(-1).to(states.dtype)
            pooled = (states * m).sum(1) / m.sum(1).clamp_min(1)
        else:
            last = attention_mask.long().sum(1).clamp_min(1) - 1
            pooled = states[torch.arange(states.shape[0], device=states.device), last]
        return self.proj(pooled)

    def forward_flops(self, tokens: int) -> float:
        """Matmul FLOPs of one forward over ``tokens`` tokens that gradients flow back through (encoder
        blocks, attention, projection); see :meth:`unused_flops` for the rest."""
        cfg = self.transformer.config
        d, layers = cfg.hidden_size, cfg.num_hidden_layers
        ffn = getattr(cfg, "intermediate_size", 4 * d)
        per_layer = 2 * tokens * (4 * d * d + 2 * d * ffn) + 2 * 2 * tokens * tokens * d
        proj = sum(2 * m.in_features * m.out_features for m in self.proj.modules() if isinstance(m, nn.Linear))
        return float(layers * per_layer + proj)

    def unused_flops(self) -> float:
        """Forward FLOPs whose output nothing reads (BERT's pooler runs on the first token): no backward."""
        d = self.transformer.config.hidden_size
        return float(2 * d * d) if getattr(self.transformer, "pooler", None) is not None else 0.0
