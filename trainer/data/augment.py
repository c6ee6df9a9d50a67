"""Training-time augmentation: the one spec of every operation, its parameter draws and
the PyTorch implementation. The DALI pipeline (`trainer.data.dali`) builds the same
operations from the same `AugmentSpec` and draws its parameters from the same
distributions (`Uniform`, `LogUniform`, `Bernoulli`, `box`).

The operations, in the order they run (each off until its `data.augment` key is > 0;
the loaders' horizontal flip, on by default, runs last and is drawn as it always was):

1. crop (probability `crop`): area fraction `a ~ U[crop_area]`, aspect (width/height)
   `r ~ logU[crop_aspect]`, box `w = min(1, sqrt(a r))`, `h = min(1, sqrt(a / r))` (as
   fractions of the image side; clipped instead of torchvision's redraws, so the draw has
   a fixed shape), top-left corner uniform over the positions that keep the box inside;
   resampled back to SxS bilinearly (pixel centres, edge pixels repeated outside).
2. colour: `x -> b (m + c (x - m))` with `m` the image's mean grey (PIL/torchvision's
   contrast centre), then `x -> g + s (x - g)` with `g` each pixel's grey
   (`GRAY_WEIGHTS`, BT.601): `b ~ U[1 ± brightness]`, `c ~ U[1 ± contrast]`,
   `s ~ U[1 ± saturation]`, and `s = 0` (a grey image) with probability `grayscale`.
   One rounding at the end.
3. blur (probability `blur`): Gaussian, `sigma ~ U[blur_sigma]` pixels, radius
   `ceil(3 sigma)` (DALI's default window), borders reflected without repeating the edge.
4. erase (probability `erase`): a box drawn like the crop's from `erase_area` and
   `erase_aspect`, snapped down to whole pixels, filled with `ERASE_FILL` (grey 128,
   ~0 after normalisation: torchvision's RandomErasing value 0 on normalised input).

After every operation pixels are rounded half up and clamped to [0, 255], as DALI's
uint8 operators do, so the two loaders agree to about one grey level.

Draws: every sample's parameters come from its own generator seeded by
`(seed, epoch, record)` (`record`: its position in the dataset's manifest order), a
fixed number of uniforms (`_SLOTS`) of which each operation always reads the same ones:
a sample's augmentation does not depend on the batch, the rank, the world size or which
other operations are on, and a resumed run redraws it exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from trainer.config import AugmentConfig

GRAY_WEIGHTS = (0.299, 0.587, 0.114)  # BT.601 luma of RGB: grey of the colour operations
ERASE_FILL = 128
_TAG_AUGMENT = 3  # keeps this stream's seeds apart from the loader's order (1) and flips (2)


@dataclass(frozen=True)
class Uniform:
    low: float
    high: float

    def from_unit(self, u: np.ndarray) -> np.ndarray:
        return self.low + (self.high - self.low) * u


@dataclass(frozen=True)
class LogUniform:
    """`exp(U[log low, log high])`: as likely to halve as to double (aspect ratios)."""

    low: float
    high: float

    def from_unit(self, u: np.ndarray) -> np.ndarray:
        return np.exp(math.log(self.low) + (math.log(self.high) - math.log(self.low)) * u)


@dataclass(frozen=True)
class Bernoulli:
    p: float

    def from_unit(self, u: np.ndarray) -> np.ndarray:
        return u < self.p


POSITION = Uniform(0.0, 1.0)  # where a box's corner lies within the positions that keep it inside


@dataclass(frozen=True)
class Box:
    """A random box (crop or erase): applied with `p`, area fraction `area`, width/height `aspect`."""

    p: Bernoulli
    area: Uniform
    aspect: LogUniform


def box(area: Any, aspect: Any, ux: Any, uy: Any, sqrt: Callable, minimum: Callable) -> tuple:
    """`(top, left, height, width)` as fractions of the image side, from an area fraction, an
    aspect (width/height) and two POSITION draws; `sqrt`/`minimum` are numpy's or DALI's
    (`nvidia.dali.math`), so both loaders compute the box with this one formula."""
    width, height = minimum(sqrt(area * aspect), 1.0), minimum(sqrt(area / aspect), 1.0)
    return uy * (1.0 - height), ux * (1.0 - width), height, width


@dataclass(frozen=True)
class AugmentSpec:
    """Each operation's parameter distributions (None: off), from `data.augment`."""

    crop: Box | None = None
    brightness: Uniform | None = None
    contrast: Uniform | None = None
    saturation: Uniform | None = None
    grayscale: Bernoulli | None = None
    blur: Bernoulli | None = None
    blur_sigma: Uniform | None = None
    erase: Box | None = None

    @classmethod
    def from_config(cls, cfg: AugmentConfig) -> AugmentSpec:
        def factor(x: float) -> Uniform | None:
            return Uniform(1 - x, 1 + x) if x > 0 else None

        def boxes(p: float, area: list[float], aspect: list[float]) -> Box | None:
            return Box(Bernoulli(p), Uniform(*area), LogUniform(*aspect)) if p > 0 else None

        return cls(
            crop=boxes(cfg.crop, cfg.crop_area, cfg.crop_aspect),
            brightness=factor(cfg.brightness), contrast=factor(cfg.contrast), saturation=factor(cfg.saturation),
            grayscale=Bernoulli(cfg.grayscale) if cfg.grayscale else None,
            blur=Bernoulli(cfg.blur) if cfg.blur else None,
            blur_sigma=Uniform(*cfg.blur_sigma) if cfg.blur else None,
            erase=boxes(cfg.erase, cfg.erase_area, cfg.erase_aspect),
        )

    @property
    def active(self) -> bool:
        return any(getattr(self, name) is not None for name in self.__dataclass_fields__)

    @property
    def colour(self) -> bool:
        return any(x is not None for x in (self.brightness, self.contrast, self.saturation, self.grayscale))


