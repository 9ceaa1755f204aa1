"""InfoNCE and SigLIP against references computed another way, and the distributed path against one process."""

from __future__ import annotations

import datetime
import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from pretrain.losses.gather import gather_with_grad, world_info
from pretrain.losses.infonce_loss import infonce_loss
from pretrain.losses.siglip_loss import siglip_loss, siglip_loss_dense

# Each image id occurs among the text ids and vice versa, with 1 to 3 positives per row,
# and positives that span the two halves (the two ranks of the distributed test).
MULTI_IMAGE_IDS = [0, 1, 1, 2, 3, 0, 4, 2]
MULTI_TEXT_IDS = [1, 0, 2, 2, 4, 3, 0, 1]


def _unit(batch: int, dim: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(batch, dim, generator=generator, dtype=torch.float64), dim=-1)


def _leaves(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.detach().clone().requires_grad_(True) for t in tensors]


def _value_and_grads(fn, *leaves: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    loss = fn(*leaves)
    return loss.detach(), list(torch.autograd.grad(loss, leaves))


def _assert_same(a, b, rtol: float = 1e-10, atol: float = 1e-12) -> None:
    loss_a, grads_a = a
    loss_b, grads_b = b
    torch.testing.assert_close(loss_a, loss_b, rtol=rtol, atol=atol)
    for grad_a, grad_b in zip(grads_a, grads_b, strict=True):
        torch.testing.assert_close(grad_a, grad_b, rtol=rtol, atol=atol)


# ---------------------------------------------------------------- InfoNCE


def _clip_cross_entropy(image, text, scale):
    """CLIP's loss as usually written: cross-entropy with integer labels on the diagonal, both ways."""
    logits = scale * image @ text.t()
    labels = torch.arange(image.shape[0])
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))


def _infonce_loop(image, text, scale, image_ids: list[int], text_ids: list[int]):
    """Per row: -mean over its positives of (logit - logsumexp(row)), rows averaged, both ways."""
    def direction(queries, keys, query_ids, key_ids):
        rows = []
        for i in range(queries.shape[0]):
            row = scale * (keys @ queries[i])
            log_normaliser = torch.logsumexp(row, dim=0)
            positives = [j for j in range(keys.shape[0]) if key_ids[j] == query_ids[i]]
            rows.append(-sum(row[j] - log_normaliser for j in positives) / len(positives))
        return sum(rows) / len(rows)

    return 0.5 * (direction(image, text, image_ids, text_ids) + direction(text, image, text_ids, image_ids))


def test_infonce_unique_ids_equals_clip_cross_entropy():
    image, text = _unit(6, 5, seed=0), _unit(6, 5, seed=1)
    scale = torch.tensor(7.5, dtype=torch.float64)
    ids = torch.tensor([10, 3, 7, 0, 4, 99])  # unique, not 0..B-1: only equality matters
    result = _value_and_grads(lambda i, t, s: infonce_loss(i, t, s, ids, ids), *_leaves(image, text, scale))
    expected = _value_and_grads(_clip_cross_entropy, *_leaves(image, text, scale))
    assert result[0].dtype == torch.float64
    _assert_same(result, expected)

    low = infonce_loss(image.to(torch.bfloat16), text.to(torch.bfloat16), scale.float(), ids, ids)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low.double(), expected[0], rtol=2e-2, atol=0)


def test_infonce_multi_positive_matches_loop_reference():
    image, text = _unit(8, 4, seed=2), _unit(8, 4, seed=3)
    scale = torch.tensor(5.0, dtype=torch.float64)
    image_ids, text_ids = torch.tensor(MULTI_IMAGE_IDS), torch.tensor(MULTI_TEXT_IDS)
    result = _value_and_grads(lambda i, t, s: infonce_loss(i, t, s, image_ids, text_ids), *_leaves(image, text, scale))
    expected = _value_and_grads(lambda i, t, s: _infonce_loop(i, t, s, MULTI_IMAGE_IDS, MULTI_TEXT_IDS),
                                *_leaves(image, text, scale))
    _assert_same(result, expected)
    # Several positives really change the loss: it is not the diagonal one.
    assert abs(result[0].item() - _clip_cross_entropy(image, text, scale).item()) > 1e-3


def test_infonce_rejects_row_without_positive():
    image, text = _unit(3, 4, seed=4), _unit(3, 4, seed=5)
    with pytest.raises(ValueError, match="image row 2 .* no positive"):
        infonce_loss(image, text, torch.tensor(1.0), torch.tensor([0, 1, 5]), torch.tensor([0, 1, 1]))


# ---------------------------------------------------------------- SigLIP


def _siglip_pair_loop(image, text, scale, bias, image_ids: list[int], text_ids: list[int]):
    total = 0.0
    for i in range(image.shape[0]):
        for j in range(text.shape[0]):
            sign = 1.0 if image_ids[i] == text_ids[j] else -1.0
            total = total + F.logsigmoid(sign * (scale * torch.dot(image[i], text[j]) + bias))
    return -total / image.shape[0]


@pytest.mark.parametrize("ids", [(list(range(6)), list(range(6))), (MULTI_IMAGE_IDS[:6], MULTI_TEXT_IDS[:6])],
                         ids=["unique", "multi"])
