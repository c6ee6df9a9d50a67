"""The trainer's one door to data: the `BatchSource` interface and `build_source`.

The trainer calls `build_source` once and then only `epoch_batches`; which loader runs
(synthetic identities, the DALI pipeline, the PyTorch fallback), how many worker
processes prefetch for it and how its batches reach the device stay inside
`trainer.data`. Every source yields `steps_per_epoch` batches on every rank
(`trainer.data.batches.steps_per_epoch`), because ranks running different step counts
deadlock in the collectives.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

import torch
from torch import Tensor

from trainer.config import DataConfig
from trainer.data.recordio_source import make_recordio_source, open_dataset
from trainer.data.synthetic import SyntheticIdentities


class BatchSource(Protocol):
    """This rank's training batches, `(images float32 [B, 3, S, S], labels int64 [B])` on
    the device, normalised by the face contract (`data_tools.face`)."""

    steps_per_epoch: int  # batches this rank yields per epoch (equal on every rank)

    def epoch_batches(self, epoch: int, start_step: int = 0) -> Iterable[tuple[Tensor, Tensor]]:
        """This rank's batches `start_step ..` of `epoch`, prefetched as configured.

        A resumed run passes the step to start at; the DALI source must be read epoch
        after epoch, in order, from the `first_epoch` it was built for.
        """
        ...


def build_source(
    data: DataConfig, rank: int, world_size: int, seed: int, device: torch.device, first_epoch: int = 0
) -> BatchSource:
    """This rank's source for `data` (`first_epoch`: the epoch a resumed run starts in).

    For `data.source=recordio` every rank checks the dataset first (ConfigError naming
    what differs) and `data.num_classes` is set from its manifest, which resolves a null
    in the config (the run's config.yaml then records the number).
    """
    if data.source == "recordio":
        manifest = open_dataset(data)
        data.num_classes = manifest.num_classes
        return make_recordio_source(data, manifest, rank, world_size, seed, device, first_epoch)
    return SyntheticIdentities(
        data.num_classes, data.num_samples, data.batch_size, rank, world_size, data.image_size,
        seed, data.synthetic_mode, workers=data.workers, device=device,
    )
