"""Training-time augmentation (trainer/data/augment.py) in both RecordIO loaders.

Each operation runs on PNG images with a known pattern (lossless, so a statistic of the
output is a function of the drawn parameters alone), and a two-sample Kolmogorov-Smirnov
test compares that statistic between the DALI pipeline and the PyTorch fallback. Seeds are
fixed, so each comparison is deterministic; every case also checks that the fallback with
one range or probability off by 2x is told apart from DALI.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.trainer.data.recordio_sets import CPU, shards, write_dataset
from trainer.config import load_config
from trainer.data.augment import AugmentSpec, augment, unit_draws
from trainer.data.recordio_source import dali_available
from trainer.data.torch_loader import TorchRecordIO

needs_dali = pytest.mark.skipif(not dali_available(), reason="needs the dali extra")

N, BATCH, S = 384, 48, 112
KS_CRITICAL = 1.95 * np.sqrt(2 / N)  # two-sample KS at alpha = 0.001 for n = m = N


def png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def pattern(kind: str) -> np.ndarray:
    """One 112x112 RGB test image whose augmented statistics are easy to read."""
    image = np.zeros((S, S, 3), np.uint8)
    ramp = np.round(np.arange(S) * 255 / (S - 1)).astype(np.uint8)
    if kind == "ramps":  # red encodes x, green encodes y: a crop's box can be read back
        image[..., 0], image[..., 1] = ramp[None, :], ramp[:, None]
    elif kind == "grey":
        image[...] = 100
    elif kind == "halves":  # mean grey 90, not 128: shows the contrast centre
        image[:, : S // 2], image[:, S // 2 :] = 40, 140
    elif kind == "colour":
        image[...] = (200, 100, 50)
    elif kind == "edge":
        image[:, : S // 2], image[:, S // 2 :] = 40, 200
    elif kind == "dark":
        image[...] = 30
    return image


@pytest.fixture(scope="module")
def pattern_sets(tmp_path_factory) -> dict[str, Path]:
    """N copies of each pattern, as a two-shard dataset per pattern."""
    sets = {}
    for kind in ("ramps", "grey", "halves", "colour", "edge", "dark"):
        directory = tmp_path_factory.mktemp(kind)
        write_dataset(directory, [png(pattern(kind))] * N, [i % 4 for i in range(N)], [N // 2, N - N // 2], 4)
        sets[kind] = directory
    return sets


def spec(directory: Path, *keys: str) -> AugmentSpec:
    """The AugmentSpec of `data.augment.KEY=value` overrides, through the config parser."""
    cfg = load_config(None, ["data.source=recordio", f"data.path={directory}",
                             *(f"data.augment.{k}" for k in keys)])
    return AugmentSpec.from_config(cfg.data.augment)


def pixels_of(source) -> np.ndarray:
    """All images of epoch 0 as float pixel values [n, 3, S, S]."""
    return np.concatenate([(images * 127.5 + 127.5).numpy() for images, _ in source.epoch_batches(0)])


def torch_pixels(directory: Path, augment: AugmentSpec, seed: int = 0) -> np.ndarray:
    recs, idxs = shards(directory)
    return pixels_of(TorchRecordIO(recs, idxs, 4, BATCH, 0, 1, seed, workers=0, shuffle=False, flip=False,
                                   augment=augment))


def dali_pixels(directory: Path, augment: AugmentSpec, seed: int = 0) -> np.ndarray:
    from trainer.data.dali import DaliRecordIO

    recs, idxs = shards(directory)
    return pixels_of(DaliRecordIO(recs, idxs, N, 4, BATCH, 0, 1, seed, CPU, threads=1, shuffle=False,
                                  flip=False, augment=augment))


def ks(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the empirical CDFs."""
    a, b = np.sort(a), np.sort(b)
    at = np.concatenate([a, b])
    return float(np.abs(np.searchsorted(a, at, "right") / len(a) - np.searchsorted(b, at, "right") / len(b)).max())


def crop_stats(x: np.ndarray) -> list[np.ndarray]:
    """Box area, log aspect and left edge, read back from the red (x) and green (y) ramps."""
    width = (x[:, 0, :, -1] - x[:, 0, :, 0]).mean(1) / 255
    height = (x[:, 1, -1, :] - x[:, 1, 0, :]).mean(1) / 255
    return [width * height, np.log(width / height), x[:, 0, :, 0].mean(1)]


def erase_stats(x: np.ndarray) -> list[np.ndarray]:
    """Erased area fraction, log aspect (0 when nothing is erased) and centre column."""
    erased = x[:, 0] == 128
    rows, cols = erased.any(2).sum(1), erased.any(1).sum(1)
    centre = (erased.sum(1) * np.arange(S)).sum(1) / np.maximum(erased.sum((1, 2)), 1)
    return [erased.mean((1, 2)), np.log(np.maximum(cols, 1) / np.maximum(rows, 1)), centre]


def edge_energy(x: np.ndarray) -> list[np.ndarray]:
    """Sum of squared horizontal steps across the edge: 160^2 unblurred, less the wider the blur."""
    return [(np.diff(x[:, 0], axis=2) ** 2).sum(2).mean(1)]


