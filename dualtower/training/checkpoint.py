"""Resumable checkpoints with torch.distributed.checkpoint (DCP), and export in the `save_pretrained` format.

A checkpoint is a directory `step_XXXXXXXX/` holding
    DCP shards + .metadata      model and optimizer state (sharded under FSDP; loads on any number of ranks)
    train_state.json            step, scheduler, skipped-step counters, world size, param groups, the model's
                                image preprocessing (rank 0)
    rank_XXXXX.pt               each rank's data-loader state and RNG states (torch CPU and CUDA, python, numpy)
It is written to `.tmp_step_XXXXXXXX/` and renamed when every rank has finished, so a crash mid-save never
leaves a partial `step_*` directory and the previous checkpoint stays intact (a save first removes the debris of
crashed ones). The newest `keep` are kept.

World size: the model and optimizer re-shard onto any number of ranks, and so does the data position where
reshard_loader_state can map it. The RNG states are restored only on the world size they were saved on: rank r's
stream has no counterpart among a different number of ranks, and giving one rank's state to several would make
them draw the same numbers, so on another world size each rank keeps the RNG state it has (logged at info).

Timelines: a run resumed from an older checkpoint (checkpoint.resume=PATH) that publishes step S abandons the
checkpoints of steps >= S already in the folder. They are moved into `superseded/` (never deleted, never resumed
from, never counted by `keep`) with a warning, so resume=auto and pruning only see the current timeline.

Hyperparameters: the optimizer's param groups and the scheduler's base LRs come from the config, not from the
checkpoint, so a changed peak LR, weight decay, betas or eps takes effect on resume; the step (the position in
the schedule) and the Adam moments come from the checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
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
    set_model_state_dict,
    set_state_dict,
)

from dualtower.adapters.common import CONFIG_FILE, CheckpointError
from dualtower.model import DualTowerVLM, ModelConfig
from dualtower.parallel import DistEnv, barrier

logger = logging.getLogger(__name__)

STEP_DIR = re.compile(r"^step_(\d{8})$")
DEBRIS = re.compile(r"^\.(tmp|old)_step_\d{8}$")  # left behind by a save that crashed
SUPERSEDED = "superseded"
HYPERPARAMETERS = ("initial_lr", "weight_decay", "betas", "eps")  # per param group, from the config
EXPORT_STAGING = ".tmp_export"  # inside the export folder: where an export is written before it is moved in


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
        return sorted(found, key=_step_of)

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
            self._remove_debris()
            tmp.mkdir(parents=True)
        barrier()
        model_sd, optim_sd = get_state_dict(model, optimizer)
        with _single_process_quiet():
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
        torch.save({"loader": loader.state_dict(), "rng": rng_state()}, tmp / f"rank_{self.env.rank:05d}.pt")
        if self.env.is_main:
            state = {**train_state, "step": step, "scheduler": scheduler.state_dict()}
            state["world_size"] = self.env.world_size
            state["param_groups"] = param_group_layout(optimizer)
            _write_json(tmp / "train_state.json", state)
        barrier()
        if self.env.is_main:
            self._publish(tmp, final)
            self._prune()
        barrier()
        logger.info("checkpoint saved: %s", final)
        return final

    def _remove_debris(self) -> None:
        """Delete the temporary directories of saves that crashed (only one save of a run runs at a time)."""
        if not self.folder.is_dir():
            return
        for path in self.folder.iterdir():
            if DEBRIS.match(path.name):
                logger.info("removing %s, left behind by a save that did not finish", path)
                shutil.rmtree(path, ignore_errors=True)

    def _publish(self, tmp: Path, final: Path) -> None:
        self._supersede(_step_of(final))
        os.replace(tmp, final)
        _fsync_dir(self.folder)

    def _supersede(self, step: int) -> None:
        """Move the checkpoints of steps >= `step` (an abandoned timeline: the run resumed from an older one)."""
        abandoned = [p for p in self.checkpoints() if _step_of(p) >= step]
        if not abandoned:
            return
        aside = self.folder / SUPERSEDED
        aside.mkdir(exist_ok=True)
        moved = [p.rename(_free_name(aside / p.name)) for p in abandoned]
        logger.warning(
            "saving step %d over checkpoints of steps >= %d (the run resumed from an older checkpoint): moved "
            "them to %s as %s; they are no longer resumed from or pruned, delete them when no longer needed",
            step,
            step,
            aside,
            ", ".join(p.name for p in moved),
        )

    def _prune(self) -> None:
        for old in self.checkpoints()[: -self.cfg.keep]:
            shutil.rmtree(old, ignore_errors=True)

    def load(self, path: Path, model: nn.Module, optimizer, scheduler, loader) -> dict[str, Any]:
        """Restore everything saved by save(); returns train_state (with "step").

        The optimizer's and scheduler's hyperparameters stay those of the config they were built from.
        """
        train_state = json.loads((path / "train_state.json").read_text())
        check_param_groups(train_state, optimizer, path)
        configured = [{key: group[key] for key in HYPERPARAMETERS} for group in optimizer.param_groups]
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        with _single_process_quiet():
            dcp.load(state, checkpoint_id=str(path))
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        scheduler.load_state_dict(train_state["scheduler"])
        reapply_hyperparameters(optimizer, scheduler, configured)
        self._load_rank_state(path, train_state["world_size"], loader)
        logger.info("resumed from %s at step %d", path, train_state["step"])
        return train_state

    def load_model(self, path: Path, model: nn.Module) -> dict[str, Any]:
        """Restore only the model's weights (to export them): the optimizer's layout may differ from the
        checkpoint's, as when the config now freezes another tower. Returns train_state (with "step")."""
        train_state = json.loads((path / "train_state.json").read_text())
        state = {"model": get_model_state_dict(model)}
        with _single_process_quiet():
            dcp.load(state, checkpoint_id=str(path))
        set_model_state_dict(model, state["model"])
        logger.info("loaded the model of %s (step %d)", path, train_state["step"])
        return train_state

    def _load_rank_state(self, path: Path, saved_world: int, loader) -> None:
        if saved_world == self.env.world_size:
            rank_state = torch.load(path / f"rank_{self.env.rank:05d}.pt", weights_only=False)
            loader.load_state_dict(rank_state["loader"])
            set_rng_state(rank_state["rng"])
            return
        logger.info(
            "the checkpoint was saved on %d ranks, this run has %d: its per-rank RNG states are not restored "
            "(they do not map onto another number of ranks), random draws differ from an uninterrupted run",
            saved_world,
            self.env.world_size,
        )
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


