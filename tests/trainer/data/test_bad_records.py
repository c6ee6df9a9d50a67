"""A damaged dataset met by a loader is one DataError line naming the shard, record and fix.

Covers a wrong `.idx` offset and a damaged JPEG inside a record, for the PyTorch loader
(in-process and from DataLoader workers) and the DALI pipeline (CPU), the trainer's exit
on one and the start-up check of the manifest's record counts against the `.idx` files.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.trainer.data.recordio_sets import CPU, jpeg, shards, write_dataset
from tests.trainer.data.test_recordio_data import _config, needs_dali
from trainer.config import ConfigError
from trainer.data.errors import DataError
from trainer.data.recordio_source import open_dataset
from trainer.data.torch_loader import TorchRecordIO

BAD_SHARD = "train-00001.rec"  # the second of two shards of 6 records
BAD_RECORD = 2  # record index within it; its key is BAD_RECORD too


def _dataset(directory: Path, damage: str) -> Path:
    """12 records in shards of 6 and 6, record 2 of the second shard damaged as `damage`."""
    rng = np.random.default_rng(3)
    images = [jpeg(rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)) for _ in range(12)]
    if damage == "jpeg":  # same length, so the framing and index stay right
        good = images[6 + BAD_RECORD]
        images[6 + BAD_RECORD] = (b"not a JPEG any more " * len(good))[: len(good)]
    write_dataset(directory, images, [i % 4 for i in range(12)], [6, 6], 4)
    if damage == "offset":  # the .idx points 8 bytes into the record instead of at its start
        idx = directory / "train-00001.idx"
        lines = idx.read_text().splitlines()
        key, offset = lines[BAD_RECORD].split("\t")
        lines[BAD_RECORD] = f"{key}\t{int(offset) + 8}"
        idx.write_text("\n".join(lines) + "\n")
    return directory


def _assert_one_line(error: BaseException, directory: Path) -> str:
    # From a DataLoader worker the message carries the worker's traceback text; the
    # trainer prints its last line, which must say everything.
    line = str(error).strip().splitlines()[-1].split("DataError: ", 1)[-1]
    assert f"{directory / BAD_SHARD}: record key {BAD_RECORD}" in line, line
    assert f"run `arcshard-data verify {directory}`" in line, line
    assert "Traceback" not in line and "BytesIO" not in line, line
    return line


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("damage, reason", [("offset", "bad magic"), ("jpeg", "not a readable image")])
def test_torch_loader_names_the_bad_record(tmp_path, damage, reason, workers):
    directory = _dataset(tmp_path, damage)
    recs, idxs = shards(directory)
    loader = TorchRecordIO(recs, idxs, 4, 4, 0, 1, seed=0, workers=workers, shuffle=False, flip=False)
    with pytest.raises(DataError) as info:
        list(loader.epoch_batches(0))
    assert reason in _assert_one_line(info.value, directory)


@needs_dali
@pytest.mark.parametrize("damage, reason", [("offset", "bad magic"), ("jpeg", "not a readable image")])
def test_dali_loader_names_the_bad_record(tmp_path, damage, reason):
    from trainer.data.dali import DaliRecordIO

    directory = _dataset(tmp_path, damage)
    recs, idxs = shards(directory)
    loader = DaliRecordIO(recs, idxs, 12, 4, 4, 0, 1, seed=0, device=CPU, shuffle=False, flip=False)
    with pytest.raises(DataError) as info:
        list(loader.epoch_batches(0))
    line = _assert_one_line(info.value, directory)
    assert reason in line and "DALI: " in line, line
    assert len(str(info.value).splitlines()) == 1


def test_open_dataset_checks_record_counts_against_the_index(tmp_path, noise_set):
    """A manifest claiming more records than a shard's .idx lists is refused at start-up."""
    source, _ = noise_set
    shutil.copytree(source, tmp_path / "data")
    path = tmp_path / "data" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["shards"][1]["num_records"] += 95  # 5 -> 100
    manifest["num_images"] += 95
    path.write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match=r"train-00001.idx: indexes 5 records, manifest.json says 100 "
                                          r"for train-00001.rec; run `arcshard-data verify"):
        open_dataset(_config(tmp_path / "data", "data.num_classes=null").data)



def test_trainer_exits_5_with_one_line_for_a_damaged_jpeg(tmp_path):
    """The whole path: a worker meets the damaged record mid-run, the trainer prints its one
    line (no library traceback) and exits 5."""
    directory = _dataset(tmp_path / "data", "jpeg")
    proc = subprocess.run(
        [sys.executable, "trainer/train.py", "--config", "trainer/configs/cpu_demo.yaml",
         f"run.output_dir={tmp_path / 'run'}", "data.source=recordio", f"data.path={directory}",
         "data.num_classes=null", "data.loader=torch", "data.workers=1", "data.batch_size=2",
         "run.max_steps=12", "backbone.embedding_size=16"],
        cwd=Path(__file__).resolve().parents[3], capture_output=True, text=True, timeout=300, check=False,
    )
    assert proc.returncode == 5, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "UnidentifiedImageError" not in proc.stderr, proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("arcshard: data error (rank 0): "), line
    _assert_one_line(RuntimeError(line), directory)

