"""LVM-Med (Nguyen et al., NeurIPS 2023): contrastive learning as second-order graph matching.

Implemented from the paper's mathematics (``../shared/LVM_MED.md``), not from
any code of its authors. One step, per group of ``group_size`` images of a
rank's batch:

1. two augmented views of each image, with their crop boxes and flips kept;
2. the encoder's feature map y (ViT patch tokens or CNN cells), pooled and
   projected to z (one linear layer to 128-d in the paper);
3. a symmetric cosine kNN graph on each view's z (no gradient through the
   edges) and a shared 2-layer GCN refining the nodes;
4. vertex affinities: alpha * cos(GCN nodes) + (1 - alpha) * the local prior
   (mean cosines of location-nearest and feature-nearest cell pairs);
5. edge affinities: cosines of node differences along edges of both graphs;
6. the matching of view s's nodes to view t's: Lawler's QAP on Gumbel-perturbed
   affinities, solved by the batched device solver (``pretrain.losses.qap_solver``);
7. the loss: its Hamming distance to the identity (image i of view s is image
   i of view t), with the blackbox gradient (``pretrain.losses.matching_loss``).

Choices the paper leaves open (each a config key): the batch maps to groups in
order (``data.batch_size`` a multiple of ``group_size``); gamma scales with the
number of cells (20 per 49, the paper's 7 x 7 value); the loss is reported
per node, Hamming / (2 n) (the fraction of images matched wrongly), averaged
over groups; the solver runs ``solver.iterations`` RRWM iterations and
``solver.swap_passes`` swap passes. The Gumbel noise is drawn on the CPU side
from each sample's seed (its rows of its group's noise), so resumed and
re-sharded runs see the same noise.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from pretrain.config.registry import register_objective
from pretrain.config.typed import ConfigError, check_range
from pretrain.data.multicrop import MultiCropSpec, multi_crop
from pretrain.data.transforms import sample_rng
from pretrain.losses.graph_affinity import (edge_affinity, edge_mask, knn_adjacency, local_prior, normalized_adjacency,
                                            vertex_cosine)
from pretrain.losses.matching_loss import blackbox_matching_loss
from pretrain.losses.qap_solver import QAPSolver
from pretrain.models.backbones import build_backbone
from pretrain.models.gcn import GCN
from pretrain.objectives.base import (BuildContext, DataRecipe, EvalBundle, Objective, check_view_fits_patches,
                                      load_init_weights)
from pretrain.optim.schedules import Schedule

NAME = "lvm_med"
CELLS_PER_PAIR_UNIT = 49 / 20  # the paper keeps gamma = 20 pairs for a 7 x 7 feature map


@dataclass
class TwoViewSpec(MultiCropSpec):
    """LVM-Med's views: two crops of one size (the global crops of the multi-crop spec), no local crops;
    blur on either view half the time (the paper lists crops, flips, intensity jitter and blur)."""

    n_local: int = 0  # LVM-Med matches two views: keep 0
    global_scale: tuple[float, float] = (0.25, 1.0)  # area/volume fraction of the image covered, (low, high)
    blur_p: tuple[float, float, float] = (0.5, 0.5, 0.0)  # blur probability of (view s, view t, unused)


@dataclass
class Config:
    name: str = NAME  # "lvm_med": LVM-Med's second-order graph matching (this section's schema)
    views: TwoViewSpec = field(default_factory=TwoViewSpec)  # the two views: global_size, n_global=2, n_local=0
    group_size: int = 16  # n: images per graph; data.batch_size must be a multiple of it
    knn: int = 5  # k of each view's symmetric cosine kNN graph
    embed_dim: int = 128  # projector output, the GCN's input
    projector_layers: int = 1  # 1: one linear layer (the paper); more: an MLP with the encoder's width inside
    gcn_layers: int = 2  # graph convolutions, ReLU between them
    gcn_width: int = 128  # width of every GCN layer
    # A skip around each graph convolution (not in the paper, whose encoders start pretrained). Each layer
    # averages a node with its ~6 kNN neighbours, so two layers leave it little of its own features: from
    # scratch, the matching then sees neighbourhoods rather than images (the demo ViT's vertex margin stayed
    # under 0.02 and its tokens collapsed); with the skip the node keeps its own embedding.
    gcn_residual: bool = False  # True: H + P H W per GCN layer (a skip); False: the paper's GCN
    alpha: float = 0.8  # vertex affinity: alpha * global cosine + (1 - alpha) * local prior
    local_pairs: int = 0  # gamma, cell pairs of each kind in the local prior; 0: 20 per 49 cells (paper's 7x7)
    second_order: bool = True  # edge affinities in the matching; False: linear assignment (the paper's ablation)
    # Weight of the edge (second-order) term against the vertex term: 1 in the paper, whose encoders start
    # pretrained. From scratch the two views' kNN graphs share few edges and the edge term rewards matching
    # graph shapes rather than images: on the demo the vertex margin fell from 0.005 to 0.0006 and the
    # patch tokens collapsed (mean cosine 0.997); warming the weight up from 0 (first-order matching
    # first) kept them apart (cosine 0.3), though it did not improve the demo's linear probe.
    edge_weight: float = 1.0  # weight of the edge affinities in the QAP after the warm-up
    edge_warmup_fraction: float = 0.0  # fraction of train.steps over which the edge weight rises from 0
    gumbel_scale: float = 1.0  # scale of the Gumbel(0, 1) perturbation of the affinities; 0: none (ablation)
    blackbox_lambda: float = 80.0  # lambda of the blackbox / I-MLE gradient
    pool: Literal["mean", "cls"] = "mean"  # encoder tokens -> z, and the features evaluated and exported
    solver: QAPSolver = field(default_factory=QAPSolver)  # the batched QAP solver's settings
    init_from: str = ""  # start the ViT from weights: our run/checkpoint/export, or a timm-format state dict

    def __post_init__(self) -> None:
        views = self.views
        if views.n_global != 2 or views.n_local != 0:
            raise ConfigError("config key 'objective.views': LVM-Med matches two views of each image: "
                              f"n_global=2 and n_local=0, got {views.n_global} and {views.n_local}")
        if views.rotation_degrees:
            raise ConfigError("config key 'objective.views.rotation_degrees': the local prior places cells by "
                              "their crop box and flips; rotations would misplace them (set 0)")
        check_range("objective.group_size", self.group_size, 2)
        check_range("objective.knn", self.knn, 1, self.group_size - 1)
        for key in ("embed_dim", "projector_layers", "gcn_layers", "gcn_width"):
            check_range(f"objective.{key}", getattr(self, key), 1)
        check_range("objective.alpha", self.alpha, 0.0, 1.0)
        check_range("objective.local_pairs", self.local_pairs, 0)
        check_range("objective.gumbel_scale", self.gumbel_scale, 0.0)
        check_range("objective.edge_weight", self.edge_weight, 0.0)
        check_range("objective.edge_warmup_fraction", self.edge_warmup_fraction, 0.0, 1.0)
        check_range("objective.blackbox_lambda", self.blackbox_lambda, 0.0, low_open=True)


def local_pairs_for(cells: int, configured: int = 0) -> int:
    """gamma for a feature map of ``cells`` cells: the configured value, else the paper's 20 per 49."""
    return min(cells, configured or max(1, round(cells / CELLS_PER_PAIR_UNIT)))


