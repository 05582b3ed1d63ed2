"""Parallelism applied to a model that knows nothing of it: activation checkpointing, then per-block compile,
then FSDP2, in that order (compile sees the checkpointed blocks; FSDP wraps the compiled ones)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from dualtower.model.config import ConfigError
from dualtower.parallel.ac import apply_ac
from dualtower.parallel.compile import apply_compile
from dualtower.parallel.fsdp import apply_fsdp, set_gradient_sync
from dualtower.parallel.mesh import DistEnv, barrier, init_distributed, launch_ranks, teardown

logger = logging.getLogger(__name__)

__all__ = [
    "DistEnv", "ParallelPlan", "barrier", "init_distributed", "launch_ranks", "parallelize", "set_gradient_sync",
    "teardown",
]


@dataclass
class ParallelPlan:
    fsdp: bool
    autocast_dtype: torch.dtype | None  # set when mixed precision runs through autocast (no FSDP)


def _mixed_precision_dtype(setting: str, device: torch.device) -> torch.dtype | None:
    if setting == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return torch.bfloat16 if setting == "bf16" else None


def parallelize(model: nn.Module, parallel_cfg, env: DistEnv) -> ParallelPlan:
    """Apply [parallel] to `model` in place. FSDP needs torchrun (a process group); without it a single
    process trains the plain module, with bf16 autocast where mixed precision is on. A setting this world cannot
    run is a ConfigError (a ValueError), which train/main.py reports in one line."""
    use_fsdp = {"auto": env.world_size > 1, "on": True, "off": False}[parallel_cfg.fsdp]
    if use_fsdp and env.mesh is None:
        raise ConfigError("parallel.fsdp = 'on' needs a process group: launch with torchrun")
    if env.world_size > 1 and not use_fsdp:
        raise ConfigError("several ranks need parallel.fsdp = 'auto' or 'on' (no other data parallelism)")
    low_precision = _mixed_precision_dtype(parallel_cfg.mixed_precision, env.device)
    if parallel_cfg.activation_checkpointing:
        apply_ac(model)
    if parallel_cfg.compile:
        apply_compile(model, fullgraph=parallel_cfg.compile_fullgraph)
    if use_fsdp:
        reduce_dtype = torch.float32 if low_precision is not None else None
        apply_fsdp(model, env.mesh, low_precision, reduce_dtype, parallel_cfg.reshard_after_forward)
    logger.info(
        "parallel: fsdp=%s compile=%s ac=%s precision=%s",
        use_fsdp,
        parallel_cfg.compile,
        parallel_cfg.activation_checkpointing,
        low_precision or "fp32",
    )
    barrier()
    return ParallelPlan(fsdp=use_fsdp, autocast_dtype=None if use_fsdp else low_precision)
