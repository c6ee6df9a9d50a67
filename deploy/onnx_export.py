"""Export a backbone to ONNX and prove the exported graph computes what PyTorch computes.

`export_onnx(module, out)` is the whole pipeline behind `arcshard-export onnx`:

1. trace the eval-mode backbone with PyTorch's `torch.export`-based ONNX exporter
   (`torch.onnx.export(..., dynamo=True)`, the default since PyTorch 2.9; the legacy
   TorchScript exporter is deprecated) into one self-contained file (weights inside,
   no external-data side file, so a Triton repository needs just `model.onnx`);
   the single input `input` is float32 NCHW `[N, 3, 112, 112]` with a symbolic batch
   axis `N` (or a fixed N), the single output `embedding` is float32 `[N, D]`;
2. run `onnx.checker` (full check, with shape inference) and check the graph's
   signature;
3. run the same inputs through PyTorch and through onnxruntime (CPU), on random inputs
   in the normalised pixel range and on real face images when given, and compare:
   the largest absolute difference and the smallest per-image cosine similarity of the
   raw embeddings;
4. only if every cosine is at least the bound (`COSINE_BOUND`: 0.9999 for fp32,
   0.999 for `fp16`) is the file moved to `out` (atomically); otherwise it is deleted
   and `ParityError` says by how much it missed.

`fp16=True` stores weights and runs every layer in float16 but keeps the float32 input
and output, so clients do not change. float16 keeps 11 significant bits (about 3
decimal digits) through ~50 layers, hence its looser bound. onnxruntime's CPU provider
runs many float16 operators by casting to float32 around them, so on a CPU the parity
check measures the float16 weights, not float16 arithmetic; a GPU would also overflow
wherever an activation exceeds float16's largest value (65504). So the float32 reference
records every layer's largest activation on the parity inputs, and a backbone that goes
beyond that range (such as a barely trained IResNet whose BatchNorm statistics are still
at their initial values) fails the export instead of producing a model that returns inf.
"""

from __future__ import annotations

import copy
import logging
import os
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from data_tools.atomic import publish
from trainer.evaluation.embedder import INPUT_SIZE, OnnxEmbedder, TorchEmbedder

__all__ = [
    "COSINE_BOUND",
    "DEFAULT_OPSET",
    "INPUT_NAME",
    "RANDOM_PARITY_IMAGES",
    "OUTPUT_NAME",
    "ExportError",
    "ParityError",
    "ParityResult",
    "check_graph",
    "check_parity",
    "export_onnx",
    "largest_activation",
    "random_inputs",
]

INPUT_NAME = "input"
OUTPUT_NAME = "embedding"
BATCH_AXIS = "N"
DEFAULT_OPSET = 18  # the torch.export-based exporter's native opset; onnxruntime >= 1.14 runs it
COSINE_BOUND = {"fp32": 0.9999, "fp16": 0.999}
"""Smallest per-image cosine similarity between PyTorch and onnxruntime embeddings that
an export may have, by precision."""

RANDOM_PARITY_IMAGES = 32
FLOAT16_MAX = 65504.0
_EXAMPLE_BATCH = 2  # a traced batch of 1 could be specialised by the exporter


class ExportError(ValueError):
    """The backbone cannot be exported, or the exported graph is not what clients expect."""


class ParityError(ExportError):
    """onnxruntime's embeddings differ from PyTorch's by more than the bound."""


@dataclass(frozen=True)
class ParityResult:
    """How closely onnxruntime reproduced PyTorch on one set of inputs."""

    inputs: str  # what was compared: "random inputs" or "images from DIR"
    images: int
    max_abs_diff: float
    min_cosine: float
    max_abs_embedding: float  # scale of the embeddings, to read max_abs_diff against

    def line(self) -> str:
        """One human-readable line for the CLI."""
        return (
            f"parity on {self.images} {self.inputs}: max abs diff {self.max_abs_diff:.3g} "
            f"(embeddings up to {self.max_abs_embedding:.3g}), min cosine {self.min_cosine:.7f}"
        )

    def as_dict(self) -> dict[str, float | int | str]:
        return asdict(self)


