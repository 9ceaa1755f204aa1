"""Linear probe on cached, frozen features: multinomial logistic regression, hyper-parameters chosen honestly.

For each candidate feature set (e.g. class token, mean patch token, both) and
L2 strength ``wd`` of a grid, minimise

    mean_i CE(W z_i + b, y_i) + wd * ||W||^2,    z = (x - mu_train) / sd_train

with full-batch L-BFGS (the problem is strictly convex, so the optimum does
not depend on a learning rate or an epoch count; for a given machine and
thread count the result is deterministic). All weight decays of one feature
set train together as one batched problem. The choice is made on a held-out fifth of the *training*
set; the chosen (features, wd) is refitted on the whole training set and
scored once on the evaluation set, which never influences a choice.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

WEIGHT_DECAYS = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


@dataclass
class ProbeResult:
    accuracy: float  # on the evaluation set
    features: str  # the chosen feature set
    weight_decay: float  # the chosen L2 strength
    selection_accuracy: float  # on the held-out part of the training set, where the choice was made


def standardise(train: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    mean, std = train.mean(0), train.std(0).clamp_min(1e-6)
    return [(t - mean) / std for t in (train, *others)]


def fit_logistic(x_NF: torch.Tensor, y_N: torch.Tensor, num_classes: int, weight_decays, max_iter: int = 300,
                 *, multi_label: bool = False, class_weight: torch.Tensor | None = None):
    """(W (G, F, C), b (G, C)): one logistic regression per weight decay, fitted together.

    Single-label: multinomial (softmax cross-entropy), ``class_weight`` (C,) weighting each sample by its
    class (for imbalanced sets). Multi-label: ``y_N`` is (N, C) multi-hot, one binary logistic regression
    per label (mean binary cross-entropy over labels).
    """
    x = x_NF.double()
    wd = torch.tensor(list(weight_decays), dtype=torch.float64)
    G, (N, Fdim) = len(wd), x.shape
    W = torch.zeros(G, Fdim, num_classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(G, num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], lr=1, max_iter=max_iter, tolerance_grad=1e-9, tolerance_change=1e-12,
                            history_size=20, line_search_fn="strong_wolfe")
    if multi_label:
        targets = y_N.double()[None].expand(G, -1, -1)
    else:
        targets = y_N.repeat(G)
        weight = None if class_weight is None else class_weight.double()[y_N]
        weight = None if weight is None else weight / weight.mean()

    def closure():
        opt.zero_grad()
        logits = torch.einsum("nf,gfc->gnc", x, W) + b[:, None]
        if multi_label:
            data = F.binary_cross_entropy_with_logits(logits, targets, reduction="none").mean((1, 2))
        else:
            ce = F.cross_entropy(logits.reshape(G * N, num_classes), targets, reduction="none").view(G, N)
            data = (ce * weight).mean(1) if weight is not None else ce.mean(1)
        loss = (data + wd * W.pow(2).sum((1, 2))).sum()  # the problems are independent: their sum separates
        loss.backward()
        return loss

    opt.step(closure)
    return W.detach(), b.detach()


def logistic_scores(x_NF: torch.Tensor, W: torch.Tensor, b: torch.Tensor, multi_label: bool = False) -> torch.Tensor:
    """(G, N, C) probabilities: softmax over classes, or a sigmoid per label."""
    logits = torch.einsum("nf,gfc->gnc", x_NF.double(), W) + b[:, None]
    return logits.sigmoid() if multi_label else logits.softmax(-1)


def _accuracy(x_NF: torch.Tensor, y_N: torch.Tensor, W: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Accuracy per grid member, (G,)."""
    logits = torch.einsum("nf,gfc->gnc", x_NF.double(), W) + b[:, None]
    return (logits.argmax(-1) == y_N).double().mean(1)


def linear_probe(
    train: dict[str, torch.Tensor], y_train: torch.Tensor, test: dict[str, torch.Tensor], y_test: torch.Tensor,
    *, weight_decays=WEIGHT_DECAYS, selection_fraction: float = 0.2, seed: int = 0,
) -> ProbeResult:
    """The best (feature set, weight decay) chosen on a held-out part of ``train``, scored on ``test``.

    ``train`` / ``test`` map feature-set names to (N, F) features of the same samples.
    """
    num_classes = int(max(y_train.max(), y_test.max())) + 1
    n = y_train.shape[0]
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_sel = max(1, int(round(n * selection_fraction)))
    sel, fit = order[:n_sel], order[n_sel:]
    best = None
    for name, x in train.items():
        x_fit, x_sel = standardise(x[fit].float(), x[sel].float())
        W, b = fit_logistic(x_fit, y_train[fit], num_classes, weight_decays)
        accs = _accuracy(x_sel, y_train[sel], W, b)
        i = int(accs.argmax())  # ties: the first, i.e. the weakest regularisation of the tie
        if best is None or accs[i] > best[0]:
            best = (float(accs[i]), name, weight_decays[i])
    selection_acc, name, wd = best
    x_all, x_test = standardise(train[name].float(), test[name].float())
    W, b = fit_logistic(x_all, y_train, num_classes, [wd])
    return ProbeResult(float(_accuracy(x_test, y_test, W, b)[0]), name, wd, selection_acc)
