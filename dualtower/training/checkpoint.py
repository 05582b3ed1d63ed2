"""Resumable checkpoints with torch.distributed.checkpoint (DCP), and export in the `save_pretrained` format.

A checkpoint is a directory `step_XXXXXXXX/` holding
    DCP shards + .metadata      model and optimizer state (sharded under FSDP; loads on any number of ranks)
    train_state.json            step, scheduler, skipped-step counters, world size (rank 0)
    rank_XXXXX.pt               each rank's data-loader state and RNG states
It is written to `.tmp_step_XXXXXXXX/` and renamed when every rank has finished, so a crash mid-save never
leaves a partial `step_*` directory and the previous checkpoint stays intact. The newest `keep` are kept.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import re
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from dualtower.model import DualTowerVLM, ModelConfig
from dualtower.parallel import DistEnv, barrier

logger = logging.getLogger(__name__)

STEP_DIR = re.compile(r"^step_(\d{8})$")


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class Checkpointer:
    """Takes the [checkpoint] section."""

    def __init__(self, checkpoint_cfg, run_dir: Path, env: DistEnv):
        self.cfg = checkpoint_cfg
        self.folder = run_dir / checkpoint_cfg.folder
        self.env = env

    def checkpoints(self) -> list[Path]:
        if not self.folder.is_dir():
            return []
        found = [p for p in self.folder.iterdir() if p.is_dir() and STEP_DIR.match(p.name)]
        return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))

    def resume_path(self) -> Path | None:
        """The checkpoint to resume from: none, the newest in the folder (auto), or an explicit path."""
        if self.cfg.resume == "none":
            return None
        if self.cfg.resume == "auto":
            found = self.checkpoints()
            return found[-1] if found else None
        path = Path(self.cfg.resume)
        if not (path / "train_state.json").is_file():
            raise FileNotFoundError(f"checkpoint.resume = {self.cfg.resume!r} is not a checkpoint directory")
        return path

    def save(self, step: int, model: nn.Module, optimizer, scheduler, loader, train_state: dict[str, Any]) -> Path:
        final = self.folder / f"step_{step:08d}"
        tmp = self.folder / f".tmp_step_{step:08d}"
        if self.env.is_main:
            shutil.rmtree(tmp, ignore_errors=True)  # debris of a save that crashed
            tmp.mkdir(parents=True)
        barrier()
        model_sd, optim_sd = get_state_dict(model, optimizer)
        with _single_process_quiet():
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
        torch.save({"loader": loader.state_dict(), "rng": rng_state()}, tmp / f"rank_{self.env.rank:05d}.pt")
        if self.env.is_main:
            state = {**train_state, "step": step, "scheduler": scheduler.state_dict()}
            state["world_size"] = self.env.world_size
            _write_json(tmp / "train_state.json", state)
        barrier()
        if self.env.is_main:
            self._publish(tmp, final)
            self._prune()
        barrier()
        logger.info("checkpoint saved: %s", final)
        return final

    def _publish(self, tmp: Path, final: Path) -> None:
        trash = final.with_name(f".old_{final.name}")
        if final.exists():  # the same step saved again after resuming from an older checkpoint
            final.rename(trash)
        os.replace(tmp, final)
        _fsync_dir(self.folder)
        shutil.rmtree(trash, ignore_errors=True)

    def _prune(self) -> None:
        for old in self.checkpoints()[: -self.cfg.keep]:
            shutil.rmtree(old, ignore_errors=True)

    def load(self, path: Path, model: nn.Module, optimizer, scheduler, loader) -> dict[str, Any]:
        """Restore everything saved by save(); returns train_state (with "step")."""
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        with _single_process_quiet():
            dcp.load(state, checkpoint_id=str(path))
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        train_state = json.loads((path / "train_state.json").read_text())
        scheduler.load_state_dict(train_state["scheduler"])
        self._load_rank_state(path, train_state["world_size"], loader)
        logger.info("resumed from %s at step %d", path, train_state["step"])
        return train_state

    def _load_rank_state(self, path: Path, saved_world: int, loader) -> None:
        if saved_world == self.env.world_size:
            rank_state = torch.load(path / f"rank_{self.env.rank:05d}.pt", weights_only=False)
            loader.load_state_dict(rank_state["loader"])
            set_rng_state(rank_state["rng"])
            return
        # Another world size: re-shard the data position from the states of every saved rank if possible.
        states = [torch.load(path / f"rank_{r:05d}.pt", weights_only=False)["loader"] for r in range(saved_world)]
        reshard = getattr(loader, "load_resharded_state_dict", None)
        if reshard is not None:
            reshard(states)
            return
        state = reshard_loader_state(states, self.env.rank, self.env.world_size, loader.state_dict())
        if state is None:
            shape = (saved_world, self.env.world_size)
            logger.warning("cannot re-shard the data position of %d ranks onto %d: the data stream restarts", *shape)
            return
        loader.load_state_dict(state)


def reshard_loader_state(saved: list[dict], rank: int, world_size: int, current: dict) -> dict | None:
    """Map the saved loaders' shard states onto this rank (dualtower.data.loader state, version 1).

    That loader reads shard `rank * W + w` of `world_size * W` in logical worker w and hands batches out
    round-robin over its workers, so a position carries over exactly when the total number of shards is the
    same (e.g. 2 ranks x 1 worker <-> 1 rank x 2 workers) and every shard has delivered as many batches (true
    at optimizer-step boundaries when each step takes a multiple of W batches per rank). None otherwise.
    """
    if any(s.get("version") != 1 for s in [*saved, current]):
        return None
    saved_workers = saved[0]["num_logical_workers"]
    workers = current["num_logical_workers"]
    if len(saved) * saved_workers != world_size * workers:
        return None
    per_shard = {}  # global shard -> (batches delivered from it, its pipeline state)
    for saved_rank, state in enumerate(saved):
        for w in range(saved_workers):
            delivered = (state["delivered"] - w + saved_workers - 1) // saved_workers
            per_shard[saved_rank * saved_workers + w] = (max(delivered, 0), state["workers"].get(str(w)))
    mine = [per_shard[rank * workers + w] for w in range(workers)]
    counts = {count for count, _ in mine}
    if len(counts) != 1:
        return None
    state = {**current, "delivered": counts.pop() * workers}
    state["workers"] = {str(w): s for w, (_, s) in enumerate(mine) if s is not None}
    return state


def full_model_copy(model: nn.Module, model_cfg: ModelConfig, env: DistEnv) -> DualTowerVLM | None:
    """An unsharded, uncompiled fp32 CPU copy of `model` on rank 0 (None on the others). Collective."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model, options=options)
    if not env.is_main:
        return None
    copy = DualTowerVLM(model_cfg)
    copy.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return copy


def export_pretrained(model: nn.Module, model_cfg: ModelConfig, env: DistEnv, dest: Path, tokenizer=None) -> None:
    """Write `dest` in the save_pretrained format (config.json + model.safetensors [+ tokenizer])."""
    copy = full_model_copy(model, model_cfg, env)
    if copy is not None:
        copy.save_pretrained(str(dest), tokenizer=tokenizer)
        logger.info("exported %s", dest)
    barrier()


@contextlib.contextmanager
def _single_process_quiet() -> Iterator[None]:
    """DCP warns that it assumes a single process when no process group exists: that is intended here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _write_json(path: Path, data: dict[str, Any]) -> None:
    with path.open("w") as handle:
        json.dump(data, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
