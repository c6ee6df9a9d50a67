"""`arcshard-export triton`: the model repository, checked against the ONNX graph.

No Triton server runs here: config.pbtxt is parsed with protobuf's text-format parser
against Triton's ModelConfig field names and types, and every field is compared with
the graph as onnxruntime reports it.
"""

from __future__ import annotations

import json

import pytest

from tests.deploy.conftest import run_cli

ort = pytest.importorskip("onnxruntime")

from deploy.export import main  # noqa: E402
from deploy.triton import TritonError, check_config, parse_config  # noqa: E402

_ORT_TO_TRITON = {"tensor(float)": "TYPE_FP32", "tensor(float16)": "TYPE_FP16"}


def _triton_type(config, value: int) -> str:
    """The DataType enum name (TYPE_FP32, ...) of `value` in the parsed config's schema."""
    data_type = config.DESCRIPTOR.fields_by_name["input"].message_type.fields_by_name["data_type"]
    return data_type.enum_type.values_by_number[value].name


def test_repository_layout_and_config_match_the_graph(mbf_export, tmp_path):
    repo = tmp_path / "models"
    result = run_cli(main, ["triton", "--model", mbf_export.model, "--repo", repo, "--name", "faces",
                            "--max-batch-size", 48])
    assert result.code == 0, result.err
    model_dir = repo / "faces"
    assert sorted(str(p.relative_to(repo)) for p in repo.rglob("*")) == [
        "faces", "faces/1", "faces/1/model.onnx", "faces/config.pbtxt", "faces/model.json",
    ]
    assert (model_dir / "1" / "model.onnx").read_bytes() == mbf_export.model.read_bytes()
    assert json.loads((model_dir / "model.json").read_text())["backbone"] == "mobilefacenet"

    config = parse_config((model_dir / "config.pbtxt").read_text())
    assert config.name == "faces" and config.backend == "onnxruntime"
    assert config.max_batch_size == 48
    assert config.HasField("dynamic_batching")
    session = ort.InferenceSession(str(model_dir / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    for declared, actual in ((config.input, session.get_inputs()), (config.output, session.get_outputs())):
        assert len(declared) == len(actual) == 1
        (d,), (a,) = declared, actual
        assert d.name == a.name
        assert _triton_type(config, d.data_type) == _ORT_TO_TRITON[a.type]
        assert isinstance(a.shape[0], str)  # the batch axis Triton adds is dynamic in the graph
        assert list(d.dims) == a.shape[1:]
    assert list(config.input[0].dims) == [3, 112, 112] and list(config.output[0].dims) == [512]


def test_existing_model_directory_is_replaced_only_when_asked(mbf_export, tmp_path):
    argv = ["triton", "--model", mbf_export.model, "--repo", tmp_path]
    assert run_cli(main, argv).code == 0
    (tmp_path / "arcshard" / "stale.txt").write_text("from an older export")
    again = run_cli(main, argv)
    assert again.code == 2 and "--overwrite" in again.err
    assert run_cli(main, [*argv, "--overwrite"]).code == 0
    assert not (tmp_path / "arcshard" / "stale.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["arcshard"]  # no staging leftovers


def test_check_config_rejects_configs_that_do_not_match(mbf_export, tmp_path):
    import onnx

    assert run_cli(main, ["triton", "--model", mbf_export.model, "--repo", tmp_path]).code == 0
    text = (tmp_path / "arcshard" / "config.pbtxt").read_text()
    model = onnx.load(str(mbf_export.model))
    check_config(parse_config(text), model, "arcshard")
    wrong_dims = text.replace("dims: [ 512 ]", "dims: [ 128 ]")
    with pytest.raises(TritonError, match="outputs are .*'embedding', 'TYPE_FP32', \\[128\\]"):
        check_config(parse_config(wrong_dims), model, "arcshard")
    wrong_name = text.replace('name: "input"', 'name: "data"')
    with pytest.raises(TritonError, match="inputs are"):
        check_config(parse_config(wrong_name), model, "arcshard")
    no_batching = text[: text.index("dynamic_batching")]
    with pytest.raises(TritonError, match="dynamic_batching is not enabled"):
        check_config(parse_config(no_batching), model, "arcshard")
    with pytest.raises(TritonError, match="config.pbtxt: not a valid Triton model config"):
        parse_config(text.replace("max_batch_size", "max_batch"))
    with pytest.raises(TritonError, match="not a valid Triton model config"):
        parse_config(text.replace("TYPE_FP32", "TYPE_FLOAT32"))


def test_fixed_batch_model_is_refused(tmp_path):
    import torch

    from deploy.onnx_export import export_onnx

    model = tmp_path / "fixed.onnx"
    export_onnx(torch.nn.Sequential(torch.nn.AvgPool2d(112), torch.nn.Flatten()), model, batch=2, random_count=2)
    result = run_cli(main, ["triton", "--model", model, "--repo", tmp_path / "repo"])
    assert result.code == 2
    assert "first axis is not a dynamic batch axis" in result.err and "--batch dynamic" in result.err
    assert not (tmp_path / "repo" / "arcshard").exists()
