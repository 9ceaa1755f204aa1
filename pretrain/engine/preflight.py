"""What a run checks before it writes anything or starts its first step: its shard sets exist and are whole,
a batch fits in memory, and (a warning) its images are not all smaller than the views made from them."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from pretrain.config import ConfigError, RunConfig
from pretrain.data.manifest import MANIFEST_NAME, read_manifest
from pretrain.data.stream import expand_shards

log = logging.getLogger(__name__)


def check_shard_sets(cfg: RunConfig) -> None:
    """Every shard set the config names resolves to shards: checked before a run writes anything, so a wrong
    path is one message naming its key, not a half-made run directory and a traceback. A shard folder whose
    conversion has not finished is refused (DataError) unless ``data.allow_incomplete_shards``."""
    if not cfg.data.train:
        raise ConfigError("config key 'data.train' is empty: give at least one shard set")
    named = [(f"data.train.{i}.shards" if len(cfg.data.train) > 1 else "data.train", s.shards)
             for i, s in enumerate(cfg.data.train)]
    ev = cfg.eval
    if bool(ev.knn_train) != bool(ev.knn_val):
        given, missing = ("knn_train", "knn_val") if ev.knn_train else ("knn_val", "knn_train")
        raise ConfigError(f"config key 'eval.{missing}' is empty while 'eval.{given}' is set: evaluation needs both "
                          "labelled shard sets (or neither, to train without evaluation)")
    named += [(f"eval.{k}", getattr(ev, k)) for k in ("knn_train", "knn_val") if getattr(ev, k)]
    from pretrain.data.errors import DataError
    from pretrain.data.manifest import unfinished_conversion

    for key, spec in named:
        try:
            expand_shards(spec)
        except DataError as e:  # shards that exist but cannot be read (a FIFO): the data's fault, not the key's
            raise DataError(f"config key {key!r}: {e}") from None
        except ValueError as e:
            raise ConfigError(f"config key {key!r}: {e}") from None
        # A half-written folder would train on part of the data with no word; glob/list entries are the user's.
        for folder in [s for s in ([spec] if isinstance(spec, str) else spec) if Path(s).is_dir()]:
            reason = unfinished_conversion(folder)
            if reason is None:
                continue
            if not cfg.data.allow_incomplete_shards:
                raise DataError(f"config key {key!r}: {folder} is an unfinished shard conversion ({reason}); "
                                "finish it by rerunning the same `pretrain shards write` command, or set "
                                "data.allow_incomplete_shards=true to train on the shards it holds so far")
            log.warning("%s: %s is an unfinished shard conversion (%s); training on the shards it holds so far "
                        "(data.allow_incomplete_shards)", key, folder, reason)


def check_batch_memory(cfg: RunConfig, available: int | None = None) -> None:
    """Refuse a batch size whose batches in flight (each loader worker prefetches 2) cannot fit in memory, even
    counted as one float32 view per sample at the model's size: such a run grows until it is killed."""
    import psutil

    d, m = cfg.data, cfg.model
    per_sample = 4 * m.in_chans * int(np.prod(m.img_size_tuple()))
    in_flight = (2 * max(d.num_workers, 1) + 1) * d.batch_size * per_sample
    available = psutil.virtual_memory().available if available is None else available
    if in_flight > available / 2:
        raise ConfigError(f"config key 'data.batch_size': {d.batch_size} samples per batch need at least "
                          f"{in_flight / 2**30:.1f} GiB for the batches in flight ({d.num_workers} loader workers "
                          f"prefetching 2 each), more than half of the {available / 2**30:.1f} GiB available; "
                          "lower data.batch_size (and raise train.grad_accum for the same global batch)")


def upsampling_warnings(cfg: RunConfig, view_size: tuple[int, ...] | None) -> list[str]:
    """A warning for each training shard set whose largest image (from its manifest) is smaller than the view
    the objective makes from a whole image: every image would be upsampled, adding compute and no detail."""
    if view_size is None:
        return []
    out = []
    for source in cfg.data.train:
        spec = source.shards
        if not (isinstance(spec, str) and Path(spec, MANIFEST_NAME).is_file()):
            continue  # shard lists, patterns and URLs carry no manifest to ask
        try:
            largest = read_manifest(spec)["shape_max"].get(str(len(view_size)))
        except (ValueError, OSError):
            continue  # a damaged manifest is the stream's to report
        if largest and all(s < v for s, v in zip(largest, view_size)):
            factor = min(v / s for s, v in zip(largest, view_size))
            out.append(f"data.train {spec}: its images are at most {'x'.join(map(str, largest))}, smaller than the "
                       f"{'x'.join(map(str, view_size))} views this objective makes from a whole image, so every "
                       f"image is upsampled ({factor:.1f}x or more): lower model.img_size (DINO / LVM-Med: the "
                       "global and local crop sizes) to the data's size")
    return out
