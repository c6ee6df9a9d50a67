"""Fixtures shared by the deploy tests: short real training runs and their exports.

Each backbone is trained once per session (2 CPU steps, a few identities). A model
that has taken two steps still has BatchNorm running statistics close to their initial
values, so in eval mode it maps every face to almost the same vector (cosine > 0.99999
between different people): parity and "same vectors" checks on it could not tell one
image from another. `mbf_trained` therefore re-estimates the BatchNorm statistics of
the trained MobileFaceNet on real faces (what a longer run converges to) and saves it
as a finished run (`backbone.pt` + `config.yaml` + `metrics.jsonl`); the IResNet-50 is
exported straight from its checkpoint directory.

The IResNet-50 run and export (two subprocesses, most of this directory's wall time)
start in a background thread as soon as collection shows a test needing `r50_export`,
so they overlap with the MobileFaceNet tests instead of preceding them.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import shutil
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
YALEFACES = REPO.parent / "shared" / "data" / "yalefaces"
CALIBRATION_IMAGES = 16
R50_STEP_DIR = "step-000000002"


@dataclass
class CliResult:
    """Exit code and output of a CLI call."""

    code: int
    out: str
    err: str


@dataclass
class Export:
    """What `arcshard-export onnx --checkpoint source --out model` did."""

    source: Path
    model: Path
    result: CliResult


def run_cli(main, argv: list) -> CliResult:
    """Call a console script's `main(argv)` in this process, capturing its output."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return CliResult(code, out.getvalue(), err.getvalue())


def train(out_dir: Path, backbone: str, batch_size: int) -> Path:
    """A 2-step single-process CPU training run of `backbone` into `out_dir`."""
    cmd = [
        sys.executable, "-m", "trainer.train", f"run.output_dir={out_dir}", "run.max_steps=2",
        f"data.batch_size={batch_size}", "data.num_classes=50", f"backbone.name={backbone}",
        "partial_fc.sample_rate=1.0", "data.workers=0", "run.log_every=1",
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out_dir


def face_files(count: int) -> list[Path]:
    """The first `count` distinct yalefaces images (sorted; the set holds a few
    byte-identical copies, e.g. normal.gif = noglasses.gif), [] when it is absent."""
    if not YALEFACES.is_dir():
        return []
    files, seen = [], set()
    for path in sorted(YALEFACES.rglob("*.gif")):
        digest = hashlib.sha256(path.read_bytes()).digest()
        if digest not in seen:
            seen.add(digest)
            files.append(path)
        if len(files) == count:
            break
    return files


class _R50Job:
    """Trains the IResNet-50 and exports its checkpoint with `python -m deploy.export`
    (a real process: exit code, stdout and stderr as a user sees them), in a thread."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="arcshard-deploy-r50-"))
        self.export: Export | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="r50-train-export", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            run = train(self.root / "run", "iresnet50", batch_size=2)
            ckpt = run / "checkpoints" / R50_STEP_DIR
            model = self.root / "onnx" / "r50.onnx"
            argv = [sys.executable, "-m", "deploy.export", "onnx", "--checkpoint", str(ckpt),
                    "--out", str(model), "--parity-samples", "4"]
            if YALEFACES.is_dir():
                argv += ["--parity-images", str(YALEFACES)]
            proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=600)
            self.export = Export(ckpt, model, CliResult(proc.returncode, proc.stdout, proc.stderr))
        except BaseException as exc:  # re-raised in the test thread by wait()
            self.error = exc

    def wait(self) -> Export:
        self.thread.join()
        if self.error is not None:
            raise self.error
        assert self.export is not None
        return self.export

    def cleanup(self) -> None:
        self.thread.join()
        shutil.rmtree(self.root, ignore_errors=True)


_r50_job: _R50Job | None = None


def pytest_collection_finish(session) -> None:
    """After selection (-k, -m, node ids): start the IResNet-50 job if a test needs it."""
    global _r50_job
    if _r50_job is None and any("r50_export" in getattr(item, "fixturenames", ()) for item in session.items):
        _r50_job = _R50Job()
        session.config.add_cleanup(_r50_job.cleanup)


@pytest.fixture(scope="session")
def r50_export() -> Export:
    """`arcshard-export onnx` of the IResNet-50's checkpoint directory (a real process)."""
    assert _r50_job is not None, "started at collection"
    return _r50_job.wait()


@pytest.fixture(scope="session")
def mbf_run(tmp_path_factory) -> Path:
    return train(tmp_path_factory.mktemp("mbf") / "run", "mobilefacenet", batch_size=8)


@pytest.fixture(scope="session")
def calibration_batch() -> np.ndarray:
    """Normalised faces to estimate BatchNorm statistics on (uniform noise without yalefaces)."""
    from deploy.images import load_face
    from trainer.evaluation.embedder import preprocess

    files = face_files(CALIBRATION_IMAGES)
    if files:
        return preprocess(np.stack([load_face(f) for f in files]))
    return np.random.default_rng(1).uniform(-1, 1, (CALIBRATION_IMAGES, 3, 112, 112)).astype(np.float32)


@pytest.fixture(scope="session")
def mbf_trained(mbf_run, calibration_batch, tmp_path_factory) -> Path:
    """The trained MobileFaceNet with BatchNorm statistics re-estimated, as a finished run."""
    from trainer.checkpoint import load_backbone

    module = load_backbone(mbf_run).module
    for layer in module.modules():
        if isinstance(layer, torch.nn.modules.batchnorm._BatchNorm):
            layer.reset_running_stats()
            layer.momentum = None  # cumulative average over the calibration batch
    module.train()
    with torch.no_grad():
        module(torch.from_numpy(calibration_batch))
    run = tmp_path_factory.mktemp("mbf_trained") / "run"
    run.mkdir()
    torch.save(module.state_dict(), run / "backbone.pt")
    for name in ("config.yaml", "metrics.jsonl"):
        shutil.copyfile(mbf_run / name, run / name)
    return run


@pytest.fixture(scope="session")
def mbf_module(mbf_trained) -> torch.nn.Module:
    """The PyTorch backbone `mbf_export` was exported from (eval mode)."""
    from trainer.checkpoint import load_backbone

    return load_backbone(mbf_trained)[0]


@pytest.fixture(scope="session")
def mbf_export(mbf_trained, tmp_path_factory) -> Export:
    """`arcshard-export onnx` of the MobileFaceNet (in process)."""
    from deploy.export import main

    model = tmp_path_factory.mktemp("mbf_onnx") / "model.onnx"
    argv = ["onnx", "--checkpoint", mbf_trained, "--out", model, "--parity-samples", 16]
    if YALEFACES.is_dir():
        argv += ["--parity-images", YALEFACES]
    return Export(mbf_trained, model, run_cli(main, argv))
