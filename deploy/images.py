"""Face image files -> RGB uint8 arrays the embedder takes.

Any format Pillow reads (JPEG, PNG, GIF, PGM, BMP, WebP, ...); grayscale, palette and
alpha images are converted to RGB; images that are not 112x112 get the training set's
geometry, `data_tools.face.fit` with the `fit` given (crop, squash or pad: what
`arcshard-data build --fit` does to the training images, so a deployed model sees faces
shaped as in training and in verification; `deploy.fit` finds the model's). Images
should be aligned face crops: resizing does not align a face.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image

from data_tools import face
from data_tools.face import check_fit

__all__ = ["UnreadableImage", "expand_paths", "image_extensions", "load_face", "read_list"]


class UnreadableImage(ValueError):
    """An image file that cannot be opened or decoded; the message names it and says why."""


def image_extensions() -> frozenset[str]:
    """Lower-case file suffixes Pillow can open (".jpg", ".png", ".gif", ...)."""
    return frozenset(ext.lower() for ext in Image.registered_extensions())


def expand_paths(paths: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Files as given, directories replaced by the image files below them (recursively,
    sorted, by extension); order otherwise kept."""
    extensions = image_extensions()
    out: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            out.extend(sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in extensions))
        else:
            out.append(path)
    return out


def read_list(list_file: str | os.PathLike[str]) -> list[Path]:
    """Image paths from a list file: one per line; blank lines and lines starting with
    '#' are ignored; relative paths are relative to the current directory."""
    try:
        text = Path(list_file).read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"{list_file}: cannot read the image list ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise ValueError(f"{list_file}: not a UTF-8 text file of image paths, one per line") from None
    return [Path(line.strip()) for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def load_face(path: str | os.PathLike[str], fit: str = "crop") -> np.ndarray:
    """One image file as RGB uint8 `[112, 112, 3]`, made square by `fit` (one of
    `data_tools.face.FIT_MODES`); `UnreadableImage` says why not."""
    check_fit(fit)
    try:
        with Image.open(path) as image:
            image.load()
            rgb = image.convert("RGB")
    except FileNotFoundError:
        raise UnreadableImage(f"{path}: no such file") from None
    except IsADirectoryError:
        raise UnreadableImage(f"{path}: is a directory") from None
    except PermissionError:
        raise UnreadableImage(f"{path}: permission denied") from None
    except Exception as exc:  # Pillow raises many types for bad data (OSError, SyntaxError, ...)
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UnreadableImage(f"{path}: not a readable image ({reason})") from None
    return face.fit(np.asarray(rgb, dtype=np.uint8), face.INPUT_SIZE, fit)
