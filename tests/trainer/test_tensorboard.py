"""TensorBoard event files, read back with tensorboard's own event reader: values and
steps of the training scalars and verification accuracy; a resumed run appends at its
checkpoint's step and hides what the killed run logged beyond it."""

from __future__ import annotations

import pytest

pytest.importorskip("tensorboard")


def _scalars(path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(path))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _log(out, first_step, steps, loss_offset):
    from trainer.telemetry import RunLog

    runlog = RunLog(out, True, 10, first_step, tensorboard=True)
    for step in steps:
        values = {"loss": loss_offset + step, "samples_per_sec": 8.0, "data_wait_frac": 0.25, "grad_norm": 1.5}
        runlog.write(step, 0, 0.1 * step, values)
        if step == 4:
            runlog.record({"step": step, "eval": {"lfw": {"accuracy": 0.75}}})
    runlog.close()


def test_event_files_hold_the_logged_values_and_a_resume_appends_at_its_step(tmp_path):
    _log(tmp_path, 0, range(1, 5), 10.0)  # killed after step 4, its checkpoint at step 2
    _log(tmp_path, 2, range(3, 6), 20.0)
    scalars = _scalars(tmp_path / "tensorboard")
    assert scalars["train/loss"] == [(1, 11.0), (2, 12.0), (3, 23.0), (4, 24.0), (5, 25.0)]
    assert [step for step, _ in scalars["train/lr"]] == [1, 2, 3, 4, 5]
    assert scalars["train/lr"][2][1] == pytest.approx(0.3)
    assert scalars["train/data_wait_frac"][0] == (1, 0.25)
    assert scalars["verification/lfw"] == [(4, 0.75)]


def test_tensorboard_setting_defaults_to_installed_and_true_without_it_is_one_line(monkeypatch):
    import importlib.util

    from trainer.config import ConfigError, load_config
    from trainer.telemetry import tensorboard_enabled

    assert tensorboard_enabled(None) and not tensorboard_enabled(False)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    assert not tensorboard_enabled(None)
    with pytest.raises(ConfigError, match=r"install the extra \(pip install 'arcshard\[tensorboard\]'\)"):
        load_config(None, ["metrics.tensorboard=true"])


def _train_worker(rank, world, out: str, target: str):
    from pathlib import Path

    from tests.trainer.test_finetune import _ctx
    from trainer.config import load_config
    from trainer.loop import train
    from trainer.run import build

    repo = Path(__file__).resolve().parents[2]
    cfg = load_config(repo / "trainer/configs/cpu_demo.yaml", [
        "backbone.embedding_size=32", "backbone.channels_last=false", "data.num_classes=16",
        "data.batch_size=4", "data.num_samples=32", "run.max_steps=4", "run.log_every=2",
        "checkpoint.every=2", "eval.every=2", f"eval.targets=[{target}]", "eval.batch_size=8",
        f"run.output_dir={out}",  # metrics.tensorboard unset: on, tensorboard is installed
    ])
    train(build(cfg, _ctx(rank, world)))


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    from tests.distributed import run_world
    from tests.evaluation.conftest import make_bin

    root = tmp_path_factory.mktemp("tb_run")
    make_bin(root / "pairs.bin", num_images=6, num_pairs=20)
    run_world(_train_worker, 1, str(root / "run"), str(root / "pairs.bin"), timeout=300)
    return root / "run"


def test_a_training_run_logs_loss_verification_and_checkpoint_seconds(trained_run):
    scalars = _scalars(trained_run / "tensorboard")
    for tag in ("train/loss", "train/lr", "train/samples_per_sec", "train/data_wait_frac",
                "train/grad_norm", "train/max_logit", "train/target_cos", "verification/pairs",
                "checkpoint/seconds"):
        assert [step for step, _ in scalars[tag]] == [2, 4], tag
    assert all(0.0 <= v <= 1.0 for _, v in scalars["verification/pairs"])
    assert all(-1.0 <= v <= 1.0 for _, v in scalars["train/target_cos"])
    assert all(v > 0 for _, v in scalars["train/loss"] + scalars["checkpoint/seconds"])


@pytest.mark.integration
def test_a_real_tensorboard_server_serves_the_logged_loss(trained_run):
    import json
    import shutil
    import subprocess
    import sys
    import time
    import urllib.request
    from pathlib import Path

    from tests.distributed import free_port

    binary = shutil.which("tensorboard") or str(Path(sys.executable).parent / "tensorboard")
    port = free_port()
    server = subprocess.Popen([binary, "--logdir", str(trained_run / "tensorboard"), "--host", "127.0.0.1",
                               "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/data/plugin/scalars/scalars?run=.&tag=train/loss"
    try:
        deadline, points = time.monotonic() + 60, None
        while points is None and time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    points = json.loads(response.read())
            except OSError:
                time.sleep(0.5)
    finally:
        server.terminate()
        server.wait(timeout=10)
    expected = _scalars(trained_run / "tensorboard")["train/loss"]
    assert points is not None, "tensorboard server did not answer within 60 s"
    assert [(step, pytest.approx(value)) for _, step, value in points] == expected
