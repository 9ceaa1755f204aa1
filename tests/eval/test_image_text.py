"""Zero-shot accuracy and Recall@K on hand-built embeddings whose answers are known."""
from __future__ import annotations

import torch

from pretrain.eval.image_text import class_embeddings, recall_at_k, zero_shot_scores


def test_zero_shot_on_embeddings_with_known_answers():
    classes = torch.eye(3)  # class c points along axis c
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2])
    images = classes[labels] + 0.1 * torch.tensor([[0, 1, 0]] * 8)
    images[3] = torch.tensor([0.0, 1.0, 0.1])  # a class-0 image nearest class 1: the one mistake
    got = zero_shot_scores(images, classes, labels)
    assert got["zeroshot"] == 7 / 8
    assert abs(got["zeroshot_balanced"] - (3 / 4 + 1 + 1) / 3) < 1e-9  # per-class recalls averaged


def test_class_embedding_is_the_normalised_mean_of_its_prompts():
    table = {"a": torch.tensor([1.0, 0.0]), "b": torch.tensor([0.0, 1.0]), "c": torch.tensor([1.0, 1.0])}

    def embed(texts):
        return torch.nn.functional.normalize(torch.stack([table[t] for t in texts]), dim=1)

    got = class_embeddings(embed, {"x": ["a", "b"], "y": ["c"]})
    torch.testing.assert_close(got, torch.full((2, 2), 2 ** -0.5))


def test_recall_at_k_counts_the_rank_of_each_positive():
    # text j sits at angle j; image i is closest to text perm[i], its own text ranks as below
    n = 12
    angles = torch.arange(n) * (torch.pi / n)
    texts = torch.stack([angles.cos(), angles.sin()], 1)
    shift = torch.tensor([0, 0, 0, 1, 1, 2, 0, 0, 3, 0, 5, 0])  # own text is the (shift+1)-th nearest-ish
    images = texts[(torch.arange(n) + shift) % n] + 1e-3 * texts
    got = recall_at_k(images, texts, ks=(1, 5, 10))
    sim = images @ texts.T
    ranks = (sim > sim.diag()[:, None]).sum(1)  # texts strictly more similar than the own one
    for k in (1, 5, 10):
        assert got[f"i2t_r{k}"] == float((ranks < k).float().mean())
    ranks_t = (sim.T > sim.diag()[:, None]).sum(1)
    assert got["t2i_r1"] == float((ranks_t < 1).float().mean())
    assert 0.0 < got["i2t_r1"] < got["i2t_r5"] <= got["i2t_r10"] < 1.0  # the case is not degenerate


def test_recall_with_several_positives_per_query():
    images = torch.eye(4)[[0, 1, 2, 3]]
    texts = torch.eye(4)[[1, 0, 3, 2]]
    assert recall_at_k(images, texts, ks=(1,))["i2t_r1"] == 0.0
    ids = torch.tensor([0, 0, 1, 1])  # image pairs {0,1} and {2,3} share their texts
    got = recall_at_k(images, texts, ks=(1,), image_ids=ids, text_ids=ids)
    assert got == {"i2t_r1": 1.0, "t2i_r1": 1.0}
