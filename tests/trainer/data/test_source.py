"""`build_source`, the steps-per-epoch rule and the uint8 hand-over from loader workers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.trainer.data.recordio_sets import CPU
from tests.trainer.data.test_recordio_data import _config, needs_dali
from trainer.config import ConfigError, load_config
from trainer.data import build_source
from trainer.data.batches import _Steps, steps_per_epoch, to_device
from trainer.data.synthetic import SyntheticIdentities
from trainer.data.torch_loader import TorchRecordIO

REPO = Path(__file__).resolve().parents[3]


def _synthetic(*overrides: str):
    return load_config(None, ["data.num_classes=20", "data.num_samples=48", "data.batch_size=4",
                              "data.image_size=112", *overrides]).data


def test_steps_per_epoch_is_one_rule():
    assert steps_per_epoch(23, 3, 2, "n", "fix") == 3  # 23 // 6: the remainder is dropped
    with pytest.raises(ValueError, match=r"^n 5 is less than one global batch \(batch_size 3 x "
                                         r"world_size 2 = 6\): zero steps per epoch; fix it$"):
        steps_per_epoch(5, 3, 2, "n", "fix it")


# In a fresh process: twice in full runs a forked DataLoader worker hung when forked from
# the pytest process, which by then holds threads of earlier tests (tqdm's monitor, queue
# feeders); a trainer forks its workers from a process without those. The timeout makes a
# hang a failure, never a stuck suite.
@pytest.mark.timeout(240)
@pytest.mark.parametrize("mode", ["identities", "noise"])
def test_synthetic_workers_ship_uint8_and_the_trainer_sees_the_same_batches(mode):
    code = f"from tests.trainer.data.test_source import _workers_ship_uint8; _workers_ship_uint8({mode!r})"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]


def _workers_ship_uint8(mode: str) -> None:
    data = _synthetic("data.workers=0", f"data.synthetic_mode={mode}")
    inline = build_source(data, 1, 2, 7, CPU)
    data.workers = 2
    prefetched = build_source(data, 1, 2, 7, CPU)
    assert isinstance(prefetched, SyntheticIdentities) and prefetched.steps_per_epoch == 6
    a, b = list(inline.epoch_batches(1, 4)), list(prefetched.epoch_batches(1, 4))
    assert len(a) == len(b) == 2
    for (xa, ya), (xb, yb) in zip(a, b):
        assert xa.dtype == torch.float32 and torch.equal(xa, xb) and torch.equal(ya, yb)
    # What a worker hands over (through /dev/shm) is uint8, a quarter of the float32 bytes.
    pixels, _ = _Steps(prefetched, 1)[4]
    images, _ = b[0]
    assert pixels.dtype == torch.uint8 and 4 * pixels.nbytes <= images.nbytes
    assert torch.equal((pixels.float() - 127.5) / 127.5, images)


def test_build_source_recordio_takes_num_classes_from_the_manifest(noise_set):
    directory, _ = noise_set
    data = _config(directory, "data.num_classes=null", "data.batch_size=4", "data.loader=torch",
                   "data.workers=0").data
    source = build_source(data, 0, 2, 0, CPU)
    assert isinstance(source, TorchRecordIO) and data.num_classes == 23
    assert source.steps_per_epoch == 2  # 23 // (4 x 2)
    data.batch_size = 12
    with pytest.raises(ConfigError, match=r"data.batch_size: .*num_images 23 is less than one global batch"):
        build_source(data, 0, 2, 0, CPU)


def test_to_device_keeps_cpu_tensors():
    t = torch.arange(4)
    assert to_device(t, CPU) is t


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("kind", ["torch", pytest.param("dali", marks=needs_dali)])
def test_batches_arrive_on_the_gpu(noise_set, kind):
    """Labels travel from pinned host memory (non-blocking); images and labels end on the GPU."""
    directory, _ = noise_set
    data = _config(directory, "data.num_classes=null", "data.batch_size=4", f"data.loader={kind}",
                   "data.workers=1").data
    gpu = torch.device("cuda", torch.cuda.current_device())
    images, labels = next(iter(build_source(data, 0, 1, 0, gpu).epoch_batches(0)))
    assert images.device == labels.device == gpu and labels.dtype == torch.int64
    assert images.dtype == torch.float32 and -1 <= images.min() and images.max() <= 1
