"""Bad inputs: one line naming the file and the fix, exit code 2, never a traceback."""

from __future__ import annotations

import shutil

import pytest
import torch

from tests.deploy.conftest import run_cli

pytest.importorskip("onnxruntime")

from deploy import embed, export  # noqa: E402
from trainer.backbones import get_backbone  # noqa: E402


def _one_error_line(result, *needles: str) -> str:
    assert result.code == 2, (result.out, result.err)
    lines = result.err.strip().splitlines()
    assert len(lines) == 1, result.err
    assert "Traceback" not in result.err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_missing_checkpoint(tmp_path):
    missing = tmp_path / "no_such_run"
    result = run_cli(export.main, ["onnx", "--checkpoint", missing, "--out", tmp_path / "m.onnx"])
    line = _one_error_line(result)
    assert line == f"arcshard-export: error: {missing}: does not exist (give a run output dir or a checkpoint dir)"
    assert list(tmp_path.iterdir()) == []


def test_checkpoint_of_another_shape(mbf_trained, tmp_path):
    """config.yaml says 512-d MobileFaceNet, backbone.pt holds a 128-d one."""
    run = tmp_path / "run"
    run.mkdir()
    shutil.copyfile(mbf_trained / "config.yaml", run / "config.yaml")
    torch.save(get_backbone("mobilefacenet", embedding_size=128).state_dict(), run / "backbone.pt")
    result = run_cli(export.main, ["onnx", "--checkpoint", run, "--out", tmp_path / "m.onnx"])
    _one_error_line(result, str(run / "backbone.pt"))
    assert not (tmp_path / "m.onnx").exists()


def test_out_must_be_an_onnx_file(mbf_trained, tmp_path):
    result = run_cli(export.main, ["onnx", "--checkpoint", mbf_trained, "--out", tmp_path / "model.json"])
    _one_error_line(result, "model.json", "must end in .onnx")


def test_embed_and_triton_refuse_a_non_onnx_model(mbf_trained, tmp_path):
    fake = tmp_path / "model.onnx"
    fake.write_text("this is not a protobuf")
    image = tmp_path / "face.png"
    from PIL import Image

    Image.new("RGB", (112, 112)).save(image)
    result = run_cli(embed.main, [image, "--model", fake, "--out", tmp_path / "e.npy"])
    _one_error_line(result, str(fake), "not a loadable ONNX model")
    result = run_cli(export.main, ["triton", "--model", fake, "--repo", tmp_path / "repo"])
    _one_error_line(result, str(fake), "not a valid ONNX model", "arcshard-export onnx")
    result = run_cli(embed.main, [image, "--model", tmp_path / "missing.onnx", "--out", tmp_path / "e.npy"])
    _one_error_line(result, str(tmp_path / "missing.onnx"))
    card = tmp_path / "model.json"
    card.write_text("{}")
    result = run_cli(embed.main, ["compare", image, image, "--model", card])
    _one_error_line(result, f"{card}: not an ONNX model")


def test_embed_with_no_readable_image_is_an_error(mbf_export, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    argv = [bad, tmp_path / "missing.jpg", "--model", mbf_export.model, "--out", tmp_path / "e.npy"]
    result = run_cli(embed.main, argv)
    assert result.code == 2
    assert f"skipped {bad}: not a readable image" in result.err
    assert f"skipped {tmp_path / 'missing.jpg'}: no such file" in result.err
    last = result.err.strip().splitlines()[-1]
    assert last == "arcshard-embed: error: none of the 2 images could be read; nothing written"
    assert not (tmp_path / "e.npy").exists()