def param_group_layout(optimizer) -> list[list[Any]]:
    """[name, number of parameters] per param group: what the optimizer state of a checkpoint is laid out by."""
    return [[group.get("name", str(i)), len(group["params"])] for i, group in enumerate(optimizer.param_groups)]


def check_param_groups(train_state: dict[str, Any], optimizer, path: Path) -> None:
    """Refuse a checkpoint whose optimizer state belongs to other parameter groups (other towers trained).

    Freezing follows the per-tower LRs, so a tower's LR changed from or to 0 changes the groups; the Adam state
    then has no place to go and DCP would fail with an unrelated-looking missing-key error. (Checkpoints written
    before the layout was recorded are not checked.)
    """
    saved = train_state.get("param_groups")
    current = param_group_layout(optimizer)
    if saved is None or [list(group) for group in saved] == current:
        return
    raise CheckpointError(
        f"{path}: the checkpoint's parameter groups {_layout_text(saved)} differ from the config's "
        f"{_layout_text(current)}: resuming needs the same trainable towers (optim.lr_* zero or not) and "
        "optim.decay_norms_and_biases; to train other towers, start a new run from an export (model.checkpoint)"
    )


def preprocessing_changes(train_state: dict[str, Any], model_cfg: ModelConfig) -> list[str]:
    """"image.<field> saved -> current" for each image-preprocessing setting (ModelConfig.image: mean, std,
    max_img_size, ...) that differs from the one the checkpoint was trained with. The weights do not show
    these (a DCP load succeeds whatever they are), so they are recorded in train_state.json; checkpoints
    written before that record nothing to compare."""
    saved = train_state.get("image")
    if saved is None:
        return []
    current = dataclasses.asdict(model_cfg.image)
    return [
        f"image.{key} {_plain(saved[key])} -> {_plain(value)}"
        for key, value in current.items()
        if key in saved and _plain(saved[key]) != _plain(value)
    ]


