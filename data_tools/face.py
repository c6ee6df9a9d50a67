"""The face input contract every layer shares: 112x112 RGB, `(x - 127.5) / 127.5`, one geometry.

A network is only as good as the agreement between how its training images were made
and how the faces it serves are prepared, so this is defined once, here, at the lowest
layer, and used by `arcshard-data build`/`make-pairs`, the training loaders (PyTorch,
DALI, synthetic), the embedder behind `arcshard-eval`/`arcshard-embed` and the ONNX export:

* `INPUT_SIZE`: the side of the square, aligned face crop every backbone takes.
* `normalise`: uint8 pixels -> float32 `(x - MEAN) / STD`, i.e. [0, 255] -> [-1, 1].
* `fit_image` (Pillow) / `fit` (numpy): how an image that is not `size x size` becomes
  one, one of `FIT_MODES` (a dataset records its mode in its manifest, `--fit` on every
  command that reads photos chooses it). All three resample bilinearly with antialiasing
  (Pillow filters over the whole footprint when it shrinks), and all three leave a
  `size x size` image unchanged and shape any square image identically:

  - `crop` (the default, and what `arcshard-data build` always did, so every dataset
    made before `--fit` existed was made this way): resize so the *shorter* side is
    `size`, centre-crop the longer one. The aspect ratio is kept, the edges of the longer
    side are lost: a 92x112 portrait loses about 10 rows at its top and bottom (forehead,
    chin), a 320x243 landscape about 38 columns at each side.
  - `squash`: resize to `size x size`, ignoring the aspect ratio. Nothing is lost, the
    face is stretched (92x112 -> 1.22x wider; 320x243 -> 1.32x taller).
  - `pad`: resize so the *longer* side is `size` (aspect ratio kept), centre it on a
    `size x size` canvas of `PAD_VALUE` (grey 128); an odd remainder puts the extra
    pixel on the right / bottom. Nothing is lost or stretched; part of the input is bars
    (92x112 -> 92x112 between 10-pixel bars left and right; 320x243 -> 112x85 with bars
    of 13 rows above and 14 below).

  Grey 128 rather than black: `(128 - 127.5) / 127.5 = 0.004`, so the bars enter the
  network as (almost) zeros, the value its convolutions' zero padding already puts around
  every image, and carry no signal of their own; black bars (-1, the extreme value) would
  add strong artificial edges along the photo's border.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeVar

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    import torch

INPUT_SIZE = 112
"""Side of the square, aligned face crop every backbone takes."""
MEAN = 127.5
STD = 127.5
"""Pixels `x` in [0, 255] enter the network as `(x - MEAN) / STD`, in [-1, 1]."""

Pixels = TypeVar("Pixels", np.ndarray, "torch.Tensor")


def normalise(pixels: Pixels) -> Pixels:
    """uint8 pixels (numpy array or torch tensor, any layout) -> float32 `(x - MEAN) / STD`.

    A tensor stays on its device, so a loader can ship uint8 (a quarter of the bytes)
    and normalise where the network runs. Both kinds round identically (float32
    subtraction of 127.5 is exact, the division correctly rounded).
    """
    out = pixels.astype(np.float32) if isinstance(pixels, np.ndarray) else pixels.float()
    out -= MEAN
    out /= STD
    return out


FIT_MODES = ("crop", "squash", "pad")
"""How an image that is not `size x size` becomes one (see the module docstring)."""
PAD_VALUE = 128
"""The grey of `pad`'s bars: normalises to 0.004, the network's "nothing here"."""


def check_fit(mode: object) -> str:
    """`mode` if it is one of `FIT_MODES`; else ValueError listing them."""
    if mode not in FIT_MODES:
        raise ValueError(f"fit {mode!r}: not one of {', '.join(FIT_MODES)}")
    return mode  # type: ignore[return-value]


def square_crop(image: Image.Image, size: int = INPUT_SIZE) -> Image.Image:
    """`image` resized so its shorter side is `size`, centre-cropped to `size x size`
    (bilinear, antialiased: Pillow resamples the crop box straight to the output)."""
    w, h = image.size
    side = min(w, h)
    left, top = (w - side) / 2, (h - side) / 2
    return image.resize((size, size), Image.Resampling.BILINEAR, box=(left, top, left + side, top + side))


def squash(image: Image.Image, size: int = INPUT_SIZE) -> Image.Image:
    """`image` resized to `size x size`, aspect ratio ignored (bilinear, antialiased)."""
    return image.resize((size, size), Image.Resampling.BILINEAR)


def pad(image: Image.Image, size: int = INPUT_SIZE) -> Image.Image:
    """`image` resized so its longer side is `size` (bilinear, antialiased, aspect kept) and
    centred on a `size x size` canvas of `PAD_VALUE` (extra odd pixel right / bottom)."""
    w, h = image.size
    scale = size / max(w, h)
    inner = (max(1, round(w * scale)), max(1, round(h * scale)))
    canvas = Image.new(image.mode, (size, size), (PAD_VALUE,) * len(image.getbands()))
    canvas.paste(image.resize(inner, Image.Resampling.BILINEAR), ((size - inner[0]) // 2, (size - inner[1]) // 2))
    return canvas


_FITS = {"crop": square_crop, "squash": squash, "pad": pad}


def fit_image(image: Image.Image, size: int = INPUT_SIZE, mode: str = "crop") -> Image.Image:
    """An RGB (or grayscale) Pillow image as `size x size` by `mode` (one of `FIT_MODES`);
    returned as it is when it already is `size x size`."""
    check_fit(mode)
    if image.size == (size, size):
        return image
    return _FITS[mode](image, size)


def fit(pixels: np.ndarray, size: int = INPUT_SIZE, mode: str = "crop") -> np.ndarray:
    """One RGB uint8 `[H, W, 3]` face as `[size, size, 3]`: unchanged when it already is,
    else shaped by `fit_image` (the geometry `arcshard-data build --fit mode` gives
    training images)."""
    check_fit(mode)
    if pixels.shape[:2] == (size, size):
        return pixels
    return np.asarray(fit_image(Image.fromarray(pixels), size, mode))
