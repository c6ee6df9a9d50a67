"""`deploy.fit`: a model's faces get the geometry its training set was built with, and
arcshard-embed follows it (`--fit` overriding)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_tools.manifest import Manifest, write_manifest
from deploy.fit import model_fit
from deploy.model_card import FORMAT, Provenance, write_card
from tests.deploy.conftest import run_cli


def _dataset(directory: Path, fit: str) -> Path:
    """A training set directory as far as its manifest goes (no shards are read)."""
    directory.mkdir(parents=True)
    write_manifest(directory, Manifest(num_images=0, num_classes=3, image_size=(112, 112), shards=[], fit=fit))
    return directory


def _run_config(run: Path, data_path: Path | None) -> Path:
    """`run/config.yaml` of a mobilefacenet run on the recordio set `data_path` (None: synthetic)."""
    from trainer.config import Config, save_config

    cfg = Config()
    cfg.backbone.name = "mobilefacenet"
    if data_path is not None:
        cfg.data.source, cfg.data.path, cfg.data.num_classes = "recordio", str(data_path), None
    save_config(cfg, run / "config.yaml")
    return run


def _card(model: Path, input_section: dict) -> None:
    model.write_bytes(b"stands in for a model")
    model.with_suffix(".json").write_text(json.dumps({"format": FORMAT, "input": input_section}))


def test_the_fit_comes_from_the_flag_the_card_the_run_or_the_default(tmp_path):
    data = _dataset(tmp_path / "data", "pad")
    run = _run_config(tmp_path / "run", data)
    assert model_fit(None, model=run) == ("pad", f"from {data / 'manifest.json'}")
    assert model_fit("squash", model=run) == ("squash", "--fit")
    synthetic = _run_config(tmp_path / "synthetic", None)
    assert model_fit(None, model=synthetic) == ("crop", "default: the run trained on synthetic data")
    assert model_fit(None, model=tmp_path / "data")[0] == "crop"  # no config.yaml there
    assert model_fit(None) == ("crop", "default: bare weights record no training set")

    model = tmp_path / "m.onnx"
    assert model_fit(None, model=model) == ("crop", "default: no m.json beside the model")
    _card(model, {"name": "input", "fit": "squash"})
    assert model_fit(None, model=model) == ("squash", f"from {tmp_path / 'm.json'}")
    assert model_fit("pad", model=model) == ("pad", "--fit")
    _card(model, {"name": "input"})
    fit, source = model_fit(None, model=model)
    assert fit == "crop" and "records no fit (exported before --fit)" in source


def test_a_bad_recorded_fit_is_an_error_naming_the_file(tmp_path):
    model = tmp_path / "m.onnx"
    _card(model, {"fit": "stretch"})
    with pytest.raises(ValueError, match=rf"{tmp_path / 'm.json'}: input.fit 'stretch' is not one of crop, squash, pad"):
        model_fit(None, model=model)
    data = _dataset(tmp_path / "data", "pad")
    manifest = data / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"fit": "pad"', '"fit": "stretch"'))
    with pytest.raises(ValueError, match=rf"{manifest}: fit 'stretch' is not one of .*pass --fit"):
        model_fit(None, model=_run_config(tmp_path / "run", data))


def test_the_export_card_records_the_fit_arcshard_embed_reads(tmp_path):
    model = tmp_path / "model.onnx"
    model.write_bytes(b"stands in for a model")
    write_card(model, Provenance("mobilefacenet", 512, "0" * 64, "run"), precision="fp32", opset=18, batch=None,
               input_name="input", output_name="embedding", input_size=112, parity=[], cosine_bound=0.9999, fit="pad")
    assert json.loads(model.with_suffix(".json").read_text())["input"]["fit"] == "pad"
    assert model_fit(None, model=model) == ("pad", f"from {model.with_suffix('.json')}")


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> tuple[Path, Path]:
    """A finished mobilefacenet run (`backbone.pt` + `config.yaml`) trained on a set built
    with --fit pad, BatchNorm statistics estimated on noise so that different inputs give
    clearly different embeddings, and its training set."""
    from trainer.backbones import get_backbone

    root = tmp_path_factory.mktemp("fit_run")
    data = _dataset(root / "data", "pad")
    run = _run_config(root / "run", data)
    torch.manual_seed(0)
    module = get_backbone("mobilefacenet", embedding_size=512)
    for layer in module.modules():
        if isinstance(layer, torch.nn.modules.batchnorm._BatchNorm):
            layer.momentum = None  # cumulative average over the batch
    module.train()
    with torch.no_grad():
        module(torch.rand(8, 3, 112, 112) * 2 - 1)
    torch.save(module.state_dict(), run / "backbone.pt")
    return run, data


def test_arcshard_embed_uses_the_training_fit_unless_told_otherwise(trained_run, tmp_path):
    from deploy.embed import main
    from deploy.images import load_face
    from trainer.checkpoint import load_backbone
    from trainer.evaluation.embedder import TorchEmbedder, embed, preprocess

    run, data = trained_run
    rng = np.random.default_rng(0)
    photos = []
    for i, (w, h) in enumerate([(92, 112), (320, 243)]):
        photos.append(tmp_path / f"{i}.png")
        Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8)).save(photos[-1])
    module = load_backbone(run)[0]

    def reference(fit: str) -> np.ndarray:
        return embed(TorchEmbedder(module), preprocess(np.stack([load_face(p, fit) for p in photos])), flip=False)

    out = tmp_path / "e.npy"
    result = run_cli(main, [*photos, "--model", run, "--out", out, "--workers", "1"])
    assert result.code == 0, result.err
    assert f"fit pad (from {data / 'manifest.json'})" in result.out
    np.testing.assert_allclose(np.load(out), reference("pad"), atol=1e-5)
    assert np.abs(reference("pad") - reference("crop")).max() > 1e-2  # the choice is visible

    result = run_cli(main, [*photos, "--model", run, "--out", out, "--workers", "1", "--fit", "crop"])
    assert result.code == 0 and "fit crop (--fit)" in result.out
    np.testing.assert_allclose(np.load(out), reference("crop"), atol=1e-5)

    result = run_cli(main, ["compare", *photos, "--model", run, "--no-flip"])
    assert result.code == 0 and f"fit pad (from {data / 'manifest.json'})" in result.out
    cosine = float(result.out.split()[1].rstrip(":"))
    assert cosine == pytest.approx(float(np.dot(*reference("pad"))), abs=1e-4)
