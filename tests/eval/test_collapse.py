"""Collapse indicators against cases whose answer is known."""
from __future__ import annotations

import math

import torch

from pretrain.eval.collapse import collapse_stats, embedding_scalars


def test_identical_features_are_fully_collapsed():
    stats = collapse_stats(torch.ones(32, 16) * torch.randn(16))
    assert stats["std"] < 1e-6 and abs(stats["cosine"] - 1) < 1e-6 and stats["rank"] == 1.0


def test_isotropic_features_are_spread():
    x = torch.randn(256, 16, generator=torch.Generator().manual_seed(0))
    stats = collapse_stats(x)
    assert abs(stats["std"] - 1 / math.sqrt(16)) < 0.02
    assert abs(stats["cosine"]) < 0.02
    assert 14 < stats["rank"] <= 16


def test_effective_rank_counts_directions_and_a_common_offset_shows_in_cosine():
    g = torch.Generator().manual_seed(1)
    two = torch.randn(128, 2, generator=g) @ torch.randn(2, 32, generator=g)
    assert 1.5 < collapse_stats(two)["rank"] <= 2.0 + 1e-4
    offset = torch.randn(128, 32, generator=g) * 0.1 + 5.0  # all near one direction: a collapsed class token
    stats = collapse_stats(offset)
    assert stats["cosine"] > 0.99 and stats["rank"] > 20  # the spread left is still full-rank


def test_only_embedding_outputs_become_scalars():
    out = {"loss": torch.tensor(1.0), "_embed/teacher/cls": torch.randn(8, 4), "_pred": torch.randn(8, 4)}
    assert set(embedding_scalars(out)) == {"collapse/teacher/cls/std", "collapse/teacher/cls/cosine", "collapse/teacher/cls/rank"}


def test_prototype_entropies_tell_uniform_collapse_from_one_prototype_collapse():
    from pretrain.eval.collapse import distribution_stats
    K = 16
    uniform = distribution_stats(torch.full((8, K), 1 / K))
    assert abs(uniform["entropy"] - 1) < 1e-6 and abs(uniform["marginal_entropy"] - 1) < 1e-6
    one_prototype = distribution_stats(torch.nn.functional.one_hot(torch.full((8,), 3), K).float())
    assert one_prototype["entropy"] < 1e-6 and one_prototype["marginal_entropy"] < 1e-6
    spread = distribution_stats(torch.nn.functional.one_hot(torch.arange(32) % K, K).float())  # confident, balanced
    assert spread["entropy"] < 1e-6 and abs(spread["marginal_entropy"] - 1) < 1e-6
    half = distribution_stats(torch.tensor([[0.5, 0.5, 0.0, 0.0]] * 4))
    assert abs(half["entropy"] - 0.5) < 1e-6  # ln 2 / ln 4


def test_probability_outputs_become_entropy_scalars():
    out = {"_dist/teacher/cls_targets": torch.softmax(torch.randn(8, 5), -1), "_dist/bad": torch.ones(3)}
    assert set(embedding_scalars(out)) == {"collapse/teacher/cls_targets/entropy",
                                            "collapse/teacher/cls_targets/marginal_entropy"}
