"""A Triton Inference Server model repository for an exported embedding model.

    OUT/<name>/config.pbtxt     onnxruntime backend, max_batch_size, dynamic batching,
                                input/output names, data types and dims
    OUT/<name>/model.json       the model card (normalisation, threshold), when present
    OUT/<name>/1/model.onnx     the model, version 1

With `max_batch_size > 0` Triton prepends the batch dimension itself, so `dims` leave
it out (`[3, 112, 112]` in, `[D]` out); the ONNX graph must therefore have a dynamic
first axis (export with `--batch dynamic`, the default).

`config_text` writes the config from the ONNX graph itself (never from assumptions
about it) and `check_config` re-reads a config.pbtxt with protobuf's text-format parser
against a copy of the subset of Triton's `ModelConfig` schema that we use
(`inference.ModelConfig` in triton-inference-server/common `model_config.proto`: same
field names, types and enum values), so a misspelt field or a wrong type fails here as
it would fail in the server, and then compares every field to the graph. No Triton
server is run.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from deploy.model_card import card_path

__all__ = [
    "DEFAULT_MAX_BATCH_SIZE",
    "DEFAULT_QUEUE_DELAY_US",
    "TensorSpec",
    "TritonError",
    "check_config",
    "config_text",
    "graph_tensors",
    "parse_config",
    "write_repository",
]

DEFAULT_MAX_BATCH_SIZE = 64
DEFAULT_QUEUE_DELAY_US = 100  # wait at most 0.1 ms for more requests to batch
BACKEND = "onnxruntime"
MODEL_FILE = "model.onnx"
VERSION = "1"

# ONNX TensorProto element type -> Triton DataType name
_ONNX_TO_TRITON = {
    1: "TYPE_FP32", 2: "TYPE_UINT8", 3: "TYPE_INT8", 4: "TYPE_UINT16", 5: "TYPE_INT16",
    6: "TYPE_INT32", 7: "TYPE_INT64", 8: "TYPE_STRING", 9: "TYPE_BOOL", 10: "TYPE_FP16",
    11: "TYPE_FP64", 12: "TYPE_UINT32", 13: "TYPE_UINT64", 16: "TYPE_BF16",
}
# Triton's DataType enum (model_config.proto)
_TRITON_TYPES = [
    "TYPE_INVALID", "TYPE_BOOL", "TYPE_UINT8", "TYPE_UINT16", "TYPE_UINT32", "TYPE_UINT64",
    "TYPE_INT8", "TYPE_INT16", "TYPE_INT32", "TYPE_INT64", "TYPE_FP16", "TYPE_FP32",
    "TYPE_FP64", "TYPE_STRING", "TYPE_BF16",
]


class TritonError(ValueError):
    """The model cannot be served as configured, or a config does not match its model."""


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: name, Triton data type, shape (None: symbolic axis)."""

    name: str
    data_type: str
    shape: tuple[int | None, ...]