class _Float16(nn.Module):
    """Runs `module` in float16 between a float32 input and a float32 output."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module.half()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x.half()).float()


def random_inputs(count: int = RANDOM_PARITY_IMAGES, seed: int = 0) -> np.ndarray:
    """`count` normalised float32 images `[count, 3, 112, 112]`, uniform in [-1, 1] (the
    range `(pixel - 127.5) / 127.5` takes), reproducible from `seed`."""
    rng = np.random.default_rng(seed)
    return rng.uniform(-1.0, 1.0, (count, 3, INPUT_SIZE, INPUT_SIZE)).astype(np.float32)


def export_onnx(
    module: nn.Module,
    out: str | os.PathLike[str],
    *,
    opset: int = DEFAULT_OPSET,
    fp16: bool = False,
    batch: int | None = None,
    random_count: int = RANDOM_PARITY_IMAGES,
    parity_inputs: dict[str, np.ndarray] | None = None,
    metadata: dict[str, str] | None = None,
) -> list[ParityResult]:
    """Export `module` to the ONNX file `out` and check it against PyTorch.

    Args:
        module: the backbone (any device; it is exported from a float32 CPU copy in eval
            mode and is itself left unchanged).
        out: destination `.onnx` file; written only once every check passed.
        opset: ONNX opset of the graph.
        fp16: float16 weights and arithmetic behind the float32 input/output.
        batch: None for a dynamic batch axis, else the fixed batch size.
        random_count: how many `random_inputs` to compare.
        parity_inputs: extra named sets of normalised images `[K, 3, 112, 112]` (e.g.
            real faces) compared in addition to `random_inputs()`.
        metadata: strings stored in the model's `metadata_props`.

    Returns:
        One `ParityResult` per compared input set (random first).

    Raises:
        ExportError: the exporter, the checker or the graph signature failed.
        ParityError: a cosine similarity fell below `COSINE_BOUND`.
    """
    out = Path(out)
    if batch is not None and batch < 1:
        raise ExportError(f"batch size must be >= 1 or dynamic, got {batch}")
    reference = copy.deepcopy(module).float().cpu().eval()
    exported = _Float16(copy.deepcopy(reference)) if fp16 else reference
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        _trace(exported, tmp, opset, batch)
        _stamp_and_check(tmp, out, metadata or {}, batch)
        results = _parity(reference, tmp, out, fp16, random_count, parity_inputs or {})
        publish(tmp, out)
        return results
    finally:
        tmp.unlink(missing_ok=True)


def _stamp_and_check(tmp: Path, out: Path, metadata: dict[str, str], batch: int | None) -> None:
    """Add `metadata` and the producer name to the graph at `tmp`; onnx.checker and the
    graph signature must pass."""
    import onnx

    model = onnx.load(str(tmp))
    for key, value in metadata.items():
        model.metadata_props.add(key=key, value=value)
    model.producer_name = "arcshard"
    onnx.save(model, str(tmp))
    try:
        onnx.checker.check_model(str(tmp), full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"{out}: the exported graph fails onnx.checker: {_first_line(exc)}") from None
    check_graph(model, batch, out)


def _parity(
    reference: nn.Module, tmp: Path, out: Path, fp16: bool, random_count: int,
    parity_inputs: dict[str, np.ndarray],
) -> list:
    """onnxruntime on `tmp` against PyTorch on random and the given images; raises
    ParityError (nothing is written) below the cosine bound."""
    inputs = {"random inputs": random_inputs(random_count), **parity_inputs}
    if fp16:
        peak = max(largest_activation(reference, images) for images in inputs.values())
        if not peak <= FLOAT16_MAX:
            raise ParityError(
                f"{out}: activations reach {peak:.3g}, beyond float16's range ({FLOAT16_MAX:.0f}); "
                "nothing was written; export it without --fp16"
            )
    results = [check_parity(reference, tmp, images, name) for name, images in inputs.items()]
    bound = COSINE_BOUND["fp16" if fp16 else "fp32"]
    failed = [r for r in results if not r.min_cosine >= bound]  # NaN fails too
    if failed:
        raise ParityError(
            f"{out}: onnxruntime disagrees with PyTorch ({'; '.join(r.line() for r in failed)}); "
            f"the bound is cosine >= {bound}; nothing was written"
            + ("; export it without --fp16" if fp16 else "")
        )
    return results


def largest_activation(module: nn.Module, images: np.ndarray) -> float:
    """The largest absolute value any layer of `module` (every leaf module's output)
    produces on the normalised `images`, run in float32 without autograd."""
    peak = 0.0

    def record(_module: nn.Module, _inputs: object, output: object) -> None:
        nonlocal peak
        if isinstance(output, torch.Tensor) and output.is_floating_point() and output.numel():
            peak = max(peak, float(output.detach().abs().max()))

    leaves = [m for m in module.modules() if not any(True for _ in m.children())]
    handles = [m.register_forward_hook(record) for m in leaves]
    try:
        TorchEmbedder(module, "cpu", batch_size=32)(images)
    finally:
        for handle in handles:
            handle.remove()
    return peak


def _trace(module: nn.Module, path: Path, opset: int, batch: int | None) -> None:
    """torch.onnx.export (torch.export-based) of `module` into the single file `path`."""
    example = torch.zeros(batch or _EXAMPLE_BATCH, 3, INPUT_SIZE, INPUT_SIZE)
    dynamic_shapes = None if batch else ({0: torch.export.Dim(BATCH_AXIS, min=1)},)
    with _quiet_exporter():
        try:
            program = torch.onnx.export(
                module, (example,), dynamo=True, opset_version=opset, input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME], dynamic_shapes=dynamic_shapes, verbose=False,
            )
            program.save(str(path), external_data=False)
        except Exception as exc:  # the exporter raises many types; one line says which
            raise ExportError(
                f"torch.onnx.export failed at opset {opset}: {type(exc).__name__}: {_first_line(exc)}"
            ) from None


@contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the exporter's progress prints and expected warnings (e.g. 'torchvision
    is not installed') so the CLI shows only its own lines."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def check_graph(model: object, batch: int | None, path: Path) -> int:
    """Check that the ONNX `model` (a ModelProto) has the single input `input` float32
    `[N|batch, 3, 112, 112]` and the single output `embedding` float32 `[N|batch, D]`;
    returns D. Raises ExportError naming `path` otherwise."""
    import onnx

    graph = model.graph
    if len(graph.input) != 1 or len(graph.output) != 1:
        raise ExportError(
            f"{path}: expected one input and one output, got inputs "
            f"{[i.name for i in graph.input]} and outputs {[o.name for o in graph.output]}"
        )
    want_batch: int | str = batch if batch else BATCH_AXIS
    (inp,), (outp,) = graph.input, graph.output
    for value, name, tail in ((inp, INPUT_NAME, [3, INPUT_SIZE, INPUT_SIZE]), (outp, OUTPUT_NAME, None)):
        tensor = value.type.tensor_type
        dims = [d.dim_param or d.dim_value for d in tensor.shape.dim]
        ok = (
            value.name == name
            and tensor.elem_type == onnx.TensorProto.FLOAT
            and dims[:1] == [want_batch]
            and (dims[1:] == tail if tail else len(dims) == 2 and isinstance(dims[1], int) and dims[1] > 0)
        )
        if not ok:
            expected = [want_batch, *(tail or ["D"])]
            raise ExportError(
                f"{path}: graph {'input' if tail else 'output'} is {value.name!r} "
                f"{onnx.TensorProto.DataType.Name(tensor.elem_type)} {dims}, expected {name!r} FLOAT "
                f"{expected}"
            )
    return int(outp.type.tensor_type.shape.dim[1].dim_value)


def check_parity(reference: nn.Module, onnx_path: Path, images: np.ndarray, name: str) -> ParityResult:
    """Embed the normalised `images` with the PyTorch `reference` and with onnxruntime
    running `onnx_path`; the raw embeddings' largest absolute difference and smallest
    per-image cosine similarity (computed in float64)."""
    expected = TorchEmbedder(reference, "cpu", batch_size=32)(images).astype(np.float64)
    actual = OnnxEmbedder(onnx_path, batch_size=32)(images).astype(np.float64)
    norms = np.linalg.norm(expected, axis=1) * np.linalg.norm(actual, axis=1)
    cosine = (expected * actual).sum(axis=1) / np.where(norms > 0, norms, np.nan)
    return ParityResult(
        inputs=name,
        images=len(images),
        max_abs_diff=float(np.abs(expected - actual).max()),
        min_cosine=float(cosine.min()),  # NaN when an embedding is zero or not finite
        max_abs_embedding=float(np.abs(expected).max()),
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
