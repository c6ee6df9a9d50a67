"""RecordIO training sets for the trainer: start-up validation and loader selection.

`open_dataset` checks a dataset directory against the config before training starts,
on every rank: `manifest.json` readable, every shard file present with its recorded
size and its `.idx` listing the manifest's record count (no hashing: `arcshard-data
verify` does that), the manifest's image size equal to `data.image_size` and its `num_classes` equal to `data.num_classes` (or taken from
it when that is null). Anything else raises `ConfigError` with one line naming what
differs.

`make_recordio_source` picks the loader: `data.loader=dali` is the DALI pipeline
(`trainer.data.dali`), `torch` the pure-PyTorch fallback (`trainer.data.torch_loader`),
`auto` DALI when `nvidia.dali` imports and the fallback otherwise; both apply
`data.augment` (`trainer.data.augment`). Both yield every
rank exactly `trainer.data.batches.steps_per_epoch` batches per epoch. The trainer
reaches both through `trainer.data.source.build_source`.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from data_tools.manifest import Manifest, check_shard_files, load_manifest
from trainer.config import ConfigError, DataConfig
from trainer.data.augment import AugmentSpec
from trainer.data.batches import steps_per_epoch
from trainer.data.torch_loader import TorchRecordIO

if TYPE_CHECKING:
    from trainer.data.dali import DaliRecordIO

log = logging.getLogger(__name__)


def open_dataset(data: DataConfig) -> Manifest:
    """The manifest of `data.path`, checked against `data`; raises ConfigError."""
    try:
        manifest = load_manifest(data.path)
        check_shard_files(data.path, manifest)
    except ValueError as exc:
        raise ConfigError(f"data.path: {exc}") from None
    where = Path(data.path) / "manifest.json"
    if tuple(manifest.image_size) != (data.image_size, data.image_size):
        h, w = manifest.image_size
        raise ConfigError(
            f"data.path: {where} has {h}x{w} images, data.image_size is {data.image_size}; "
            "rebuild the dataset with aligned 112x112 faces"
        )
    if data.num_classes is not None and data.num_classes != manifest.num_classes:
        raise ConfigError(
            f"data.num_classes: {data.num_classes}, but {where} has {manifest.num_classes} "
            "classes; set data.num_classes=null to take it from the manifest"
        )
    return manifest


def dali_available() -> bool:
    """Whether NVIDIA DALI is installed (the `dali` extra)."""
    return importlib.util.find_spec("nvidia.dali") is not None


def make_recordio_source(
    data: DataConfig, manifest: Manifest, rank: int, world_size: int, seed: int, device: torch.device,
    first_epoch: int = 0,
) -> TorchRecordIO | DaliRecordIO:
    """This rank's loader of the dataset at `data.path` (see the module docstring);
    ConfigError when the batch is too large or a shard's index is unreadable."""
    loader = data.loader
    if loader == "auto":
        loader = "dali" if dali_available() else "torch"
    elif loader == "dali" and not dali_available():
        raise ConfigError(
            "data.loader: dali is not installed; `pip install -e '.[dali]'` or use data.loader=torch"
        )
    directory = Path(data.path)
    recs = [directory / s.rec for s in manifest.shards]
    idxs = [directory / s.idx for s in manifest.shards]
    try:
        steps_per_epoch(manifest.num_images, data.batch_size, world_size, f"{directory}: num_images",
                        "lower data.batch_size")
    except ValueError as exc:
        raise ConfigError(f"data.batch_size: {exc}") from None
    log.info("data: %s loader over %d images in %d shards of %s",
             loader, manifest.num_images, len(recs), directory)
    flip, augment = data.augment.flip, AugmentSpec.from_config(data.augment)
    try:
        if loader == "dali":
            from trainer.data.dali import DaliRecordIO  # imports nvidia.dali

            return DaliRecordIO(
                recs, idxs, manifest.num_images, manifest.num_classes, data.batch_size, rank,
                world_size, seed, device, threads=max(1, data.workers), dataset=str(directory),
                first_epoch=first_epoch, image_size=data.image_size, flip=flip, augment=augment,
            )
        return TorchRecordIO(
            recs, idxs, manifest.num_classes, data.batch_size, rank, world_size, seed,
            data.image_size, data.workers, flip=flip, device=device, augment=augment,
        )
    except ValueError as exc:  # a malformed .idx
        raise ConfigError(f"data.path: {exc}") from None
