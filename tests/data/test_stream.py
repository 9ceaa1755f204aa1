"""The sharded, shuffled, resumable stream: coverage, determinism, resume, damage, mixture."""
from __future__ import annotations

import itertools
import json
import logging
from collections import Counter

import numpy as np
import pytest
import torch
import webdataset as wds

from pretrain.data.codec import encode_sample
from pretrain.data.shardlists import epoch_shard_order, expand_shards, slot_shards
from pretrain.data.stream import ShardStream, StreamSource, make_loader, read_tar_samples

SHARDS, PER_SHARD = 8, 13


def write_shards(folder, n_shards=SHARDS, per_shard=PER_SHARD, first_id=0, manifest=False) -> list[str]:
    """Shards whose sample ``i`` holds the value ``i`` everywhere, so a batch tells its ids."""
    folder.mkdir(parents=True, exist_ok=True)
    urls, entries = [], []
    for s in range(n_shards):
        path = folder / f"shard-{s:06d}.tar"
        with wds.TarWriter(str(path)) as writer:
            for j in range(per_shard):
                sid = first_id + s * per_shard + j
                writer.write(encode_sample(f"sample{sid:07d}", np.full((1, 2, 2), sid, np.int32), {"label": sid % 3}))
        urls.append(str(path))
        entries.append({"name": path.name, "samples": per_shard})
    if manifest:
        (folder / "manifest.json").write_text(json.dumps({"shards": entries[::-1]}))
    return urls


def transform(sample: dict) -> dict:
    return {"id": int(sample["image"].flat[0]), "epoch": sample["__epoch__"], "seed": sample["__seed__"],
            "source": sample["__source__"]}


def collate(samples: list[dict]) -> dict:
    return {key: [s[key] for s in samples] for key in samples[0]}


def make_stream(urls, **kw) -> ShardStream:
    sources = kw.pop("sources", None) or [StreamSource(urls)]
    kw.setdefault("batch_size", 5)
    kw.setdefault("shuffle_buffer", 0)
    return ShardStream(sources, transform=transform, collate=collate, **kw)


def take(iterable, n: int) -> list[dict]:
    return list(itertools.islice(iter(iterable), n))


def ids(batches) -> list[int]:
    return [i for b in batches for i in b["id"]]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[str]:
    return write_shards(tmp_path_factory.mktemp("shards"))


def test_expand_shards_forms(tmp_path):
    urls = write_shards(tmp_path / "a", n_shards=3, per_shard=1)
    assert expand_shards(str(tmp_path / "a")) == urls
    assert expand_shards(str(tmp_path / "a" / "shard-{000000..000002}.tar")) == urls
    assert expand_shards(str(tmp_path / "a" / "*.tar")) == urls
    assert expand_shards([urls[2], str(tmp_path / "a" / "shard-00000[01].tar")]) == [urls[2], urls[0], urls[1]]
    listed = write_shards(tmp_path / "m", n_shards=3, per_shard=1, manifest=True)
    assert expand_shards(str(tmp_path / "m")) == listed[::-1]  # the manifest's order wins over sorting
    (tmp_path / "empty").mkdir()
    for bad in [str(tmp_path / "empty"), str(tmp_path / "nope-*.tar"), str(tmp_path / "missing.tar"), []]:
        with pytest.raises(ValueError, match="empty list" if bad == [] else "nope|missing|empty"):
            expand_shards(bad)
    (tmp_path / "m" / "manifest.json").write_text(json.dumps({"files": []}))
    with pytest.raises(ValueError, match="manifest.json.*shards"):
        expand_shards(str(tmp_path / "m"))


def test_shard_split_is_a_partition_each_epoch():
    urls = [f"s{i}" for i in range(10)]
    for epoch in range(3):
        order = epoch_shard_order(urls, seed=1, epoch=epoch, source_index=0)
        parts = [slot_shards(order, slot=s, slots=4) for s in range(4)]
        assert sorted(u for p in parts for u in p) == urls
    assert epoch_shard_order(urls, seed=1, epoch=0, source_index=0) != epoch_shard_order(urls, seed=1, epoch=1,
                                                                                        source_index=0)
    assert slot_shards(urls[:3], slot=3, slots=4) is None


