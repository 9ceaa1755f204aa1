"""DINO, iBOT and KoLeo losses against loop references and hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch

from pretrain.losses.dino_loss import dino_loss
from pretrain.losses.ibot_loss import ibot_loss
from pretrain.losses.koleo_loss import koleo_loss


def _log_softmax_row(row: list[float], temperature: float) -> list[float]:
    scaled = [value / temperature for value in row]
    log_normaliser = math.log(sum(math.exp(value) for value in scaled))
    return [value - log_normaliser for value in scaled]


def _cross_entropy(target: list[float], logits: list[float], temperature: float) -> float:
    return -sum(q * p for q, p in zip(target, _log_softmax_row(logits, temperature)))


# ---------------------------------------------------------------- DINO


def _reference_dino(student: list[torch.Tensor], teacher: list[torch.Tensor], temperature: float) -> float:
    total, pairs = 0.0, 0
    for s, student_crop in enumerate(student):
        for t, teacher_crop in enumerate(teacher):
            if s == t:
                continue
            rows = [
                _cross_entropy(teacher_crop[b].tolist(), student_crop[b].tolist(), temperature)
                for b in range(student_crop.shape[0])
            ]
            total += sum(rows) / len(rows)
            pairs += 1
    return total / pairs


def test_dino_loss_matches_loop_reference():
    torch.manual_seed(0)
    student = [torch.randn(3, 5, dtype=torch.float64) for _ in range(4)]
    teacher = [torch.softmax(torch.randn(3, 5, dtype=torch.float64), dim=-1) for _ in range(2)]
    expected = _reference_dino(student, teacher, temperature=0.1)
    result = dino_loss([s.float() for s in student], [t.float() for t in teacher], 0.1)
    assert result.dtype == torch.float32
    assert result.item() == pytest.approx(expected, rel=1e-5)

    result_bf16 = dino_loss([s.to(torch.bfloat16) for s in student], [t.to(torch.bfloat16) for t in teacher], 0.1)
    assert result_bf16.dtype == torch.float32
    assert result_bf16.item() == pytest.approx(expected, rel=2e-2)


def test_dino_loss_excludes_same_crop_pairs():
    torch.manual_seed(1)
    temperature, batch = 0.2, 2
    teacher_1 = torch.softmax(torch.randn(batch, 4), dim=-1)
    student_1 = torch.randn(batch, 4)
    grads = []
    for teacher_0 in (torch.softmax(torch.randn(batch, 4), dim=-1), torch.softmax(torch.randn(batch, 4), dim=-1)):
        student_0 = torch.randn(batch, 4, generator=torch.Generator().manual_seed(7)).requires_grad_(True)
        dino_loss([student_0, student_1], [teacher_0, teacher_1], temperature).backward()
        grads.append(student_0.grad)
    # Student crop 0 is only paired with teacher crop 1: its gradient ignores teacher crop 0.
    torch.testing.assert_close(grads[0], grads[1])
    # d/dz of the one pair (0, 1), averaged over 2 pairs and the batch: (softmax(z / T) - q_1) / (T * B * 2).
    student_0 = torch.randn(batch, 4, generator=torch.Generator().manual_seed(7))
    expected = (torch.softmax(student_0 / temperature, dim=-1) - teacher_1) / (temperature * batch * 2)
    torch.testing.assert_close(grads[0], expected)


def test_dino_loss_rejects_bad_input():
    one = torch.randn(2, 3)
    with pytest.raises(ValueError, match="at least 2 crops"):
        dino_loss([one], [torch.softmax(one, -1)], 0.1)
    with pytest.raises(ValueError, match="student crop 1 has shape"):
        dino_loss([one, torch.randn(2, 4)], [torch.softmax(one, -1)], 0.1)
    with pytest.raises(ValueError, match="teacher crops"):
        dino_loss([one, one], [one, one, one], 0.1)


# ---------------------------------------------------------------- iBOT


def test_ibot_loss_matches_per_image_reference():
    torch.manual_seed(2)
    index = torch.tensor([0, 2, 2, 0, 2, 2])
    student = torch.randn(6, 5, dtype=torch.float64)
    teacher = torch.softmax(torch.randn(6, 5, dtype=torch.float64), dim=-1)
    per_image: dict[int, list[float]] = {}
    for m in range(6):
        ce = _cross_entropy(teacher[m].tolist(), student[m].tolist(), 0.1)
        per_image.setdefault(int(index[m]), []).append(ce)
    # Image 1 has no masked patch and does not count in the average.
    expected = sum(sum(v) / len(v) for v in per_image.values()) / len(per_image)
    result = ibot_loss(student.float(), teacher.float(), index, batch_size=3, student_temp=0.1)
    assert result.dtype == torch.float32
    assert result.item() == pytest.approx(expected, rel=1e-5)


def test_ibot_loss_weights_images_not_patches():
    prototypes = 4
    target = torch.tensor([1.0, 0.0, 0.0, 0.0])
    confident = torch.tensor([5.0, 0.0, 0.0, 0.0])
    unsure = torch.zeros(prototypes)
    # Image 0: one well-predicted patch; image 1: ten badly predicted patches.
    student = torch.stack([confident] + [unsure] * 10)
    teacher = target.expand(11, prototypes)
    index = torch.tensor([0] + [1] * 10)
    ce_confident = _cross_entropy(target.tolist(), confident.tolist(), 1.0)
    ce_unsure = math.log(prototypes)
    result = ibot_loss(student, teacher, index, batch_size=2, student_temp=1.0)
    assert result.item() == pytest.approx((ce_confident + ce_unsure) / 2, rel=1e-6)


def test_ibot_loss_empty_mask_is_connected_zero():
    student = torch.randn(0, 7, requires_grad=True)
    result = ibot_loss(student, torch.zeros(0, 7), torch.zeros(0, dtype=torch.long), batch_size=4, student_temp=0.1)
    assert result.item() == 0.0 and result.requires_grad
    result.backward()
    assert student.grad is not None and student.grad.shape == (0, 7)


def test_ibot_loss_rejects_bad_shapes():
    with pytest.raises(ValueError, match="same shape"):
        ibot_loss(torch.randn(3, 4), torch.randn(3, 5), torch.zeros(3, dtype=torch.long), 1, 0.1)
    with pytest.raises(ValueError, match="sample_index_M"):
        ibot_loss(torch.randn(3, 4), torch.randn(3, 4), torch.zeros(2, dtype=torch.long), 1, 0.1)


# ---------------------------------------------------------------- KoLeo


def test_koleo_hand_case_on_the_unit_circle():
    eps = 1e-8
    angles = [0.0, 0.4, 1.2]
    # Different norms: KoLeo normalises first.
    x = torch.tensor([[r * math.cos(a), r * math.sin(a)] for r, a in zip([2.0, 0.5, 7.0], angles)])
    chord = [2 * math.sin(0.4 / 2), 2 * math.sin(0.4 / 2), 2 * math.sin(0.8 / 2)]
    expected = -sum(math.log(d + eps) for d in chord) / 3
    assert koleo_loss(x, eps=eps).item() == pytest.approx(expected, rel=1e-5)


def test_koleo_matches_brute_force_nearest_neighbour():
    torch.manual_seed(3)
    x = torch.randn(9, 4, dtype=torch.float64)
    unit = [row / row.norm() for row in x]
    expected = 0.0
    for i in range(9):
        nearest = min(float((unit[i] - unit[j]).norm()) for j in range(9) if j != i)
        expected -= math.log(nearest + 1e-8) / 9
    assert koleo_loss(x.float()).item() == pytest.approx(expected, rel=1e-5)


def test_koleo_single_sample_is_connected_zero():
    x = torch.randn(1, 8, requires_grad=True)
    result = koleo_loss(x)
    assert result.item() == 0.0 and result.requires_grad
    result.backward()
    torch.testing.assert_close(x.grad, torch.zeros(1, 8))


def test_koleo_duplicates_and_bf16_are_finite():
    eps = 1e-8
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 3.0]], requires_grad=True)
    result = koleo_loss(x, eps=eps)
    expected = -(2 * math.log(eps) + math.log(math.sqrt(2) + eps)) / 3
    assert result.item() == pytest.approx(expected, rel=1e-5)
    result.backward()
    assert torch.isfinite(x.grad).all()

    torch.manual_seed(4)
    features = torch.randn(16, 32)
    result_bf16 = koleo_loss(features.to(torch.bfloat16))
    assert result_bf16.dtype == torch.float32 and torch.isfinite(result_bf16)
    assert result_bf16.item() == pytest.approx(koleo_loss(features).item(), rel=2e-2)
