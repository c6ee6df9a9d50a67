"""The face input contract every layer shares: 112x112 RGB, `(x - 127.5) / 127.5`, square crop.

A network is only as good as the agreement between how its training images were made
and how the faces it serves are prepared, so this is defined once, here, at the lowest
layer, and used by `arcshard-data build`, the training loaders (PyTorch, DALI, synthetic),
the embedder behind `arcshard-eval`/`arcshard-embed` and the ONNX export:

* `INPUT_SIZE`: the side of the square, aligned face crop every backbone takes.
* `normalise`: uint8 pixels -> float32 `(x - MEAN) / STD`, i.e. [0, 255] -> [-1, 1].
* `square_crop` / `fit`: an image that is not `size x size` is resized so that its
  *shorter* side is `size` and then centre-cropped to a square (bilinear, antialiased;
  the aspect ratio is kept, as a face's must be). This is what `arcshard-data build` has
  always done to a non-square photo, so every existing training set was made this way.
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


def square_crop(image: Image.Image, size: int = INPUT_SIZE) -> Image.Image:
    """`image` resized so its shorter side is `size`, centre-cropped to `size x size`
    (bilinear, antialiased: Pillow resamples the crop box straight to the output)."""
    w, h = image.size
    side = min(w, h)
    left, top = (w - side) / 2, (h - side) / 2
    return image.resize((size, size), Image.Resampling.BILINEAR, box=(left, top, left + side, top + side))


def fit(pixels: np.ndarray, size: int = INPUT_SIZE) -> np.ndarray:
    """One RGB uint8 `[H, W, 3]` face as `[size, size, 3]`: unchanged when it already is,
    else `square_crop`ped (the geometry `arcshard-data build` gives training images)."""
    if pixels.shape[:2] == (size, size):
        return pixels
    return np.asarray(square_crop(Image.fromarray(pixels), size))
