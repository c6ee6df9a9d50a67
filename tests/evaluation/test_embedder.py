"""`preprocess`, `embed` and `TorchEmbedder`: the input contract the deploy tools share."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trainer.evaluation.embedder import INPUT_SIZE, TorchEmbedder, embed, preprocess


def test_preprocess_normalises_like_the_training_loaders():
    images = np.zeros((2, INPUT_SIZE, INPUT_SIZE, 3), np.uint8)
    images[0, ..., 0] = 255  # red channel of image 0
    images[1, 5, 7] = (0, 128, 255)
    out = preprocess(images)
    assert out.shape == (2, 3, INPUT_SIZE, INPUT_SIZE) and out.dtype == np.float32
    assert out[0, 0].min() == 1.0 and out[0, 1].max() == -1.0  # (255 - 127.5) / 127.5, (0 - 127.5) / 127.5
    np.testing.assert_allclose(out[1, :, 5, 7], [-1.0, 0.5 / 127.5, 1.0])
    assert preprocess(np.full((1, 50, 80, 3), 200, np.uint8)).shape == (1, 3, INPUT_SIZE, INPUT_SIZE)
    with pytest.raises(ValueError, match="RGB uint8 images shaped"):
        preprocess(np.zeros((1, 112, 112), np.uint8))


class Linear:
    """A stand-in module: embedding = sum of each column of the red channel (flip-sensitive)."""

    def __init__(self) -> None:
        self.training = True
        self.calls: list[int] = []

    def eval(self):
        self.training = False

    def train(self, mode: bool = True):
        self.training = mode

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        assert not self.training and not torch.is_grad_enabled()
        self.calls.append(len(x))
        return x[:, 0].sum(dim=1)  # [N, W]


def test_embed_adds_the_mirror_and_normalises():
    rng = np.random.default_rng(0)
    batch = rng.normal(size=(5, 3, INPUT_SIZE, INPUT_SIZE)).astype(np.float32)
    module = Linear()
    embedder = TorchEmbedder(module, batch_size=2)  # type: ignore[arg-type]
    out = embed(embedder, batch, flip=True)
    raw = batch[:, 0].sum(axis=1)
    expected = raw + raw[:, ::-1]
    np.testing.assert_allclose(out, expected / np.linalg.norm(expected, axis=1, keepdims=True), atol=1e-6)
    assert module.calls == [2, 2, 1, 2, 2, 1] and module.training  # batched; mode restored
    np.testing.assert_allclose(np.linalg.norm(embed(embedder, batch, flip=False), axis=1), 1.0, rtol=1e-6)