def test_siglip_dense_matches_pair_loop_and_chunked_matches_dense(ids):
    image_ids, text_ids = ids
    image, text = _unit(6, 5, seed=6), _unit(6, 5, seed=7)
    scale, bias = torch.tensor(10.0, dtype=torch.float64), torch.tensor(-4.0, dtype=torch.float64)
    image_ids_t, text_ids_t = torch.tensor(image_ids), torch.tensor(text_ids)
    leaves = (image, text, scale, bias)

    dense = _value_and_grads(lambda *a: siglip_loss_dense(*a, image_ids_t, text_ids_t), *_leaves(*leaves))
    loop = _value_and_grads(lambda *a: _siglip_pair_loop(*a, image_ids, text_ids), *_leaves(*leaves))
    chunked = _value_and_grads(lambda *a: siglip_loss(*a, image_ids_t, text_ids_t), *_leaves(*leaves))
    assert dense[0].dtype == torch.float64
    _assert_same(dense, loop)
    _assert_same(chunked, dense)

    low = siglip_loss(*(t.to(torch.bfloat16) for t in leaves), image_ids_t, text_ids_t)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low.double(), loop[0], rtol=2e-2, atol=0)


def test_gather_is_identity_without_distributed():
    if dist.is_initialized():
        pytest.skip("a process group is initialised in this process")
    x = torch.randn(3, 2, requires_grad=True)
    assert gather_with_grad(x) is x
    assert world_info() == (0, 1)


# ---------------------------------------------------------------- distributed

WORLD_SIZE = 2
CASES = [
    ("infonce", "unique"), ("infonce", "multi"),
    ("siglip", "unique"), ("siglip", "multi"),
]


def _batch() -> dict[str, torch.Tensor]:
    return {
        "image": _unit(8, 5, seed=8), "text": _unit(8, 5, seed=9),
        "scale": torch.tensor(6.0, dtype=torch.float64), "bias": torch.tensor(-3.0, dtype=torch.float64),
        "unique_image_ids": torch.arange(8), "unique_text_ids": torch.arange(8),
        "multi_image_ids": torch.tensor(MULTI_IMAGE_IDS), "multi_text_ids": torch.tensor(MULTI_TEXT_IDS),
    }


def _run_case(loss_name: str, ids_name: str, batch: dict[str, torch.Tensor], rows: slice, group=None):
    """(loss, [grad image, grad text, grad scale, grad bias]) on the rows ``rows`` of the batch."""
    image, text, scale, bias = _leaves(batch["image"][rows], batch["text"][rows], batch["scale"], batch["bias"])
    image_ids, text_ids = batch[f"{ids_name}_image_ids"][rows], batch[f"{ids_name}_text_ids"][rows]
    if loss_name == "infonce":
        loss = infonce_loss(image, text, scale, image_ids, text_ids, group=group)
    else:
        loss = siglip_loss(image, text, scale, bias, image_ids, text_ids, group=group)
    grads = torch.autograd.grad(loss, [image, text, scale, bias], allow_unused=True)
    grads = [torch.zeros_like(leaf) if g is None else g for g, leaf in zip(grads, [image, text, scale, bias])]
    return loss.detach(), grads


def _distributed_worker(rank: int, world_size: int, init_file: str, batch: dict, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=60))
    try:
        local = batch["image"].shape[0] // world_size
        rows = slice(rank * local, (rank + 1) * local)
        results = {case: _run_case(*case, batch, rows, group=dist.group.WORLD) for case in CASES}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_distributed_losses_match_single_process_on_concatenated_batch(tmp_path):
    batch = _batch()
    context = mp.spawn(_distributed_worker, args=(WORLD_SIZE, str(tmp_path / "pg_init"), batch, str(tmp_path)),
                       nprocs=WORLD_SIZE, join=False)
    deadline = time.monotonic() + 120
    while not context.join(timeout=1):  # raises if a rank failed, after killing the others
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("distributed loss ranks still running after 120 s; killed")

    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD_SIZE)]
    local = batch["image"].shape[0] // WORLD_SIZE
    for case in CASES:
        loss, (grad_image, grad_text, grad_scale, grad_bias) = _run_case(*case, batch, slice(None))
        rank_losses = torch.stack([r[case][0] for r in ranks])
        torch.testing.assert_close(rank_losses.mean(), loss, rtol=1e-10, atol=1e-10, msg=lambda m: f"{case}: {m}")
        for rank, result in enumerate(ranks):
            rows = slice(rank * local, (rank + 1) * local)
            for got, want, name in ((result[case][1][0], grad_image[rows], "image"),
                                    (result[case][1][1], grad_text[rows], "text")):
                torch.testing.assert_close(got / WORLD_SIZE, want, rtol=1e-10, atol=1e-10,
                                           msg=lambda m: f"{case} rank {rank} {name} grad: {m}")
        for index, want, name in ((2, grad_scale, "scale"), (3, grad_bias, "bias")):
            mean = torch.stack([r[case][1][index] for r in ranks]).mean()
            torch.testing.assert_close(mean, want, rtol=1e-10, atol=1e-10, msg=lambda m: f"{case} {name} grad: {m}")
