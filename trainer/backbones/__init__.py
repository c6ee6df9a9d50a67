"""Face-recognition backbones, built by name.

Every backbone maps a batch of aligned faces, Nx3x112x112 (any float dtype, contiguous or
channels_last), to NxD embeddings (D = `embedding_size`) and exposes `input_size` (112).
Backbones never touch precision themselves: the trainer runs them under
`torch.autocast`.

Names: iresnet18, iresnet34, iresnet50, iresnet100, iresnet200 (see `iresnet`),
mobilefacenet (arcface_torch's `mbf`, see `mobilefacenet`) and the Vision Transformers
vit_t, vit_s, vit_b, vit_l, vit_h (arcface_torch's, see `vit`).

`backbone_options(cfg.backbone)` turns the config's per-architecture keys (ViT drop
path and mask ratio, activation checkpointing) into `get_backbone` keyword arguments.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from torch import nn

from .iresnet import IRESNET_LAYERS, IResNet
from .mobilefacenet import MobileFaceNet
from .vit import VIT_SIZES, VisionTransformer

__all__ = [
    "IResNet", "MobileFaceNet", "VisionTransformer", "available_backbones", "backbone_options",
    "get_backbone", "supports_activation_checkpointing",
]


def _vit(name: str, **kw: Any) -> VisionTransformer:
    size = VIT_SIZES[name]
    kw.setdefault("drop_path_rate", size.drop_path_rate)
    kw.setdefault("mask_ratio", size.mask_ratio)
    return VisionTransformer(size.embed_dim, size.depth, **kw)


# name -> constructor taking (embedding_size=..., dropout=..., **kw)
_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    **{f"iresnet{depth}": partial(IResNet, layers) for depth, layers in IRESNET_LAYERS.items()},
    "mobilefacenet": MobileFaceNet,
    **{name: partial(_vit, name) for name in VIT_SIZES},
}


def available_backbones() -> list[str]:
    """The names `get_backbone` accepts, sorted."""
    return sorted(_REGISTRY)


def supports_activation_checkpointing(name: str) -> bool:
    """Whether backbone `name` takes `checkpoint_blocks` (iresnet*, vit_*)."""
    return name.startswith(("iresnet", "vit_"))


def backbone_options(backbone_cfg: Any) -> dict[str, Any]:
    """`get_backbone` keyword arguments from a trainer.config.BackboneConfig: the ViT
    keys that are set, and `checkpoint_blocks` for activation_checkpointing "blocks"."""
    kw = {k: getattr(backbone_cfg, k) for k in ("drop_path_rate", "mask_ratio")
          if getattr(backbone_cfg, k) is not None}
    if backbone_cfg.activation_checkpointing == "blocks":
        kw["checkpoint_blocks"] = True
    return kw


def get_backbone(name: str, *, embedding_size: int = 512, dropout: float = 0.0, **kw: Any) -> nn.Module:
    """Build the backbone called `name` with freshly initialised weights.

    Args:
        name: one of `available_backbones()`.
        embedding_size: size of the output embedding.
        dropout: dropout probability before the final Linear layer (0 disables it).
        **kw: passed to the backbone's constructor (e.g. `blocks`, `scale` for
            mobilefacenet; `drop_path_rate`, `mask_ratio` for ViTs; `checkpoint_blocks`
            for iresnet and ViTs).

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
