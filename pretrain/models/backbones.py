"""Backbones by name: our ViT, any timm 2D model, MONAI's 3D (and 2D) networks.

``model.name``:

- ``vit``: ``pretrain.models.vit.VisionTransformer`` (2D and 3D), configured by
  the ViT fields of the model section;
- ``timm:<name>``: ``timm.create_model(name, num_classes=0, global_pool="",
  in_chans=model.in_chans, **model.kwargs)``, e.g. ``timm:resnet50`` with
  1-channel input (timm adapts the stem); 2D only;
- ``monai:<name>``: a network from ``monai.networks.nets``: the ResNet family
  (``resnet10`` ... ``resnet200``, feature map after ``layer4``), ``swin``
  (SwinUNETR's Swin encoder, deepest stage), or any other class whose forward
  returns a feature map, a vector or tokens, built with ``spatial_dims`` and
  the input channels plus ``model.kwargs``.

Networks other than our ViT are wrapped in :class:`FeatureMapEncoder`, which
meets the ``Encoder`` protocol: token 0 is the global average pool of the
final feature map, then one token per cell. Their FLOPs are counted by
``FlopCounterMode`` on a twin built on the meta device (no memory, no compute).
"""
from __future__ import annotations

import copy
import importlib
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from pretrain.models.encoder import pool_tokens
from pretrain.models.vit import ViTConfig, VisionTransformer

