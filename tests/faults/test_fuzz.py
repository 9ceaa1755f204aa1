"""Fuzzed shard members and config values (hypothesis): whatever a shard or an override holds, the answer is a
sample rejected for a named reason or a config error naming the key, never another exception."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from pretrain.config import ConfigError, load_config
from pretrain.config.explain import walk
from pretrain.config.registry import objectives
from pretrain.data import sample_faults
from pretrain.data.stream import ShardStream, _SlotState
from tests.faults.test_sample_faults import mae_stream

REASONS = {v for k, v in vars(sample_faults).items() if k.isupper() and isinstance(v, str)}
FUZZ = settings(max_examples=300, deadline=None, derandomize=True,  # the same examples on every run (CI)
                 suppress_health_check=[HealthCheck.function_scoped_fixture])

dtypes = st.sampled_from(["uint8", "uint16", "int16", "int32", "int64", "float16", "float32", "float64", "bool",
                          "complex64"])
arrays = dtypes.flatmap(lambda dt: hnp.arrays(dt, hnp.array_shapes(min_dims=0, max_dims=5, min_side=0, max_side=6)))
json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                                       max_size=3), max_leaves=6)


def npy(array) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


@pytest.fixture(scope="module")
def stream(tmp_path_factory) -> ShardStream:
    from tests.faults.conftest import write_shard

    return mae_stream(write_shard(tmp_path_factory.mktemp("fuzz") / "s.tar", 1, {}))


def prepare(stream: ShardStream, members: dict) -> tuple[dict | None, _SlotState]:
    state = _SlotState(0)
    raw = {"__key__": "fuzzed", "__url__": "fuzz.tar", "__seed__": 0, "__epoch__": 0, "__source__": "0", **members}
    return stream._prepare(raw, state, transform=True), state


@FUZZ
@given(image=arrays, meta=json_values)
def test_any_array_and_metadata_give_a_finite_view_or_a_named_rejection(stream, image, meta):
    out, state = prepare(stream, {"npy": npy(image), "json": json.dumps(meta).encode()})
    if out is None:
        (reason,) = state.bad_by_reason
        assert reason in REASONS and "fuzzed" in state.last_error
        trainable = (isinstance(meta, dict) and image.ndim == 3 and 0 not in image.shape
                     and image.dtype.kind in "biuf" and bool(np.isfinite(image.astype(np.float64)).all()))
        # a 2D image of real, finite values with any sizes, extremes and dtype is trained on, never refused
        assert not trainable, state.last_error
    else:
        assert out["image"].shape == (1, 32, 32) and torch.isfinite(out["image"]).all()


@FUZZ
@given(members=st.dictionaries(st.sampled_from(["npy", "json", "seg.npy", "txt", "cls"]), st.binary(max_size=64),
                               max_size=5))
def test_any_member_bytes_give_a_named_rejection(stream, members):
    out, state = prepare(stream, members)
    if out is None:
        assert set(state.bad_by_reason) <= REASONS and "fuzzed" in state.last_error


NASTY = [float("nan"), float("inf"), -float("inf"), -1, 0, -0.0, 1e30, 10**30, "x", "", [], [None], {}, None, True,
         [-1, 0], [0.5, float("nan")], "1e9"]
LEAVES = sorted({(row["key"], name) for name in objectives() if name != "finetune"
                 for row in walk(load_config(None, [f"objective.name={name}"])) if not row["section"]})


def test_every_nasty_value_of_every_key_loads_or_is_a_config_error_naming_it():
    # exhaustive, not sampled: every (key, value) pair of every objective's config
    wrong = []
    for key, objective in LEAVES:
        for value in NASTY:
            try:
                load_config(None, [f"objective.name={objective}", f"{key}={json.dumps(value)}"])
            except ConfigError as e:
                if key.split(".")[-1] not in str(e):
                    wrong.append((objective, key, value, f"message does not name the key: {e}"))
            except Exception as e:  # noqa: BLE001 - the point: no other kind of error
                wrong.append((objective, key, value, f"{type(e).__name__}: {e}"))
    assert wrong == [], f"{len(wrong)} of {len(LEAVES) * len(NASTY)}: {wrong[:10]}"
