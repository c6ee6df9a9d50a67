"""Vision Transformers for faces, arcface_torch's `VisionTransformer` (backbones/vit.py).

Layout (input 3x112x112, 9x9 patches: a 12x12 grid of L = 144 tokens of width `dim`)::

    patch_embed.proj  conv9x9 stride 9 (3 -> dim), flattened to L tokens, + pos_embed
    (training, mask_ratio > 0: a random share of the tokens is dropped, per sample)
    blocks[i]         x + DropPath(Attention(LN(x))); x + DropPath(Mlp(LN(x)))
    norm              LayerNorm (dropped tokens come back as `mask_token`, unshuffled)
    feature           flatten L·dim -> Linear(dim, no bias) -> BN1d -> Linear(D, no bias) -> BN1d

Attention has no qkv bias, 8 heads, and runs in fp32 with autocast off (arcface_torch
does the same, for stability under fp16); the MLP is fc1 -> ReLU6 -> fc2 (ratio 4).
DropPath rates grow linearly from 0 to `drop_path_rate` over the blocks. Parameter
names and shapes are arcface_torch's, so its released ViT weights load with
`load_state_dict(strict=True)`.

Sizes (arcface_torch's `get_model` names; its WebFace42M recipes use the same shapes
with drop path 0.05 and mask 0.05, "vit_b_dp005_mask_005": set backbone.drop_path_rate /
backbone.mask_ratio)::

    name   dim  depth  drop_path  mask   parameters (D = 512)
    vit_t  256   12      0.1      0.1      19.1 M
    vit_s  512   12      0.1      0.1      76.0 M
    vit_b  512   24      0.1      0.1     113.8 M
    vit_l  768   24      0.1      0.1     255.7 M
    vit_h 1024   48      0.1      0.0     756.4 M

`dropout` (the trainer's backbone.dropout) is arcface_torch's `drop_rate`: dropout after
the position embedding, the attention projection and both MLP layers (0 in every
arcface_torch recipe). `checkpoint_blocks` recomputes each block in backward
(trainer.backbones.checkpointing), as arcface_torch's `using_checkpoint` does.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checkpointing import run_block

__all__ = ["VIT_SIZES", "VisionTransformer", "ViTSize"]


@dataclass(frozen=True)
class ViTSize:
    embed_dim: int
    depth: int
    drop_path_rate: float = 0.1
    mask_ratio: float = 0.1


VIT_SIZES: dict[str, ViTSize] = {
    "vit_t": ViTSize(256, 12),
    "vit_s": ViTSize(512, 12),
    "vit_b": ViTSize(512, 24),
    "vit_l": ViTSize(768, 24),
    "vit_h": ViTSize(1024, 48, mask_ratio=0.0),
}


class DropPath(nn.Module):
    """Stochastic depth: in training, zero a sample's residual branch with probability
    `p` and scale the kept ones by 1/(1-p) (timm's DropPath); the identity otherwise."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask.div_(keep)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.ReLU6()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


def _autocast_off(device_type: str):
    """A region without autocast (a no-op where autocast does not exist: the meta device)."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return nullcontext()


class Attention(nn.Module):
    """Multi-head self-attention; the softmax(q·kᵀ/√d)·v part in fp32, autocast off."""

    def __init__(self, dim: int, num_heads: int, drop: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).float()
        with _autocast_off(x.device.type):
            out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(1, 2).reshape(batch, tokens, dim)
        return self.proj_drop(self.proj(out))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, drop: float, drop_path: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, 4 * dim, drop)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, img_size: int, patch_size: int, dim: int) -> None:
        super().__init__()
        self.img_size = img_size
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(
                f"VisionTransformer expects Nx3x{self.img_size}x{self.img_size} images, got "
                f"{list(x.shape)}; resize/align faces to {self.img_size}x{self.img_size}"
            )
        return self.proj(x).flatten(2).transpose(1, 2)


class VisionTransformer(nn.Module):
    """arcface_torch's ViT (see the module docstring); maps Nx3x112x112 to NxD."""

    input_size: int = 112

    def __init__(
        self, embed_dim: int, depth: int, embedding_size: int = 512, *, num_heads: int = 8,
        patch_size: int = 9, dropout: float = 0.0, drop_path_rate: float = 0.1,
        mask_ratio: float = 0.1, checkpoint_blocks: bool = False,
    ) -> None:
        super().__init__()
        if not 0 <= drop_path_rate < 1 or not 0 <= mask_ratio < 1:
            raise ValueError(
                f"VisionTransformer: drop_path_rate and mask_ratio must be in [0, 1), got "
                f"{drop_path_rate} and {mask_ratio}"
            )
        self.embed_dim, self.mask_ratio = embed_dim, mask_ratio
        self.checkpoint_blocks = checkpoint_blocks
        self.patch_embed = PatchEmbed(self.input_size, patch_size, embed_dim)
        self.num_patches = self.patch_embed.num_patches
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches, embed_dim))
        self.pos_drop = nn.Dropout(dropout)
        rates = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, dropout, r) for r in rates)
        self.norm = nn.LayerNorm(embed_dim)
        self.feature = nn.Sequential(
            nn.Linear(embed_dim * self.num_patches, embed_dim, bias=False),
            nn.BatchNorm1d(embed_dim, eps=2e-5),
            nn.Linear(embed_dim, embedding_size, bias=False),
            nn.BatchNorm1d(embedding_size, eps=2e-5),
        )
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self._init_weights()

    def _init_weights(self) -> None:
        """arcface_torch's: truncated normal (std 0.02) for Linear weights and the position
        embedding, normal (0.02) for the mask token, zero biases, LayerNorm 1 / 0."""
        nn.init.normal_(self.mask_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _mask(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Keep a random (1 − mask_ratio) share of each sample's tokens; returns them and
        the permutation that puts kept tokens + mask tokens back in place."""
        n, length, dim = x.shape
        keep = int(length * (1 - self.mask_ratio))
        shuffle = torch.argsort(torch.rand(n, length, device=x.device), dim=1)
        restore = torch.argsort(shuffle, dim=1)
        kept = torch.gather(x, 1, shuffle[:, :keep].unsqueeze(-1).expand(-1, -1, dim))
        return kept, restore

    def forward(self, x: Tensor) -> Tensor:
        batch = x.shape[0]
        x = self.pos_drop(self.patch_embed(x) + self.pos_embed)
        masking = self.training and self.mask_ratio > 0
        if masking:
            x, restore = self._mask(x)
        for block in self.blocks:
            x = run_block(block, x, self.checkpoint_blocks)
        x = self.norm(x.float())
        if masking:
            fill = self.mask_token.expand(batch, restore.shape[1] - x.shape[1], -1).to(x.dtype)
            x = torch.cat([x, fill], dim=1)
            x = torch.gather(x, 1, restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))
        return self.feature(x.reshape(batch, self.num_patches * self.embed_dim))
