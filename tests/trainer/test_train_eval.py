"""Verification during training: results in metrics.jsonl, a `best` checkpoint."""

import io
import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from tests.distributed import free_port
from trainer import checkpoint

REPO = Path(__file__).resolve().parents[2]


def _write_bin(path: Path, pairs: int, seed: int) -> None:
    """An insightface-format .bin of random 112x112 JPEG pairs, half of them genuine."""
    rng = np.random.default_rng(seed)
    bins = []
    for _ in range(2 * pairs):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)).save(buf, "JPEG")
        bins.append(buf.getvalue())
    issame = [i % 2 == 0 for i in range(pairs)]
    path.write_bytes(pickle.dumps((bins, issame), protocol=4))


def test_eval_every_records_results_and_keeps_best(tmp_path):
    _write_bin(tmp_path / "lfw.bin", 20, 0)
    _write_bin(tmp_path / "agedb_30.bin", 10, 1)
    out = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_port", str(free_port()), "trainer/train.py",
        "--config", "trainer/configs/cpu_demo.yaml", f"run.output_dir={out}",
        "backbone.name=mobilefacenet", "backbone.embedding_size=32", "data.num_classes=16",
        "data.batch_size=4", "data.num_samples=64", "run.max_steps=4", "run.log_every=2",
        f"eval.targets=[{tmp_path / 'lfw.bin'}, {tmp_path / 'agedb_30.bin'}]", "eval.every=2",
        "eval.batch_size=16", "eval.best_target=agedb_30", "checkpoint.keep=1",
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval" in r]
    assert [r["step"] for r in evals] == [2, 4]
    for r in evals:
        assert set(r["eval"]) == {"lfw", "agedb_30"}
        assert 0.0 <= r["eval"]["lfw"]["accuracy"] <= 1.0 and r["eval"]["lfw"]["num_pairs"] == 20
    root = out / "checkpoints"
    best = (root / "best").read_text().strip()
    # max() returns the first of equal accuracies, as the trainer keeps the earlier best
    best_step = max(evals, key=lambda r: r["eval"]["agedb_30"]["accuracy"])["step"]
    assert best == f"step-{best_step:09d}" and checkpoint.is_complete(root / best)
    index = checkpoint.read_index(root / best)
    assert index["train_state"]["best"]["target"] == "agedb_30"
    log = (out / "logs" / "rank0.log").read_text()
    assert "verification lfw: accuracy" in log and "verification agedb_30" in log


def test_bad_eval_target_is_a_config_error(tmp_path):
    bad = tmp_path / "lfw.bin"
    bad.write_bytes(b"not a pickle")
    proc = subprocess.run(
        [sys.executable, "-m", "trainer.train", "--config", "trainer/configs/cpu_demo.yaml",
         f"run.output_dir={tmp_path / 'run'}", f"eval.targets=[{bad}]", "run.max_steps=1"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2
    assert "eval.targets[0]" in proc.stderr and str(bad) in proc.stderr
    assert "Traceback" not in proc.stderr
