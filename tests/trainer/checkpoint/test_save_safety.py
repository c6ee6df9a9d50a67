"""Saves that must not go wrong quietly: another run's step directory, a full disk, a
dangling `latest`; and RNG states that round-trip as plain data."""

import errno
import json
import os
import random

import numpy as np
import pytest
import torch

from tests.trainer.checkpoint.parts import pfc_parts, reforge_index
from trainer import checkpoint
from trainer.checkpoint import CheckpointError, TrainState, rowfiles
from trainer.cli.ckpt import main

pytestmark = pytest.mark.usefixtures("world_of_one")


def test_step_dir_of_another_run_is_refused(tmp_path, capsys):
    parts = pfc_parts(momentum=0.0)
    ckpt = checkpoint.save(tmp_path, parts, TrainState(step=1), run_id="run-a")
    assert checkpoint.read_index(ckpt)["run_id"] == "run-a"
    before = {p: p.read_bytes() for p in ckpt.rglob("*") if p.is_file()}
    assert checkpoint.save(tmp_path, parts, TrainState(step=1), run_id="run-a") == ckpt  # ours: kept
    with pytest.raises(CheckpointError, match=rf"{ckpt}: already saved by another run \(run id run-a; this run is run-b\)"):
        checkpoint.save(tmp_path, parts, TrainState(step=1), run_id="run-b")
    assert {p: p.read_bytes() for p in ckpt.rglob("*") if p.is_file()} == before
    assert main(["info", str(ckpt), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["run_id"] == "run-a"


def test_disk_full_is_one_line_naming_the_file_and_free_space(tmp_path, monkeypatch, caplog):
    """f.write raising ENOSPC (no filename on the error, as a real write gives): one line
    naming the file being written and the free space, logged, nothing committed."""
    real = rowfiles.write_atomic_with

    def full_disk(path, write):
        def failing(f):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(path, failing)

    monkeypatch.setattr(rowfiles, "write_atomic_with", full_disk)
    with caplog.at_level("ERROR", logger="trainer.checkpoint"), pytest.raises(CheckpointError) as err:
        checkpoint.save(tmp_path, pfc_parts(), TrainState(step=7))
    message = str(err.value)
    target = tmp_path / "step-000000007" / "classifier" / "weight.0000000000-0000001003.bin"
    assert message.startswith(f"{target}: cannot write checkpoint file (No space left on device; ")
    assert " free there)" in message and "\n" not in message
    assert message in caplog.text
    assert not (tmp_path / "latest").exists() and checkpoint.find_latest(tmp_path) is None
    assert not [p for p in tmp_path.rglob("*.tmp")]  # the temporary file was removed


def test_dangling_latest_is_followed_with_a_warning(tmp_path, caplog):
    parts = pfc_parts(momentum=0.0)
    for step in (1, 2):
        checkpoint.save(tmp_path, parts, TrainState(step=step))
    (tmp_path / "latest").write_text("step-000000005\n")
    with caplog.at_level("WARNING", logger="trainer.checkpoint"):
        assert checkpoint.find_latest(tmp_path) == tmp_path / "step-000000002"
    assert f"{tmp_path / 'latest'} names {tmp_path / 'step-000000005'}, which is missing" in caplog.text
    assert str(tmp_path / "step-000000002") in caplog.text


def _draws() -> tuple:
    return torch.rand(3).tolist(), np.random.rand(3).tolist(), random.random()


def test_rng_states_round_trip_as_plain_data(tmp_path, caplog):
    torch.manual_seed(5)
    np.random.seed(5)
    random.seed(5)
    np.random.randn()  # leaves a cached gaussian in numpy's state
    ckpt = checkpoint.save(tmp_path, pfc_parts(momentum=0.0), TrainState(step=1))
    expected = _draws()
    torch.load(ckpt / "rng" / "rank00000.pt", weights_only=True)  # no allow-list needed
    checkpoint.load(ckpt, pfc_parts(momentum=0.0))
    assert _draws() == expected
    # A file of an older arcshard (numpy arrays): never unpickled, streams restart.
    legacy = ckpt / "rng" / "rank00000.pt"
    torch.save({"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}, legacy)
    reforge_index(ckpt, "rng/rank00000.pt")
    with caplog.at_level("WARNING", logger="trainer.checkpoint"):
        checkpoint.load(ckpt, pfc_parts(momentum=0.0))
    assert f"{legacy} holds numpy arrays" in caplog.text
