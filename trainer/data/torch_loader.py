"""Pure-PyTorch loader over a RecordIO training set: the fallback when DALI is missing.

Records are read with `data_tools.recordio.RecordReader` (memory-mapped, opened lazily
in each worker process: a mapping cannot be pickled), decoded with Pillow, flipped
horizontally at random and normalised to `(x - 127.5) / 127.5` as CHW float32, the
same transform as the DALI pipeline (`trainer.data.dali`). Workers hand over uint8
batches (a quarter of the bytes of float32); the consumer normalises them on `device`.

Equal steps on every rank: epoch `e` orders all `N` records of the dataset by a
permutation seeded by `(seed, e)` (the identity with `shuffle=False`), keeps the first
`steps_per_epoch * B * W` of them (`steps_per_epoch = N // (B * W)`: at most one global
batch is dropped per epoch) and gives rank `r` the contiguous slice
`[r * steps * B, (r + 1) * steps * B)`. Every rank runs `steps_per_epoch` batches and
the ranks together read each kept record exactly once per epoch. A batch, its flips
included, is a pure function of `(seed, epoch, rank, step)`, so `epoch_batches` can
start at any step.
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from data_tools.recordio import RecordReader, unpack

from trainer.data.errors import DataError

_TAG_ORDER, _TAG_FLIP = 1, 2  # keep the seeds of the two random streams apart


def _generator(*parts: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(parts))


class TorchRecordIO:
    """This rank's batches of a RecordIO dataset; the loop's interface of `SyntheticIdentities`.

    `rec_paths`/`idx_paths` list every shard in manifest order. Batches are
    `(images float32 [B, 3, H, W], labels int64 [B])` on `device`, decoded by `workers`
    DataLoader processes (0: in this process).
    """

    def __init__(
        self,
        rec_paths: Sequence[Path],
        idx_paths: Sequence[Path],
        num_classes: int,
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        image_size: int = 112,
        workers: int = 2,
        shuffle: bool = True,
        flip: bool = True,
        device: torch.device = torch.device("cpu"),
    ) -> None:
        self.rec_paths = [Path(p) for p in rec_paths]
        self.idx_paths = [Path(p) for p in idx_paths]
        shard, key = [], []
        for i, idx in enumerate(self.idx_paths):
            keys = [int(line.split(b"\t", 1)[0]) for line in idx.read_bytes().splitlines()]
            shard.append(np.full(len(keys), i, dtype=np.int32))
            key.append(np.asarray(keys, dtype=np.int64))
        self._shard, self._key = np.concatenate(shard), np.concatenate(key)
        num_images = len(self._key)
        self.steps_per_epoch = num_images // (batch_size * world_size)
        if self.steps_per_epoch < 1:
            raise ValueError(
                f"{self.rec_paths[0].parent}: {num_images} images is less than one global batch "
                f"({batch_size} x {world_size} ranks); lower data.batch_size"
            )
        self.num_classes = num_classes
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.image_size = image_size
        self.workers = workers
        self.shuffle = shuffle
        self.flip = flip
        self.device = device
        self._readers: dict[int, RecordReader] = {}  # opened lazily, per process
        self._mine: tuple[int, np.ndarray] | None = None  # (epoch, records(epoch))

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_readers"] = {}  # mappings stay in the process that opened them
        state["_mine"] = None
        return state

    def epoch_batches(self, epoch: int, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield `batch(epoch, s)` for s = start_step .. steps_per_epoch - 1."""
        if not 0 <= start_step <= self.steps_per_epoch:
            raise ValueError(
                f"start_step {start_step} must be in [0, steps_per_epoch={self.steps_per_epoch}]"
            )
        steps = range(start_step, self.steps_per_epoch)
        if self.workers == 0:
            return (self.batch(epoch, s) for s in steps)
        raw = torch.utils.data.DataLoader(
            _Steps(self, epoch), batch_size=None, sampler=steps, num_workers=self.workers,
            pin_memory=self.device.type == "cuda", prefetch_factor=4,
        )
        return (self._normalise(pixels, labels) for pixels, labels in raw)

    def records(self, epoch: int) -> np.ndarray:
        """Global record numbers (positions in manifest order) this rank reads in `epoch`, in order."""
        if self._mine is not None and self._mine[0] == epoch:
            return self._mine[1]
        n = len(self._key)
        order = _generator(self.seed, _TAG_ORDER, epoch).permutation(n) if self.shuffle else np.arange(n)
        per_rank = self.steps_per_epoch * self.batch_size
        mine = order[self.rank * per_rank : (self.rank + 1) * per_rank]
        self._mine = (epoch, mine)
        return mine

    def batch(self, epoch: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's `(images, labels)` of one step."""
        return self._normalise(*self.raw_batch(epoch, step))

    def _normalise(self, pixels: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 [B, 3, H, W] to float32 `(x - 127.5) / 127.5` on `device`."""
        images = pixels.to(self.device, non_blocking=True).float().sub_(127.5).div_(127.5)
        return images, labels.to(self.device, non_blocking=True)

    def raw_batch(self, epoch: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`batch` before normalisation: `(pixels uint8 [B, 3, H, W], labels int64 [B])`."""
        if not 0 <= step < self.steps_per_epoch:
            raise ValueError(f"step {step} must be in [0, steps_per_epoch={self.steps_per_epoch})")
        chosen = self.records(epoch)[step * self.batch_size : (step + 1) * self.batch_size]
        size = self.image_size
        pixels = np.empty((len(chosen), size, size, 3), dtype=np.uint8)
        labels = np.empty(len(chosen), dtype=np.int64)
        for i, record in enumerate(chosen):
            labels[i] = self._decode(int(record), pixels[i])
        if self.flip:
            flips = _generator(self.seed, _TAG_FLIP, epoch, self.rank, step).random(len(chosen)) < 0.5
            pixels[flips] = pixels[flips, :, ::-1]
        return torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels)

    def _decode(self, record: int, out: np.ndarray) -> int:
        """Decode record number `record` into `out` (H, W, 3 uint8); return its checked label."""
        shard, key = int(self._shard[record]), int(self._key[record])
        reader = self._readers.get(shard)
        if reader is None:
            reader = self._readers[shard] = RecordReader(self.rec_paths[shard], self.idx_paths[shard])
        header, payload = unpack(reader.read(key))
        where = f"{self.rec_paths[shard]}: record key {key}"
        label = header.label
        if isinstance(label, tuple) or not (0 <= label < self.num_classes and label == int(label)):
            raise DataError(
                f"{where} has label {label!r}, not a class id in [0, {self.num_classes}) "
                "(manifest num_classes); rebuild the dataset"
            )
        with Image.open(io.BytesIO(payload)) as image:
            if image.mode != "RGB":
                image = image.convert("RGB")
            if image.size != (out.shape[1], out.shape[0]):
                raise DataError(
                    f"{where} is a {image.size[0]}x{image.size[1]} image, expected "
                    f"{out.shape[1]}x{out.shape[0]}; rebuild the dataset with aligned faces"
                )
            out[...] = np.asarray(image)
        return int(label)


class _Steps(torch.utils.data.Dataset):
    """The batches of one epoch, indexed by step, for a DataLoader's workers."""

    def __init__(self, source: TorchRecordIO, epoch: int) -> None:
        self.source, self.epoch = source, epoch

    def __len__(self) -> int:
        return self.source.steps_per_epoch

    def __getitem__(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.source.raw_batch(self.epoch, step)
