"""RecordIO data: the DALI pipeline, the PyTorch fallback, start-up validation, training."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.trainer.data.recordio_sets import CPU, jpeg, shards, write_dataset
from tests.trainer.test_train import _metrics, _torchrun
from trainer.config import ConfigError, load_config
from trainer.data.recordio_source import (
    dali_available,
    make_recordio_source,
    open_dataset,
)
from trainer.data.synthetic import SyntheticIdentities
from trainer.data.torch_loader import TorchRecordIO

needs_dali = pytest.mark.skipif(not dali_available(), reason="needs the dali extra")


def dali_loader(directory: Path, batch: int, rank: int, world: int, **kw):
    from trainer.data.dali import DaliRecordIO

    recs, idxs = shards(directory)
    return DaliRecordIO(recs, idxs, 23, 23, batch, rank, world, seed=1, device=CPU, **kw)


def torch_loader(directory: Path, batch: int, rank: int, world: int, **kw) -> TorchRecordIO:
    recs, idxs = shards(directory)
    return TorchRecordIO(recs, idxs, 23, batch, rank, world, seed=1, **{"workers": 0, **kw})


def test_torch_loader_decodes_records_in_order(noise_set):
    directory, pixels = noise_set
    loader = torch_loader(directory, 5, 0, 1, shuffle=False, flip=False)
    images, labels = loader.batch(0, 1)
    assert images.dtype == torch.float32 and images.shape == (5, 3, 112, 112)
    assert labels.dtype == torch.int64 and labels.tolist() == [5, 6, 7, 8, 9]
    for image, label in zip(images, labels.tolist()):
        decoded = np.array(Image.open(io.BytesIO(jpeg(pixels[label]))).convert("RGB"))
        expected = torch.from_numpy(decoded).permute(2, 0, 1).float().sub(127.5).div(127.5)
        assert torch.equal(image, expected)


def test_torch_loader_flips_half_the_images(noise_set):
    directory, _ = noise_set
    plain = torch_loader(directory, 23, 0, 1, shuffle=False, flip=False).batch(0, 0)[0]
    flipped = torch_loader(directory, 23, 0, 1, shuffle=False, flip=True).batch(0, 0)[0]
    same = [torch.equal(a, b) for a, b in zip(plain, flipped)]
    mirrored = [torch.equal(a.flip(-1), b) for a, b in zip(plain, flipped)]
    assert all(s or m for s, m in zip(same, mirrored)) and 3 < sum(mirrored) < 20


@needs_dali
def test_dali_and_torch_decode_the_same_pixels(noise_set):
    directory, _ = noise_set
    dali = next(dali_loader(directory, 8, 0, 1, shuffle=False, flip=False).epoch_batches(0))
    ref = torch_loader(directory, 8, 0, 1, shuffle=False, flip=False).batch(0, 0)
    assert torch.equal(dali[1], ref[1])
    assert dali[0].shape == ref[0].shape and dali[0].dtype == ref[0].dtype
    # Both decode with libjpeg-turbo; allow one grey level for a different IDCT/upsampling.
    diff = (dali[0] - ref[0]).abs() * 127.5
    assert diff.max() <= 1.01, diff.max()


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("kind", ["torch", pytest.param("dali", marks=needs_dali)])
def test_every_rank_runs_the_same_steps_and_reads_each_record_once(noise_set, kind, world):
    directory, _ = noise_set
    batch = 3
    make = dali_loader if kind == "dali" else torch_loader
    loaders = [make(directory, batch, rank, world) for rank in range(world)]
    steps = 23 // (batch * world)
    for epoch in range(3):  # DALI moves each rank to the next part of the data every epoch
        seen = []
        for loader in loaders:
            assert loader.steps_per_epoch == steps
            batches = list(loader.epoch_batches(epoch))
            assert len(batches) == steps
            seen += [label for _, labels in batches for label in labels.tolist()]
        assert len(set(seen)) == len(seen) == steps * batch * world  # no record twice
        assert 23 - len(seen) < batch * world + world  # dropped: < one global batch (+ N mod W)


def test_torch_loader_epochs_differ_and_repeat(noise_set):
    directory, _ = noise_set
    a = torch_loader(directory, 4, 1, 2)
    b = torch_loader(directory, 4, 1, 2)
    assert torch.equal(a.batch(2, 1)[0], b.batch(2, 1)[0])
    assert not np.array_equal(a.records(0), a.records(1))


def test_torch_loader_worker_processes(noise_set):
    directory, _ = noise_set
    inline = list(torch_loader(directory, 4, 0, 2).epoch_batches(1, start_step=1))
    workers = list(torch_loader(directory, 4, 0, 2, workers=2).epoch_batches(1, start_step=1))
    assert len(inline) == len(workers) == 1
    assert torch.equal(inline[0][0], workers[0][0]) and torch.equal(inline[0][1], workers[0][1])


@pytest.mark.parametrize("kind", ["torch", pytest.param("dali", marks=needs_dali)])
def test_label_out_of_range_is_caught(tmp_path, kind):
    rng = np.random.default_rng(1)
    images = [jpeg(rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)) for _ in range(4)]
    write_dataset(tmp_path, images, [0, 1, 9, 2], [4], 3)  # label 9 of 3 classes
    cfg = load_config(None, ["data.source=recordio", f"data.path={tmp_path}", "data.num_classes=null",
                             "data.batch_size=4", "data.workers=0", f"data.loader={kind}"])
    source = make_recordio_source(cfg.data, open_dataset(cfg.data), 0, 1, 0, CPU)
    with pytest.raises(ValueError, match=r"label 9.*not a class id in \[0, 3\)") as info:
        list(source.epoch_batches(0))
    assert str(tmp_path) in str(info.value)


def _config(path: Path, *overrides: str):
    return load_config(None, ["data.source=recordio", f"data.path={path}", *overrides])


def test_open_dataset_takes_or_checks_num_classes(noise_set):
    directory, _ = noise_set
    assert open_dataset(_config(directory, "data.num_classes=null").data).num_classes == 23
    assert open_dataset(_config(directory, "data.num_classes=23").data).num_images == 23
    with pytest.raises(ConfigError, match="data.num_classes: 100, but .*manifest.json has 23 classes"):
        open_dataset(_config(directory, "data.num_classes=100").data)


def test_null_num_classes_needs_recordio():
    with pytest.raises(ConfigError, match="data.num_classes: null"):
        load_config(None, ["data.num_classes=null"])


def _refused(tmp_path: Path, dataset: Path, *overrides: str) -> str:
    proc = subprocess.run(
        [sys.executable, "trainer/train.py", "--config", "trainer/configs/cpu_demo.yaml",
         f"run.output_dir={tmp_path / 'run'}", "data.source=recordio", f"data.path={dataset}",
         *overrides],
        cwd=Path(__file__).resolve().parents[3], capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


@pytest.mark.parametrize("damage", ["num_classes", "missing", "truncated"])
def test_trainer_refuses_a_dataset_that_does_not_match(tmp_path, noise_set, damage):
    source, _ = noise_set
    dataset = tmp_path / "data"
    dataset.mkdir()
    for f in source.iterdir():
        (dataset / f.name).write_bytes(f.read_bytes())
    overrides = ["data.num_classes=null"]
    if damage == "num_classes":
        overrides = ["data.num_classes=100"]
        needle = "data.num_classes: 100, but"
    elif damage == "missing":
        (dataset / "train-00001.rec").unlink()
        needle = "train-00001.rec: listed in manifest.json but missing"
    else:
        rec = dataset / "train-00002.rec"
        rec.write_bytes(rec.read_bytes()[:-100])
        needle = "train-00002.rec: "
    line = _refused(tmp_path, dataset, *overrides)
    assert needle in line, line


@pytest.fixture(scope="module")
def identity_set(tmp_path_factory) -> Path:
    """640 JPEG renders of 16 synthetic identities (learnable), in 3 uneven shards."""
    source = SyntheticIdentities(16, 640, 640, 0, 1, seed=5)
    images, labels = source.batch(0, 0)
    pixels = (images.permute(0, 2, 3, 1) * 127.5 + 127.5).round().clamp(0, 255).to(torch.uint8)
    directory = tmp_path_factory.mktemp("identities")
    write_dataset(directory, [jpeg(p.numpy()) for p in pixels], labels.tolist(), [250, 200, 190], 16)
    return directory


@pytest.mark.parametrize("loader", [pytest.param("dali", marks=needs_dali)])
def test_two_process_training_on_recordio_learns(tmp_path, identity_set, loader):
    out = tmp_path / "run"
    proc = _torchrun(out, "run.max_steps=30", "data.source=recordio", f"data.path={identity_set}",
                     "data.num_classes=null", f"data.loader={loader}", "data.workers=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _metrics(out)
    first, last = rows[0]["loss"], rows[-1]["loss"]
    print(f"loss {first:.3f} -> {last:.3f}")
    assert last < 0.8 * first, f"loss did not fall: {first} -> {last}"
    assert f"{loader} loader over 640 images in 3 shards" in (out / "logs" / "rank0.log").read_text()
    assert load_config(out / "config.yaml").data.num_classes == 16


def test_loader_selection(noise_set, monkeypatch):
    directory, _ = noise_set
    import trainer.data.recordio_source as recordio_source

    def make(loader: str):
        data = _config(directory, "data.num_classes=null", "data.batch_size=4",
                       f"data.loader={loader}").data
        return make_recordio_source(data, open_dataset(data), 0, 1, 0, CPU)

    assert isinstance(make("torch"), TorchRecordIO)
    if dali_available():
        assert type(make("auto")).__name__ == "DaliRecordIO"
    monkeypatch.setattr(recordio_source, "dali_available", lambda: False)
    assert isinstance(make("auto"), TorchRecordIO)  # the fallback when DALI is missing
    with pytest.raises(ConfigError, match=r"data.loader: dali is not installed"):
        make("dali")


@pytest.mark.parametrize("workers", [0, 1])
def test_bad_label_mid_run_is_one_line_and_exit_5(tmp_path, workers):
    """A record with an out-of-range label met while training: the trainer prints one line
    naming the dataset and the fix and exits 5, also from a DataLoader worker."""
    rng = np.random.default_rng(2)
    images = [jpeg(rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)) for _ in range(8)]
    write_dataset(tmp_path / "data", images, [0, 1, 2, 0, 1, 7, 2, 0], [8], 3)
    proc = subprocess.run(
        [sys.executable, "trainer/train.py", "--config", "trainer/configs/cpu_demo.yaml",
         f"run.output_dir={tmp_path / 'run'}", "data.source=recordio",
         f"data.path={tmp_path / 'data'}", "data.num_classes=null", "data.loader=torch",
         f"data.workers={workers}", "data.batch_size=2", "run.max_steps=8",
         "backbone.embedding_size=16"],
        cwd=Path(__file__).resolve().parents[3], capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 5, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr
    line = proc.stderr.strip().splitlines()[-1]  # after rank 0's log lines
    assert line.startswith("arcshard: data error (rank 0): ") and "label 7" in line
    assert str(tmp_path / "data" / "train-00000.rec") in line and "rebuild the dataset" in line
