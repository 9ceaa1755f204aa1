"""Feature extraction shared by two gloo ranks gives every rank exactly what one process computes alone."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from pretrain.engine.distributed import free_port
from pretrain.eval.features import encoder_readings, stream_features
from tests.eval.test_features import _data, _vit, write_shard

N = 37  # odd: rank 0 has one sample more, and the last batches are ragged


def extract(spec: str):
    data = _data()
    return stream_features(encoder_readings(_vit(), ("cls", "mean", "tokens")), spec, data.view, batch_size=8,
                           mask_view=data.mask_view)


def _rank_main(spec: str, out: str) -> None:
    dist.init_process_group("gloo")
    try:
        fs = extract(spec)
        torch.save(fs.__dict__, Path(out) / f"rank{dist.get_rank()}.pt")
    finally:
        dist.destroy_process_group()


def test_two_ranks_equal_one(tmp_path):
    spec = write_shard(tmp_path / "s.tar", N, 0, patient_every=4)
    port = str(free_port())
    root = Path(__file__).resolve().parents[2]
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "OMP_NUM_THREADS": "1",
               "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        procs.append(subprocess.Popen([sys.executable, "-c", "import sys; from tests.eval.test_features_two_ranks "
                                       "import _rank_main; _rank_main(sys.argv[1], sys.argv[2])", spec, str(tmp_path)],
                                      env=env, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        logs = [p.communicate(timeout=240)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert all(p.returncode == 0 for p in procs), logs
    alone = extract(spec)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert got["keys"] == alone.keys == [f"s0_{i:04d}" for i in range(N)]
        assert got["groups"] == alone.groups and torch.equal(got["labels"], alone.labels)
        for name in ("cls", "mean"):
            torch.testing.assert_close(got["features"][name], alone.features[name], rtol=1e-5, atol=1e-5)  # other batch mates: other summation order
        torch.testing.assert_close(got["tokens"].float(), alone.tokens.float(), rtol=0, atol=1e-3)
        assert torch.equal(got["masks"], alone.masks)