NO_AUGMENT = AugmentSpec()  # every operation off (the loaders still flip)


# Which of a sample's uniforms each parameter reads (fixed, whatever is switched on).
_SLOTS = {name: i for i, name in enumerate((
    "crop", "crop_area", "crop_aspect", "crop_x", "crop_y", "brightness", "contrast", "saturation",
    "grayscale", "blur", "blur_sigma", "erase", "erase_area", "erase_aspect", "erase_x", "erase_y",
))}


def unit_draws(seed: int, epoch: int, records: Sequence[int]) -> np.ndarray:
    """`[len(records), len(_SLOTS)]` uniforms in [0, 1): row i from the generator of `(seed, epoch, records[i])`."""
    return np.stack([
        np.random.default_rng(np.random.SeedSequence((seed, _TAG_AUGMENT, epoch, int(r)))).random(len(_SLOTS))
        for r in records
    ]) if len(records) else np.empty((0, len(_SLOTS)))


def _boxes(spec: Box, u: np.ndarray, prefix: str) -> tuple[np.ndarray, np.ndarray]:
    """(applied [B] bool, boxes [B, 4] top/left/height/width fractions) of one Box from the uniforms."""
    col = lambda name: u[:, _SLOTS[f"{prefix}_{name}"]]
    boxes = box(spec.area.from_unit(col("area")), spec.aspect.from_unit(col("aspect")),
                POSITION.from_unit(col("x")), POSITION.from_unit(col("y")), np.sqrt, np.minimum)
    return spec.p.from_unit(u[:, _SLOTS[prefix]]), np.stack(boxes, 1)


def augment(pixels: Tensor, spec: AugmentSpec, u: np.ndarray) -> Tensor:
    """`pixels` (uint8 [B, 3, H, W]) augmented by `spec` with the parameters read from the
    uniforms `u` (`unit_draws`); uint8 [B, 3, H, W]."""
    x = pixels.float()
    if spec.crop is not None:
        on, boxes = _boxes(spec.crop, u, "crop")
        if on.any():
            picked = torch.from_numpy(on)
            x[picked] = _round(_crop(x[picked], torch.from_numpy(boxes[on]).float()))
    if spec.colour:
        brightness = _factor(spec.brightness, u[:, _SLOTS["brightness"]])
        contrast = _factor(spec.contrast, u[:, _SLOTS["contrast"]])
        x = _round(_colour(x, brightness, contrast, _saturation(spec, u)))
    if spec.blur is not None:
        on = spec.blur.from_unit(u[:, _SLOTS["blur"]])
        if on.any():
            picked = torch.from_numpy(on)
            x[picked] = _round(_blur(x[picked], spec.blur_sigma.from_unit(u[on, _SLOTS["blur_sigma"]])))
    if spec.erase is not None:
        on, boxes = _boxes(spec.erase, u, "erase")
        x.masked_fill_(_erase_mask(boxes * on[:, None], *x.shape[2:]), float(ERASE_FILL))
    return x.to(torch.uint8)


