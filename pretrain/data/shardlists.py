"""Which shards exist, which of them each stream slot reads, and how one shard is read.

A *slot* is one reader of the stream: one DataLoader worker of one rank,
``slot = rank * num_workers + worker_id`` out of ``world_size * num_workers``.
Everything random here comes from explicit seeds derived with
:func:`derive_seed`, so every rank and worker computes the same shard orders
without talking to the others, and a restarted run computes them again.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import random
import re
import stat
import tarfile
from dataclasses import dataclass
from typing import Any, Callable, Iterator
from urllib.parse import urlparse

from pretrain.data.errors import DataError

try:  # webdataset depends on braceexpand; keep a fallback for bare installs
    from braceexpand import braceexpand
except ImportError:  # pragma: no cover - exercised only without webdataset
    braceexpand = None

MANIFEST_NAME = "manifest.json"
_GLOB_CHARS = frozenset("*?[")
_META_MEMBER = re.compile(r"__[^/]*__($|/)")  # webdataset's per-shard metadata members


@dataclass
class StreamSource:
    """One data set in the stream: its shard paths and its share of the mixture."""

    urls: list[str]
    weight: float = 1.0
    name: str = ""


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from a tuple such as ``(seed, "shards", epoch, source)``.

    Hash-based, so seeds for neighbouring tuples are unrelated, the result is
    identical in every process, and it fits ``torch.manual_seed`` and numpy.
    """
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def has_scheme(url: str) -> bool:
    """True for ``pipe:``, ``http://``, ``s3://`` ... (not for local paths)."""
    scheme = urlparse(url).scheme
    return len(scheme) > 1  # one letter is a Windows drive, not a scheme


def _manifest_shards(folder: str) -> list[str] | None:
    path = os.path.join(folder, MANIFEST_NAME)
    if not os.path.exists(path):
        return None
    _check_regular(path, "shard manifest")
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
        entries = manifest["shards"]
        names = [entry["name"] for entry in entries]
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read shard manifest: {e}") from e
    except (KeyError, TypeError) as e:
        raise ValueError(f"{path}: expected {{'shards': [{{'name': ..., 'samples': ...}}, ...]}}, "
                         f"missing or malformed {e}") from None
    return [os.path.join(folder, str(name)) for name in names]


def _expand_one(spec: str) -> list[str]:
    if os.path.isdir(spec):
        listed = _manifest_shards(spec)
        return listed if listed is not None else sorted(glob.glob(os.path.join(spec, "*.tar")))
    if "{" in spec and "}" in spec:
        if braceexpand is None:
            raise ValueError(f"shard pattern {spec!r} needs the braceexpand package")
        return list(braceexpand(spec))
    if has_scheme(spec):
        return [spec]
    if _GLOB_CHARS & set(spec):
        return sorted(glob.glob(spec))
    return [spec] if os.path.exists(spec) else []


