"""Small RecordIO training sets written for the data tests."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from data_tools.manifest import Manifest, describe_shard, write_manifest
from data_tools.recordio import IRHeader, RecordWriter, pack

CPU = torch.device("cpu")


def jpeg(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def write_dataset(directory: Path, images: list[bytes], labels: list[int], shard_sizes: list[int],
                  num_classes: int) -> Manifest:
    """A dataset directory with shards of `shard_sizes` records (record i: labels[i], images[i])."""
    assert sum(shard_sizes) == len(images) == len(labels)
    directory.mkdir(parents=True, exist_ok=True)
    shards, i = [], 0
    for s, size in enumerate(shard_sizes):
        rec, idx = f"train-{s:05d}.rec", f"train-{s:05d}.idx"
        with RecordWriter(directory / rec, directory / idx) as writer:
            for _ in range(size):
                writer.write(pack(IRHeader(0, float(labels[i]), i, 0), images[i]))
                i += 1
        shards.append(describe_shard(directory, rec, idx, size))
    manifest = Manifest(num_images=len(images), num_classes=num_classes, image_size=(112, 112),
                        shards=shards)
    write_manifest(directory, manifest)
    return manifest


def shards(directory: Path) -> tuple[list[Path], list[Path]]:
    recs = sorted(directory.glob("train-*.rec"))
    return recs, [r.with_suffix(".idx") for r in recs]
