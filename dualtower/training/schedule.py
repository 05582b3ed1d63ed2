"""Learning-rate schedule: linear warmup, then cosine decay to a floor (the original's `get_lr`).

    lr(s) = max * (s + 1) / W                                    for s < W
    lr(s) = min + (max - min) * (1 + cos(pi * (s - W) / (S - W))) / 2   for W <= s <= S
    lr(s) = min                                                  for s > S
with min = min_lr_ratio * max, W warmup steps and S total steps. With S = 50,000 and W = 1,500:
lr(0) = max / 1500, lr(1499) = max, lr(25,750) = 0.55 max, lr(50,000) = 0.1 max.
The multiplier applies to every parameter group's own peak LR.
"""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def warmup_steps_for(total_steps: int, warmup_steps: int, warmup_ratio: float) -> int:
    """Explicit warmup_steps (>= 0) wins; -1 means round(warmup_ratio * total_steps)."""
    if warmup_steps >= 0:
        return warmup_steps
    return round(warmup_ratio * total_steps)


def lr_multiplier(step: int, total_steps: int, warmup_steps: int, min_lr_ratio: float, kind: str = "cosine") -> float:
    """Fraction of the peak LR used by optimizer step `step` (0-based)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "constant":
        return 1.0
    if step > total_steps or total_steps <= warmup_steps:
        return min_lr_ratio
    progress = (step - warmup_steps) / (total_steps - warmup_steps)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: Optimizer, schedule_cfg, total_steps: int) -> LambdaLR:
    """A LambdaLR over `schedule_cfg` ([schedule] section); step it once per optimizer step."""
    warmup = warmup_steps_for(total_steps, schedule_cfg.warmup_steps, schedule_cfg.warmup_ratio)

    def multiplier(step: int) -> float:
        return lr_multiplier(step, total_steps, warmup, schedule_cfg.min_lr_ratio, schedule_cfg.kind)

    return LambdaLR(optimizer, multiplier)