KINDS = ("vit", "timm", "monai")
_MONAI_RESNETS = ("resnet10", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnet200")


@dataclass
class ModelConfig(ViTConfig):
    """The backbone: ``name`` picks it; the ViT fields apply to ``vit`` only."""

    name: str = "vit"  # vit | timm:<model name> | monai:<network name>
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra constructor arguments of a timm or MONAI network

    def validate(self) -> "ModelConfig":
        kind, _, target = self.name.partition(":")
        if kind not in KINDS or (kind == "vit") != (target == ""):
            raise ValueError(f"model.name: {self.name!r} must be 'vit', 'timm:<model>' or 'monai:<network>'")
        if kind == "vit":
            if self.kwargs:
                raise ValueError("model.kwargs: only for timm: and monai: backbones; the ViT takes its own fields")
            return super().validate()
        if self.spatial_dims not in (2, 3):
            raise ValueError(f"ViTConfig.spatial_dims: must be 2 or 3, got {self.spatial_dims!r}")
        if kind == "timm" and self.spatial_dims != 2:
            raise ValueError(f"model.name: timm models are 2D; {self.name!r} cannot take spatial_dims=3 "
                             "(use a monai: network or the vit)")
        self.img_size_tuple()
        if not isinstance(self.in_chans, int) or self.in_chans < 1:
            raise ValueError(f"ViTConfig.in_chans: must be a positive int, got {self.in_chans!r}")
        return self


def _as_tokens(out: Any, spatial_dims: int, channels_last: bool) -> tuple[torch.Tensor, tuple[int, ...]]:
    """A network's output as (B, N, C) cell tokens and their grid."""
    if isinstance(out, (tuple, list)):  # MONAI's ViT returns (tokens, hidden states); Swin a list of stages
        out = out[0] if out[0].ndim == 3 else out[-1]
    if out.ndim == 2:  # a pooled vector: one cell
        return out[:, None], (1,) * spatial_dims
    if out.ndim == 3:  # tokens already
        return out, (out.shape[1],)
    if channels_last:
        out = out.movedim(-1, 1)
    return out.flatten(2).transpose(1, 2), tuple(out.shape[2:])


class FeatureMapEncoder(nn.Module):
    """Any network that maps an image or volume to a feature map, as an ``Encoder``."""

    num_prefix_tokens = 1  # the global average pool of the cells
    supports_token_mask = False

    def __init__(self, factory: Callable[[], nn.Module], features: Callable[[nn.Module, torch.Tensor], Any],
                 cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self._factory, self._features = factory, features
        self.net = factory()
        # timm's Swin, MaxViT, ... return (B, H, W, C) feature maps and say so
        self._channels_last = str(getattr(self.net, "output_fmt", "NCHW")) == "NHWC"
        # a timm transformer returns its own class/register tokens first: its class token is the summary
        self._net_prefix = int(getattr(self.net, "num_prefix_tokens", 0) or 0)
        self.spatial_dims, self.in_chans = cfg.spatial_dims, cfg.in_chans
        self._twins: list[tuple[nn.Module, torch.device]] = []  # a list: not a submodule, not in the state dict
        self._grids: dict[tuple[int, ...], tuple[int, ...]] = {}
        self._flops: dict[tuple, float] = {}
        probe = self._meta_tokens(cfg.img_size_tuple())
        self.embed_dim = int(probe.shape[-1])

    def _twin(self) -> tuple[nn.Module, torch.device]:
        """The same network for probing shapes and counting FLOPs, in eval mode (batch norm over one
        sample of one cell): built on the meta device (no memory, no compute) where the network's
        constructor allows it, else a CPU copy made before any ZeRO-3 partitioning."""
        if not self._twins:
            try:
                with torch.device("meta"):
                    self._twins.append((self._factory().eval(), torch.device("meta")))
            except (RuntimeError, NotImplementedError):  # e.g. .item() on a meta tensor in __init__
                self._twins.append((copy.deepcopy(self.net).eval(), torch.device("cpu")))
        return self._twins[0]

    def _split(self, out: Any) -> tuple[torch.Tensor | None, torch.Tensor, tuple[int, ...]]:
        """A network output as (its own summary token or None, cell tokens (B, N, C), their grid)."""
        tokens, grid = _as_tokens(out, self.spatial_dims, self._channels_last)
        if self._net_prefix and len(grid) == 1:  # a timm transformer: its class token, then its patch tokens
            return tokens[:, :1], tokens[:, self._net_prefix:], (grid[0] - self._net_prefix,)
        return None, tokens, grid

    def _meta_tokens(self, spatial: tuple[int, ...]) -> torch.Tensor:
        twin, device = self._twin()
        x = torch.zeros((1, self.in_chans, *spatial), device=device)
        with torch.no_grad():
            _, cells, grid = self._split(self._features(twin, x))
        self._grids[tuple(spatial)] = grid
        return cells

    def _run(self, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor, tuple[int, ...]]:
        if x.ndim != 2 + self.spatial_dims or x.shape[1] != self.in_chans:
            raise ValueError(f"{self.cfg.name}: input must have {self.spatial_dims} spatial axes and "
                             f"C={self.in_chans}, got {tuple(x.shape)}")
        return self._split(self._features(self.net, x))

    def cells(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
        """(B, N, C) feature-map cells and their grid."""
        _, cells_BNC, grid = self._run(x)
        return cells_BNC, grid

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        summary, cells_BNC, _ = self._run(x)
        if summary is None:
            summary = cells_BNC.mean(dim=1, keepdim=True)
        return torch.cat([summary, cells_BNC], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)[:, 0]

    def pool(self, tokens: torch.Tensor, mode: str = "cls") -> torch.Tensor:
        return pool_tokens(tokens, self.num_prefix_tokens, mode)

    def grid_size(self, spatial_shape=None) -> tuple[int, ...]:
        spatial = tuple(int(s) for s in (spatial_shape or self.cfg.img_size_tuple()))
        if spatial not in self._grids:
            self._meta_tokens(spatial)
        return self._grids[spatial]

    def _count(self, spatial: tuple[int, ...], backward: bool) -> float:
        key = (tuple(int(s) for s in spatial), backward)
        if key not in self._flops:
            twin, device = self._twin()
            x = torch.zeros((1, self.in_chans, *key[0]), device=device)
            with FlopCounterMode(display=False) as counter, torch.set_grad_enabled(backward):
                tokens, _ = _as_tokens(self._features(twin, x), self.spatial_dims, self._channels_last)
                if backward:
                    tokens.float().sum().backward()
            self._flops[key] = float(counter.get_total_flops())
        return self._flops[key]

    def forward_flops(self, spatial_shape=None, num_tokens_kept: int | None = None) -> float:
        return self._count(spatial_shape or self.cfg.img_size_tuple(), backward=False)

    def train_flops(self, spatial_shape=None, num_tokens_kept: int | None = None) -> float:
        return self._count(spatial_shape or self.cfg.img_size_tuple(), backward=True)


def _timm(cfg: ModelConfig, target: str) -> FeatureMapEncoder:
    import timm

    if not timm.is_model(target):
        raise ValueError(f"model.name: timm has no model {target!r}")

    def factory() -> nn.Module:
        return timm.create_model(target, pretrained=False, num_classes=0, global_pool="", **timm_model_args(cfg))

    return FeatureMapEncoder(factory, lambda net, x: net.forward_features(x), cfg)


def _monai_resnet_features(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    x = net.act(net.bn1(net.conv1(x)))
    if not net.no_max_pool:
        x = net.maxpool(x)
    return net.layer4(net.layer3(net.layer2(net.layer1(x))))


@dataclass
class MonaiNetwork:
    """How a ``monai:`` backbone is built and read: also what its export tells MONAI users."""

    qualname: str  # the builder, e.g. monai.networks.nets.resnet10
    args: dict[str, Any]  # its exact keyword arguments (JSON-safe)
    features: Callable[[nn.Module, torch.Tensor], Any]  # network, input -> the feature map the encoder reads
    call: str  # the same, as MONAI users write it (``net``: the built network, ``x``: the input)
    pooled: bool  # ``call`` gives the embedding already; else the embedding is its mean over the spatial axes

    def build(self) -> nn.Module:
        module, _, name = self.qualname.rpartition(".")
        return getattr(importlib.import_module(module), name)(**self.args)


def monai_network(cfg: ModelConfig) -> MonaiNetwork:
    """The MONAI network of ``model.name: monai:<target>`` (see the module docstring)."""
    from monai.networks import nets

    target = cfg.name.partition(":")[2]
    dims, chans, kwargs = cfg.spatial_dims, cfg.in_chans, dict(cfg.kwargs)
    if target in _MONAI_RESNETS:
        args = {"spatial_dims": dims, "n_input_channels": chans, "feed_forward": False, **kwargs}
        # forward with feed_forward=False (no fc) ends in the global average pool of layer4: the embedding
        return MonaiNetwork(f"monai.networks.nets.{target}", args, _monai_resnet_features, "net(x)", True)
    if target == "swin":
        swin = {"embed_dim": 48, "window_size": [7] * dims, "patch_size": [2] * dims, "depths": [2, 2, 2, 2],
                "num_heads": [3, 6, 12, 24], **kwargs}
        return MonaiNetwork("monai.networks.nets.swin_unetr.SwinTransformer",
                            {"in_chans": chans, "spatial_dims": dims, **swin},
                            lambda net, x: net(x, normalize=True)[-1], "net(x, normalize=True)[-1]", False)
    cls = getattr(nets, target, None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        known = ", ".join([*_MONAI_RESNETS, "swin"])
        raise ValueError(f"model.name: monai.networks.nets has no network {target!r} (adapted: {known}; "
                         "other classes are built with spatial_dims, the input channels and model.kwargs)")
    params = inspect.signature(cls).parameters
    channel_arg = next((a for a in ("in_channels", "n_input_channels", "in_chans") if a in params), None)
    if channel_arg is None:
        raise ValueError(f"model.name: monai:{target} takes no input-channel argument this wrapper knows")
    args = {channel_arg: chans, **({"spatial_dims": dims} if "spatial_dims" in params else {}), **kwargs}
    return MonaiNetwork(f"monai.networks.nets.{target}", args, lambda net, x: net(x), "net(x)", False)


def _monai(cfg: ModelConfig) -> FeatureMapEncoder:
    network = monai_network(cfg)
    return FeatureMapEncoder(network.build, network.features, cfg)


def timm_model_args(cfg: ModelConfig) -> dict[str, Any]:
    """``timm.create_model`` keyword arguments of a ``timm:`` backbone (the export's ``model_args``)."""
    return {"in_chans": cfg.in_chans, **cfg.kwargs}


def build_backbone(cfg: ModelConfig) -> nn.Module:
    """The encoder named by ``cfg.name`` (see the module docstring)."""
    kind, _, target = getattr(cfg, "name", "vit").partition(":")
    if kind == "vit":
        return VisionTransformer(cfg)
    if kind == "timm":
        return _timm(cfg, target)
    return _monai(cfg)
