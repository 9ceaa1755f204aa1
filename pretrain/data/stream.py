"""The training data stream: sharded, shuffled, mixed, endless and exactly resumable.

Per slot (one DataLoader worker of one rank, see :mod:`pretrain.data.shardlists`)
the pipeline is::

    per source: shard order of the epoch -> this slot's shards -> tar members -> raw samples
    -> weighted choice among sources -> shuffle buffer of raw samples
    -> __seed__ -> decode_sample -> transform -> collate every batch_size samples

Every random choice comes from a ``random.Random`` seeded by :func:`derive_seed`,
never from a global RNG, so the raw pipeline of a slot is a pure function of
``(sources, seed, slot, slots)``. That is what makes resuming exact: the
DataLoader hands out batch ``j`` from worker ``j % W``, so after ``k`` batches
worker ``w`` has delivered ``len(range(w, k, W))`` of them. A stream built with
``start_batch=k`` gives DataLoader worker ``i`` the role (slot) of worker
``(i + k) % W``, because the new loader asks its worker 0 first for what is
batch ``k``. Each role re-runs its raw pipeline for the samples already
delivered, decoding them (cheap, and needed to skip undecodable samples the
same way) but not transforming or collating them, and then goes on.
Resume stays exact as long as ``transform`` is deterministic given the
sample and its ``__seed__`` and rejects no sample in the replayed range,
since rejections by the transform are not replayed (those of the decode
checks, :mod:`pretrain.data.sample_faults`, where nearly every bad sample
is caught, are).
"""
from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pretrain.data.codec import decode_sample
from pretrain.data.errors import DataError
from pretrain.data.sample_faults import BadSample, check_view, transform_failure
from pretrain.data.shardlists import (StreamSource, derive_seed, epoch_shard_order, expand_shards,
                                      read_tar_samples, resampled_shards, slot_shards)

__all__ = ["ShardStream", "StreamSource", "expand_shards", "make_loader", "read_tar_samples"]

logger = logging.getLogger(__name__)

POSITION_FORMAT = 1
# A run of this many rejected samples in a row means the data do not fit the transform
# (e.g. 3D volumes fed to a 2D model): fail loudly instead of spinning forever.
MAX_CONSECUTIVE_BAD = 1000
LOGGED_BAD_SAMPLES = 20  # per slot, each named in the log; after that every 100th


@dataclass
class _SlotState:
    """What one slot has seen so far; reported in every batch as ``"_stream"``."""

    slot: int
    corrupt: dict[str, str] = field(default_factory=dict)  # shard -> first reason
    bad_samples: int = 0
    bad_by_reason: dict[str, int] = field(default_factory=dict)
    good_samples: int = 0  # accepted, replayed ones included (counts match an uninterrupted stream's)
    last_error: str = ""

    def report_corrupt(self, url: str, reason: str) -> None:
        if url not in self.corrupt:
            self.corrupt[url] = reason
            logger.warning("corrupt shard %s: %s (slot %d skips the rest of it)", url, reason, self.slot)


