"""Shared helpers for the evaluation tests: small verification sets made on the spot."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_tools.pairs import write_bin


def jpeg(pixels: np.ndarray) -> bytes:
    """RGB uint8 pixels as JPEG bytes."""
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=95)
    return out.getvalue()


def random_faces(count: int, seed: int, size: int = 112) -> list[np.ndarray]:
    """`count` smooth random RGB images (blurred noise: JPEG keeps them close)."""
    rng = np.random.default_rng(seed)
    faces = []
    for _ in range(count):
        small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        faces.append(np.asarray(Image.fromarray(small).resize((size, size), Image.Resampling.BICUBIC)))
    return faces


def make_bin(path: Path, num_images: int = 12, num_pairs: int = 20, seed: int = 0) -> tuple[list[bytes], list[bool]]:
    """A .bin of `num_pairs` pairs over `num_images` distinct JPEGs, written as make-pairs does."""
    rng = np.random.default_rng(seed)
    encoded = [jpeg(face) for face in random_faces(num_images, seed)]
    bins, issame = [], []
    for i in range(num_pairs):
        a, b = rng.choice(num_images, 2, replace=False)
        bins += [encoded[a], encoded[b]]
        issame.append(i % 2 == 0)
    write_bin(path, bins, issame)
    return bins, issame


@pytest.fixture
def small_bin(tmp_path: Path) -> Path:
    """A .bin of 10 pairs over 6 distinct images (cheap to embed)."""
    path = tmp_path / "small.bin"
    make_bin(path, num_images=6, num_pairs=10)
    return path


@pytest.fixture(autouse=True)
def one_torch_thread():
    """One intra-op thread: these tests run tiny batches on a shared 2-core machine, where
    a second spinning thread only contends (restored afterwards)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