def test_every_sample_once_per_epoch_across_ranks_and_workers(shards):
    # 4 slots x 2 shards x 13 samples per epoch; 8 batches of 13 per worker flush epoch 0 from the buffer
    seen = []
    for rank in range(2):
        stream = make_stream(shards, batch_size=13, rank=rank, world_size=2, num_workers=2, shuffle_buffer=10)
        batches = take(make_loader(stream, num_workers=2), 16)
        seen += [i for b in batches for i, e in zip(b["id"], b["epoch"]) if e == 0]
        assert {b["_stream"]["slot"] for b in batches} == {2 * rank, 2 * rank + 1}
    assert sorted(seen) == list(range(SHARDS * PER_SHARD))


def test_fewer_shards_than_slots_keeps_every_slots_th_sample(tmp_path, caplog):
    urls = write_shards(tmp_path, n_shards=2, per_shard=6)
    with caplog.at_level(logging.WARNING):
        per_rank = [ids(take(make_stream(urls, batch_size=4, rank=r, world_size=3), 1)) for r in range(3)]
    assert sorted(i for part in per_rank for i in part) == list(range(12))
    assert "every slot reads every shard" in caplog.text


def test_shuffle_changes_order_and_is_reproducible(shards):
    plain = ids(take(make_stream(shards), 12))
    shuffled = ids(take(make_stream(shards, shuffle_buffer=30, seed=3), 12))
    assert shuffled == ids(take(make_stream(shards, shuffle_buffer=30, seed=3), 12))
    assert shuffled != ids(take(make_stream(shards, shuffle_buffer=30, seed=4), 12))
    assert shuffled != plain and len(set(shuffled)) == 60  # 90 reads < 104: all from epoch 0
    # without a buffer, samples stay in tar order within each shard
    assert all(b - a == 1 for a, b in zip(plain[:PER_SHARD], plain[1:PER_SHARD]))


def test_sample_seeds_are_distinct_and_deterministic(shards):
    first = take(make_stream(shards, shuffle_buffer=8), 6)
    seeds = [s for b in first for s in b["seed"]]
    assert len(set(seeds)) == len(seeds) and all(0 <= s < 2**63 for s in seeds)
    assert seeds == [s for b in take(make_stream(shards, shuffle_buffer=8), 6) for s in b["seed"]]
    assert seeds != [s for b in take(make_stream(shards, shuffle_buffer=8, seed=1), 6) for s in b["seed"]]


@pytest.mark.parametrize("case", ["plain", "buffer", "mixture", "resample", "workers"])
def test_resume_is_exact(shards, tmp_path, case):
    kw: dict = {"seed": 7}
    if case in ("buffer", "mixture", "resample", "workers"):
        kw["shuffle_buffer"] = 17
    if case == "mixture":
        other = write_shards(tmp_path / "b", n_shards=3, per_shard=7, first_id=1000)
        kw["sources"] = [StreamSource(shards, 0.7, "a"), StreamSource(other, 0.3, "b")]
    if case == "resample":
        kw["resample"] = True
    workers = 2 if case == "workers" else 0
    total, k = (12, 7) if workers else (40, 23)  # 40 batches of 5 cross the 104-sample epoch
    reference = take(make_loader(make_stream(shards, num_workers=workers, **kw), workers), total)
    resumed = take(make_loader(make_stream(shards, num_workers=workers, start_batch=k, **kw), workers), total - k)
    assert resumed == reference[k:]
    if case == "plain":
        assert max(e for b in reference for e in b["epoch"]) == 1
    if case == "mixture":
        assert {s for b in reference for s in b["source"]} == {"a", "b"}


