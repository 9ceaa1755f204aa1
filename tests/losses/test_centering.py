"""Sinkhorn-Knopp and centering: hand-computed cases, numerics, and the distributed path."""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pretrain.losses.centering import RunningCenter, sinkhorn_knopp, softmax_center


def _reference_sinkhorn(logits: list[list[float]], temperature: float, iterations: int) -> list[list[float]]:
    """The exp-domain algorithm of SwAV / DINOv2 with explicit loops, in Python floats (float64)."""
    batch, prototypes = len(logits), len(logits[0])
    q = [[math.exp(logits[b][k] / temperature) for b in range(batch)] for k in range(prototypes)]
    total = sum(sum(row) for row in q)
    q = [[value / total for value in row] for row in q]
    for _ in range(iterations):
        for k in range(prototypes):
            row_sum = sum(q[k])
            q[k] = [value / row_sum / prototypes for value in q[k]]
        for b in range(batch):
            column_sum = sum(q[k][b] for k in range(prototypes))
            for k in range(prototypes):
                q[k][b] = q[k][b] / column_sum / batch
    return [[q[k][b] * batch for k in range(prototypes)] for b in range(batch)]


def test_sinkhorn_matches_loop_reference_on_hand_case():
    logits = [[0.2, -0.1, 0.5], [0.9, 0.3, -0.4]]
    for iterations in (1, 3, 7):
        expected = torch.tensor(_reference_sinkhorn(logits, 0.1, iterations), dtype=torch.float32)
        result = sinkhorn_knopp(torch.tensor(logits), temperature=0.1, iterations=iterations)
        torch.testing.assert_close(result, expected, rtol=1e-5, atol=1e-6)


def test_sinkhorn_marginals():
    torch.manual_seed(0)
    batch, prototypes = 16, 4
    logits = torch.randn(batch, prototypes)
    converged = sinkhorn_knopp(logits, temperature=0.5, iterations=50)
    torch.testing.assert_close(converged.sum(dim=1), torch.ones(batch), rtol=0, atol=1e-5)
    torch.testing.assert_close(converged.sum(dim=0), torch.full((prototypes,), batch / prototypes), rtol=0, atol=1e-3)

    few = sinkhorn_knopp(logits, temperature=0.5, iterations=3)
    torch.testing.assert_close(few.sum(dim=1), torch.ones(batch), rtol=0, atol=1e-5)
    torch.testing.assert_close(few.sum(dim=0), torch.full((prototypes,), batch / prototypes), rtol=0.25, atol=0)
    # The balancing is the point: the softmax alone is far from balanced on these logits.
    plain = torch.softmax(logits / 0.5, dim=1).sum(dim=0)
    assert (plain - batch / prototypes).abs().max() > (few.sum(dim=0) - batch / prototypes).abs().max()


def test_sinkhorn_is_float32_without_grad():
    logits = torch.randn(4, 5, requires_grad=True)
    result = sinkhorn_knopp(logits.to(torch.float16), temperature=0.1)
    assert result.dtype == torch.float32 and not result.requires_grad


def test_sinkhorn_single_sample_and_equal_logits_are_uniform():
    single = sinkhorn_knopp(torch.randn(1, 6), temperature=0.05)
    torch.testing.assert_close(single, torch.full((1, 6), 1 / 6))
    equal = sinkhorn_knopp(torch.full((4, 5), 3.0), temperature=0.04)
    torch.testing.assert_close(equal, torch.full((4, 5), 1 / 5))


def test_sinkhorn_huge_bf16_logits_stay_finite():
    torch.manual_seed(1)
    logits = (torch.randn(8, 16) * 1e4).to(torch.bfloat16)
    assert torch.isinf(torch.exp(logits.float() / 0.04)).any()
    result = sinkhorn_knopp(logits, temperature=0.04)
    assert torch.isfinite(result).all()
    torch.testing.assert_close(result.sum(dim=1), torch.ones(8), rtol=0, atol=1e-5)
    constant = sinkhorn_knopp(torch.full((3, 4), 1e4, dtype=torch.bfloat16), temperature=0.04)
    torch.testing.assert_close(constant, torch.full((3, 4), 0.25))