def _check_regular(path: str, what: str) -> None:
    """DataError unless an existing local ``path`` is a regular file: opening a FIFO would wait forever."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return  # missing or unreachable: the stream reports it as a damaged shard when it gets there
    if not stat.S_ISREG(mode):
        kind = ("a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "a folder"
                if stat.S_ISDIR(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a special file")
        raise DataError(f"{path}: this {what} is not a regular file ({kind}), so it is not read (a FIFO would "
                        "block training forever); remove it or name the shards without it")


def expand_shards(spec: str | list[str]) -> list[str]:
    """Shard paths (or URLs) named by ``spec``, in a fixed order.

    ``spec`` is a directory (the shard order of its ``manifest.json`` when
    present, else its ``*.tar`` files sorted), a brace pattern
    ``"dir/shard-{000000..000009}.tar"``, a glob, a single path or URL, or a
    list of any of these (concatenated in order).

    Raises:
        ValueError: naming the spec (or list element) that matched no shard.
        DataError: naming a local shard (or manifest) that exists but is not a regular file (a FIFO, socket,
            device or folder), which is never opened.
    """
    if isinstance(spec, (list, tuple)):
        if not spec:
            raise ValueError("shard spec is an empty list")
        return [url for item in spec for url in expand_shards(item)]
    if not isinstance(spec, str):
        raise TypeError(f"shard spec must be a string or a list of strings, got {type(spec).__name__}")
    urls = _expand_one(spec)
    if not urls:
        raise ValueError(f"shard spec {spec!r} matches no shard (no such file, empty folder or no glob match)")
    for url in urls:
        if not has_scheme(url):
            _check_regular(url, "shard")
    return urls


def epoch_shard_order(urls: list[str], *, seed: int, epoch: int, source_index: int) -> list[str]:
    """The shard order of one epoch: the same permutation on every rank and worker."""
    order = list(urls)
    random.Random(derive_seed(seed, "shards", epoch, source_index)).shuffle(order)
    return order


def slot_shards(order: list[str], *, slot: int, slots: int) -> list[str] | None:
    """The shards slot ``slot`` reads this epoch, or None when it must read them all.

    With at least as many shards as slots, slot ``s`` reads ``order[s::slots]``.
    With fewer shards than slots no split by shard is possible: every slot then
    reads every shard and keeps the samples whose running index in the epoch
    is ``s`` modulo ``slots`` (None tells the caller to do that).
    """
    if not 0 <= slot < slots:
        raise ValueError(f"slot {slot} outside 0..{slots - 1}")
    return order[slot::slots] if len(order) >= slots else None


def resampled_shards(urls: list[str], *, seed: int, slot: int, source_index: int) -> Iterator[str]:
    """An endless sequence of shards drawn with replacement, private to one slot."""
    rng = random.Random(derive_seed(seed, "resample", slot, source_index))
    while True:
        yield rng.choice(urls)


def _split_member(name: str) -> tuple[str | None, str]:
    """``"a/b.seg.npy"`` -> ``("a/b", "seg.npy")`` (webdataset's grouping rule)."""
    if _META_MEMBER.match(name):
        return None, ""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not dot or not stem:
        return None, ""
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def _open_shard(url: str):
    if has_scheme(url):  # pipe:, http(s):// ... go through webdataset's opener
        from webdataset.gopen import gopen
        return gopen(url, "rb")
    return open(url, "rb")


def read_tar_samples(url: str, on_damage: Callable[[str, str], None]) -> Iterator[dict[str, Any]]:
    """Raw samples ``{"__key__", "__url__", ext: bytes, ...}`` of one shard, in tar order.

    A shard that cannot be opened, is not a tar, or ends early calls
    ``on_damage(url, reason)`` once and ends; the samples read before the
    damage are kept. A member cut off mid-data drops its sample; a sample whose
    later members are missing entirely is passed on, and ``decode_sample``
    rejects it if a required member is absent. Uses ``tarfile`` streaming mode,
    which raises ``ReadError`` on a truncated header or member (a cut exactly on
    a member boundary is indistinguishable from a shorter shard).
    """
    group: dict[str, Any] | None = None
    reading: str | None = None
    try:
        stream = _open_shard(url)
    except Exception as e:  # noqa: BLE001 - any opener failure means the shard is unusable
        on_damage(url, f"cannot be opened ({type(e).__name__}: {e})")
        return
    try:
        with stream:
            tar = tarfile.open(fileobj=stream, mode="r|*")
            for info in tar:
                key, ext = _split_member(info.name) if info.isreg() else (None, "")
                if key is None:
                    continue
                if group is not None and key != group["__key__"]:
                    yield group  # a new key starts: the previous sample is complete
                    group = None
                if group is None:
                    group = {"__key__": key, "__url__": url}
                reading = key
                if ext in group:
                    raise tarfile.TarError(f"member {info.name!r} appears twice")
                group[ext] = tar.extractfile(info).read()
                reading = None
                tar.members = []  # streaming mode would otherwise keep every header in memory
    except Exception as e:  # noqa: BLE001 - tarfile, gzip, zlib and pipes raise many types
        on_damage(url, f"{type(e).__name__}: {e}")
        if reading is not None:
            group = None
    if group is not None:
        yield group
