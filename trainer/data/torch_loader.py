"""Pure-PyTorch loader over a RecordIO training set: the fallback when DALI is missing.

Records are read with `data_tools.recordio.RecordReader` (memory-mapped, opened lazily
in each worker process: a mapping cannot be pickled), decoded with Pillow, augmented
(`trainer.data.augment`, on uint8 in the worker: off unless `data.augment` asks), flipped
horizontally at random and normalised with the face contract (`data_tools.face`) as CHW
float32, the same transform as the DALI pipeline (`trainer.data.dali`). Workers hand
over uint8 batches; the consumer normalises them on `device` (`trainer.data.batches`).
A record that cannot be read (an `.idx` offset off the framing, a damaged image, a
label outside the classes) raises `DataError`: one line naming the shard, the record
key and `arcshard-data verify`.

Equal steps on every rank: epoch `e` orders all `N` records of the dataset by a
permutation seeded by `(seed, e)` (the identity with `shuffle=False`), keeps the first
`steps_per_epoch * B * W` of them (`steps_per_epoch = N // (B * W)`: at most one global
batch is dropped per epoch: `trainer.data.batches.steps_per_epoch`) and gives rank `r` the contiguous slice
`[r * steps * B, (r + 1) * steps * B)`. Every rank runs `steps_per_epoch` batches and
the ranks together read each kept record exactly once per epoch. A batch, its flips
included, is a pure function of `(seed, epoch, rank, step)`, so `epoch_batches` can
start at any step; each sample's augmentation is a pure function of `(seed, epoch,
record)` (`trainer.data.augment.unit_draws`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from data_tools.face import INPUT_SIZE
from data_tools.recordio import RecordReader, read_index, unpack
from data_tools.shards import Rejected, decode, open_encoded
from trainer.data.augment import NO_AUGMENT, AugmentSpec, augment, unit_draws
from trainer.data.batches import CPU, StepSource, steps_per_epoch
from trainer.data.errors import DataError

_TAG_ORDER, _TAG_FLIP = 1, 2  # keep the seeds of the two random streams apart


def _generator(*parts: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(parts))


class TorchRecordIO(StepSource):
    """This rank's batches of a RecordIO dataset (a `trainer.data.source.BatchSource`).

    `rec_paths`/`idx_paths` list every shard in manifest order. Batches are
    `(images float32 [B, 3, H, W], labels int64 [B])` on `device`, decoded by `workers`
    DataLoader processes (0: in this process). `augment` (default: none) runs before the flip.
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
        image_size: int = INPUT_SIZE,
        workers: int = 2,
        shuffle: bool = True,
        flip: bool = True,
        device: torch.device = CPU,
        augment: AugmentSpec = NO_AUGMENT,
    ) -> None:
        self.rec_paths = [Path(p) for p in rec_paths]
        self.idx_paths = [Path(p) for p in idx_paths]
        shard, key = [], []
        for i, idx in enumerate(self.idx_paths):
            keys = [k for k, _ in read_index(idx)]
            shard.append(np.full(len(keys), i, dtype=np.int32))
            key.append(np.asarray(keys, dtype=np.int64))
        self._shard, self._key = np.concatenate(shard), np.concatenate(key)
        self.dataset = self.rec_paths[0].parent
        self.steps_per_epoch = steps_per_epoch(
            len(self._key), batch_size, world_size, f"{self.dataset}: num_images", "lower data.batch_size"
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
        self.augment = augment
        self.device = device
        self._readers: dict[int, RecordReader] = {}  # opened lazily, per process
        self._mine: tuple[int, np.ndarray] | None = None  # (epoch, records(epoch))

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_readers"] = {}  # mappings stay in the process that opened them
        state["_mine"] = None
        return state

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
        images = torch.from_numpy(pixels).permute(0, 3, 1, 2)
        if self.augment.active:
            images = augment(images, self.augment, unit_draws(self.seed, epoch, chosen))
        if self.flip:
            flips = _generator(self.seed, _TAG_FLIP, epoch, self.rank, step).random(len(chosen)) < 0.5
            images[torch.from_numpy(flips)] = images[torch.from_numpy(flips)].flip(-1)
        return images.contiguous(), torch.from_numpy(labels)

    def _decode(self, record: int, out: np.ndarray) -> int:
        """Decode record number `record` into `out` (H, W, 3 uint8); return its checked label."""
        shard, key = int(self._shard[record]), int(self._key[record])
        where = f"{self.rec_paths[shard]}: record key {key}"
        verify = f"run `arcshard-data verify {self.dataset}`"
        try:
            header, payload = unpack(self._reader(shard).read(key))
        except ValueError as exc:  # framing: the .idx offset is not a record start, ...
            reason = str(exc).removeprefix(f"{self.rec_paths[shard]}: ")
            raise DataError(f"{where} cannot be read at its .idx offset ({reason}); {verify}") from None
        label = header.label
        if isinstance(label, tuple) or not (0 <= label < self.num_classes and label == int(label)):
            raise DataError(
                f"{where} has label {label!r}, not a class id in [0, {self.num_classes}) "
                "(manifest num_classes); rebuild the dataset"
            )
        try:
            image = open_encoded(payload)
            decode(image)  # a truncated or corrupt image raises here, not inside convert
        except Rejected as exc:
            raise DataError(f"{where}: {exc}; {verify}") from None
        rgb = image if image.mode == "RGB" else image.convert("RGB")
        if rgb.size != (out.shape[1], out.shape[0]):
            raise DataError(
                f"{where} is a {rgb.size[0]}x{rgb.size[1]} image, expected "
                f"{out.shape[1]}x{out.shape[0]}; rebuild the dataset with aligned faces"
            )
        out[...] = np.asarray(rgb)
        return int(label)

    def _reader(self, shard: int) -> RecordReader:
        """This process's reader of `shard`, opened on first use."""
        reader = self._readers.get(shard)
        if reader is None:
            reader = self._readers[shard] = RecordReader(self.rec_paths[shard], self.idx_paths[shard])
        return reader
