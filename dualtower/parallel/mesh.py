"""Process group and device mesh: torchrun (any world size) or a plain single process without either."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from dualtower.model.config import ConfigError

logger = logging.getLogger(__name__)


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    mesh: DeviceMesh | None  # 1-D data-parallel mesh; None in a plain single process

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.mesh is not None


def _pick_device(preference: str, local_rank: int) -> torch.device:
    if preference == "cuda" and not torch.cuda.is_available():
        raise ConfigError("training.device = 'cuda' but CUDA is not available")
    if preference in ("auto", "cuda") and torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def _env_int(name: str, default: int | None = None) -> int:
    raw = os.environ.get(name)
    if raw is None:
        if default is None:
            raise ConfigError(f"RANK and WORLD_SIZE are set but {name} is not: launch with torchrun")
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"environment variable {name}={raw!r} is not an integer") from None


def launch_ranks() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) from torchrun's environment; None for a plain process.

    A bad or inconsistent value is refused here: init_process_group would otherwise wait for ranks that never
    come (RANK >= WORLD_SIZE hangs until the timeout), and a missing LOCAL_RANK would put every rank of a node on
    the same GPU. A plain process ignores a stray LOCAL_RANK.
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    rank, world_size = _env_int("RANK"), _env_int("WORLD_SIZE")
    if world_size < 1:
        raise ConfigError(f"WORLD_SIZE={world_size} must be at least 1")
    if not 0 <= rank < world_size:
        raise ConfigError(f"RANK={rank} must be in [0, WORLD_SIZE={world_size})")
    # One process alone has only one local rank to be; several need torchrun's own.
    local_rank = _env_int("LOCAL_RANK", 0 if world_size == 1 else None)
    if not 0 <= local_rank < world_size:
        raise ConfigError(f"LOCAL_RANK={local_rank} must be in [0, WORLD_SIZE={world_size})")
    return rank, world_size, local_rank


def init_distributed(device_preference: str = "auto", timeout_s: int = 1800) -> DistEnv:
    """Join the torchrun process group if launched by torchrun; otherwise run as one plain process."""
    ranks = launch_ranks()
    local_rank = 0 if ranks is None else ranks[2]
    device = _pick_device(device_preference, local_rank)
    if ranks is None:
        return DistEnv(rank=0, world_size=1, local_rank=0, device=device, mesh=None)
    # CPU tensors (host counters, barriers) always work through gloo; CUDA tensors go through NCCL.
    backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    world_size = dist.get_world_size()
    mesh = init_device_mesh(device.type, (world_size,), mesh_dim_names=("dp",))
    logger.info("rank %d of %d on %s (%s)", dist.get_rank(), world_size, device, backend)
    return DistEnv(rank=dist.get_rank(), world_size=world_size, local_rank=local_rank, device=device, mesh=mesh)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
