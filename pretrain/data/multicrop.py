"""DINOv2-style multi-crop views of one 2D image or 3D volume.

A few large global crops (seen by the teacher and the student) and many small
local crops (student only); the student learns to match the teacher's output on
a global crop from any other crop. Local crops are where most of the signal
comes from at little cost, since their token count is small.
Volumes get sub-volume crops; all random choices come from the sample's generator.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from pretrain.data import augment
from pretrain.data.transforms import check_spatial_dims, match_channels, random_flip_axes, random_resized_crop, to_tensor

# Colour jitter strengths for RGB data (fundus, pathology), as in DINO's recipe.
_COLOR_JITTER = dict(brightness=0.4, contrast=0.4, saturation=0.2, p=0.8)


@dataclass
class MultiCropSpec:
    """Crop sizes, counts and augmentations; defaults suit grayscale X-ray (z-scored, 2D, 224/96 for patch 16).

    Solarisation (DINOv2 applies it to global crop 2) is left out: it inverts the
    bright half of the intensity range, which for X-ray/CT/MRI maps bone to air or
    fluid to fat, a contrast no scanner produces, and on z-scored data its threshold
    has no fixed meaning.
    """

    global_size: tuple[int, ...] = (224, 224)  # global crop size in pixels/voxels, (H, W) or (D, H, W)
    local_size: tuple[int, ...] = (96, 96)  # local crop size, with as many axes as global_size
    n_global: int = 2  # global crops per image, seen by teacher and student; >= 1
    n_local: int = 8  # local crops per image, seen by the student only; 0: none
    global_scale: tuple[float, float] = (0.32, 1.0)  # area/volume fraction of the image covered, (low, high)
    local_scale: tuple[float, float] = (0.05, 0.32)  # area/volume fraction of the image covered, (low, high)
    flip_axes: list[int] = field(default_factory=lambda: [-1])  # spatial axes, negative counts from the last
    rotation_degrees: float = 0.0  # max in-plane rotation, angle uniform in [-value, value] degrees; 0 = off
    # Blur probability for (global crop 1, other global crops, local crops): DINOv2's asymmetry,
    # one teacher view always sharp-ish contrasts with a blurred one. All zero = off.
    blur_p: tuple[float, float, float] = (1.0, 0.1, 0.5)
    blur_sigma: tuple[float, float] = (0.1, 2.0)  # range of the Gaussian blur sigma, in pixels/voxels
    noise_p: float = 0.2  # probability of additive Gaussian noise per crop
    noise_std: tuple[float, float] = (0.0, 0.1)  # range of the noise std, in z-score units
    intensity_p: float = 0.8  # probability per crop of contrast/brightness x * a + b (unless color_jitter)
    intensity_scale: tuple[float, float] = (0.75, 1.25)  # range of the contrast factor a
    intensity_shift: tuple[float, float] = (-0.25, 0.25)  # range of the brightness offset b, in z-score units
    gamma_p: float = 0.3  # probability per crop of a random gamma curve (unless color_jitter)
    gamma_range: tuple[float, float] = (0.7, 1.5)  # range of the gamma, drawn log-uniformly
    color_jitter: bool = False  # brightness/contrast/saturation jitter instead of intensity and gamma; RGB only
    # (center, width) in HU; when set, each crop is windowed from raw values and intensity normalisation is skipped.
    ct_windows: list[tuple[float, float]] = field(default_factory=list)
    ct_window_jitter: float = 0.1  # CT window center moves <= jitter x width, width scales by 1 +- jitter; [0, 1)

    def __post_init__(self) -> None:
        self.global_size = _size(self.global_size, "global_size")
        self.local_size = _size(self.local_size, "local_size")
        n = len(self.global_size)
        if len(self.local_size) != n and self.n_local == 0:
            self.local_size = self.global_size  # unused without local crops: no need to spell it out for 3D
        if len(self.local_size) != n:
            raise ValueError(
                f"MultiCropSpec.local_size {self.local_size} must have one entry per spatial axis, "
                f"like global_size {self.global_size}"
            )
        if self.n_global < 1:
            raise ValueError(f"MultiCropSpec.n_global must be >= 1, got {self.n_global}")
        if self.n_local < 0:
            raise ValueError(f"MultiCropSpec.n_local must be >= 0, got {self.n_local}")
        for name in ("global_scale", "local_scale"):
            lo, hi = getattr(self, name)
            if not 0.0 < lo <= hi <= 1.0:
                raise ValueError(f"MultiCropSpec.{name} must satisfy 0 < low <= high <= 1, got {(lo, hi)}")
            setattr(self, name, (float(lo), float(hi)))
        for a in self.flip_axes:
            if not -n <= a < n:
                raise ValueError(f"MultiCropSpec.flip_axes: axis {a} out of range for {n} spatial axes")
        self.blur_p = tuple(float(p) for p in self.blur_p)
        if len(self.blur_p) != 3:
            raise ValueError(f"MultiCropSpec.blur_p needs 3 probabilities (global 1, other globals, locals), got {self.blur_p}")
        probs = [("blur_p", q) for q in self.blur_p] + [(k, getattr(self, k)) for k in ("noise_p", "intensity_p", "gamma_p")]
        for name, p in probs:
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"MultiCropSpec.{name} must be a probability in [0, 1], got {p}")
        if self.rotation_degrees < 0:
            raise ValueError(f"MultiCropSpec.rotation_degrees must be >= 0, got {self.rotation_degrees}")
        self.ct_windows = [(float(c), float(w)) for c, w in self.ct_windows]
        for c, w in self.ct_windows:
            if w <= 0:
                raise ValueError(f"MultiCropSpec.ct_windows: width must be positive, got ({c}, {w})")
        if not 0.0 <= self.ct_window_jitter < 1.0:
            raise ValueError(f"MultiCropSpec.ct_window_jitter must be in [0, 1), got {self.ct_window_jitter}")


def _size(size, name: str) -> tuple[int, ...]:
    size = tuple(int(s) for s in size)
    if len(size) not in (2, 3) or min(size) < 1:
        raise ValueError(f"MultiCropSpec.{name} must have 2 (H,W) or 3 (D,H,W) positive entries, got {size}")
    return size


@dataclass(frozen=True)
class CropPlace:
    """Where a view came from: its box in the image, as fractions of each axis, and the axes it flipped."""

    box: tuple[tuple[float, float], ...]  # (start, stop) per spatial axis, in [0, 1]
    flipped: tuple[int, ...]  # spatial axes (0 = first) mirrored after the crop


def _view(x: torch.Tensor, spec: MultiCropSpec, rng: np.random.Generator, size, scale,
          blur_p: float) -> tuple[torch.Tensor, CropPlace]:
    n = len(size)
    v, box = random_resized_crop(x, size, rng, scale=scale)
    v, flipped = random_flip_axes(v, rng, [a % n for a in spec.flip_axes])
    place = CropPlace(tuple((a / e, b / e) for (a, b), e in zip(box, x.shape[1:])), tuple(flipped))
    if spec.ct_windows:
        # Each view draws its own window, like colour jitter per view: the anatomy is the invariant, not the contrast.
        v = augment.random_ct_window(v, rng, spec.ct_windows, spec.ct_window_jitter)
    if spec.rotation_degrees > 0:
        v = augment.random_rotation(v, rng, spec.rotation_degrees)
    if spec.color_jitter:
        v = augment.random_color_jitter(v, rng, **_COLOR_JITTER)
    else:
        v = augment.random_intensity_scale_shift(v, rng, spec.intensity_scale, spec.intensity_shift, spec.intensity_p)
        v = augment.random_gamma(v, rng, spec.gamma_range, spec.gamma_p)
    v = augment.random_gaussian_blur(v, rng, spec.blur_sigma, blur_p)
    v = augment.random_gaussian_noise(v, rng, spec.noise_std, spec.noise_p)
    return v.contiguous(), place


def multi_crop(
    image: np.ndarray,
    spec: MultiCropSpec,
    rng: np.random.Generator,
    channels: int,
    intensity: str = "zscore",
    key: str = "?",
    places: bool = False,
) -> dict:
    """One image ``(C, *spatial)`` -> ``{"global_crops": [Tensor (channels, *global_size)] * n_global,
    "local_crops": [Tensor (channels, *local_size)] * n_local}``, and with ``places`` also
    ``"global_places"`` / ``"local_places"``: each crop's :class:`CropPlace`.

    With the default ``blur_p`` global crop 1 is always blurred, the other globals rarely, locals half the time.
    """
    x = to_tensor(image, "none" if spec.ct_windows else intensity)
    x = match_channels(x, channels, key)
    check_spatial_dims(x, len(spec.global_size), key)
    if spec.color_jitter and x.shape[0] != 3:
        raise ValueError(f"sample {key!r}: colour jitter needs 3 channels (RGB), got shape {tuple(x.shape)}")
    p_first, p_other, p_local = spec.blur_p
    globals_ = [
        _view(x, spec, rng, spec.global_size, spec.global_scale, p_first if i == 0 else p_other)
        for i in range(spec.n_global)
    ]
    locals_ = [_view(x, spec, rng, spec.local_size, spec.local_scale, p_local) for _ in range(spec.n_local)]
    out = {"global_crops": [v for v, _ in globals_], "local_crops": [v for v, _ in locals_]}
    if places:
        out.update(global_places=[p for _, p in globals_], local_places=[p for _, p in locals_])
    return out


def collate_crops(samples: list[dict]) -> dict:
    """Stack crops crop-major: ``[s0.crop0, s1.crop0, ..., sB-1.crop0, s0.crop1, ...]``.

    ``global_crops``: ``(n_global * B, C, *global_size)``, so ``.chunk(n_global)`` gives one
    batch per crop index, the pairing DINO's cross-view loss iterates over.
    ``local_crops``: ``(n_local * B, C, *local_size)``, or ``(0, C, 0, ...)`` when there are none.
    """
    if not samples:
        raise ValueError("collate_crops got an empty batch")
    out = {}
    for name in ("global_crops", "local_crops"):
        counts = {len(s[name]) for s in samples}
        if len(counts) != 1:
            raise ValueError(f"collate_crops: samples have different numbers of {name}: {sorted(counts)}")
        k = counts.pop()
        if k:
            out[name] = torch.stack([s[name][i] for i in range(k) for s in samples])
        else:
            ref = samples[0]["global_crops"][0]
            out[name] = ref.new_empty((0, ref.shape[0], *[0] * (ref.ndim - 1)))
    return out
