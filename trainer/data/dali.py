"""NVIDIA DALI loader over a RecordIO training set (see `trainer.data.recordio_source`).

One DALI pipeline per rank: `fn.readers.mxnet` over every shard's `.rec` with
`shard_id=rank, num_shards=world_size`, JPEG decode (`device="mixed"`: nvJPEG on GPU;
`"cpu"` on a CPU-only run), `data.augment`'s operations (`_augment`: off unless asked), a
random horizontal flip (`fn.random.coin_flip` as the
`mirror` of `fn.crop_mirror_normalize`), the face contract's normalisation
(`data_tools.face`: `(x - 127.5) / 127.5`) to CHW float32, wrapped in `DALIGenericIterator`. DALI's reader takes one index for all the
`.rec` files, read as one concatenated stream; `combined_index` writes it (each shard's
`.idx` offsets shifted by the sizes of the shards before it) to a temporary file that
lives only while the pipeline is built.

Equal steps on every rank: DALI splits the `N` records into `W` contiguous parts whose
sizes differ by at most one, and without `stick_to_shard` rank `r` reads part
`(r + epoch) % W` in epoch `epoch`, so one epoch over all ranks reads every record once.
The reader pads its part (`pad_last_batch=True`) and the iterator (`reader_name` +
`LastBatchPolicy.DROP`) counts every rank's epoch as `N // W` samples and drops the
incomplete last batch: every rank yields exactly `N // (B * W)` batches per epoch
(`trainer.data.batches.steps_per_epoch`) and at most one global batch of records (plus
`N mod W`) is not read in an epoch. `epoch_batches` checks that count and fails loudly rather than let
ranks drift apart (a mismatch deadlocks the collectives).

The reader shuffles within a buffer of `initial_fill` records (DALI's
`random_shuffle`); the datasets are globally shuffled when written, so that is enough.
Its stream is seeded by `seed + rank`; DALI's state cannot be rewound, so epochs must
be read in order (`epoch_batches` refuses anything else). A run resumed from a checkpoint
taken in epoch `e` builds the reader with `first_epoch=e`: it starts on part
`(rank + e) % W` with the seed `seed + rank + e * W` and skips the batches already
consumed, so the resumed run reads the right part and the right number of batches, but
not the same order within the shuffle buffer as an uninterrupted run (the PyTorch
loader and the synthetic source resume exactly).

Augmentation follows `trainer.data.augment` (order, formulas, distributions): each
parameter is drawn per sample by `fn.random.uniform`/`coin_flip` from the spec's
distribution (`_draw`) and passed as a tensor argument; an operation applied with a
probability runs under a per-sample `if` (DALI conditionals). The crop is `fn.resize` of a
relative ROI, the blur `fn.gaussian_blur` (same window and border as the fallback's), the
erase `fn.erase` with whole-pixel boxes. The colour operations are DALI arithmetic of the
spec's formula rather than `fn.brightness_contrast`/`fn.saturation`: `contrast_center`
cannot take a per-image mean computed on the GPU (see DALI's own auto_aug `contrast`),
and `fn.saturation`'s colour matrix leaves a grey image a level off (124, 124, 125).

Labels are checked on the host and reach a GPU from pinned memory without blocking.
A bad record (an `.idx` offset off the framing, a damaged JPEG) stops the pipeline with
a `RuntimeError` that names no record; `epoch_batches` turns it into a `DataError`
naming the shard and record key, found by checking (`data_tools.verify.check_record`)
the records of this rank's part the reader can have reached so far.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import nvidia.dali.math as dmath
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

from data_tools.face import INPUT_SIZE, MEAN, STD
from data_tools.recordio import RecordReader, read_index
from data_tools.verify import check_record
from trainer.data.augment import (
    ERASE_FILL,
    GRAY_WEIGHTS,
    NO_AUGMENT,
    POSITION,
    AugmentSpec,
    Bernoulli,
    LogUniform,
    Uniform,
    box,
)
from trainer.data.batches import check_start, steps_per_epoch, to_device
from trainer.data.errors import DataError

log = logging.getLogger(__name__)

_READER = "Reader"
_SHUFFLE_BUFFER = 4096  # records held by the reader's shuffle buffer
_PREFETCH = 2  # batches the pipeline prepares ahead of the consumer
_DATA_OPERATORS = ("readers.mxnet", "decoders.image")  # a failure there is a bad record
Index = list[tuple[int, int]]  # (key, offset) per record of one shard


@pipeline_def(enable_conditionals=True)
def _pipeline(
    rec_paths: Sequence[str], index_path: str, shard_id: int, num_shards: int,
    shuffle: bool, flip: bool, decode_device: str, augment: AugmentSpec, size: int,
):
    jpegs, labels = fn.readers.mxnet(
        path=list(rec_paths), index_path=[index_path], shard_id=shard_id,
        num_shards=num_shards, random_shuffle=shuffle, initial_fill=_SHUFFLE_BUFFER,
        pad_last_batch=True, name=_READER,
    )
    images = fn.decoders.image(jpegs, device=decode_device, output_type=types.RGB)
    if augment.active:
        images = _augment(images, augment, size)
    mirror = fn.random.coin_flip(probability=0.5) if flip else 0
    images = fn.crop_mirror_normalize(
        images, dtype=types.FLOAT, output_layout="CHW", mean=[MEAN] * 3, std=[STD] * 3,
        mirror=mirror,
    )
    return images, labels


def _draw(dist: Uniform | LogUniform | Bernoulli):
    """One value per sample from one of `trainer.data.augment`'s distributions."""
    if isinstance(dist, Bernoulli):
        return fn.random.coin_flip(probability=dist.p, dtype=types.BOOL)
    if isinstance(dist, LogUniform):
        return dmath.exp(_draw(Uniform(math.log(dist.low), math.log(dist.high))))
    if dist.low == dist.high:  # DALI refuses an empty range
        return fn.random.uniform(values=[dist.low])
    return fn.random.uniform(range=[dist.low, dist.high])