def test_the_loader_leaves_the_global_rng_alone(shards):
    """A resumed run restores the global RNG before it builds its loader; drawing from it there would shift
    every later drop-path / dropout draw against the uninterrupted run."""
    torch.manual_seed(0)
    before = torch.get_rng_state()
    take(make_loader(make_stream(shards), 0), 2)
    assert torch.equal(torch.get_rng_state(), before)


def test_position_round_trip_and_refusals(shards):
    stream = make_stream(shards, num_workers=2, world_size=2, seed=5)
    pos = json.loads(json.dumps(stream.position(31)))  # survives a JSON checkpoint
    assert ShardStream.start_batch_from(pos, num_workers=2, world_size=2, seed=5, batch_size=5) == 31
    for kw, name in [({"num_workers": 3, "world_size": 2, "seed": 5}, "num_workers=2"),
                     ({"num_workers": 2, "world_size": 4, "seed": 5}, "world_size=2"),
                     ({"num_workers": 2, "world_size": 2, "seed": 6}, "seed=5"),
                     ({"num_workers": 2, "world_size": 2, "seed": 5, "batch_size": 8}, "batch_size=5")]:
        with pytest.raises(ValueError, match=name):
            ShardStream.start_batch_from(pos, **kw)
    with pytest.raises(ValueError, match="lacks.*seed"):
        ShardStream.start_batch_from({k: v for k, v in pos.items() if k != "seed"}, num_workers=2,
                                     world_size=2, seed=5)


def test_worker_count_mismatch_is_an_error(shards):
    stream = make_stream(shards, num_workers=2)
    with pytest.raises(ValueError, match="num_workers=2"):
        make_loader(stream, num_workers=1)
    with pytest.raises(RuntimeError, match="main process"):
        next(iter(stream))


def _truncate(path: str, keep: int) -> None:
    data = open(path, "rb").read()
    open(path, "wb").write(data[:keep])


def test_truncated_tar_keeps_the_samples_before_the_damage(tmp_path):
    (url,) = write_shards(tmp_path, n_shards=1, per_shard=5)
    # a sample is 3 members (cls, json, npy) of 2048 bytes: 3 header blocks + 1 data block; cut in sample 3's npy
    _truncate(url, 3 * 3 * 2048 + 2 * 2048 + 1536 + 50)
    damage = []
    keys = [raw["__key__"] for raw in read_tar_samples(url, lambda u, why: damage.append((u, why)))]
    assert keys == [f"sample{i:07d}" for i in range(3)]
    assert len(damage) == 1 and damage[0][0] == url and "ReadError" in damage[0][1]


def write_damaged_shards(folder) -> list[str]:
    """Shard 1 truncated after 2 samples, shard 2 not a tar, shard 4 with one undecodable sample."""
    urls = write_shards(folder, n_shards=4, per_shard=5)
    _truncate(urls[1], 2 * 3 * 2048 + 700)  # keeps samples 5 and 6 of shard 1
    open(urls[2], "wb").write(b"this is not a tar archive" * 50)
    bad = str(folder / "shard-000004.tar")
    with wds.TarWriter(bad) as writer:
        writer.write({"__key__": "broken", "npy": b"garbage", "json": b"{}"})
        writer.write(encode_sample("good", np.full((1, 2, 2), 99, np.int32), {}))
    return urls + [bad]


def test_corrupt_shards_and_samples_are_skipped_counted_and_reported(tmp_path, caplog):
    urls = write_damaged_shards(tmp_path)
    bad = urls[4]
    with caplog.at_level(logging.WARNING):
        batches = take(make_stream(urls, batch_size=1, shuffle_buffer=4), 60)
    epoch0 = sorted(i for b in batches for i, e in zip(b["id"], b["epoch"]) if e == 0)
    assert epoch0 == [0, 1, 2, 3, 4, 5, 6, 15, 16, 17, 18, 19, 99]
    counters = batches[-1]["_stream"]
    assert counters["corrupt_shards"] == 2 and counters["bad_samples"] >= 1
    assert f"corrupt shard {urls[1]}" in caplog.text and f"corrupt shard {urls[2]}" in caplog.text
    assert "'broken'" in caplog.text and bad in caplog.text
    assert caplog.text.count(f"corrupt shard {urls[2]}") == 1  # reported once although read every epoch