def _round(x: Tensor) -> Tensor:
    """Half up, clamped to uint8's range: DALI's float-to-uint8 conversion."""
    return x.clamp_(0, 255).add_(0.5).floor_()


def _factor(dist: Uniform | None, u: np.ndarray) -> Tensor:
    return torch.from_numpy(dist.from_unit(u) if dist is not None else np.ones_like(u)).float()


def _saturation(spec: AugmentSpec, u: np.ndarray) -> Tensor:
    s = _factor(spec.saturation, u[:, _SLOTS["saturation"]])
    if spec.grayscale is not None:
        s[torch.from_numpy(spec.grayscale.from_unit(u[:, _SLOTS["grayscale"]]))] = 0.0
    return s


def _crop(x: Tensor, boxes: Tensor) -> Tensor:
    """Each image's box (top, left, height, width fractions) resampled to the full size."""
    top, left, height, width = boxes.unbind(1)
    zero = torch.zeros_like(top)
    theta = torch.stack([  # output [-1, 1] -> input [-1, 1] (grid_sample's pixel-edge coordinates)
        torch.stack([width, zero, 2 * left + width - 1], 1),
        torch.stack([zero, height, 2 * top + height - 1], 1),
    ], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _gray(x: Tensor) -> Tensor:
    w = torch.tensor(GRAY_WEIGHTS, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


def _colour(x: Tensor, brightness: Tensor, contrast: Tensor, saturation: Tensor) -> Tensor:
    """`b (m + c (x - m))`, then `g + s (x - g)` (the module docstring), per image."""
    b, c, s = (t.view(-1, 1, 1, 1) for t in (brightness, contrast, saturation))
    m = _gray(x).mean((2, 3), keepdim=True)
    x = b * (m + c * (x - m))
    g = _gray(x)
    return g + s * (x - g)


def _blur(x: Tensor, sigma: np.ndarray) -> Tensor:
    """Separable Gaussian blur of each image with its own sigma, radius ceil(3 sigma)."""
    n, ch, h, w = x.shape
    radius = np.ceil(3 * sigma)
    r = int(radius.max())
    t = torch.arange(-r, r + 1, dtype=torch.float64)
    s = torch.from_numpy(sigma).view(-1, 1)
    k = torch.exp(-(t**2) / (2 * s**2)) * (t.abs() <= torch.from_numpy(radius).view(-1, 1))
    k = (k / k.sum(1, keepdim=True)).float().repeat_interleave(ch, 0)  # [n * ch, 2r + 1]
    y = x.reshape(1, n * ch, h, w)
    y = F.conv2d(F.pad(y, (r, r, 0, 0), mode="reflect"), k.view(n * ch, 1, 1, -1), groups=n * ch)
    y = F.conv2d(F.pad(y, (0, 0, r, r), mode="reflect"), k.view(n * ch, 1, -1, 1), groups=n * ch)
    return y.view(n, ch, h, w)


def _erase_mask(boxes: np.ndarray, h: int, w: int) -> Tensor:
    """[n, 1, h, w]: inside each image's box (fractions; corner and size snapped down to
    whole pixels, as the DALI pipeline passes them to fn.erase; a zero box erases nothing)."""
    top, left, height, width = (torch.from_numpy(np.floor(boxes[:, i] * side)).view(-1, 1)
                                for i, side in enumerate((h, w, h, w)))
    rows, cols = torch.arange(h).view(1, -1), torch.arange(w).view(1, -1)
    inside_rows = (rows >= top) & (rows < top + height)
    inside_cols = (cols >= left) & (cols < left + width)
    return (inside_rows[:, :, None] & inside_cols[:, None, :])[:, None]