def _box(spec):
    """(top, left, height, width) fractions of one of the spec's random boxes."""
    return box(_draw(spec.area), _draw(spec.aspect), _draw(POSITION), _draw(POSITION), dmath.sqrt, dmath.min)


def _gray(x):
    return fn.reductions.sum(x * types.Constant(np.array(GRAY_WEIGHTS, np.float32)), axes=[2], keep_dims=True)


def _augment(images, spec: AugmentSpec, size: int):
    """`spec`'s operations on decoded uint8 HWC `size`x`size` images, in `trainer.data.augment`'s order."""
    if spec.crop is not None:
        top, left, height, width = _box(spec.crop)
        if _draw(spec.crop.p):
            images = fn.resize(images, size=[size, size], roi_start=fn.stack(top, left),
                               roi_end=fn.stack(top + height, left + width), roi_relative=True)
    if spec.colour:
        x = fn.cast(images, dtype=types.FLOAT)
        m = fn.reductions.mean(_gray(x), axes=[0, 1], keep_dims=True)
        if spec.contrast is not None:
            x = m + _draw(spec.contrast) * (x - m)
        if spec.brightness is not None:
            x = _draw(spec.brightness) * x
        s = _draw(spec.saturation) if spec.saturation is not None else 1.0
        if spec.grayscale is not None:
            s = s * (1.0 - fn.cast(_draw(spec.grayscale), dtype=types.FLOAT))
        g = _gray(x)
        images = fn.cast(g + s * (x - g), dtype=types.UINT8)  # rounds half up, saturates
    if spec.blur is not None:
        sigma = _draw(spec.blur_sigma)
        if _draw(spec.blur):
            images = fn.gaussian_blur(images, sigma=sigma)
    if spec.erase is not None:
        top, left, height, width = _box(spec.erase)
        if _draw(spec.erase.p):
            images = fn.erase(images, anchor=dmath.floor(fn.stack(top, left) * size),
                              shape=dmath.floor(fn.stack(height, width) * size), axis_names="HW",
                              fill_value=ERASE_FILL)
    return images


