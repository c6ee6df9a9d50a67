"""IResNet ("improved ResNet"), the ArcFace backbone family of insightface arcface_torch.

Layout (input 3x112x112, output an `embedding_size` vector per image)::

    stem    conv3x3(3->64, stride 1) -> BN -> PReLU                    64 x 112 x 112
    layer1  IBasicBlock x n1, 64 channels, first block stride 2        64 x  56 x  56
    layer2  IBasicBlock x n2, 128 channels, first block stride 2      128 x  28 x  28
    layer3  IBasicBlock x n3, 256 channels, first block stride 2      256 x  14 x  14
    layer4  IBasicBlock x n4, 512 channels, first block stride 2      512 x   7 x   7
    head    BN2d -> flatten -> Dropout -> Linear(512*7*7, D) -> BN1d  D

The block is pre-activation style: BN -> conv3x3 -> BN -> PReLU -> conv3x3(stride) -> BN,
plus the identity (or a conv1x1(stride) + BN projection when the shape changes). There is
no ReLU after the addition. The final BatchNorm1d ("features") has its scale frozen at
1.0 (only the shift learns), exactly as arcface_torch does.

The module names (`conv1`, `bn1`, `prelu`, `layer1..4`, `bn2`, `dropout`, `fc`,
`features`) and parameter shapes match arcface_torch, so its checkpoints load with
`load_state_dict` unchanged.

Size at 112x112 with 512-d embeddings. insightface's "FLOPs" (r50 6.3 G, r100 12.1 G)
are multiply-accumulates as ptflops counts them: convolution + linear MACs plus one op per
BatchNorm/PReLU output element. Conv + linear MACs alone (what tests/trainer/
test_backbones.py asserts, via torch's FlopCounterMode / 2) are 0.3% lower; true FLOPs
(2 per MAC) are twice as high::

    depth   parameters   conv+linear GMACs   ptflops GMACs   published
    18        24.0 M          2.61              2.63           2.6 G
    50        43.6 M          6.31              6.33           6.3 G, 43.6 M
    100       65.2 M         12.09             12.13          12.1 G, 65.2 M
    200      118.8 M         23.42             23.48          23.5 G

The model is precision- and layout-agnostic: no dtype is hard-coded (the trainer wraps
it in `torch.autocast`) and every op accepts channels_last inputs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .checkpointing import run_block

__all__ = ["IBasicBlock", "IResNet", "IRESNET_LAYERS"]

# Blocks per stage of each depth, as in arcface_torch (iresnet200 from its later versions).
IRESNET_LAYERS: dict[int, tuple[int, int, int, int]] = {
    18: (2, 2, 2, 2),
    34: (3, 4, 6, 3),
    50: (3, 4, 14, 3),
    100: (3, 13, 30, 3),
    200: (6, 26, 60, 6),
}


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)


class IBasicBlock(nn.Module):
    """BN -> conv3x3 -> BN -> PReLU -> conv3x3(stride) -> BN, added to the shortcut.

    The shortcut is the identity, or conv1x1(stride) + BN when `stride != 1` or the
    channel count changes.
    """

    def __init__(self, in_channels: int, channels: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels, eps=1e-5)
        self.conv1 = _conv3x3(in_channels, channels)
        self.bn2 = nn.BatchNorm2d(channels, eps=1e-5)
        self.prelu = nn.PReLU(channels)
        self.conv2 = _conv3x3(channels, channels, stride)
        self.bn3 = nn.BatchNorm2d(channels, eps=1e-5)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, channels, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(channels, eps=1e-5),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return out + shortcut


class IResNet(nn.Module):
    """IResNet with `layers[i]` IBasicBlocks in stage i; maps Nx3x112x112 to NxD.

    Args:
        layers: blocks per stage (four stages of 64, 128, 256, 512 channels).
        embedding_size: D, the size of the output embedding.
        dropout: dropout probability on the flattened 512x7x7 feature map before `fc`.
        checkpoint_blocks: recompute each IBasicBlock in backward instead of keeping its
            activations (trainer.backbones.checkpointing; same gradients, less memory).
    """

    input_size: int = 112
    _fc_spatial: int = 7 * 7  # 112 / 2**4 = 7

    def __init__(
        self, layers: Sequence[int], embedding_size: int = 512, dropout: float = 0.0,
        checkpoint_blocks: bool = False,
    ) -> None:
        super().__init__()
        self.checkpoint_blocks = checkpoint_blocks
        if len(layers) != 4 or any(n < 1 for n in layers):
            raise ValueError(f"IResNet: layers must be 4 positive block counts, got {list(layers)}")
        self.conv1 = _conv3x3(3, 64)
        self.bn1 = nn.BatchNorm2d(64, eps=1e-5)
        self.prelu = nn.PReLU(64)
        self.layer1 = self._make_stage(64, 64, layers[0])
        self.layer2 = self._make_stage(64, 128, layers[1])
        self.layer3 = self._make_stage(128, 256, layers[2])
        self.layer4 = self._make_stage(256, 512, layers[3])
        self.bn2 = nn.BatchNorm2d(512, eps=1e-5)
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(512 * self._fc_spatial, embedding_size)
        self.features = nn.BatchNorm1d(embedding_size, eps=1e-5)
        self._init_weights()

    @staticmethod
    def _make_stage(in_channels: int, channels: int, blocks: int) -> nn.Sequential:
        stage = [IBasicBlock(in_channels, channels, stride=2)]
        stage += [IBasicBlock(channels, channels) for _ in range(blocks - 1)]
        return nn.Sequential(*stage)

    def _init_weights(self) -> None:
        """arcface_torch's initialisation: conv ~ N(0, 0.1), BN scale 1 / shift 0, and the
        output BN's scale frozen at 1.0. `fc` keeps PyTorch's default Linear init."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.1)
            elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        self.features.weight.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.input_size, self.input_size):
            raise ValueError(
                f"IResNet expects Nx3x{self.input_size}x{self.input_size} images, got "
                f"{list(x.shape)}; resize/align faces to {self.input_size}x{self.input_size}"
            )
        x = self.prelu(self.bn1(self.conv1(x)))
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in stage:
                x = run_block(block, x, self.checkpoint_blocks)
        x = torch.flatten(self.bn2(x), 1)
        return self.features(self.fc(self.dropout(x)))