def graph_tensors(model: Any) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The (inputs, outputs) of an ONNX ModelProto as TensorSpecs (initialisers that a
    graph lists as inputs are left out)."""
    initialisers = {init.name for init in model.graph.initializer}

    def spec(value: Any) -> TensorSpec:
        tensor = value.type.tensor_type
        shape = tuple(d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim)
        return TensorSpec(value.name, _ONNX_TO_TRITON.get(tensor.elem_type, "TYPE_INVALID"), shape)

    inputs = [spec(v) for v in model.graph.input if v.name not in initialisers]
    return inputs, [spec(v) for v in model.graph.output]


def config_text(model: Any, name: str, max_batch_size: int, queue_delay_us: int = DEFAULT_QUEUE_DELAY_US) -> str:
    """config.pbtxt for serving the ONNX ModelProto `model` as `name`."""
    if max_batch_size < 1:
        raise TritonError(f"--max-batch-size must be >= 1 (dynamic batching), got {max_batch_size}")
    inputs, outputs = graph_tensors(model)
    for tensor in (*inputs, *outputs):
        if not tensor.shape or tensor.shape[0] is not None:
            raise TritonError(
                f"tensor {tensor.name!r} has shape {list(tensor.shape)}: its first axis is not a "
                "dynamic batch axis; re-export with `arcshard-export onnx --batch dynamic`"
            )
        if any(d is None for d in tensor.shape[1:]) or tensor.data_type == "TYPE_INVALID":
            raise TritonError(
                f"tensor {tensor.name!r} ({tensor.data_type}, shape {list(tensor.shape)}): Triton needs "
                "a known data type and fixed sizes after the batch axis; export with arcshard-export onnx"
            )

    def block(kind: str, tensors: list[TensorSpec]) -> str:
        items = ",\n".join(
            f'  {{\n    name: "{t.name}"\n    data_type: {t.data_type}\n'
            f"    dims: [ {', '.join(str(d) for d in t.shape[1:])} ]\n  }}"
            for t in tensors
        )
        return f"{kind} [\n{items}\n]\n"

    return (
        f'name: "{name}"\n'
        f'backend: "{BACKEND}"\n'
        f"max_batch_size: {max_batch_size}\n"
        + block("input", inputs)
        + block("output", outputs)
        + f"dynamic_batching {{\n  max_queue_delay_microseconds: {queue_delay_us}\n}}\n"
        + "instance_group [\n  {\n    count: 1\n    kind: KIND_AUTO\n  }\n]\n"
    )


@cache
def _model_config_class() -> type:
    """A protobuf message class for the subset of Triton's `inference.ModelConfig` that
    config_text writes (plus the fields a user is likely to add), built at run time."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    F = descriptor_pb2.FieldDescriptorProto
    fdp = descriptor_pb2.FileDescriptorProto(
        name="arcshard_triton_model_config.proto", package="inference", syntax="proto3"
    )
    data_type = fdp.enum_type.add(name="DataType")
    for number, value in enumerate(_TRITON_TYPES):
        data_type.value.add(name=value, number=number)

    def message(name: str, *fields: tuple[str, int, int, int, str | None]) -> descriptor_pb2.DescriptorProto:
        msg = fdp.message_type.add(name=name)
        for fname, number, ftype, label, type_name in fields:
            field = msg.field.add(name=fname, number=number, type=ftype, label=label)
            if type_name:
                field.type_name = type_name
        return msg

    one, rep = F.LABEL_OPTIONAL, F.LABEL_REPEATED
    message(
        "ModelInput",
        ("name", 1, F.TYPE_STRING, one, None),
        ("data_type", 2, F.TYPE_ENUM, one, ".inference.DataType"),
        ("dims", 4, F.TYPE_INT64, rep, None),
    )
    message(
        "ModelOutput",
        ("name", 1, F.TYPE_STRING, one, None),
        ("data_type", 2, F.TYPE_ENUM, one, ".inference.DataType"),
        ("dims", 3, F.TYPE_INT64, rep, None),
    )
    message(
        "ModelDynamicBatching",
        ("preferred_batch_size", 1, F.TYPE_INT32, rep, None),
        ("max_queue_delay_microseconds", 2, F.TYPE_UINT64, one, None),
        ("preserve_ordering", 3, F.TYPE_BOOL, one, None),
    )
    group = message(
        "ModelInstanceGroup",
        ("name", 1, F.TYPE_STRING, one, None),
        ("count", 2, F.TYPE_INT32, one, None),
        ("gpus", 3, F.TYPE_INT32, rep, None),
        ("kind", 4, F.TYPE_ENUM, one, ".inference.ModelInstanceGroup.Kind"),
    )
    kind = group.enum_type.add(name="Kind")
    for number, value in enumerate(["KIND_AUTO", "KIND_GPU", "KIND_CPU", "KIND_MODEL"]):
        kind.value.add(name=value, number=number)
    message(
        "ModelConfig",
        ("name", 1, F.TYPE_STRING, one, None),
        ("platform", 2, F.TYPE_STRING, one, None),
        ("max_batch_size", 4, F.TYPE_INT32, one, None),
        ("input", 5, F.TYPE_MESSAGE, rep, ".inference.ModelInput"),
        ("output", 6, F.TYPE_MESSAGE, rep, ".inference.ModelOutput"),
        ("instance_group", 7, F.TYPE_MESSAGE, rep, ".inference.ModelInstanceGroup"),
        ("default_model_filename", 8, F.TYPE_STRING, one, None),
        ("dynamic_batching", 11, F.TYPE_MESSAGE, one, ".inference.ModelDynamicBatching"),
        ("backend", 17, F.TYPE_STRING, one, None),
    )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("inference.ModelConfig"))


