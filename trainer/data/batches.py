"""What every batch source shares: the steps-per-epoch rule, device transfer, prefetching.

`steps_per_epoch` is the one rule for how many batches a rank reads per epoch:
`num_images // (batch_size * world_size)` on every rank (the remainder is dropped),
because ranks running different step counts deadlock in the collectives.

`StepSource` is the base of the sources whose batch of `(epoch, step)` is a pure
function (the PyTorch RecordIO loader, the synthetic source): a subclass renders
`raw_batch` (uint8 pixels, int64 labels); `epoch_batches` runs it in `workers`
DataLoader processes (`prefetch_factor` 4, pinned memory on CUDA) and normalises on
`device` with the face contract (`data_tools.face.normalise`). Shipping uint8 out of the
workers moves a quarter of float32's bytes through shared memory: 4 workers x 4 batches
of 128 float32 faces need ~300 MB of /dev/shm, more than a container's 64 MB default.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator

import torch
from torch import Tensor

from data_tools.face import normalise

PREFETCH_FACTOR = 4  # batches each DataLoader worker keeps ready
CPU = torch.device("cpu")


def steps_per_epoch(num_images: int, batch_size: int, world_size: int, what: str, fix: str) -> int:
    """Batches every rank reads per epoch; ValueError naming `what` and `fix` when zero."""
    global_batch = batch_size * world_size
    steps = num_images // global_batch
    if steps < 1:
        raise ValueError(
            f"{what} {num_images} is less than one global batch (batch_size {batch_size} x "
            f"world_size {world_size} = {global_batch}): zero steps per epoch; {fix}"
        )
    return steps


def check_start(start_step: int, steps: int) -> None:
    """A resumed epoch starts inside it (or at its end, which yields nothing)."""
    if not 0 <= start_step <= steps:
        raise ValueError(f"start_step {start_step} must be in [0, steps_per_epoch={steps}]")


def to_device(tensor: Tensor, device: torch.device) -> Tensor:
    """`tensor` on `device` without blocking the host: a CUDA copy goes from pinned memory
    with `non_blocking` (from pageable memory it would wait for the copy)."""
    if device.type != "cuda":
        return tensor.to(device)
    if not tensor.is_pinned():
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


class StepSource(ABC):
    """A source whose batch of `(epoch, step)` is a pure function (see the module docstring).

    Subclasses set `steps_per_epoch`, `workers` (0: render in this process) and `device`.
    """

    steps_per_epoch: int
    workers: int
    device: torch.device

    @abstractmethod
    def raw_batch(self, epoch: int, step: int) -> tuple[Tensor, Tensor]:
        """`(pixels uint8 [B, 3, H, W], labels int64 [B])` of one step, on the host."""

    def batch(self, epoch: int, step: int) -> tuple[Tensor, Tensor]:
        """This rank's `(images float32 [B, 3, H, W], labels int64 [B])` of one step, on `device`."""
        return self._on_device(*self.raw_batch(epoch, step))

    def epoch_batches(self, epoch: int, start_step: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        """Yield `batch(epoch, s)` for s = start_step .. steps_per_epoch - 1."""
        check_start(start_step, self.steps_per_epoch)
        steps = range(start_step, self.steps_per_epoch)
        if self.workers == 0:
            return (self.batch(epoch, s) for s in steps)
        raw = torch.utils.data.DataLoader(
            _Steps(self, epoch), batch_size=None, sampler=steps, num_workers=self.workers,
            pin_memory=self.device.type == "cuda", prefetch_factor=PREFETCH_FACTOR,
        )
        return (self._on_device(pixels, labels) for pixels, labels in raw)

    def _on_device(self, pixels: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        return normalise(to_device(pixels, self.device)), to_device(labels, self.device)


class _Steps(torch.utils.data.Dataset):
    """The raw batches of one epoch, indexed by step, for a DataLoader's workers."""

    def __init__(self, source: StepSource, epoch: int) -> None:
        self.source, self.epoch = source, epoch

    def __len__(self) -> int:
        return self.source.steps_per_epoch

    def __getitem__(self, step: int) -> tuple[Tensor, Tensor]:
        return self.source.raw_batch(self.epoch, step)
