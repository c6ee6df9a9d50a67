"""A synthetic image source: learnable fake identities, or pure noise for speed tests.

`mode="identities"`: every identity `c` has a base image, a pure function of
`(seed, c)`: a 3x16x16 field of uniform noise in [-1, 1] mixed with a coarser 3x4x4
one (upsampled), made mostly left-right symmetric like a face, then upsampled
bilinearly to the image size. Convex mixing and bilinear upsampling keep it in
[-1, 1], like normalised face crops, with smooth structure at two scales. A sample is
a perturbed view of its identity's base: a circular shift of up to 5% of the side, a
horizontal flip half the time, contrast and brightness jitter, additive gaussian
noise, clipped to [-1, 1]. The coarse, mostly symmetric structure survives those
perturbations, so identities are learnable and a demo's loss falls; the fine
structure does not survive shifts, which keeps the task from being trivial.

`mode="noise"`: every pixel is 0 or 255 at random (so -1 or +1 once normalised: mean 0,
std 1) and labels are uniform; nearly free to make, for throughput benchmarks.

Like a real loader, the source renders uint8 pixels (`raw_batch`; an identity view in
[-1, 1] is quantised to `round(127.5 * x + 127.5)`) and `epoch_batches` ships them out
of `workers` DataLoader processes and normalises them on `device` with the face
contract (`trainer.data.batches.StepSource`), so the trainer sees the 256 levels of
`(x - 127.5) / 127.5` a decoded JPEG has, and /dev/shm carries a quarter of the bytes.

Batches are a pure function of `(seed, epoch, step, rank)`, so a run resumed at any
step sees exactly the data it would have seen. The global batch of a step (labels and
one perturbation seed per sample) is drawn from a generator seeded by
`(seed, epoch, step)`; rank `r` takes samples `[r*B, (r+1)*B)` and renders only those.
The global batch therefore does not depend on how it is split: world size 2 with batch
4 sees the same samples as world size 1 with batch 8. Every rank runs
`num_samples // (batch_size * world_size)` steps per epoch
(`trainer.data.batches.steps_per_epoch`).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from data_tools.face import INPUT_SIZE, MEAN, STD
from trainer.data.batches import CPU, StepSource, steps_per_epoch

Mode = Literal["identities", "noise"]

_BASE_SIZE = 16  # side of the low-resolution base field before upsampling
_COARSE_SIZE = 4  # side of the coarse field mixed into it
_COARSE_WEIGHT = 0.7
_SYMMETRY = 0.75  # weight of the mirror-symmetric part of the base field
_CACHE_BYTES = 64 * 2**20  # bound on the cache of upsampled base images
_MAX_SHIFT = 0.05  # largest circular shift, as a fraction of the image side
_CONTRAST = (0.7, 1.3)
_BRIGHTNESS = 0.1  # brightness offset drawn from [-0.1, 0.1]
_NOISE_STD = 0.2
# Stream tags keep the seeds of different uses of one (seed, ...) tuple apart.
_TAG_IDENTITY, _TAG_STEP, _TAG_NOISE = 1, 2, 3


def _derive_seed(*parts: int) -> int:
    """A well-mixed 63-bit generator seed from non-negative integers."""
    return int(np.random.SeedSequence(parts).generate_state(1, np.uint64)[0] >> 1)


class SyntheticIdentities(StepSource):
    """Deterministic, resumable synthetic batches for one rank.

    `num_samples` is the number of images per epoch over all ranks, `batch_size` the
    per-rank batch; `workers` DataLoader processes render them (0: this process) and
    batches arrive normalised on `device`. Upsampled base images are cached in an LRU
    bounded to 64 MiB, so memory stays small whatever `num_classes` is.
    """

    def __init__(
        self,
        num_classes: int,
        num_samples: int,
        batch_size: int,
        rank: int,
        world_size: int,
        image_size: int = INPUT_SIZE,
        seed: int = 0,
        mode: Mode = "identities",
        workers: int = 0,
        device: torch.device = CPU,
    ) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes {num_classes} must be >= 1")
        if batch_size < 1:
            raise ValueError(f"batch_size {batch_size} must be >= 1")
        if world_size < 1:
            raise ValueError(f"world_size {world_size} must be >= 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} must be in [0, world_size={world_size})")
        if image_size < _BASE_SIZE:
            raise ValueError(f"image_size {image_size} must be >= {_BASE_SIZE}")
        if seed < 0:
            raise ValueError(f"seed {seed} must be >= 0")
        if mode not in ("identities", "noise"):
            raise ValueError(f"mode {mode!r} must be 'identities' or 'noise'")
        self.steps_per_epoch = steps_per_epoch(
            num_samples, batch_size, world_size, "num_samples", "raise num_samples or lower batch_size"
        )
        self.num_classes = num_classes
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.image_size = image_size
        self.seed = seed
        self.mode = mode
        self.workers = workers
        self.device = device
        self._cache: OrderedDict[int, torch.Tensor] = OrderedDict()
        self._cache_limit = max(1, _CACHE_BYTES // (3 * image_size * image_size * 4))

    def raw_batch(self, epoch: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's `(pixels uint8 [B, 3, S, S], labels int64 [B])` of one step."""
        if epoch < 0:
            raise ValueError(f"epoch {epoch} must be >= 0")
        if not 0 <= step < self.steps_per_epoch:
            raise ValueError(f"step {step} must be in [0, steps_per_epoch={self.steps_per_epoch})")
        step_gen = torch.Generator().manual_seed(_derive_seed(self.seed, _TAG_STEP, epoch, step))
        global_batch = self.batch_size * self.world_size
        labels = torch.randint(self.num_classes, (global_batch,), generator=step_gen)
        sample_seeds = torch.randint(2**62, (global_batch,), generator=step_gen)
        mine = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        labels = labels[mine].clone()
        shape = (self.batch_size, 3, self.image_size, self.image_size)
        if self.mode == "noise":
            noise_gen = torch.Generator().manual_seed(
                _derive_seed(self.seed, _TAG_NOISE, epoch, step, self.rank)
            )
            return torch.randint(2, shape, generator=noise_gen, dtype=torch.uint8).mul_(255), labels
        images = torch.empty(shape)
        for i, (label, sample_seed) in enumerate(
            zip(labels.tolist(), sample_seeds[mine].tolist())
        ):
            images[i] = self._view(label, sample_seed)
        return images.mul_(STD).add_(MEAN).round_().to(torch.uint8), labels

    def _view(self, label: int, sample_seed: int) -> torch.Tensor:
        """One perturbed view [3, S, S] of identity `label`, a function of `sample_seed`."""
        gen = torch.Generator().manual_seed(sample_seed)
        u = torch.rand(5, generator=gen).tolist()
        noise = torch.randn(3, self.image_size, self.image_size, generator=gen)
        max_shift = max(1, round(_MAX_SHIFT * self.image_size))
        shift_y = round((2 * u[0] - 1) * max_shift)
        shift_x = round((2 * u[1] - 1) * max_shift)
        image = torch.roll(self._base(label), shifts=(shift_y, shift_x), dims=(1, 2))
        if u[2] < 0.5:
            image = image.flip(2)
        contrast = _CONTRAST[0] + (_CONTRAST[1] - _CONTRAST[0]) * u[3]
        brightness = _BRIGHTNESS * (2 * u[4] - 1)
        return (image * contrast + brightness + _NOISE_STD * noise).clamp_(-1.0, 1.0)

    def _base(self, label: int) -> torch.Tensor:
        """The base image [3, S, S] of identity `label` (shared; do not modify)."""
        base = self._cache.get(label)
        if base is not None:
            self._cache.move_to_end(label)
            return base
        gen = torch.Generator().manual_seed(_derive_seed(self.seed, _TAG_IDENTITY, label))
        coarse = torch.rand(1, 3, _COARSE_SIZE, _COARSE_SIZE, generator=gen) * 2 - 1
        fine = torch.rand(1, 3, _BASE_SIZE, _BASE_SIZE, generator=gen) * 2 - 1
        field = _COARSE_WEIGHT * _upsample(coarse, _BASE_SIZE) + (1 - _COARSE_WEIGHT) * fine
        field = _SYMMETRY * (field + field.flip(-1)) / 2 + (1 - _SYMMETRY) * field
        base = _upsample(field, self.image_size)[0]
        self._cache[label] = base
        if len(self._cache) > self._cache_limit:
            self._cache.popitem(last=False)
        return base


def _upsample(images: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