CASES = {  # pattern, data.augment keys, statistics, keys with one range or probability 2x off
    "crop": ("ramps", ["crop=0.9", "crop_area=[0.4,1.0]", "crop_aspect=[0.6,1.6]"], crop_stats,
             ["crop=0.9", "crop_area=[0.2,1.0]", "crop_aspect=[0.6,1.6]"]),
    "brightness": ("grey", ["brightness=0.3"], lambda x: [x.mean((1, 2, 3))], ["brightness=0.15"]),
    "contrast": ("halves", ["contrast=0.4"],
                 lambda x: [x[..., S // 2 :].mean((1, 2, 3)) - x[..., : S // 2].mean((1, 2, 3)), x.mean((1, 2, 3))],
                 ["contrast=0.2"]),
    "saturation": ("colour", ["saturation=0.5"], lambda x: [x[:, 0].mean((1, 2)) - x[:, 2].mean((1, 2))],
                   ["saturation=0.25"]),
    "grayscale": ("colour", ["grayscale=0.3"], lambda x: [x[:, 0].mean((1, 2)) - x[:, 2].mean((1, 2))],
                  ["grayscale=0.6"]),
    "blur": ("edge", ["blur=0.6", "blur_sigma=[0.5,2.5]"], edge_energy, ["blur=0.6", "blur_sigma=[1.0,5.0]"]),
    "erase": ("dark", ["erase=0.7", "erase_area=[0.05,0.3]", "erase_aspect=[0.5,2.0]"], erase_stats,
              ["erase=0.7", "erase_area=[0.1,0.6]", "erase_aspect=[0.5,2.0]"]),
    "all": ("ramps", ["crop=0.5", "brightness=0.2", "contrast=0.2", "saturation=0.3", "grayscale=0.2",
                      "blur=0.5", "erase=0.5"],
            lambda x: [x.mean((1, 2, 3)), x.std((1, 2, 3)), x[:, 0].mean((1, 2)) - x[:, 1].mean((1, 2))],
            ["crop=0.5", "brightness=0.4", "contrast=0.2", "saturation=0.3", "grayscale=0.4",
             "blur=0.5", "erase=0.5"]),
}


@needs_dali
@pytest.mark.parametrize("case", list(CASES))
def test_both_loaders_draw_the_same_distribution(pattern_sets, case):
    kind, keys, stats, wrong = CASES[case]
    directory = pattern_sets[kind]
    dali = stats(dali_pixels(directory, spec(directory, *keys)))
    fallback = stats(torch_pixels(directory, spec(directory, *keys)))
    off = stats(torch_pixels(directory, spec(directory, *wrong)))
    same = [ks(a, b) for a, b in zip(dali, fallback)]
    apart = [ks(a, b) for a, b in zip(dali, off)]
    print(f"{case}: KS dali vs torch {np.round(same, 3)}, vs 2x off {np.round(apart, 3)}, critical {KS_CRITICAL:.3f}")
    assert max(same) < KS_CRITICAL, same
    assert max(apart) > KS_CRITICAL, apart  # the comparison can fail
    assert np.std(dali[0]) > 0  # the operation did something


@pytest.fixture(scope="module")
def noise_pngs(tmp_path_factory) -> Path:
    """24 random PNG images (lossless: byte-exact decoding anywhere), shards of 10 and 14."""
    rng = np.random.default_rng(7)
    pixels = [rng.integers(0, 256, (S, S, 3), dtype=np.uint8) for _ in range(24)]
    directory = tmp_path_factory.mktemp("noise_png")
    write_dataset(directory, [png(p) for p in pixels], [i % 5 for i in range(24)], [10, 14], 5)
    return directory


EVERYTHING = ["crop=1", "brightness=0.3", "contrast=0.3", "saturation=0.3", "grayscale=0.3", "blur=0.5",
              "erase=0.5"]


def per_record(loader: TorchRecordIO, epoch: int) -> dict[int, bytes]:
    """Each record this rank reads in `epoch` -> the bytes of its augmented image."""
    out = {}
    for step in range(loader.steps_per_epoch):
        pixels, _ = loader.raw_batch(epoch, step)
        records = loader.records(epoch)[step * loader.batch_size : (step + 1) * loader.batch_size]
        out.update({int(r): p.numpy().tobytes() for r, p in zip(records, pixels)})
    return out


def test_fallback_draws_are_a_pure_function_of_seed_epoch_and_record(noise_pngs):
    recs, idxs = shards(noise_pngs)
    everything = spec(noise_pngs, *EVERYTHING)

    def loader(batch: int, rank: int = 0, world: int = 1, seed: int = 3) -> TorchRecordIO:
        return TorchRecordIO(recs, idxs, 5, batch, rank, world, seed, workers=0, flip=False, augment=everything)

    one = per_record(loader(4), 1)
    # Another batch size and world size: each record's augmentation is unchanged.
    other = {**per_record(loader(3, 0, 2), 1), **per_record(loader(3, 1, 2), 1)}
    assert other and all(one[r] == image for r, image in other.items() if r in one)
    assert len(set(other) & set(one)) >= 16
    # A resumed epoch (a fresh loader, started at step 3, in worker processes) gives the same bytes.
    resumed = list(loader(4).epoch_batches(1, start_step=3))
    full = list(loader(4).epoch_batches(1))[3:]
    assert all(torch.equal(a[0], b[0]) for a, b in zip(resumed, full)) and len(resumed) == len(full) == 3
    # Another epoch or seed draws again.
    again = per_record(loader(4), 2)
    assert sum(one[r] != again[r] for r in set(one) & set(again)) >= 0.9 * len(set(one) & set(again))
    reseeded = per_record(loader(4, seed=4), 1)
    assert sum(one[r] != reseeded.get(r, one[r]) for r in one) >= 0.5 * len(one)


def test_worker_processes_augment_like_the_main_process(noise_pngs):
    recs, idxs = shards(noise_pngs)
    everything = spec(noise_pngs, *EVERYTHING)
    inline = TorchRecordIO(recs, idxs, 5, 4, 0, 1, 3, workers=0, augment=everything)
    workers = TorchRecordIO(recs, idxs, 5, 4, 0, 1, 3, workers=2, augment=everything)
    for a, b in zip(inline.epoch_batches(0, 4), workers.epoch_batches(0, 4), strict=True):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_each_operation_reads_its_own_draws(noise_pngs):
    """Switching one operation on does not change what another one draws."""
    pixels = torch.from_numpy(np.stack([pattern("dark")] * 8)).permute(0, 3, 1, 2).contiguous()
    u = unit_draws(0, 0, range(8))
    alone = augment(pixels, spec(noise_pngs, "erase=1"), u)
    with_colour = augment(pixels, spec(noise_pngs, "erase=1", "brightness=0.3"), u)
    assert torch.equal(alone == 128, with_colour == 128) and (alone == 128).any()


# sha256 of every raw batch (2 ranks x 2 epochs) of `noise_pngs` from the PyTorch loader as it
# was before data.augment existed (flip only), with seed 3 and batch 4.
BEFORE_AUGMENT = "22f7a801bd90f03768d40600adb040e8e560b68e5fbf3f53eeef72ecd5197d9a"


def test_defaults_give_the_fallback_output_from_before_augmentation(noise_pngs):
    from trainer.data.recordio_source import make_recordio_source, open_dataset

    data = load_config(None, ["data.source=recordio", f"data.path={noise_pngs}", "data.num_classes=null",
                              "data.batch_size=4", "data.workers=0", "data.loader=torch"]).data
    digest = hashlib.sha256()
    for rank in range(2):
        source = make_recordio_source(data, open_dataset(data), rank, 2, 3, CPU)
        for epoch in range(2):
            for step in range(source.steps_per_epoch):
                pixels, labels = source.raw_batch(epoch, step)
                digest.update(pixels.numpy().tobytes())
                digest.update(labels.numpy().tobytes())
    assert digest.hexdigest() == BEFORE_AUGMENT


@needs_dali
def test_defaults_give_the_dali_graph_from_before_augmentation(noise_pngs, tmp_path):
    """With no data.augment keys, DALI's output equals that of the pipeline as it was
    (reader, decoder, coin flip, crop_mirror_normalize), same seed, same flips."""
    from nvidia.dali import fn, pipeline_def, types

    from data_tools.recordio import read_index
    from trainer.data.dali import DaliRecordIO, combined_index
    from trainer.data.recordio_source import make_recordio_source, open_dataset

    recs, idxs = shards(noise_pngs)
    index = tmp_path / "all.idx"
    combined_index(recs, [read_index(i) for i in idxs], index)

    @pipeline_def
    def before():
        jpegs, labels = fn.readers.mxnet(path=[str(r) for r in recs], index_path=[str(index)], shard_id=0,
                                         num_shards=1, random_shuffle=True, initial_fill=4096,
                                         pad_last_batch=True, name="Reader")
        images = fn.decoders.image(jpegs, device="cpu", output_type=types.RGB)
        return fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW", mean=[127.5] * 3,
                                        std=[127.5] * 3, mirror=fn.random.coin_flip(probability=0.5)), labels

    pipe = before(batch_size=4, num_threads=1, device_id=None, seed=5, prefetch_queue_depth=2)
    pipe.build()
    data = load_config(None, ["data.source=recordio", f"data.path={noise_pngs}", "data.num_classes=null",
                              "data.batch_size=4", "data.workers=1", "data.loader=dali"]).data
    source = make_recordio_source(data, open_dataset(data), 0, 1, 5, CPU)
    assert isinstance(source, DaliRecordIO)
    steps = 0
    for images, labels in source.epoch_batches(0):
        ref_images, ref_labels = (torch.from_numpy(np.array(o.as_tensor())) for o in pipe.run())
        assert torch.equal(images, ref_images) and torch.equal(labels, ref_labels.reshape(-1).long())
        steps += 1
    assert steps == source.steps_per_epoch == 6