class ShardStream(IterableDataset):
    """Endless stream of collated batches from webdataset shards; see the module docstring.

    Use with ``DataLoader(stream, batch_size=None, num_workers=num_workers)``
    (:func:`make_loader`). Shards are split over ``world_size * max(num_workers, 1)``
    slots; slot ``rank * W + worker_id`` reads ``shards[slot::slots]`` of each
    epoch's shuffled shard list. When a source has fewer shards than slots, every
    slot reads all of its shards and keeps the samples whose running index in the
    epoch is its slot modulo the slot count (correct, but each shard is read
    ``slots`` times; a warning says so once). With ``resample=True`` each slot
    instead draws shards with replacement, and epochs count ``len(urls) / slots``
    shards drawn. Each batch dict gets ``"_stream": {"slot", "epoch",
    "corrupt_shards", "bad_samples"}``, counted per slot since its start; ``epoch``
    is that of the batch's last sample; ``bad_by_reason``, ``good_samples`` and ``last_error`` say what was
    rejected and why. A data fault that stops the stream arrives as a last item ``{"_stream": {"fatal"}}``.
    Every new iterator starts again at ``start_batch``: build one loader iterator per run.
    """

    def __init__(self, sources: list[StreamSource], *, batch_size: int, transform: Callable[[dict], dict],
                 collate: Callable[[list[dict]], dict], seed: int = 0, rank: int = 0, world_size: int = 1,
                 shuffle_buffer: int = 1000, resample: bool = False, start_batch: int = 0,
                 num_workers: int = 0) -> None:
        super().__init__()
        if not sources:
            raise ValueError("ShardStream needs at least one source")
        for i, source in enumerate(sources):
            if not source.urls:
                raise ValueError(f"{self._label(i, source)} has no shards")
            if not (math.isfinite(source.weight) and source.weight >= 0):
                raise ValueError(f"{self._label(i, source)}: weight must be finite and >= 0, got {source.weight}")
        if sum(source.weight for source in sources) <= 0:
            raise ValueError("ShardStream: the source weights sum to zero")
        for name, value, low in (("batch_size", batch_size, 1), ("world_size", world_size, 1),
                                 ("shuffle_buffer", shuffle_buffer, 0), ("start_batch", start_batch, 0),
                                 ("num_workers", num_workers, 0)):
            if value < low:
                raise ValueError(f"ShardStream: {name} must be >= {low}, got {value}")
        if not 0 <= rank < world_size:
            raise ValueError(f"ShardStream: rank {rank} outside 0..{world_size - 1}")
        self.sources = [StreamSource(list(s.urls), float(s.weight), s.name) for s in sources]
        self.batch_size, self.transform, self.collate = batch_size, transform, collate
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.shuffle_buffer, self.resample = shuffle_buffer, resample
        self.start_batch, self.num_workers = start_batch, num_workers

    @staticmethod
    def _label(index: int, source: StreamSource) -> str:
        return f"source {index}" + (f" ({source.name!r})" if source.name else "")

    # ---- checkpointing -------------------------------------------------------------------------

    def position(self, batches_consumed: int) -> dict[str, Any]:
        """What the trainer checkpoints after taking ``batches_consumed`` batches in total
        from this rank's loader (counted from the stream's very start, resumes included)."""
        return {"format": POSITION_FORMAT, "batches": int(batches_consumed), "num_workers": self.num_workers,
                "world_size": self.world_size, "seed": self.seed, "batch_size": self.batch_size,
                "shuffle_buffer": self.shuffle_buffer, "resample": self.resample,
                "sources": [{"name": s.name, "shards": len(s.urls), "weight": s.weight} for s in self.sources]}

    @staticmethod
    def start_batch_from(position: dict[str, Any], *, num_workers: int, world_size: int, seed: int,
                         batch_size: int | None = None) -> int:
        """``start_batch`` that resumes a checkpointed stream exactly.

        Raises ValueError when the position is malformed or when the worker count,
        world size, seed (or ``batch_size``, if given) differ from the saved run:
        the slots would then read different data and the resume would not be exact.
        ``num_workers`` 0 and 1 are the same layout (one reader per rank).
        """
        if not isinstance(position, dict):
            raise ValueError(f"data position must be a dict, got {type(position).__name__}")
        missing = [k for k in ("format", "batches", "num_workers", "world_size", "seed", "batch_size")
                   if k not in position]
        if missing:
            raise ValueError(f"data position lacks {missing}; keys present: {sorted(position)}")
        if position["format"] != POSITION_FORMAT:
            raise ValueError(f"data position has format {position['format']}, this code reads {POSITION_FORMAT}")
        checks = [("num_workers", max(int(position["num_workers"]), 1), max(num_workers, 1)),
                  ("world_size", position["world_size"], world_size), ("seed", position["seed"], seed)]
        if batch_size is not None:
            checks.append(("batch_size", position["batch_size"], batch_size))
        for name, saved, now in checks:
            if saved != now:
                raise ValueError(f"cannot resume the data stream exactly: it was saved with {name}={saved}, "
                                 f"this run has {name}={now}; use the saved value, or start a new run "
                                 "(a fresh train.run_dir; the stream from start_batch=0)")
        batches = int(position["batches"])
        if batches < 0:
            raise ValueError(f"data position has a negative batch count {batches}")
        return batches

    # ---- iteration ----------------------------------------------------------------------------

    def __iter__(self) -> Iterator[dict[str, Any]]:
        workers = max(self.num_workers, 1)
        info = get_worker_info()
        running = 1 if info is None else info.num_workers
        if running != workers:
            where = "the main process" if info is None else f"a DataLoader with {running} workers"
            raise RuntimeError(f"ShardStream was built for num_workers={self.num_workers} but runs in {where}; "
                               f"pass the same count to make_loader")
        # The resumed loader's first batch comes from its worker 0 but must be batch start_batch,
        # which the original run got from worker start_batch % W: rotate the workers' roles.
        role = ((0 if info is None else info.id) + self.start_batch) % workers
        delivered = len(range(role, self.start_batch, workers))
        return self._reporting_data_errors(self.rank * workers + role, self.world_size * workers, delivered)

    def _reporting_data_errors(self, slot: int, slots: int, delivered_batches: int) -> Iterator[dict[str, Any]]:
        """The slot's batches; a :class:`DataError` ends them with a last item ``{"_stream": {"fatal": message}}``
        instead of a raise: from a DataLoader worker a raise would reach the trainer wrapped in the worker's
        traceback, and the message is the user's to read (the trainer raises it again, see ``train_step``)."""
        try:
            yield from self._slot_batches(slot, slots, delivered_batches)
        except DataError as e:
            yield {"_stream": {"slot": slot, "fatal": str(e)}}

    def _slot_batches(self, slot: int, slots: int, delivered_batches: int) -> Iterator[dict[str, Any]]:
        state = _SlotState(slot)
        to_skip = delivered_batches * self.batch_size
        if to_skip:
            logger.info("slot %d: replaying %d delivered samples to resume", slot, to_skip)
        batch: list[dict] = []
        bad_in_a_row = 0
        for raw in self._raw_samples(slot, slots, state):
            replaying = to_skip > 0
            sample = self._prepare(raw, state, transform=not replaying)
            if sample is None:
                bad_in_a_row += 1
                if bad_in_a_row >= MAX_CONSECUTIVE_BAD:
                    raise DataError(f"{bad_in_a_row} samples in a row were rejected (by reason: "
                                    f"{state.bad_by_reason}); the last: {state.last_error}")
                continue
            bad_in_a_row = 0
            state.good_samples += 1
            if replaying:
                to_skip -= 1
                continue
            batch.append(sample)
            if len(batch) == self.batch_size:
                out = self.collate(batch)
                if not isinstance(out, dict):
                    raise TypeError(f"collate must return a dict, got {type(out).__name__}")
                out["_stream"] = {"slot": slot, "epoch": raw["__epoch__"], "corrupt_shards": len(state.corrupt),
                                  "bad_samples": state.bad_samples, "bad_by_reason": dict(state.bad_by_reason),
                                  "good_samples": state.good_samples, "last_error": state.last_error}
                yield out
                batch = []

    def _prepare(self, raw: dict[str, Any], state: _SlotState, *, transform: bool) -> dict | None:
        """Decoded (and, unless replaying, transformed) sample, or None for a bad one (counted by reason)."""
        try:
            sample = decode_sample(raw)
        except BadSample as e:
            return self._reject(raw, state, e)
        if not transform:
            return sample
        sample.update(__seed__=raw["__seed__"], __epoch__=raw["__epoch__"], __source__=raw["__source__"])
        try:
            out = self.transform(sample)
            check_view(sample, out)
            return out
        except MemoryError:
            raise
        except Exception as e:  # any failure on one sample costs that sample, never the worker or its batch
            return self._reject(raw, state, transform_failure(sample, e))

    @staticmethod
    def _reject(raw: dict[str, Any], state: _SlotState, error: BadSample) -> None:
        state.bad_samples += 1
        state.bad_by_reason[error.reason] = state.bad_by_reason.get(error.reason, 0) + 1
        state.last_error = str(error)
        if state.bad_samples <= LOGGED_BAD_SAMPLES or state.bad_samples % 100 == 0:  # the message names key and shard
            logger.warning("skipping a sample (%s, %d so far in slot %d): %s", error.reason, state.bad_samples,
                           state.slot, error)
        if state.bad_samples == LOGGED_BAD_SAMPLES:
            logger.warning("slot %d: further rejected samples are counted (data/bad_samples/<reason>), and "
                           "only every 100th is named", state.slot)
        return None

    def _raw_samples(self, slot: int, slots: int, state: _SlotState) -> Iterator[dict[str, Any]]:
        streams = [self._source_samples(i, source, slot, slots, state) for i, source in enumerate(self.sources)]
        for n, raw in enumerate(self._shuffled(self._mixed(streams, slot), slot)):
            raw["__seed__"] = derive_seed(self.seed, "sample", slot, n)
            yield raw

    def _mixed(self, streams: list[Iterator[dict]], slot: int) -> Iterator[dict]:
        if len(streams) == 1:
            yield from streams[0]
            return
        rng = random.Random(derive_seed(self.seed, "mixture", slot))
        choices, weights = range(len(streams)), [s.weight for s in self.sources]
        while True:
            yield next(streams[rng.choices(choices, weights=weights)[0]])

    def _shuffled(self, samples: Iterator[dict], slot: int) -> Iterator[dict]:
        size = self.shuffle_buffer
        if size <= 1:
            yield from samples
            return
        rng = random.Random(derive_seed(self.seed, "buffer", slot))
        buffer: list[dict] = []
        for sample in samples:
            if len(buffer) < size:
                buffer.append(sample)
                continue
            j = rng.randrange(size)
            buffer[j], sample = sample, buffer[j]
            yield sample
        rng.shuffle(buffer)  # only reached by finite inputs; sources themselves never end
        yield from buffer

    # ---- per-source reading --------------------------------------------------------------------

    def _read(self, url: str, index: int, state: _SlotState) -> Iterator[dict[str, Any]]:
        name = self.sources[index].name or str(index)
        for raw in read_tar_samples(url, state.report_corrupt):
            raw["__source__"] = name
            yield raw

    def _source_samples(self, index: int, source: StreamSource, slot: int, slots: int,
                        state: _SlotState) -> Iterator[dict[str, Any]]:
        if self.resample:
            yield from self._resampled_samples(index, source, slot, slots, state)
            return
        epoch = 0
        while True:
            order = epoch_shard_order(source.urls, seed=self.seed, epoch=epoch, source_index=index)
            mine = slot_shards(order, slot=slot, slots=slots)
            produced = 0
            if mine is not None:
                for url in mine:
                    for raw in self._read(url, index, state):
                        raw["__epoch__"] = epoch
                        produced += 1
                        yield raw
                if produced == 0:
                    self._require_any_sample(index, source, state)
            else:
                if slot == 0 and epoch == 0:
                    logger.warning("%s has %d shards for %d slots (world_size x workers): every slot reads "
                                   "every shard and keeps every %d-th sample; write more, smaller shards",
                                   self._label(index, source), len(order), slots, slots)
                seen = 0
                for url in order:
                    for raw in self._read(url, index, state):
                        if seen % slots == slot:
                            raw["__epoch__"] = epoch
                            produced += 1
                            yield raw
                        seen += 1
                if produced == 0:
                    raise DataError(self._starved_message(index, source, state, seen, slots))
            epoch += 1

    def _resampled_samples(self, index: int, source: StreamSource, slot: int, slots: int,
                           state: _SlotState) -> Iterator[dict[str, Any]]:
        shards_per_epoch = max(1, math.ceil(len(source.urls) / slots))
        dry: set[str] = set()  # distinct shards drawn since the last sample
        for draws, url in enumerate(resampled_shards(source.urls, seed=self.seed, slot=slot, source_index=index)):
            produced = False
            for raw in self._read(url, index, state):
                raw["__epoch__"] = draws // shards_per_epoch
                produced = True
                yield raw
            if produced:
                dry.clear()
                continue
            dry.add(url)
            if len(dry) == len(set(source.urls)):
                raise DataError(self._starved_message(index, source, state, 0, slots))

    def _require_any_sample(self, index: int, source: StreamSource, state: _SlotState) -> None:
        """After an epoch in which this slot's shards gave nothing: go on only if some shard can."""
        for url in source.urls:
            if url in state.corrupt:
                continue
            samples = read_tar_samples(url, state.report_corrupt)
            found = next(samples, None) is not None
            samples.close()
            if found:
                return
        raise DataError(self._starved_message(index, source, state, 0, 1))

    def _starved_message(self, index: int, source: StreamSource, state: _SlotState, seen: int, slots: int) -> str:
        label = self._label(index, source)
        if seen:
            return (f"{label} has only {seen} samples per epoch, fewer than the {slots} slots "
                    f"(world_size x workers), so slot {state.slot} would wait forever; use fewer workers")
        broken = [url for url in source.urls if url in state.corrupt]
        example = f"; e.g. {broken[0]}: {state.corrupt[broken[0]]}" if broken else ""
        return (f"{label}: none of its {len(source.urls)} shards yields a sample "
                f"({len(broken)} unreadable, the rest empty){example}")