def test_resume_is_exact_across_damaged_shards_and_samples(tmp_path):
    urls = write_damaged_shards(tmp_path)
    reference = take(make_stream(urls, shuffle_buffer=5, seed=2), 12)
    resumed = take(make_stream(urls, shuffle_buffer=5, seed=2, start_batch=5), 7)  # replays over "broken"
    assert resumed == reference[5:]
    assert reference[4]["_stream"]["bad_samples"] >= 1 and reference[4]["_stream"]["corrupt_shards"] == 2


def test_transform_rejections_are_counted_and_skipped(shards, caplog):
    def picky(sample):
        if int(sample["image"].flat[0]) % 10 == 0:
            raise ValueError("too small to crop")
        return transform(sample)

    stream = ShardStream([StreamSource(shards)], batch_size=8, transform=picky, collate=collate, shuffle_buffer=0)
    with caplog.at_level(logging.WARNING):
        batches = take(stream, 6)
    assert all(i % 10 for i in ids(batches))
    assert batches[-1]["_stream"]["bad_samples"] >= 4 and "too small to crop" in caplog.text


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", ["split", "every_slot", "resample"])
def test_all_corrupt_source_raises_instead_of_hanging(tmp_path, mode):
    good = write_shards(tmp_path / "good", n_shards=2, per_shard=3)
    broken = []
    for i in range(4 if mode != "every_slot" else 1):
        path = tmp_path / f"bad-{i}.tar"
        path.write_bytes(b"\0garbage" * (i + 1))
        broken.append(str(path))
    sources = [StreamSource(good, 0.5, "good"), StreamSource(broken, 0.5, "scans")]
    stream = make_stream(None, sources=sources, resample=mode == "resample", world_size=2)
    assert_stops_with(take(stream, 50), "'scans'.*none of its")


def test_mixture_weights_are_respected(tmp_path):
    a = write_shards(tmp_path / "a", n_shards=2, per_shard=10)
    b = write_shards(tmp_path / "b", n_shards=2, per_shard=10, first_id=1000)
    stream = make_stream(None, sources=[StreamSource(a, 4.0, "a"), StreamSource(b, 1.0, "b")], batch_size=50)
    counts = Counter(s for batch in take(stream, 40) for s in batch["source"])
    assert abs(counts["a"] / 2000 - 0.8) < 0.03, counts


@pytest.mark.timeout(60)
def test_data_that_never_fits_the_transform_raises_instead_of_spinning(tmp_path, monkeypatch):
    import pretrain.data.stream as stream_module

    monkeypatch.setattr(stream_module, "MAX_CONSECUTIVE_BAD", 20)
    urls = write_shards(tmp_path, n_shards=2, per_shard=15)

    def reject(sample):
        raise ValueError(f"sample {sample['__key__']!r} is 2D; the model expects a 3D volume")

    stream = ShardStream([StreamSource(urls)], batch_size=4, transform=reject, collate=collate, seed=0)
    assert_stops_with(take(stream, 2), "20 samples in a row were rejected.*expects a 3D volume")


def assert_stops_with(batches: list[dict], pattern: str) -> None:
    """The stream ended on a data fault: its last item carries the message, and nothing follows it."""
    import re

    fatal = [i for i, b in enumerate(batches) if "fatal" in b.get("_stream", {})]
    assert fatal == [len(batches) - 1], [b.get("_stream") for b in batches]
    assert re.search(pattern, batches[-1]["_stream"]["fatal"]), batches[-1]["_stream"]["fatal"]
