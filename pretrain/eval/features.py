"""Frozen features of labelled shards: extracted once, streamed, shared over ranks, cached on disk.

Every protocol of the evaluation suite reads the same :class:`FeatureSet`
(kNN, linear probe, few-shot, the dense probe), so an encoder's forward runs
once per data set, not once per protocol. Samples are streamed from the
shards in batches (a data set is never held in memory as images: only its
features are), and rank ``r`` of ``w`` takes samples ``r, r + w, ...``; every
rank runs the same number of forwards (ZeRO-3 gathers parameters
collectively), and all ranks get every row back, in shard order.

The cache key hashes what decides the numbers: the encoder's weights, the
readings, the evaluation view (size, channels, intensity), the dtype, and each
shard file's path, size and modification time. A changed encoder or a
rewritten shard is a different file, never a stale hit.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
import webdataset as wds
from torch import nn

from pretrain.data.codec import decode_sample
from pretrain.data.errors import DataError
from pretrain.data.stream import expand_shards
from pretrain.models.encoder import eval_mode
from pretrain.storage.cache import cache_root

CACHE_VERSION = 1
LAST_BLOCKS = 4  # DINOv2's linear probe: the class tokens of the last 4 blocks


@dataclass
class FeatureSet:
    """One labelled set read through one encoder (or raw pixels), rows in shard order."""

    features: dict[str, torch.Tensor]  # reading -> (N, F) float32
    labels: torch.Tensor  # (N,) int64 single-label, or (N, L) float32 multi-hot (multi-label)
    keys: list[str]
    groups: list[str] | None = None  # patient key per row, where the shards carry one (``meta["patient"]``)
    tokens: torch.Tensor | None = None  # (N, *grid, D) float16 grid tokens, for the dense probe
    masks: torch.Tensor | None = None  # (N, *spatial) uint8 label maps on the evaluation view's grid
    label_names: list[str] = field(default_factory=list)
    mask_labels: dict[str, int] = field(default_factory=dict)
    texts: list[str] | None = None  # each sample's report ("" where it has none), for image-text protocols

    @property
    def multi_label(self) -> bool:
        return self.labels.dim() == 2

    @property
    def num_classes(self) -> int:
        return self.labels.shape[1] if self.multi_label else int(self.labels.max()) + 1

    def __len__(self) -> int:
        return len(self.keys)

    def subset(self, idx: torch.Tensor) -> "FeatureSet":
        idx_list = idx.tolist()
        return FeatureSet({n: f[idx] for n, f in self.features.items()}, self.labels[idx],
                          [self.keys[i] for i in idx_list], None if self.groups is None else [self.groups[i] for i in idx_list],
                          None if self.tokens is None else self.tokens[idx], None if self.masks is None else self.masks[idx],
                          self.label_names, self.mask_labels, None if self.texts is None else [self.texts[i] for i in idx_list])


Featurize = Callable[[torch.Tensor], dict[str, torch.Tensor]]  # views (B, C, ...) -> {reading: (B, ...)}


def encoder_readings(encoder: nn.Module, readings: tuple[str, ...]) -> Featurize:
    """Readings of one forward of a frozen encoder (eval mode):

    - ``cls``, ``mean``: the pooled tokens (``Encoder.pool``);
    - ``last4``: the class tokens of the last 4 blocks, each through the final norm, concatenated (ViTs);
    - ``tokens``: the grid tokens, (B, *grid, D), for the dense probe.
    """
    blocks = getattr(encoder, "blocks", None)
    if "last4" in readings and (blocks is None or not hasattr(encoder, "norm")):
        raise ValueError(f"reading 'last4' needs a ViT (blocks and a final norm); {type(encoder).__name__} has none")

    def featurize(x: torch.Tensor) -> dict[str, torch.Tensor]:
        captured: list[torch.Tensor] = []
        hooks = []
        if "last4" in readings:
            for block in list(blocks)[-LAST_BLOCKS:]:
                hooks.append(block.register_forward_hook(lambda _m, _i, out: captured.append(out[:, 0])))
        try:
            with eval_mode(encoder):
                tokens = encoder.forward_features(x)
        finally:
            for h in hooks:
                h.remove()
        out = {r: encoder.pool(tokens, r) for r in readings if r in ("cls", "mean", "cls+mean")}
        if "last4" in readings:
            out["last4"] = torch.cat([encoder.norm(c) for c in captured], dim=1)
        if "tokens" in readings:
            grid = tuple(encoder.grid_size(x.shape[2:]))
            out["tokens"] = tokens[:, encoder.num_prefix_tokens:].reshape(x.shape[0], *grid, -1).half()
        return out
    return featurize


def pixel_readings(grid: tuple[int, ...], patch: tuple[int, ...] | None = None) -> Featurize:
    """The raw-pixel baseline: ``pixels``, the view averaged down to ``grid`` and flattened; with ``patch``
    also ``tokens``, each grid cell's pixels as its token (the dense probe's baseline)."""
    pool = {2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}[len(grid)]

    def featurize(x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = x.float()
        out = {"pixels": pool(x, tuple(grid)).flatten(1)}
        if patch is not None:
            B, C, dims = x.shape[0], x.shape[1], len(grid)
            shape = [B, C] + [v for g, p in zip(grid, patch) for v in (g, p)]
            cells = x[(slice(None), slice(None), *(slice(0, g * p) for g, p in zip(grid, patch)))].reshape(shape)
            # (B, C, g0, p0, g1, p1, ...) -> (B, g0, g1, ..., C, p0, p1, ...)
            perm = [0] + [2 + 2 * i for i in range(dims)] + [1] + [3 + 2 * i for i in range(dims)]
            out["tokens"] = cells.permute(perm).reshape(B, *grid, -1).half()
        return out
    return featurize


# --- streaming --------------------------------------------------------------------------------------------
def _iter_samples(spec: str | list[str]) -> Iterator[dict]:
    urls = expand_shards(spec)
    dataset = wds.WebDataset(urls, shardshuffle=False, nodesplitter=None, workersplitter=None, empty_check=False)
    for raw in dataset:
        yield decode_sample(raw)


def _label(sample: dict) -> torch.Tensor:
    meta = sample["meta"] or {}
    if meta.get("labels") is not None:  # multi-label: a multi-hot vector of findings
        return torch.tensor([float(v) for v in meta["labels"]], dtype=torch.float32)
    if sample["label"] is None:
        raise DataError(f"{sample['__url__']}: sample {sample['__key__']!r} has no label "
                         "(evaluation needs labelled shards: a .cls member or meta 'labels')")
    return torch.tensor(int(sample["label"]))


def mask_label_map(names, sample: dict) -> dict[str, int]:
    """meta 'mask_labels' as {name: value}: a list names value i by its i-th entry (the codec's form),
    a mapping gives the values."""
    if not names:
        return {}
    if isinstance(names, (list, tuple)):
        return {str(n): i for i, n in enumerate(names)}
    if isinstance(names, dict) and all(isinstance(v, int) for v in names.values()):
        return {str(k): v for k, v in names.items()}
    raise ValueError(f"{sample['__url__']}: sample {sample['__key__']!r}: meta 'mask_labels' must be a list of names "
                     f"(value i = entry i) or a {{name: value}} mapping, got {names!r}")


def _world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@torch.no_grad()
def stream_features(featurize: Featurize, spec: str | list[str], view: Callable[[dict], torch.Tensor], *,
                    batch_size: int, device: torch.device = torch.device("cpu"), dtype: torch.dtype = torch.float32,
                    mask_view: Callable[[dict], torch.Tensor] | None = None, texts: bool = False) -> FeatureSet:
    """``featurize`` over every sample of ``spec``, ``batch_size`` images at a time, shared by the ranks
    (with ``mask_view``: each sample's mask through it; with ``texts``: each sample's report)."""
    rank, world = _world()
    stream = (s for i, s in enumerate(_iter_samples(spec)) if i % world == rank)
    rows: dict[str, list[torch.Tensor]] = {}
    labels, keys, groups, masks, reports = [], [], [], [], []
    names: dict[int, str] = {}
    mask_labels: dict[str, int] = {}
    last_x = None
    while True:
        chunk = [s for _, s in zip(range(batch_size), stream)]
        more = torch.tensor([len(chunk)])
        if world > 1:  # everyone forwards while anyone has samples left
            dist.all_reduce(more, op=dist.ReduceOp.MAX)
        if int(more) == 0:
            break
        if chunk:
            last_x = torch.stack([view(s) for s in chunk])
        elif last_x is None:  # this rank never had a sample: it still has to take part
            raise ValueError(f"{spec!r} has fewer samples than ranks ({world}); evaluate on fewer ranks")
        out = featurize(last_x.to(device=device, dtype=dtype))
        if not chunk:
            continue
        for name, t in out.items():
            rows.setdefault(name, []).append(t.cpu() if name == "tokens" else t.float().cpu())
        for s in chunk:
            labels.append(_label(s))
            keys.append(s["__key__"])
            meta = s["meta"] or {}
            groups.append(meta.get("patient"))
            if texts:
                reports.append((s["text"] or "").strip())
            if s["label"] is not None and meta.get("label_name"):
                names.setdefault(int(s["label"]), str(meta["label_name"]))
            if mask_view is not None:
                if s["mask"] is None:
                    raise ValueError(f"{s['__url__']}: sample {s['__key__']!r} has no mask (seg.npy); "
                                     "the dense probe needs masks on every sample")
                masks.append(mask_view(s))
                mask_labels = mask_labels or mask_label_map(meta.get("mask_labels"), s)
    part = {"rows": {n: torch.cat(t) for n, t in rows.items()}, "labels": labels, "keys": keys, "groups": groups,
            "masks": masks, "names": names, "mask_labels": mask_labels, "texts": reports}
    parts = [part]
    if world > 1:
        parts = [None] * world
        dist.all_gather_object(parts, part)
    return _merge(parts, spec)


def _merge(parts: list[dict], spec) -> FeatureSet:
    """Rank r's j-th row is sample j * world + r: interleave back to shard order."""
    world = len(parts)
    total = sum(len(p["keys"]) for p in parts)
    if total == 0:
        raise ValueError(f"no samples in {spec!r}")
    order = [(j, r) for j in range(max(len(p["keys"]) for p in parts)) for r in range(world) if j < len(parts[r]["keys"])]
    pick = lambda seq_of: [parts[r][seq_of][j] for j, r in order]  # noqa: E731
    names = {k: v for p in parts for k, v in p["names"].items()}
    labels = pick("labels")
    if len({tuple(t.shape) for t in labels}) > 1:
        raise ValueError(f"{spec!r}: samples disagree on the number of labels (meta 'labels')")
    features, tokens = {}, None
    for name in parts[0]["rows"]:
        stacked = [parts[r]["rows"][name][j] for j, r in order]
        if name == "tokens":
            tokens = torch.stack(stacked)
        else:
            features[name] = torch.stack(stacked)
    groups = pick("groups")
    masks = pick("masks") if parts[0]["masks"] else []
    return FeatureSet(features, torch.stack(labels), pick("keys"),
                      groups if all(g is not None for g in groups) else None, tokens,
                      torch.stack(masks) if masks else None,
                      [names.get(c, str(c)) for c in range(max(names) + 1)] if names else [],
                      next((p["mask_labels"] for p in parts if p["mask_labels"]), {}),
                      pick("texts") if parts[0]["texts"] else None)


# --- the cache --------------------------------------------------------------------------------------------
def weights_digest(module: nn.Module) -> str:
    """sha256 of a module's parameters and buffers (names, shapes, dtypes, bytes)."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def data_digest(spec: str | list[str]) -> str:
    """sha256 of each shard's resolved path, size and modification time."""
    h = hashlib.sha256()
    for url in expand_shards(spec):
        st = os.stat(url)
        h.update(f"{os.path.realpath(url)}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def default_cache_dir() -> Path:
    return cache_root() / "features"


def cached_features(encoder_key: str, spec: str | list[str], view_key: dict, extract: Callable[[], FeatureSet],
                    cache_dir: Path | None) -> FeatureSet:
    """``extract()``, or its cached result for the same encoder, data and view; ``cache_dir`` None: no cache.

    Rank 0 writes (atomically: a reader never sees half a file); every rank reads.
    """
    if cache_dir is None:
        return extract()
    key = hashlib.sha256(json.dumps({"v": CACHE_VERSION, "encoder": encoder_key, "data": data_digest(spec),
                                     "view": view_key}, sort_keys=True).encode()).hexdigest()[:24]
    path = Path(cache_dir) / f"{key}.pt"
    if path.is_file():
        try:
            return FeatureSet(**torch.load(path, weights_only=False))
        except Exception:  # a damaged cache file is only a miss
            pass
    result = extract()
    if _world()[0] == 0:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
            os.close(fd)
            torch.save(result.__dict__, tmp)
            os.replace(tmp, path)
        except OSError:  # a read-only or full cache costs only the reuse
            pass
    return result
