"""Face images in, embeddings out: the one path every evaluation and the deploy tools share.

* `preprocess` turns RGB uint8 faces into the network input with the face contract the
  training data was made and loaded with (`data_tools.face`: 112x112, a face of another
  size made square by the `fit` the training set was built with, crop by default, as
  `arcshard-data build --fit` does; `(pixel - 127.5) / 127.5`, CHW float32).
* An `Embedder` maps a normalised float32 NCHW batch to raw (unnormalised) embeddings:
  `TorchEmbedder` wraps a backbone module, `OnnxEmbedder` an exported ONNX model
  (onnxruntime, CPU). `load_embedder` picks one from a path.
* `embed` adds flip test-time augmentation (embedding of the image plus embedding of its
  horizontal mirror) and L2-normalises, which is what verification compares.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

from data_tools import face
from data_tools.face import INPUT_SIZE, normalise

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["INPUT_SIZE", "Embedder", "OnnxEmbedder", "TorchEmbedder", "embed", "l2_normalise",
           "load_embedder", "preprocess"]

_EPS = 1e-12  # L2 normalisation guard against an all-zero embedding


def preprocess(images: np.ndarray, fit: str = "crop") -> np.ndarray:
    """RGB uint8 faces `[N, H, W, 3]` -> normalised network input float32 `[N, 3, 112, 112]`.

    Pixels map to `(pixel - 127.5) / 127.5`, the normalisation the training loaders
    apply. Images whose side is not `INPUT_SIZE` get the training set's geometry
    (`data_tools.face.fit` with `fit`, one of `data_tools.face.FIT_MODES`: pass the
    manifest's `fit` of the model's training set); pass aligned face crops, since
    resizing does not align a face.
    """
    face.check_fit(fit)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(
            f"preprocess expects RGB uint8 images shaped [N, H, W, 3], got {images.dtype} "
            f"{list(images.shape)}"
        )
    if images.shape[1:3] != (INPUT_SIZE, INPUT_SIZE):
        images = np.stack([face.fit(image, INPUT_SIZE, fit) for image in images]) if len(images) else (
            np.zeros((0, INPUT_SIZE, INPUT_SIZE, 3), np.uint8)
        )
    return normalise(images.transpose(0, 3, 1, 2))


@runtime_checkable
class Embedder(Protocol):
    """Maps a normalised float32 batch `[N, 3, 112, 112]` to float32 embeddings `[N, D]`.

    The embeddings are the network's raw output (not L2-normalised); `embedding_size`
    is D.
    """

    @property
    def embedding_size(self) -> int: ...

    def __call__(self, batch: np.ndarray) -> np.ndarray: ...


class TorchEmbedder:
    """An `Embedder` over a PyTorch backbone, run in eval mode without autograd.

    The batch is cut into forwards of at most `batch_size` images on `device`. The
    module's train/eval mode is restored after each call, so a training loop can
    evaluate its live backbone.
    """

    def __init__(self, module: nn.Module, device: torch.device | str = "cpu", batch_size: int = 64) -> None:
        import torch

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.module = module
        self.device = torch.device(device)
        self.batch_size = batch_size
        self._embedding_size: int | None = None

    @property
    def embedding_size(self) -> int:
        """D, found once by embedding one blank image."""
        if self._embedding_size is None:
            blank = np.zeros((1, 3, INPUT_SIZE, INPUT_SIZE), np.float32)
            self._embedding_size = int(self(blank).shape[1])
        return self._embedding_size

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        import torch

        _check_batch(batch)
        was_training = self.module.training
        self.module.eval()
        try:
            outputs = []
            with torch.inference_mode():
                for start in range(0, len(batch), self.batch_size):
                    chunk = torch.from_numpy(np.ascontiguousarray(batch[start : start + self.batch_size]))
                    outputs.append(self.module(chunk.to(self.device)).float().cpu().numpy())
        finally:
            self.module.train(was_training)
        if not outputs:
            return np.zeros((0, self._embedding_size or 0), np.float32)
        return np.concatenate(outputs).astype(np.float32, copy=False)


class OnnxEmbedder:
    """An `Embedder` over an ONNX model run by onnxruntime on the CPU.

    The model's first input takes the normalised NCHW batch and its first output is the
    embedding. A model exported with a fixed batch dimension is fed batches of exactly
    that size (the last one zero-padded); otherwise batches of `batch_size`.
    """

    def __init__(self, path: str | Path, batch_size: int = 64) -> None:
        self.path = Path(path)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not self.path.is_file():
            raise ValueError(f"{self.path}: no such ONNX model file; check the path")
        try:
            import onnxruntime
        except ImportError:
            raise ValueError(
                f"{self.path}: onnxruntime is not installed; pip install 'arcshard[deploy]'"
            ) from None
        try:
            self.session = onnxruntime.InferenceSession(str(self.path), providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ValueError(f"{self.path}: not a loadable ONNX model ({exc}); re-export it") from None
        first_input, first_output = self.session.get_inputs()[0], self.session.get_outputs()[0]
        shape = first_input.shape
        if len(shape) != 4 or any(isinstance(s, int) and s != want for s, want in zip(shape[1:], (3, INPUT_SIZE, INPUT_SIZE))):
            raise ValueError(
                f"{self.path}: input {first_input.name!r} has shape {shape}, expected "
                f"[N, 3, {INPUT_SIZE}, {INPUT_SIZE}]; export the backbone with that input"
            )
        self.input_name, self.output_name = first_input.name, first_output.name
        self.fixed_batch = shape[0] if isinstance(shape[0], int) else None
        self.batch_size = self.fixed_batch or batch_size
        out_dim = first_output.shape[-1] if first_output.shape else None
        self._embedding_size = out_dim if isinstance(out_dim, int) else None

    @property
    def embedding_size(self) -> int:
        """D, from the output shape (or one blank image when the model leaves it symbolic)."""
        if self._embedding_size is None:
            self._embedding_size = int(self(np.zeros((1, 3, INPUT_SIZE, INPUT_SIZE), np.float32)).shape[1])
        return self._embedding_size

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        _check_batch(batch)
        outputs = []
        for start in range(0, len(batch), self.batch_size):
            chunk = np.ascontiguousarray(batch[start : start + self.batch_size], dtype=np.float32)
            real = len(chunk)
            if self.fixed_batch is not None and real < self.fixed_batch:
                chunk = np.concatenate([chunk, np.zeros((self.fixed_batch - real, *chunk.shape[1:]), np.float32)])
            try:
                result = self.session.run([self.output_name], {self.input_name: chunk})[0]
            except Exception as exc:  # onnxruntime raises its own exception types
                raise ValueError(f"{self.path}: inference failed ({exc})") from None
            outputs.append(np.asarray(result, np.float32).reshape(len(chunk), -1)[:real])
        if not outputs:
            return np.zeros((0, self._embedding_size or 0), np.float32)
        return np.concatenate(outputs)


def load_embedder(path: str | Path, batch_size: int = 64, device: torch.device | str = "cpu") -> Embedder:
    """The embedder stored at `path`.

    A `.onnx` file gives an `OnnxEmbedder` (onnxruntime, CPU; `device` is ignored);
    anything else is a training run's output directory or a checkpoint directory,
    loaded with `trainer.checkpoint.backbone.load_backbone` into a `TorchEmbedder` on `device`.
    Raises `ValueError` (including `trainer.checkpoint.CheckpointError`) naming the path.
    """
    path = Path(path)
    if path.suffix.lower() == ".onnx":
        return OnnxEmbedder(path, batch_size=batch_size)
    from trainer.checkpoint.backbone import load_backbone

    module, _config = load_backbone(path, map_location="cpu")
    return TorchEmbedder(module.to(device), device=device, batch_size=batch_size)


def embed(embedder: Embedder, images_nchw: np.ndarray, flip: bool) -> np.ndarray:
    """L2-normalised float32 embeddings `[N, D]` of a normalised NCHW batch.

    With `flip`, each image's embedding is the sum of the embeddings of the image and of
    its horizontal mirror (test-time augmentation, as insightface evaluates), normalised
    after the sum.
    """
    features = embedder(images_nchw)
    if flip:
        features = features + embedder(np.ascontiguousarray(images_nchw[..., ::-1]))
    return l2_normalise(features)


def l2_normalise(features: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (float32); an all-zero row stays zero."""
    features = np.asarray(features, np.float32)
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    return features / np.maximum(norms, _EPS)


def _check_batch(batch: np.ndarray) -> None:
    if batch.ndim != 4 or batch.shape[1:] != (3, INPUT_SIZE, INPUT_SIZE):
        raise ValueError(
            f"embedder expects a float32 batch [N, 3, {INPUT_SIZE}, {INPUT_SIZE}] "
            f"(use preprocess), got {batch.dtype} {list(batch.shape)}"
        )
