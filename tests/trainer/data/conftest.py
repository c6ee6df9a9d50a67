"""Fixtures shared by the data tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.trainer.data.recordio_sets import jpeg, write_dataset


@pytest.fixture(scope="module")
def noise_set(tmp_path_factory) -> tuple[Path, list[np.ndarray]]:
    """23 random 112x112 images in shards of 7, 5, 11; record i has label i."""
    rng = np.random.default_rng(0)
    pixels = [rng.integers(0, 256, (112, 112, 3), dtype=np.uint8) for _ in range(23)]
    directory = tmp_path_factory.mktemp("noise")
    write_dataset(directory, [jpeg(p) for p in pixels], list(range(23)), [7, 5, 11], 23)
    return directory, pixels