def check_preprocessing(train_state: dict[str, Any], model_cfg: ModelConfig, path: Path) -> None:
    """Refuse to export a checkpoint with other image preprocessing than it was trained with: the export's
    config.json would make every later user of it feed the weights differently normalized pixels."""
    changes = preprocessing_changes(train_state, model_cfg)
    if changes:
        raise CheckpointError(
            f"{path} was trained with other image preprocessing than the config gives ({'; '.join(changes)}): "
            "export it with the recipe it was trained with"
        )


def _layout_text(layout: list) -> str:
    return "[" + ", ".join(f"{name} ({count} tensors)" for name, count in layout) + "]"


def reapply_hyperparameters(optimizer, scheduler, configured: list[dict[str, Any]]) -> None:
    """Put the config's per-group hyperparameters back after a checkpoint load overwrote them.

    `configured` holds each group's HYPERPARAMETERS before the load (the groups keep their order: the same
    config builds the same named groups). The LRs are then recomputed for the scheduler's restored position.
    """
    changes = []
    for index, (group, wanted) in enumerate(zip(optimizer.param_groups, configured, strict=True)):
        for key, value in wanted.items():
            if _plain(group[key]) != _plain(value):
                changes.append(f"{group.get('name', index)}.{key} {group[key]} -> {value}")
                group[key] = value
    scheduler.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
    # The LR of the next step from the (possibly changed) peaks and schedule, at the checkpoint's position.
    lrs = [base * fn(scheduler.last_epoch) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas, strict=True)]
    for group, lr in zip(optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr
    scheduler._last_lr = lrs  # what get_last_lr() reports
    if changes:
        logger.info("optimizer hyperparameters from the config replace the checkpoint's: %s", "; ".join(changes))


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
    # The per-shard counts below assume the round-robin never skipped a worker (none ran out of data).
    if any(s.get("next_worker", s["delivered"] % saved_workers) != s["delivered"] % saved_workers for s in saved):
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
    # Every shard delivered as many batches, so the round-robin starts over at logical worker 0.
    state = {**current, "delivered": counts.pop() * workers, "next_worker": 0}
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
        staging = dest / EXPORT_STAGING
        shutil.rmtree(staging, ignore_errors=True)  # left behind by an export that was killed
        copy.save_pretrained(str(staging), tokenizer=tokenizer)
        _move_into(staging, dest)
        logger.info("exported %s", dest)
    barrier()


def _move_into(staging: Path, dest: Path) -> None:
    """Move the files written to `staging` into `dest` one atomic rename at a time, config.json last.

    A kill mid-export then leaves every file of `dest` whole (the previous export's or the new one's), never a
    truncated model.safetensors; a first export shows no config.json until its weights are in place. Other files
    in `dest` are left alone: export_folder may name a folder that holds more than the export.
    """
    files = sorted(staging.iterdir(), key=lambda path: (path.name == CONFIG_FILE, path.name))
    for path in files:
        os.replace(path, dest / path.name)
    _fsync_dir(dest)
    staging.rmdir()


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


def _plain(value: Any) -> Any:
    return tuple(value) if isinstance(value, list | tuple) else value  # betas may come back as a list


def _step_of(path: Path) -> int:
    return int(STEP_DIR.match(path.name).group(1))


def _free_name(path: Path) -> Path:
    """`path`, or `path.1`, `path.2`, ... if taken (the same step can be abandoned more than once)."""
    candidate, index = path, 0
    while candidate.exists():
        index += 1
        candidate = path.with_name(f"{path.name}.{index}")
    return candidate


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
