"""`--weights FILE --backbone NAME [--embedding-size D]` on arcshard-eval, arcshard-export onnx
and arcshard-embed, with a file arcface_torch's own `get_model("mbf")` wrote: embeddings
equal the anchor module's, the ONNX export passes its parity check, bad input is one line."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tests.deploy.conftest import run_cli
from tests.evaluation.conftest import make_bin, random_faces
from tests.trainer.test_finetune import anchor_model


@pytest.fixture(scope="module")
def mbf_file(tmp_path_factory):
    model = anchor_model("mbf", 128)
    path = tmp_path_factory.mktemp("released") / "backbone.pth"
    torch.save(model.state_dict(), path)
    return path, model


def test_embed_with_released_weights_equals_the_anchor_module(mbf_file, tmp_path):
    from deploy.embed import main
    from trainer.evaluation.embedder import preprocess

    path, model = mbf_file
    faces = random_faces(3, seed=1, size=112)
    files = []
    for i, face in enumerate(faces):
        files.append(tmp_path / f"{i}.png")
        Image.fromarray(face).save(files[-1])
    result = run_cli(main, [*files, "--weights", path, "--backbone", "mobilefacenet", "--out", tmp_path / "e.npy"])
    assert result.code == 0, result.err
    with torch.no_grad():
        ref = torch.nn.functional.normalize(model(torch.from_numpy(preprocess(np.stack(faces))))).numpy()
    np.testing.assert_allclose(np.load(tmp_path / "e.npy"), ref, atol=1e-5)


def test_eval_verify_and_onnx_export_take_released_weights(mbf_file, tmp_path):
    from deploy.export import main as export
    from trainer.cli.eval import main as evaluate

    path, _ = mbf_file
    make_bin(tmp_path / "pairs.bin")
    result = run_cli(evaluate, ["verify", "--weights", path, "--backbone", "mobilefacenet",
                                "--bin", tmp_path / "pairs.bin", "--device", "cpu"])
    assert result.code == 0, result.err
    assert "pairs" in result.out
    result = run_cli(export, ["onnx", "--weights", path, "--backbone", "mobilefacenet",
                              "--out", tmp_path / "m.onnx", "--parity-samples", "4"])
    assert result.code == 0, result.err
    assert (tmp_path / "m.onnx").is_file() and "128-d" in result.out


@pytest.mark.parametrize("extra, expected", [
    ([], "needs --backbone NAME"),
    (["--backbone", "iresnet18"], "does not fit iresnet18 with embedding size 128: conv1.weight is missing"),
    (["--backbone", "mobilefacenet", "--embedding-size", "64"], "features.layers.2.weight is (128, 512)"),
])
def test_bad_weights_arguments_are_one_line_exit_2(mbf_file, tmp_path, extra, expected):
    from deploy.embed import main

    path, _ = mbf_file
    Image.fromarray(random_faces(1, seed=2, size=112)[0]).save(tmp_path / "a.png")
    result = run_cli(main, [tmp_path / "a.png", "--weights", path, *extra, "--out", tmp_path / "e.npy"])
    assert result.code == 2 and expected in result.err, result.err
    assert len(result.err.strip().splitlines()) == 1 and not (tmp_path / "e.npy").exists()


def test_a_missing_optional_dependency_is_one_line_naming_the_extra(mbf_file, tmp_path, monkeypatch):
    import sys

    from deploy.export import main

    path, _ = mbf_file
    monkeypatch.setitem(sys.modules, "onnx", None)  # `import onnx` raises ModuleNotFoundError
    result = run_cli(main, ["onnx", "--weights", path, "--backbone", "mobilefacenet", "--out", tmp_path / "m.onnx"])
    assert result.code == 2 and not (tmp_path / "m.onnx").exists()
    assert result.err.strip() == (
        "arcshard-export: error: onnx is not installed: install the deploy extra (pip install 'arcshard[deploy]')")
