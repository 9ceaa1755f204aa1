"""DINOHead: shapes, cosine-similarity logits, init, and the frozen last layer."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pretrain.models.heads import DINOHead


@pytest.mark.parametrize("nlayers", [1, 2, 3])
def test_shapes_and_layer_count(nlayers):
    head = DINOHead(in_dim=12, out_dim=40, hidden_dim=24, bottleneck_dim=8, nlayers=nlayers)
    linears = [m for m in head.mlp if isinstance(m, nn.Linear)]
    assert len(linears) == nlayers
    assert linears[0].in_features == 12 and linears[-1].out_features == 8
    assert head.last_layer_v.shape == (40, 8)
    assert head(torch.randn(5, 12)).shape == (5, 40)


def test_logits_are_cosine_similarities_and_ignore_v_scale():
    torch.manual_seed(0)
    head = DINOHead(in_dim=6, out_dim=10, hidden_dim=16, bottleneck_dim=4, nlayers=2)
    x = torch.randn(3, 6)
    logits = head(x)
    bottleneck = head.mlp(x)
    expected = torch.stack([
        torch.stack([F.cosine_similarity(bottleneck[n], head.last_layer_v[k], dim=0) for k in range(10)])
        for n in range(3)
    ])
    torch.testing.assert_close(logits, expected)
    assert logits.abs().max() <= 1.0 + 1e-6
    with torch.no_grad():
        head.last_layer_v.mul_(5.0)
    torch.testing.assert_close(head(x), logits)


def test_init():
    torch.manual_seed(1)
    head = DINOHead(in_dim=64, out_dim=256, hidden_dim=128, bottleneck_dim=64, nlayers=3)
    for module in head.mlp:
        if isinstance(module, nn.Linear):
            assert torch.count_nonzero(module.bias) == 0
            assert module.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert head.last_layer_v.std().item() == pytest.approx(0.02, rel=0.1)
    with pytest.raises(ValueError, match="nlayers"):
        DINOHead(4, 4, nlayers=0)


def test_freeze_last_layer_stops_only_v_gradient():
    torch.manual_seed(2)
    head = DINOHead(in_dim=6, out_dim=10, hidden_dim=16, bottleneck_dim=4, nlayers=3)
    x = torch.randn(3, 6)
    head.freeze_last_layer = True
    head(x).pow(2).sum().backward()
    assert head.last_layer_v.grad is None or torch.count_nonzero(head.last_layer_v.grad) == 0
    assert all(p.grad is not None and torch.count_nonzero(p.grad) > 0 for p in head.mlp.parameters()
               if p.ndim == 2)

    head.zero_grad(set_to_none=True)
    head.freeze_last_layer = False
    head(x).pow(2).sum().backward()
    assert head.last_layer_v.grad is not None and torch.count_nonzero(head.last_layer_v.grad) > 0
