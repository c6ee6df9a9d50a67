"""`arcshard-export onnx`: graphs, parity with PyTorch, dynamic batch, model.json."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from torch import nn

from tests.deploy.conftest import YALEFACES

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from deploy.model_card import (  # noqa: E402
    DEFAULT_THRESHOLD, recorded_verification, training_provenance, write_card,
)
from deploy.onnx_export import (  # noqa: E402
    COSINE_BOUND, ParityError, check_parity, export_onnx, random_inputs,
)
from trainer.evaluation.embedder import TorchEmbedder  # noqa: E402


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _graph_signature(path) -> tuple[list, list]:
    model = onnx.load(str(path), load_external_data=False)

    def dims(value):
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    return ([(i.name, i.type.tensor_type.elem_type, dims(i)) for i in model.graph.input],
            [(o.name, o.type.tensor_type.elem_type, dims(o)) for o in model.graph.output])


def _check_card_parity(card: dict, *, with_images: bool) -> None:
    results = {r["inputs"]: r for r in card["parity"]["results"]}
    assert card["parity"]["cosine_bound"] == 0.9999
    assert results["random inputs"]["min_cosine"] >= 0.9999
    image_sets = [r for name, r in results.items() if name.startswith("images from")]
    assert len(image_sets) == (1 if with_images else 0)
    for r in image_sets:
        assert r["min_cosine"] >= 0.9999 and r["images"] > 0


def test_iresnet50_checkpoint_exports_with_parity(r50_export):
    assert r50_export.result.code == 0, r50_export.result.err
    assert "Traceback" not in r50_export.result.err
    out = r50_export.result.out
    print(out)
    assert "min cosine" in out and "loaded iresnet50 (512-d)" in out and "at step 2" in out
    inputs, outputs = _graph_signature(r50_export.model)
    assert inputs == [("input", onnx.TensorProto.FLOAT, ["N", 3, 112, 112])]
    assert outputs == [("embedding", onnx.TensorProto.FLOAT, ["N", 512])]
    card = json.loads(r50_export.model.with_suffix(".json").read_text())
    _check_card_parity(card, with_images=YALEFACES.is_dir())
    assert card["backbone"] == "iresnet50" and card["embedding_size"] == 512
    assert card["training"]["step"] == 2
    config_text = (r50_export.source / "config.yaml").read_bytes()
    assert card["training"]["config_sha256"] == hashlib.sha256(config_text).hexdigest()
    assert card["sha256"] == hashlib.sha256(r50_export.model.read_bytes()).hexdigest()
    assert card["input"]["normalisation"] == "(pixel - 127.5) / 127.5"
    assert card["input"]["shape"] == ["N", 3, 112, 112] and card["output"]["shape"] == ["N", 512]
    assert "verification" not in card["training"]  # the run verified nothing
    assert card["threshold"] == {"cosine": DEFAULT_THRESHOLD, "flip": True, "source": "default"}


def test_iresnet50_runs_at_batch_1_7_and_32(r50_export):
    """The same image gets the same embedding whichever batch size carries it."""
    assert r50_export.result.code == 0, r50_export.result.err
    session = ort.InferenceSession(str(r50_export.model), providers=["CPUExecutionProvider"])
    images = random_inputs(32, seed=7)
    out = {n: session.run(None, {"input": images[:n]})[0] for n in (1, 7, 32)}
    assert {n: o.shape for n, o in out.items()} == {1: (1, 512), 7: (7, 512), 32: (32, 512)}
    assert _cosines(out[1], out[32][:1]).min() >= 0.9999
    assert _cosines(out[7], out[32][:7]).min() >= 0.9999


def test_mobilefacenet_export_prints_parity_and_writes_card(mbf_export):
    result = mbf_export.result
    assert result.code == 0, result.err
    print(result.out)
    lines = result.out.splitlines()
    assert lines[0] == f"loaded mobilefacenet (512-d) from {mbf_export.source} at step 2, raw weights"
    parity_lines = [line for line in lines if line.startswith("parity on")]
    assert len(parity_lines) == (2 if YALEFACES.is_dir() else 1)
    assert all("max abs diff" in line and "min cosine" in line for line in parity_lines)
    card = json.loads(mbf_export.model.with_suffix(".json").read_text())
    _check_card_parity(card, with_images=YALEFACES.is_dir())
    assert card["backbone"] == "mobilefacenet" and card["precision"] == "fp32" and card["batch"] == "dynamic"
    assert card["training"]["step"] == 2  # a finished run without checkpoints: its last logged step
    model = onnx.load(str(mbf_export.model))
    props = {p.key: p.value for p in model.metadata_props}
    assert props["backbone"] == "mobilefacenet" and props["embedding_size"] == "512"


def test_mobilefacenet_matches_pytorch_at_batch_1_7_and_32(mbf_export, mbf_module, calibration_batch):
    session = ort.InferenceSession(str(mbf_export.model), providers=["CPUExecutionProvider"])
    images = np.concatenate([calibration_batch, random_inputs(16, seed=3)])  # 32
    expected = TorchEmbedder(mbf_module)(images)
    for n in (1, 7, 32):
        got = session.run(None, {"input": images[:n]})[0]
        assert got.shape == (n, 512)
        assert _cosines(got, expected[:n]).min() >= 0.9999
        np.testing.assert_allclose(got, expected[:n], rtol=1e-4, atol=1e-5 * np.abs(expected).max())
    # The check discriminates: different faces are far apart, the 0.9999 bound is much
    # tighter (uniform-noise images, by contrast, all look alike to a face network).
    faces = expected[: len(calibration_batch)]
    e = faces / np.linalg.norm(faces, axis=1, keepdims=True)
    assert (e @ e.T)[~np.eye(len(e), dtype=bool)].max() < 0.99


class _TinyBackbone(nn.Module):
    """A 112x112 -> 16-d network small enough to export in a second."""

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 8, stride=8)
        self.fc = nn.Linear(4 * 14 * 14, 16)
        with torch.no_grad():
            self.fc.weight.mul_(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(torch.relu(self.conv(x)), 1))


def test_parity_check_detects_a_slightly_different_model(tmp_path):
    torch.manual_seed(0)
    tiny = _TinyBackbone()
    path = tmp_path / "tiny.onnx"
    export_onnx(tiny, path, random_count=8)
    assert check_parity(tiny, path, random_inputs(8), "random").min_cosine >= 0.99999
    perturbed = _TinyBackbone()
    perturbed.load_state_dict(tiny.state_dict())
    with torch.no_grad():
        perturbed.fc.weight.add_(0.02 * perturbed.fc.weight.std() * torch.randn_like(perturbed.fc.weight))
    assert check_parity(perturbed, path, random_inputs(8), "random").min_cosine < COSINE_BOUND["fp32"]


def test_failed_parity_writes_nothing(tmp_path):
    """float16 overflows on a model whose activations exceed 65504: the export fails and
    neither the model nor a temporary file is left behind."""
    torch.manual_seed(0)
    path = tmp_path / "tiny.onnx"
    with pytest.raises(ParityError, match="beyond float16's range.*without --fp16"):
        export_onnx(_TinyBackbone(scale=1e6), path, fp16=True, random_count=4)
    assert list(tmp_path.iterdir()) == []


def test_fp16_export_halves_weights_and_keeps_float32_io(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "tiny16.onnx"
    results = export_onnx(_TinyBackbone(), path, fp16=True, random_count=8)
    assert results[0].min_cosine >= COSINE_BOUND["fp16"]
    model = onnx.load(str(path))
    float_types = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE}
    weights = [init for init in model.graph.initializer if init.data_type in float_types]
    assert weights and {w.data_type for w in weights} == {onnx.TensorProto.FLOAT16}
    inputs, outputs = _graph_signature(path)
    assert inputs == [("input", onnx.TensorProto.FLOAT, ["N", 3, 112, 112])]
    assert outputs == [("embedding", onnx.TensorProto.FLOAT, ["N", 16])]


def test_fixed_batch_export(tmp_path):
    path = tmp_path / "b3.onnx"
    export_onnx(_TinyBackbone(), path, batch=3, random_count=5)  # 5 images: padded to 2 batches of 3
    inputs, outputs = _graph_signature(path)
    assert inputs == [("input", onnx.TensorProto.FLOAT, [3, 3, 112, 112])]
    assert outputs == [("embedding", onnx.TensorProto.FLOAT, [3, 16])]


def test_recorded_verification_stops_at_the_weights_step():
    lfw = {"name": "lfw", "accuracy": 0.71, "accuracy_std": 0.02, "best_threshold": 0.27, "auc": 0.8,
           "tar_at_far": {}, "num_pairs": 600}
    records = [
        {"step": 1, "eval": {"lfw": {**lfw, "accuracy": 0.61, "best_threshold": 0.42}}},
        {"step": 2, "loss": 3.0},
        {"step": 3, "eval": {"lfw": lfw}, "verification": {"agedb_30": 0.65}},
        {"step": 4, "eval": {"lfw": {**lfw, "accuracy": 0.99}}},
    ]
    numbers = {k: v for k, v in lfw.items() if k != "name"}
    assert recorded_verification(records, step=3) == {
        "lfw": {"step": 3, **numbers},
        "agedb_30": {"step": 3, "accuracy": 0.65},
    }
    assert recorded_verification(records, step=2) == {
        "lfw": {"step": 1, **numbers, "accuracy": 0.61, "best_threshold": 0.42}
    }
    assert recorded_verification(records, step=None)["lfw"]["accuracy"] == 0.99


def test_card_takes_threshold_and_accuracy_from_recorded_verification(mbf_trained, tmp_path):
    from trainer.config import load_config

    run = tmp_path / "run"
    run.mkdir()
    records = [
        {"step": 1, "eval": {"agedb_30": {"name": "agedb_30", "accuracy": 0.6, "best_threshold": 0.5}}},
        {"step": 2, "eval": {"lfw": {"name": "lfw", "accuracy": 0.71, "best_threshold": 0.27},
                             "agedb_30": {"name": "agedb_30", "accuracy": 0.65, "best_threshold": 0.2}}},
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    cfg = load_config(mbf_trained / "config.yaml")
    cfg.eval.best_target, cfg.eval.flip = "lfw.bin", False
    provenance = training_provenance(run, cfg)
    assert provenance.step == 2 and provenance.threshold_target == "lfw"
    model = tmp_path / "m.onnx"
    model.write_bytes(b"stands in for a model")
    card = json.loads(write_card(
        model, provenance, precision="fp32", opset=18, batch=None, input_name="input", output_name="embedding",
        input_size=112, parity=[], cosine_bound=0.9999,
    ).read_text())
    assert card["threshold"] == {"cosine": 0.27, "flip": False, "source": "verification:lfw"}
    assert card["training"]["verification"] == {
        "agedb_30": {"step": 2, "accuracy": 0.65, "best_threshold": 0.2},
        "lfw": {"step": 2, "accuracy": 0.71, "best_threshold": 0.27},
    }
    assert card["sha256"] == hashlib.sha256(b"stands in for a model").hexdigest()