def make_loader(stream: ShardStream, num_workers: int, pin_memory: bool = False,
                prefetch_factor: int = 2) -> DataLoader:
    """A DataLoader over ``stream`` that keeps its batch order (required for exact resume)."""
    if num_workers != stream.num_workers:
        raise ValueError(f"make_loader(num_workers={num_workers}) but the stream was built with "
                         f"num_workers={stream.num_workers}; they define the shard split and must match")
    # Its own generator: the iterator draws its workers' base seed from it, and from the global RNG without one,
    # which a resumed run restores before the loader exists: drop path would then draw one number off from then on.
    generator = torch.Generator().manual_seed(derive_seed("loader", stream.seed, stream.rank))
    return DataLoader(stream, batch_size=None, num_workers=num_workers, pin_memory=pin_memory, generator=generator,
                      prefetch_factor=prefetch_factor if num_workers > 0 else None, in_order=True,
                      worker_init_fn=leave_stop_signals_to_the_trainer if num_workers > 0 else None)


def leave_stop_signals_to_the_trainer(worker_id: int) -> None:
    """A DataLoader worker ignores SIGINT and SIGTERM: Ctrl-C in a terminal and a scheduler's SIGTERM reach the
    whole process group, and a worker they killed would end the run with a crash instead of the trainer's
    checkpoint at the next step; the trainer shuts its workers down (and they exit with it if it dies)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