class DaliRecordIO:
    """This rank's batches from a DALI pipeline (a `trainer.data.source.BatchSource`).

    `rec_paths`/`idx_paths` list every shard of the dataset in manifest order;
    `num_images` is the manifest's total; `augment` (default: none) runs before the flip.
    Batches are `(images float32 [B, 3, H, W] on
    `device`, labels int64 [B] on `device`)`; labels are checked against `num_classes`
    on the host before they move.
    """

    def __init__(
        self,
        rec_paths: Sequence[Path],
        idx_paths: Sequence[Path],
        num_images: int,
        num_classes: int,
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        device: torch.device,
        threads: int = 2,
        shuffle: bool = True,
        flip: bool = True,
        dataset: str = "",
        first_epoch: int = 0,
        image_size: int = INPUT_SIZE,
        augment: AugmentSpec = NO_AUGMENT,
    ) -> None:
        self.dataset = dataset or str(Path(rec_paths[0]).parent)
        self.steps_per_epoch = steps_per_epoch(
            num_images, batch_size, world_size, f"{self.dataset}: num_images", "lower data.batch_size"
        )
        self.num_images, self.num_classes, self.image_size = num_images, num_classes, image_size
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.device = device
        self._shards = [(Path(rec), Path(idx), read_index(idx)) for rec, idx in zip(rec_paths, idx_paths, strict=True)]
        gpu = device.type == "cuda"
        with tempfile.TemporaryDirectory(prefix="arcshard-dali-") as tmp:
            index = Path(tmp) / "all.idx"
            combined_index(rec_paths, [entries for _, _, entries in self._shards], index)
            pipe = _pipeline(
                rec_paths=[str(p) for p in rec_paths], index_path=str(index),
                shard_id=(rank + first_epoch) % world_size, num_shards=world_size,
                shuffle=shuffle, flip=flip, augment=augment, size=image_size,
                decode_device="mixed" if gpu else "cpu",
                batch_size=batch_size, num_threads=threads,
                device_id=(torch.cuda.current_device() if device.index is None else device.index)
                if gpu else None, seed=seed + rank + first_epoch * world_size,
                prefetch_queue_depth=_PREFETCH,
            )
            pipe.build()  # reads the index
        self._iter = DALIGenericIterator(
            [pipe], ["images", "labels"], reader_name=_READER,
            last_batch_policy=LastBatchPolicy.DROP, auto_reset=True,
        )
        self._next_epoch = first_epoch

    def epoch_batches(self, epoch: int, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield this rank's batches `start_step .. steps_per_epoch - 1` of `epoch`.

        Epochs must come in order (0, 1, ...), each read to its end; skipped steps are
        read and dropped.
        """
        if epoch != self._next_epoch:
            raise ValueError(
                f"DALI reads epochs in order: asked for epoch {epoch}, the next one is {self._next_epoch}"
            )
        check_start(start_step, self.steps_per_epoch)
        self._next_epoch += 1
        count = 0
        while True:
            try:
                out = next(self._iter)
            except StopIteration:
                break
            except RuntimeError as exc:
                error = self._data_error(str(exc), epoch, count)
                if error is None:
                    raise
                raise error from None
            count += 1
            if count <= start_step:
                continue
            images, labels = out[0]["images"], out[0]["labels"]
            yield images.to(self.device, non_blocking=True), to_device(self._labels(labels), self.device)
        if count != self.steps_per_epoch:
            raise RuntimeError(
                f"{self.dataset}: DALI gave {count} batches in epoch {epoch}, expected "
                f"{self.steps_per_epoch} on every rank (ranks would deadlock); use data.loader=torch"
            )

    def _data_error(self, text: str, epoch: int, count: int) -> DataError | None:
        """The DataError for a pipeline failure in the reader or decoder (None: another fault),
        naming the first bad record among those this rank can have reached in `epoch`."""
        if not any(op in text for op in _DATA_OPERATORS):
            return None
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        after = lines[lines.index("encountered:") + 1 :] if "encountered:" in lines else []
        reason = after[0] if after else lines[-1]
        part = (self.rank + epoch) % self.world_size  # DALI splits N records into W parts
        start = self.num_images * part // self.world_size
        end = min(self.num_images * (part + 1) // self.world_size,
                  start + (count + 1 + _PREFETCH) * self.batch_size + _SHUFFLE_BUFFER)
        log.error("DALI failed (%s); checking records %d..%d of %s for the bad one", reason, start, end - 1, self.dataset)
        verify = f"run `arcshard-data verify {self.dataset}`"
        found = self._first_bad_record(start, end)
        if found is None:
            return DataError(
                f"{self.dataset}: DALI failed in epoch {epoch} ({reason}), but the {end - start} records "
                f"it had reached check out; {verify}"
            )
        return DataError(f"{found}; DALI: {reason}; {verify}")

    def _first_bad_record(self, start: int, end: int) -> str | None:
        """'SHARD: record key K (record I): problem' for the first bad record among the
        dataset's records `start..end-1` (manifest order), or None."""
        base = 0
        for rec, idx, entries in self._shards:
            lo, hi = max(start - base, 0), min(end - base, len(entries))
            base += len(entries)
            if lo >= hi:
                continue
            try:
                reader = RecordReader(rec, idx)
            except ValueError as exc:  # an offset beyond the end of the .rec: names idx and line
                return str(exc)
            with reader:
                for i in range(lo, hi):
                    key = entries[i][0]
                    try:
                        problem = check_record(reader.read(key), self.num_classes, (self.image_size,) * 2)
                    except ValueError as exc:  # framing: the offset is not a record start
                        problem = str(exc).removeprefix(f"{rec}: ")
                    if problem:
                        return f"{rec}: record key {key} (record {i}): {problem}"
        return None

    def _labels(self, labels: torch.Tensor) -> torch.Tensor:
        """The reader's float labels [B, 1] (host) as int64 [B], checked to be class ids."""
        if labels.numel() != self.batch_size:
            raise DataError(
                f"{self.dataset}: records carry {labels.numel() // self.batch_size} labels each, "
                "expected one class id; rebuild the dataset with arcshard-data"
            )
        labels = labels.reshape(-1)
        ids = labels.to(torch.int64)
        bad = (ids < 0) | (ids >= self.num_classes) | (ids.to(labels.dtype) != labels)
        if bool(bad.any()):
            value = labels[bad][0].item()
            raise DataError(
                f"{self.dataset}: a record has label {value}, not a class id in "
                f"[0, {self.num_classes}) (manifest num_classes); rebuild the dataset"
            )
        return ids


def combined_index(rec_paths: Sequence[Path], indexes: Sequence[Index], out: Path) -> None:
    """Write the one `.idx` DALI's reader needs for several `.rec` files to `out`.

    `indexes` holds each shard's `read_index`. DALI reads the `.rec` files as one stream;
    a record's offset in it is its offset in its own file plus the sizes of the files
    before it. Keys are renumbered 0..N-1.
    """
    base, key = 0, 0
    with open(out, "w", encoding="ascii") as f:
        for rec, entries in zip(rec_paths, indexes, strict=True):
            f.write("".join(f"{key + i}\t{base + o}\n" for i, (_, o) in enumerate(entries)))
            key += len(entries)
            base += os.path.getsize(rec)
