"""SigLIP-style vision transformer: conv patchify, learned absolute positions, pre-LN blocks, final LayerNorm.

Shape legend:
    N   image tiles, S patches per tile (1024 for 512-px tiles of 16-px patches)
    C   width (768), H heads, D head dim
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dualtower import ops
from dualtower.model.config import VisionConfig


class PatchEmbedding(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.conv = nn.Conv2d(3, cfg.hidden_dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.position_embedding = nn.Parameter(torch.empty(1, cfg.patches_per_side**2, cfg.hidden_dim))

    def forward(self, pixels: Tensor) -> Tensor:  # (N, 3, H, W) -> (N, S, C)
        patches = self.conv(pixels).flatten(2).transpose(1, 2)
        return patches + self.position_embedding


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.qkv_proj = nn.Linear(cfg.hidden_dim, 3 * cfg.hidden_dim)
        self.out_proj = nn.Linear(cfg.hidden_dim, cfg.hidden_dim)

    def forward(self, x: Tensor) -> Tensor:
        tiles, patches, width = x.shape
        q, k, v = self.qkv_proj(x).view(tiles, patches, 3, self.n_heads, -1).permute(2, 0, 3, 1, 4)  # (N, H, S, D)
        out = ops.dense_attention(q, k, v)
        return self.out_proj(out.transpose(1, 2).reshape(tiles, patches, width))


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_dim, cfg.inter_dim)
        self.fc2 = nn.Linear(cfg.inter_dim, cfg.hidden_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.hidden_dim, eps=cfg.ln_eps)
        self.attn = VisionAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.hidden_dim, eps=cfg.ln_eps)
        self.mlp = VisionMLP(cfg)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class VisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embedding = PatchEmbedding(cfg)
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.n_blocks))
        self.layer_norm = nn.LayerNorm(cfg.hidden_dim, eps=cfg.ln_eps)

    def forward(self, pixels: Tensor) -> Tensor:  # (N, 3, H, W) -> (N, S, C)
        x = self.patch_embedding(pixels)
        for block in self.blocks:
            x = block(x)
        return self.layer_norm(x)

    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> None:
        """Linear/conv normal(0, std) with zero bias, LayerNorm ones/zeros, positions uniform (as the original)."""
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Conv2d):
                nn.init.normal_(module.weight, std=std)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.uniform_(self.patch_embedding.position_embedding)