def parse_config(text: str, path: str | os.PathLike[str] = "config.pbtxt") -> Any:
    """Parse config.pbtxt text into a ModelConfig message; TritonError names `path` and
    the offending line for unknown fields, bad enum values or wrong types."""
    from google.protobuf import text_format

    try:
        return text_format.Parse(text, _model_config_class()())
    except text_format.ParseError as exc:
        raise TritonError(f"{path}: not a valid Triton model config: {exc}") from None


def check_config(config: Any, model: Any, name: str, path: str | os.PathLike[str] = "config.pbtxt") -> None:
    """Check a parsed ModelConfig against the ONNX ModelProto it serves as `name`:
    backend, batching, and every input/output's name, data type and dims (the graph's
    shape without its dynamic batch axis). Raises TritonError listing what differs."""
    inputs, outputs = graph_tensors(model)
    problems = []
    if config.name != name:
        problems.append(f"name is {config.name!r}, the model directory is {name!r}")
    if config.backend != BACKEND and config.platform != "onnxruntime_onnx":
        problems.append(f"backend is {config.backend!r}, expected {BACKEND!r}")
    if config.max_batch_size < 1:
        problems.append(f"max_batch_size is {config.max_batch_size}, expected >= 1")
    if not config.HasField("dynamic_batching"):
        problems.append("dynamic_batching is not enabled")
    for kind, declared, actual in (("input", config.input, inputs), ("output", config.output, outputs)):
        got = [(t.name, _TRITON_TYPES[t.data_type], list(t.dims)) for t in declared]
        want = [(t.name, t.data_type, list(t.shape[1:])) for t in actual]
        if sorted(got) != sorted(want):
            problems.append(f"{kind}s are {got}, the ONNX graph has {want} (name, type, dims without batch)")
        for t in actual:
            if not t.shape or t.shape[0] is not None:
                problems.append(f"{kind} {t.name!r} has no dynamic batch axis (shape {list(t.shape)})")
    if problems:
        raise TritonError(f"{path}: does not match the model: " + "; ".join(problems))


def write_repository(
    model_path: str | os.PathLike[str],
    repo: str | os.PathLike[str],
    name: str,
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
    queue_delay_us: int = DEFAULT_QUEUE_DELAY_US,
    overwrite: bool = False,
) -> Path:
    """Create `repo/name/` (config.pbtxt, 1/model.onnx, model.json) for the ONNX model at
    `model_path` and check the written config against the graph; returns the model dir.

    The directory is assembled under a temporary name and renamed into place, so a
    failure never leaves a half-written model for Triton to pick up. An existing
    `repo/name` is replaced only with `overwrite`.
    """
    model_path, repo = Path(model_path), Path(repo)
    if not name or "/" in name or name in (".", ".."):
        raise TritonError(f"--name {name!r}: a model name is one directory name, e.g. arcshard")
    model = _load_onnx(model_path)
    text = config_text(model, name, max_batch_size, queue_delay_us)
    target = repo / name
    if target.exists() and not overwrite:
        raise TritonError(f"{target}: already exists; pass --overwrite to replace it or choose another --name")
    repo.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=repo, prefix=f".{name}."))
    try:
        (staging / VERSION).mkdir()
        shutil.copyfile(model_path, staging / VERSION / MODEL_FILE)
        (staging / "config.pbtxt").write_text(text, encoding="utf-8")
        card = card_path(model_path)
        if card.is_file():
            shutil.copyfile(card, staging / "model.json")
        os.chmod(staging, 0o755)
        check_config(parse_config(text, target / "config.pbtxt"), model, name, target / "config.pbtxt")
        if target.exists():
            old = Path(tempfile.mkdtemp(dir=repo, prefix=f".{name}.old."))
            os.replace(target, old / name)
            os.replace(staging, target)
            shutil.rmtree(old)
        else:
            os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _load_onnx(path: Path) -> Any:
    """The ModelProto at `path`, checked; TritonError names the file otherwise."""
    import onnx

    if not path.is_file():
        raise TritonError(f"{path}: no such ONNX model; export one with `arcshard-export onnx`")
    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
    except Exception as exc:  # onnx raises DecodeError, ValidationError, ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TritonError(
            f"{path}: not a valid ONNX model ({first}); export one with `arcshard-export onnx`"
        ) from None
    return model
