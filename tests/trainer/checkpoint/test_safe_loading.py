"""A doctored checkpoint cannot run code: through every command that reads one.

The payload is what an attacker hands over: a `.pt` file whose pickle calls `os.system`
(here: create a marker file), with `index.json` re-forged so that its size and sha256
match. Every command must refuse it with its documented exit code and a line naming
the file, and the marker must not appear. One short real training run (single process)
makes the checkpoint every test copies.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.evaluation.conftest import make_bin
from tests.trainer.checkpoint.parts import reforge_index
from trainer import exit_codes

REPO = Path(__file__).resolve().parents[3]
BIN = Path(sys.executable).parent
TINY = [
    "--config", "trainer/configs/cpu_demo.yaml", "backbone.name=mobilefacenet",
    "backbone.embedding_size=32", "backbone.channels_last=false", "data.num_classes=12",
    "data.batch_size=2", "data.num_samples=8", "data.workers=0",
]
STEP = "checkpoints/step-000000001"


class RunsCode:
    """Unpickling this calls os.system: what a malicious checkpoint file holds."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _train(out: Path, steps: int) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "trainer.train", *TINY, f"run.output_dir={out}", f"run.max_steps={steps}"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A run directory after one training step: a checkpoint and backbone.pt."""
    out = tmp_path_factory.mktemp("trained") / "run"
    proc = _train(out, 1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _poisoned(trained: Path, tmp_path: Path, rel: str) -> tuple[Path, Path, Path]:
    """A copy of the run with `rel` replaced by the payload and the index re-forged;
    returns (run dir, poisoned file, marker the payload would create)."""
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    marker = tmp_path / "code-ran"
    target = run / rel
    torch.save({"format": "arcshard-checkpoint", "backbone": RunsCode(marker)}, target)
    if rel.startswith("checkpoints/"):
        ckpt = run / STEP
        reforge_index(ckpt, str(target.relative_to(ckpt)))
    return run, target, marker


def test_the_payload_runs_code_when_unpickled_unsafely(trained, tmp_path):
    """The check on the tests below: without weights_only the payload does run."""
    _, target, marker = _poisoned(trained, tmp_path, f"{STEP}/replicated.pt")
    torch.load(target, weights_only=False)
    assert marker.exists()


def _image(path: Path) -> Path:
    Image.fromarray(np.full((112, 112, 3), 128, np.uint8)).save(path)
    return path


def _command(name: str, run: Path, tmp: Path) -> tuple[list[str], int]:
    """(argv, documented exit code) of command `name` reading run directory `run`."""
    if name.startswith("ckpt "):
        sub = name.split()[1]
        extra = [str(tmp / "bb.pt")] if sub == "export-backbone" else []
        return [str(BIN / "arcshard-ckpt"), sub, str(run), *extra], (
            exit_codes.USAGE if sub == "export-backbone" else exit_codes.FAILED  # 1: damaged
        )
    if name == "eval verify":
        make_bin(tmp / "small.bin", num_images=4, num_pairs=4)
        return [str(BIN / "arcshard-eval"), "verify", "--checkpoint", str(run), "--bin",
                str(tmp / "small.bin"), "--device", "cpu"], exit_codes.USAGE
    if name == "embed":
        return [str(BIN / "arcshard-embed"), str(_image(tmp / "face.png")), "--model", str(run),
                "--out", str(tmp / "e.npy")], exit_codes.USAGE
    if name == "export onnx":
        return [str(BIN / "arcshard-export"), "onnx", "--checkpoint", str(run), "--out",
                str(tmp / "m.onnx")], exit_codes.USAGE
    assert name == "train resume"
    return [sys.executable, "-m", "trainer.train", *TINY, f"run.output_dir={run}",
            "run.max_steps=2"], exit_codes.CHECKPOINT


def _assert_refused(proc: subprocess.CompletedProcess, code: int, target: Path, marker: Path) -> None:
    output = proc.stdout + proc.stderr
    assert proc.returncode == code, output[-3000:]
    assert not marker.exists(), "the payload ran"
    lines = [line for line in output.splitlines() if f"{target}: refused: loading it would call posix.system" in line]
    assert lines, output[-3000:]
    assert "Traceback" not in output


COMMANDS = ["ckpt verify", "ckpt info", "ckpt export-backbone", "eval verify", "embed",
            "export onnx", "train resume"]


@pytest.mark.parametrize("name", COMMANDS)
def test_doctored_replicated_state_is_refused(trained, tmp_path, name):
    run, target, marker = _poisoned(trained, tmp_path, f"{STEP}/replicated.pt")
    argv, code = _command(name, run, tmp_path)
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=600)
    _assert_refused(proc, code, target, marker)
    assert not (tmp_path / "bb.pt").exists() and not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("name", ["train resume", "ckpt verify"])
def test_doctored_rng_state_is_refused(trained, tmp_path, name):
    run, target, marker = _poisoned(trained, tmp_path, f"{STEP}/rng/rank00000.pt")
    argv, code = _command(name, run, tmp_path)
    _assert_refused(subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=600),
                    code, target, marker)


def test_doctored_final_backbone_is_refused(trained, tmp_path):
    """A finished run without checkpoints: its backbone.pt is read the same way."""
    run, target, marker = _poisoned(trained, tmp_path, "backbone.pt")
    shutil.rmtree(run / "checkpoints")
    argv, code = _command("export onnx", run, tmp_path)
    _assert_refused(subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=600),
                    code, target, marker)