class LVMMedRecipe(DataRecipe):
    """Two views with their boxes and flips, and the sample's rows of its group's Gumbel noise."""

    def __init__(self, cfg: Config, in_chans: int, intensity: str) -> None:
        self.cfg, self.in_chans, self.intensity = cfg, in_chans, intensity

    def whole_view_size(self) -> tuple[int, ...]:
        return tuple(self.cfg.views.global_size)

    def transform(self, sample: dict[str, Any]) -> dict[str, Any]:
        rng = sample_rng(sample)
        out = multi_crop(sample["image"], self.cfg.views, rng, self.in_chans, self.intensity, key=sample["__key__"],
                         places=True)
        places = out["global_places"]
        dims = len(self.cfg.views.global_size)
        flips = torch.zeros(2, dims, dtype=torch.bool)
        for v, place in enumerate(places):
            flips[v, list(place.flipped)] = True
        item = {"view_s": out["global_crops"][0], "view_t": out["global_crops"][1],
                "boxes": torch.tensor([place.box for place in places], dtype=torch.float32), "flips": flips}
        if self.cfg.gumbel_scale > 0:
            n = self.cfg.group_size
            item["gumbel_vertex"] = torch.from_numpy(rng.gumbel(size=n).astype(np.float32))
            if self.cfg.second_order:
                item["gumbel_edge"] = torch.from_numpy(rng.gumbel(size=(n, n, n)).astype(np.float32))
        return item

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        return {key: torch.stack([s[key] for s in samples]) for key in samples[0]}


