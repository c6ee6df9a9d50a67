"""MobileFaceNet, the `mbf` backbone of insightface arcface_torch.

A MobileNetV2-style network of inverted-residual ("DepthWise") blocks: 1x1 expand conv
-> BN -> PReLU, 3x3 depthwise conv -> BN -> PReLU, 1x1 linear projection -> BN, with an
identity shortcut when the block keeps its shape. Its head is the Global Depthwise
Convolution (GDC): a 7x7 depthwise conv over the final 512x7x7 map (instead of global
average pooling, so every face position keeps its own weight) -> BN -> Linear(512, D) ->
BN1d.

arcface_torch's configuration (the default here) is `blocks=(1, 4, 6, 2), scale=2`
("mobilefacenet-0.45G" in its README): twice the width of the original MobileFaceNet
(128/256 channels instead of 64/128). At 112x112 with 512-d embeddings it has 2.06 M
parameters and 0.4375 GMACs of convolution + linear; ptflops, which insightface uses and
which adds one op per BatchNorm/PReLU output element, counts 0.452 G: the published
"0.45G". insightface publishes no parameter count for it. The "0.99 M parameters (about
1.2 M with a 512-d output), 0.45 GFLOPs" quoted elsewhere describe the narrower original
model, whose 0.45 G are true FLOPs (2 x 0.23 GMACs).

Module names and parameter shapes match arcface_torch, so its checkpoints load with
`load_state_dict` unchanged. One addition: optional dropout before the final Linear
(arcface_torch has none; the default p=0 is identical to it).

No dtype is hard-coded (the trainer owns `torch.autocast`) and every op accepts
channels_last inputs.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["MobileFaceNet"]


class ConvBlock(nn.Module):
    """conv (no bias) -> BN -> PReLU."""

    def __init__(
        self, in_c: int, out_c: int, kernel: int = 1, stride: int = 1, padding: int = 0, groups: int = 1
    ) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(in_c, out_c, kernel, stride=stride, padding=padding, groups=groups, bias=False),
            nn.BatchNorm2d(out_c),
            nn.PReLU(out_c),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class LinearBlock(nn.Module):
    """conv (no bias) -> BN, with no activation (a linear bottleneck)."""

    def __init__(
        self, in_c: int, out_c: int, kernel: int = 1, stride: int = 1, padding: int = 0, groups: int = 1
    ) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(in_c, out_c, kernel, stride=stride, padding=padding, groups=groups, bias=False),
            nn.BatchNorm2d(out_c),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class DepthWise(nn.Module):
    """Inverted residual: 1x1 expand to `hidden` -> 3x3 depthwise(stride) -> 1x1 project.

    `residual=True` adds the input back (only valid when stride is 1 and in_c == out_c).
    """

    def __init__(self, in_c: int, out_c: int, hidden: int, stride: int, residual: bool) -> None:
        super().__init__()
        self.residual = residual
        self.layers = nn.Sequential(
            ConvBlock(in_c, hidden),
            ConvBlock(hidden, hidden, kernel=3, stride=stride, padding=1, groups=hidden),
            LinearBlock(hidden, out_c),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(x)
        return x + out if self.residual else out


class Residual(nn.Module):
    """`num_block` shape-preserving residual DepthWise blocks."""

    def __init__(self, channels: int, num_block: int, hidden: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            *(DepthWise(channels, channels, hidden, stride=1, residual=True) for _ in range(num_block))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class GDC(nn.Module):
    """Global depthwise conv head: 512x7x7 -> depthwise 7x7 -> BN -> flatten -> (dropout)
    -> Linear(512, D, no bias) -> BN1d.

    The Sequential keys "0", "2", "3" keep arcface_torch's state-dict names
    (`layers.0.*`, `layers.2.weight`, `layers.3.*`) with dropout added between.
    """

    def __init__(self, embedding_size: int, dropout: float) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            OrderedDict(
                [
                    ("0", LinearBlock(512, 512, kernel=7, groups=512)),
                    ("1", nn.Flatten()),
                    ("dropout", nn.Dropout(p=dropout)),
                    ("2", nn.Linear(512, embedding_size, bias=False)),
                    ("3", nn.BatchNorm1d(embedding_size)),
                ]
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class MobileFaceNet(nn.Module):
    """MobileFaceNet mapping Nx3x112x112 to NxD.

    Args:
        embedding_size: D, the size of the output embedding.
        dropout: dropout probability on the 512-d GDC output before the final Linear.
        blocks: residual blocks in the four stages (the first stage, when 1, is a single
            grouped 3x3 conv as in arcface_torch).
        scale: width multiplier of the 64/128-channel base widths.
    """

    input_size: int = 112

    def __init__(
        self,
        embedding_size: int = 512,
        dropout: float = 0.0,
        blocks: Sequence[int] = (1, 4, 6, 2),
        scale: int = 2,
    ) -> None:
        super().__init__()
        if len(blocks) != 4 or any(n < 1 for n in blocks) or scale < 1:
            raise ValueError(
                "MobileFaceNet: blocks must be 4 positive counts and scale >= 1, "
                f"got blocks={list(blocks)} scale={scale}"
            )
        c1, c2 = 64 * scale, 128 * scale
        # Expansion widths (`hidden`) are fixed at 128/256/512 as in arcface_torch.
        first = (
            ConvBlock(c1, c1, kernel=3, padding=1, groups=64)
            if blocks[0] == 1
            else Residual(c1, blocks[0], hidden=128)
        )
        self.layers = nn.ModuleList(
            [
                ConvBlock(3, c1, kernel=3, stride=2, padding=1),  # 56x56
                first,
                DepthWise(c1, c1, hidden=128, stride=2, residual=False),  # 28x28
                Residual(c1, blocks[1], hidden=128),
                DepthWise(c1, c2, hidden=256, stride=2, residual=False),  # 14x14
                Residual(c2, blocks[2], hidden=256),
                DepthWise(c2, c2, hidden=512, stride=2, residual=False),  # 7x7
                Residual(c2, blocks[3], hidden=256),
            ]
        )
        self.conv_sep = ConvBlock(c2, 512)
        self.features = GDC(embedding_size, dropout)
        self._init_weights()

    def _init_weights(self) -> None:
        """arcface_torch's initialisation: conv and linear weights kaiming-normal
        (fan_out, ReLU gain), BN scale 1 / shift 0."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.input_size, self.input_size):
            raise ValueError(
                f"MobileFaceNet expects Nx3x{self.input_size}x{self.input_size} images, got "
                f"{list(x.shape)}; resize/align faces to {self.input_size}x{self.input_size}"
            )
        for layer in self.layers:
            x = layer(x)
        return self.features(self.conv_sep(x))
