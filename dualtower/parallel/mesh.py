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


def init_distributed(device_preference: str = "auto", timeout_s: int = 1800) -> DistEnv:
    """Join the torchrun process group if launched by torchrun; otherwise run as one plain process."""
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = _pick_device(device_preference, local_rank)
    if not launched:
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
