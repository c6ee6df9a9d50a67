"""Face-recognition backbones, built by name.

Every backbone maps a batch of aligned faces, Nx3x112x112 (any float dtype, contiguous or
channels_last), to NxD embeddings (D = `embedding_size`) and exposes `input_size` (112).
Backbones never touch precision themselves: the trainer runs them under
`torch.autocast`.

Names: iresnet18, iresnet34, iresnet50, iresnet100, iresnet200 (see `iresnet`) and
mobilefacenet (arcface_torch's `mbf`, see `mobilefacenet`).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from torch import nn

from .iresnet import IRESNET_LAYERS, IResNet
from .mobilefacenet import MobileFaceNet

__all__ = ["IResNet", "MobileFaceNet", "available_backbones", "get_backbone"]

# name -> constructor taking (embedding_size=..., dropout=..., **kw)
_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    **{f"iresnet{depth}": partial(IResNet, layers) for depth, layers in IRESNET_LAYERS.items()},
    "mobilefacenet": MobileFaceNet,
}


def available_backbones() -> list[str]:
    """The names `get_backbone` accepts, sorted."""
    return sorted(_REGISTRY)


def get_backbone(name: str, *, embedding_size: int = 512, dropout: float = 0.0, **kw: Any) -> nn.Module:
    """Build the backbone called `name` with freshly initialised weights.

    Args:
        name: one of `available_backbones()`.
        embedding_size: size of the output embedding.
        dropout: dropout probability before the final Linear layer (0 disables it).
        **kw: passed to the backbone's constructor (e.g. `blocks`, `scale` for
            mobilefacenet).

    Raises:
        ValueError: unknown name, or an invalid embedding_size / dropout.
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(available_backbones())}")
    if embedding_size < 1:
        raise ValueError(f"backbone {name}: embedding_size must be >= 1, got {embedding_size}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"backbone {name}: dropout must be in [0, 1), got {dropout}")
    return _REGISTRY[name](embedding_size=embedding_size, dropout=dropout, **kw)