def test_sinkhorn_bf16_input_matches_float32_input():
    torch.manual_seed(2)
    logits = torch.randn(32, 10)
    result_fp32 = sinkhorn_knopp(logits, temperature=0.1)
    result_bf16 = sinkhorn_knopp(logits.to(torch.bfloat16), temperature=0.1)
    assert result_bf16.dtype == torch.float32
    # bf16 keeps 8 bits: logits / temperature move by up to ~|x| / 0.1 * 2**-9.
    torch.testing.assert_close(result_bf16, result_fp32, rtol=0.15, atol=1e-2)


def test_sinkhorn_rejects_bad_input():
    with pytest.raises(ValueError, match=r"\(B, K\)"):
        sinkhorn_knopp(torch.randn(2, 3, 4), temperature=0.1)
    with pytest.raises(ValueError, match="iterations"):
        sinkhorn_knopp(torch.randn(2, 3), temperature=0.1, iterations=0)


def test_softmax_center_hand_case():
    logits = torch.tensor([[1.0, 2.0, 0.0]], dtype=torch.bfloat16)
    center = torch.tensor([[0.5, 1.0, -1.0]])
    shifted = [(1.0 - 0.5) / 0.5, (2.0 - 1.0) / 0.5, (0.0 + 1.0) / 0.5]
    denominator = sum(math.exp(v) for v in shifted)
    expected = torch.tensor([[math.exp(v) / denominator for v in shifted]])
    result = softmax_center(logits, center, temperature=0.5)
    assert result.dtype == torch.float32
    torch.testing.assert_close(result, expected)


def test_running_center_closed_form_and_fp32_buffer():
    torch.manual_seed(3)
    momentum = 0.8
    module = RunningCenter(num_prototypes=5, momentum=momentum)
    batches = [torch.randn(4, 5) for _ in range(3)]
    for batch in batches:
        module.update(batch.to(torch.bfloat16))
    expected = torch.zeros(1, 5, dtype=torch.float64)
    for i, batch in enumerate(batches, start=1):
        expected += (1 - momentum) * momentum ** (len(batches) - i) * batch.to(torch.bfloat16).double().mean(0)
    torch.testing.assert_close(module.center.double(), expected, rtol=1e-5, atol=1e-6)

    before = module.center.clone()
    module.to(torch.bfloat16).half()
    assert module.center.dtype == torch.float32
    torch.testing.assert_close(module.center, before, rtol=0, atol=0)
    assert "center" in module.state_dict()

    logits = torch.randn(2, 5)
    torch.testing.assert_close(module.probabilities(logits, 0.1), softmax_center(logits, before, 0.1))
    with pytest.raises(ValueError, match="momentum"):
        RunningCenter(3, momentum=1.5)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _distributed_worker(rank: int, world_size: int, port: int, logits: torch.Tensor, split: list[int], out_dir: str):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        local = logits.split(split)[rank]
        targets = sinkhorn_knopp(local, temperature=0.1, iterations=3)
        center = RunningCenter(logits.shape[1], momentum=0.5)
        center.update(local)
        torch.save({"targets": targets, "center": center.center}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_sinkhorn_and_center_distributed_match_single_process(tmp_path):
    torch.manual_seed(4)
    logits = torch.randn(8, 6)
    # Unequal local batches: B_global must be the sum, not local B * world size.
    split = [5, 3]
    mp.spawn(_distributed_worker, args=(2, _free_port(), logits, split, str(tmp_path)), nprocs=2, join=True)

    expected_targets = sinkhorn_knopp(logits, temperature=0.1, iterations=3).split(split)
    expected_center = 0.5 * logits.mean(dim=0, keepdim=True)
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(result["targets"], expected_targets[rank], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(result["center"], expected_center, rtol=1e-5, atol=1e-6)
