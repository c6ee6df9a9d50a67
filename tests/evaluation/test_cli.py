"""`arcshard-eval`: verify with a checkpoint or an ONNX model, ijb, and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.evaluation.test_ijb import make_ijb
from trainer.backbones import get_backbone
from trainer.config import load_config, save_config
from trainer.cli.eval import main
from trainer.evaluation.embedder import OnnxEmbedder, embed, l2_normalise, load_embedder, preprocess
from trainer.evaluation.verification import evaluate_embeddings, evaluate_targets, load_bin


def finished_run(path: Path) -> torch.nn.Module:
    """A run directory as training leaves it: backbone.pt + config.yaml."""
    cfg = load_config(None, ["backbone.name=mobilefacenet", "backbone.embedding_size=32"])
    torch.manual_seed(3)
    module = get_backbone("mobilefacenet", embedding_size=32)
    path.mkdir()
    save_config(cfg, path / "config.yaml")
    torch.save(module.state_dict(), path / "backbone.pt")
    return module.eval()


def channel_mean_onnx(path: Path, fixed_batch: int | None = None) -> Path:
    """A tiny ONNX 'backbone': GlobalAveragePool + Flatten, [N, 3, 112, 112] -> [N, 3]."""
    import onnx
    from onnx import TensorProto, helper

    batch = fixed_batch if fixed_batch is not None else "N"
    graph = helper.make_graph(
        [helper.make_node("GlobalAveragePool", ["input"], ["pooled"]), helper.make_node("Flatten", ["pooled"], ["embedding"])],
        "channel_mean",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, 3, 112, 112])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, [batch, 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.save(model, path)
    return path


def test_verify_with_a_run_directory(tmp_path: Path, small_bin: Path, capsys):
    module = finished_run(tmp_path / "run")
    out = tmp_path / "results.json"
    assert main(["verify", "--checkpoint", str(tmp_path / "run"), "--bin", str(small_bin), "--json", str(out),
                 "--device", "cpu", "--batch-size", "4"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("small: accuracy ")
    (result,) = json.loads(out.read_text())
    expected = evaluate_targets(module, [load_bin(small_bin)], "cpu", batch_size=4, flip=True)["small"]
    assert result["accuracy"] == pytest.approx(expected.accuracy)
    assert result["auc"] == pytest.approx(expected.auc, abs=1e-6)
    assert result["path"] == str(small_bin) and result["flip"] is True


@pytest.mark.parametrize("fixed_batch", [None, 4])
def test_onnx_model_embeds_like_numpy(tmp_path: Path, small_bin: Path, fixed_batch: int | None, capsys):
    model = channel_mean_onnx(tmp_path / "m.onnx", fixed_batch)
    embedder = load_embedder(model, batch_size=5)
    assert isinstance(embedder, OnnxEmbedder) and embedder.embedding_size == 3
    target = load_bin(small_bin)
    batch = preprocess(target.images)  # 6 images: with a fixed batch of 4 the last is padded
    expected = l2_normalise(batch.astype(np.float64).mean(axis=(2, 3)) * 2)
    np.testing.assert_allclose(embed(embedder, batch, flip=True), expected, atol=1e-5)
    out = tmp_path / "r.json"
    assert main(["verify", "--model", str(model), "--bin", str(small_bin), "--json", str(out)]) == 0
    scores = evaluate_embeddings("small", expected, target.pairs, target.issame)
    assert json.loads(out.read_text())[0]["accuracy"] == pytest.approx(scores.accuracy)


def test_ijb_command(tmp_path: Path, capsys):
    make_ijb(tmp_path / "IJB_release")
    model = channel_mean_onnx(tmp_path / "m.onnx")
    out = tmp_path / "ijb.json"
    assert main(["ijb", "--model", str(model), "--root", str(tmp_path / "IJB_release"), "--set", "IJBC",
                 "--json", str(out), "--workers", "1"]) == 0
    printed = capsys.readouterr().out
    assert "IJBC:" in printed and "1e-01" in printed
    result = json.loads(out.read_text())
    assert result["num_pairs"] == 28 and set(result["tar_at_far"]) == {"1e-01"}


def test_bad_inputs_are_one_line_errors_naming_the_file(tmp_path: Path, small_bin: Path, capsys):
    finished_run(tmp_path / "run")
    corrupt = tmp_path / "corrupt.bin"
    corrupt.write_bytes(b"\x00garbage")
    make_ijb(tmp_path / "ijb")
    (tmp_path / "ijb" / "IJBC" / "meta" / "ijbc_face_tid_mid.txt").unlink()
    cases = [
        (["verify", "--checkpoint", str(tmp_path / "run"), "--bin", str(corrupt)], str(corrupt)),
        (["verify", "--checkpoint", str(tmp_path / "nope"), "--bin", str(small_bin)], str(tmp_path / "nope")),
        (["verify", "--model", str(tmp_path / "x.onnx"), "--bin", str(small_bin)], str(tmp_path / "x.onnx")),
        (["verify", "--checkpoint", str(small_bin.parent), "--bin", str(small_bin)], str(small_bin.parent)),
        (["ijb", "--checkpoint", str(tmp_path / "run"), "--root", str(tmp_path / "ijb")], "ijbc_face_tid_mid.txt"),
    ]
    for argv, named in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err, err
        assert err.startswith(f"arcshard-eval {argv[0]}: error: ") and named in err, err


def test_help_explains_the_numbers(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for phrase in ("10-fold", "TAR@FAR", "IJB_release", "Exit codes"):
        assert phrase in text
    with pytest.raises(SystemExit):
        main(["ijb", "--help"])
    text = capsys.readouterr().out
    for phrase in ("--checkpoint", "--model", "--root", "--no-detector-score"):
        assert phrase in text
    with pytest.raises(SystemExit):
        main(["verify", "--bin", "x.bin"])  # --checkpoint or --model is required
    assert "one of the arguments --checkpoint --model is required" in capsys.readouterr().err