def _projector(in_dim: int, out_dim: int, layers: int) -> nn.Module:
    if layers == 1:
        return nn.Linear(in_dim, out_dim)
    blocks: list[nn.Module] = []
    for _ in range(layers - 1):
        blocks += [nn.Linear(in_dim, in_dim), nn.GELU()]
    return nn.Sequential(*blocks, nn.Linear(in_dim, out_dim))


def _symmetric_edge_noise(noise: torch.Tensor) -> torch.Tensor:
    """Per-sample rows (G, n_i, n_a, n_j, n_b) -> one symmetric draw: entry ((i,a),(j,b)) for i < j from
    sample i's row, mirrored for i > j, so x^T E x sees each pair of matches once per direction."""
    G, n = noise.shape[:2]
    idx = torch.arange(n, device=noise.device)
    upper = (idx.view(n, 1, 1, 1) < idx.view(1, 1, n, 1))
    mirrored = noise.permute(0, 3, 4, 1, 2)
    return torch.where(upper, noise, mirrored).reshape(G, n * n, n * n)


class LVMMed(Objective):
    def __init__(self, run_cfg, ctx: BuildContext) -> None:
        super().__init__(ctx)
        self.cfg: Config = run_cfg.objective
        n = self.cfg.group_size
        if run_cfg.data.batch_size % n:
            raise ConfigError(f"config key 'data.batch_size': LVM-Med splits each rank's batch into graphs of "
                              f"objective.group_size={n} images; {run_cfg.data.batch_size} is not a multiple of {n}")
        self.backbone = build_backbone(run_cfg.model)
        self.init_report = load_init_weights(self.backbone, self.cfg.init_from, run_cfg.model.name)
        size = self.cfg.views.global_size
        check_view_fits_patches("objective.views.global_size", size, self.backbone)
        self.grid = self.backbone.grid_size(size)
        self.cells = math.prod(self.grid)
        self.gamma = local_pairs_for(self.cells, self.cfg.local_pairs)
        self.batch_size = run_cfg.data.batch_size
        dim = self.backbone.embed_dim
        self.projector = _projector(dim, self.cfg.embed_dim, self.cfg.projector_layers)
        self.gcn = GCN(self.cfg.embed_dim, self.cfg.gcn_width, self.cfg.gcn_layers, self.cfg.gcn_residual)
        self._recipe = LVMMedRecipe(self.cfg, run_cfg.model.in_chans, run_cfg.data.intensity)
        self._schedules = {"edge_weight": Schedule(self.cfg.edge_weight, shape="constant", warmup_from=0.0,
                                                   warmup_fraction=self.cfg.edge_warmup_fraction)}
        self.edge_weight = self._schedules["edge_weight"](run_cfg.train.steps, run_cfg.train.steps)  # outside training

    def data_recipe(self) -> LVMMedRecipe:
        return self._recipe

    # --- device side ----------------------------------------------------------------------
    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        cfg, n = self.cfg, self.cfg.group_size
        views = torch.cat([batch["view_s"], batch["view_t"]]).to(self.compute_dtype)
        B = batch["view_s"].shape[0]
        G = B // n
        tokens = self.backbone.forward_features(views)
        prefix = self.backbone.num_prefix_tokens
        cells = tokens[:, prefix:].float()
        z = self.projector(self.backbone.pool(tokens, cfg.pool))
        zs, zt = (part.reshape(G, n, -1) for part in z.chunk(2))
        adj_s, adj_t = knn_adjacency(zs, cfg.knn), knn_adjacency(zt, cfg.knn)
        hs = self.gcn(zs, normalized_adjacency(adj_s)).float()
        ht = self.gcn(zt, normalized_adjacency(adj_t)).float()

        boxes, flips = batch["boxes"].reshape(G, n, *batch["boxes"].shape[1:]), batch["flips"].reshape(G, n, 2, -1)
        ys, yt = (part.reshape(G, n, self.cells, -1) for part in cells.chunk(2))
        prior = local_prior(ys, yt, boxes, flips, self.grid, self.gamma)
        vertex = cfg.alpha * vertex_cosine(hs, ht) + (1 - cfg.alpha) * prior
        clean = vertex.detach()
        noisy = self.training and cfg.gumbel_scale > 0
        edge = None
        if cfg.second_order and self.edge_weight > 0:
            mask = edge_mask(adj_s, adj_t)
            edge = edge_affinity(hs, ht, mask)
            if noisy:
                noise = _symmetric_edge_noise(batch["gumbel_edge"].float().reshape(G, n, n, n, n))
                edge = edge + cfg.gumbel_scale * noise * mask
            edge = self.edge_weight * edge
        if noisy:
            vertex = vertex + cfg.gumbel_scale * batch["gumbel_vertex"].float().reshape(G, n, n)
        hamming, perm = blackbox_matching_loss(vertex, edge, cfg.solver, cfg.blackbox_lambda)
        loss = hamming.mean() / (2 * n)
        eye = torch.eye(n, dtype=torch.bool, device=clean.device)
        pooled = tokens[:, 0].detach(), tokens[:, prefix:].mean(1).detach()
        return {
            "loss": loss,
            "match_accuracy": (perm == torch.arange(n, device=perm.device)).float().mean(),
            # how far each image's own other view stands out among its group's (noise-free vertex affinity)
            "affinity_margin": clean[:, eye].mean() - clean[:, ~eye].mean(),
            "local_prior_margin": prior.detach()[:, eye].mean() - prior.detach()[:, ~eye].mean(),
            "graph_degree": adj_s.sum(-1).mean(),
            "_embed/encoder/cls": pooled[0], "_embed/encoder/patch": pooled[1],
        }

    # --- hooks ----------------------------------------------------------------------------
    def schedules(self) -> dict[str, Schedule]:
        return dict(self._schedules) if self.cfg.second_order else {}

    def set_schedules(self, step: int, values: dict[str, float]) -> None:
        self.edge_weight = values.get("edge_weight", self.edge_weight)

    def eval_bundle(self) -> EvalBundle:
        return EvalBundle({"encoder": self.backbone}, pool=self.cfg.pool)

    def tokens_per_sample(self) -> int:
        return 2 * (self.cells + self.backbone.num_prefix_tokens)

    def flops_per_sample(self) -> float:
        """Both views through the encoder (forward + backward), the projector and GCN, the affinity and
        local-prior matmuls, the kNN similarities and the solver's relaxation matmuls (two solves per step).
        Matmuls only, as FlopCounterMode counts them; the training backward of a matmul costs twice its forward."""
        cfg, n, P = self.cfg, self.cfg.group_size, self.cells
        size, dim, d = cfg.views.global_size, self.backbone.embed_dim, cfg.embed_dim
        encoder = 2 * self.backbone.train_flops(size)
        linears = [m for m in self.projector.modules() if isinstance(m, nn.Linear)]
        projector = 2 * 3 * sum(2 * m.in_features * m.out_features for m in linears)
        per_group = 2 * self.gcn.train_flops(n)  # both views' graphs
        per_group += 2 * 2 * n * n * d  # kNN similarities of both views, no gradient
        per_group += 3 * 2 * n * n * cfg.gcn_width  # vertex cosines
        per_group += 3 * 2 * (n * P) ** 2 * dim + 2 * (n * P) ** 2 * dim  # local prior: cell cosines, L2 distances
        if cfg.second_order:
            per_group += 3 * 2 * n ** 4 * cfg.gcn_width  # edge cosines
            per_group += 2 * cfg.solver.iterations * 2 * n ** 4  # the relaxation's (n^2 x n^2) @ (n^2,) per solve
        return encoder + projector + per_group / n


def build(run_cfg, ctx: BuildContext) -> LVMMed:
    return LVMMed(run_cfg, ctx)


register_objective(NAME, Config, build)
