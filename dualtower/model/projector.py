"""Modality projector: pixel shuffle (space-to-depth) folded into one bias-free linear layer."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dualtower import ops


class Projector(nn.Module):
    """(N, S, C_vit) -> (N, S / f^2, C_lm)."""

    def __init__(self, vision_dim: int, lm_dim: int, factor: int):
        super().__init__()
        self.factor = factor
        self.proj = nn.Linear(vision_dim * factor * factor, lm_dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return ops.pixel_shuffle_project(x, self.proj.weight, self.factor)

    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> None:
        nn.init.normal_(self.proj.weight, std=std)
