"""Per-tower freezing, parameter groups and the AdamW optimizer.

Towers: vision (ViT), projector, left (left LM), right (right LM; absent in the vanilla architecture).
A tower whose peak LR is 0 is frozen (requires_grad=False), and the parameters the dual-tower forward never
uses (`model.unused_parameters()`) are always frozen, so no optimizer state is kept for them.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from dualtower.model import DualTowerVLM
from dualtower.model.config import ConfigError

logger = logging.getLogger(__name__)


def tower_modules(model: DualTowerVLM) -> dict[str, nn.Module]:
    towers = {"vision": model.vision_encoder, "projector": model.projector, "left": model.left_decoder}
    if model.right_decoder is not None:
        towers["right"] = model.right_decoder
    return towers


def tower_lrs(optim_cfg) -> dict[str, float]:
    return {
        "vision": optim_cfg.lr_vision,
        "projector": optim_cfg.lr_projector,
        "left": optim_cfg.lr_left,
        "right": optim_cfg.lr_right,
    }


def apply_freezing(model: DualTowerVLM, optim_cfg) -> None:
    """Set requires_grad from the per-tower LRs; call before parallelize() so FSDP sees the final flags."""
    lrs = tower_lrs(optim_cfg)
    if model.right_decoder is None and lrs["right"] > 0:
        logger.warning("optim.lr_right is ignored: the vanilla architecture has no right tower")
    for name, module in tower_modules(model).items():
        module.requires_grad_(lrs[name] > 0)
    for param in model.unused_parameters():
        param.requires_grad_(False)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info("trainable parameters: %s of %s", f"{trainable:,}", f"{model.num_parameters():,}")


def param_groups(model: nn.Module, optim_cfg) -> list[dict]:
    """One group per trainable tower (two when norms and biases are exempt from weight decay)."""
    groups = []
    lrs = tower_lrs(optim_cfg)
    for name, module in tower_modules(model).items():
        params = [p for p in module.parameters() if p.requires_grad]
        if not params or lrs[name] == 0:
            continue
        if optim_cfg.decay_norms_and_biases:
            groups.append({"name": name, "params": params, "lr": lrs[name], "weight_decay": optim_cfg.weight_decay})
            continue
        matrices = [p for p in params if p.ndim >= 2]
        vectors = [p for p in params if p.ndim < 2]
        groups.append({"name": name, "params": matrices, "lr": lrs[name], "weight_decay": optim_cfg.weight_decay})
        if vectors:
            groups.append({"name": f"{name}_no_decay", "params": vectors, "lr": lrs[name], "weight_decay": 0.0})
    return groups


def build_optimizer(model: nn.Module, optim_cfg) -> torch.optim.AdamW:
    """AdamW over the trainable towers: the fused kernel unless configured (CPU too: 5x the foreach path there)."""
    impl = "fused" if optim_cfg.implementation == "auto" else optim_cfg.implementation
    groups = param_groups(model, optim_cfg)
    if not groups:
        # Config validation sees only the LRs: e.g. optim.lr_right alone trains nothing in the vanilla architecture.
        raise ConfigError("no trainable parameters: every tower of this architecture is frozen (optim.lr_* = 0)")
    return torch.optim.AdamW(
        groups,
        betas=tuple(optim_cfg.betas),
        eps=optim_cfg.eps,
        weight_decay=optim_cfg.weight_decay,
        fused=impl == "fused",
        foreach=impl == "foreach",
    )
