"""The data loader: sources -> documents -> packed rows -> PackedBatch, in worker processes, resumable.

Work is split into logical workers (max(1, num_workers) per rank); logical worker w of rank r reads shard
r * W + w of W * world_size, so ranks and workers never see the same sample. Each logical worker runs a
`ShardPipeline` and attaches its state (epoch, next position, the keys of the documents in its packing
buffer, its counters) to every batch, and its final state to a last item without a batch (a finite pass reads
and drops samples after its last batch). The torch DataLoader returns batches round-robin over workers, so the
loader knows, for the batches actually handed out, each worker's exact state: `state_dict()` is that, and a
restored loader re-reads the buffered documents by key and continues with exactly the batches an
uninterrupted loader would have produced (physical workers are rotated so the next batch comes from the right
logical worker). The DataLoader's round-robin skips workers that ran out (a finite split's shards end at
different times), so whose turn it is follows the worker of the last batch handed out, not a batch count.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dualtower.batch import PackedBatch
from dualtower.data.config import DataConfig
from dualtower.data.counters import LoaderStats
from dualtower.data.pipeline import ShardPipeline
from dualtower.data.sources import build_source
from dualtower.model.config import ModelConfig

logger = logging.getLogger(__name__)
STATE_VERSION = 1


class _WorkerDataset(IterableDataset):
    """Runs one ShardPipeline per worker process (or in the main process when num_workers == 0)."""

    def __init__(self, loader: Loader, states: dict[int, dict[str, Any]], rotation: int) -> None:
        super().__init__()
        self.loader, self.states, self.rotation = loader, states, rotation

    def __iter__(self) -> Iterator[tuple[PackedBatch | None, dict[str, Any]]]:
        info = get_worker_info()
        logical = ((info.id if info else 0) + self.rotation) % self.loader.num_logical_workers
        pipeline = self.loader.pipeline(logical, self.states.get(logical))
        for batch, state in pipeline:
            yield batch, {"worker": logical, **state}
        # A finite pass reads (and drops) samples after its last batch: their counters come with no batch.
        yield None, {"worker": logical, **pipeline.state()}


def _init_worker(_: int) -> None:
    torch.set_num_threads(1)  # workers run in parallel already; intra-op threads would oversubscribe the CPU


class Loader:
    """Iterable of PackedBatch: infinite for "train" (epochs reshuffle), one pass for other splits."""

    def __init__(
        self, data_cfg: DataConfig, model_cfg: ModelConfig, tokenizer: Any, split: str, rank: int, world_size: int
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.cfg, self.model_cfg, self.tokenizer = data_cfg, model_cfg, tokenizer
        self.split, self.rank, self.world_size = split, rank, world_size
        self.infinite = split == "train"
        self.num_logical_workers = max(1, data_cfg.num_workers)
        self.source = build_source(data_cfg, split)
        self._states: dict[int, dict[str, Any]] = {}
        self._delivered = 0
        self._next_worker = 0  # logical worker after the one of the last batch handed out
        self._finished = False  # a finite pass ended: its stats stay readable, the next iteration starts over

    def pipeline(self, logical_worker: int, state: dict[str, Any] | None) -> ShardPipeline:
        num_shards = self.world_size * self.num_logical_workers
        shard = self.rank * self.num_logical_workers + logical_worker
        return ShardPipeline(
            self.source, self.cfg, self.model_cfg, self.tokenizer, shard, num_shards, self.infinite, state
        )

    def __iter__(self) -> Iterator[PackedBatch]:
        if self._finished:
            self._states, self._delivered, self._next_worker, self._finished = {}, 0, 0, False
        dataset = _WorkerDataset(self, copy.deepcopy(self._states), self._next_worker)
        workers = self.cfg.num_workers
        loader = DataLoader(
            dataset,
            batch_size=None,
            num_workers=workers,
            pin_memory=self.cfg.pin_memory and torch.cuda.is_available(),
            prefetch_factor=self.cfg.prefetch_factor if workers else None,
            worker_init_fn=_init_worker if workers else None,
            multiprocessing_context=(self.cfg.worker_start_method or None) if workers else None,
        )
        for batch, state in loader:
            worker = state.pop("worker")
            self._states[worker] = state
            self._next_worker = (worker + 1) % self.num_logical_workers
            if batch is not None:
                self._delivered += 1
                yield batch
        self._finished = not self.infinite

    @property
    def stats(self) -> LoaderStats:
        """Counters of everything behind the batches handed out so far, summed over workers."""
        total = LoaderStats()
        for state in self._states.values():
            total.merge(LoaderStats.from_dict(state["stats"]))
        return total

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "split": self.split,
            "seed": self.cfg.seed,
            "world_size": self.world_size,
            "rank": self.rank,
            "num_logical_workers": self.num_logical_workers,
            "pack": self.cfg.pack,
            "delivered": self._delivered,
            "next_worker": self._next_worker,
            "finished": self._finished,
            "workers": {str(k): copy.deepcopy(v) for k, v in self._states.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        expected = {
            "version": STATE_VERSION,
            "split": self.split,
            "seed": self.cfg.seed,
            "world_size": self.world_size,
            "rank": self.rank,  # another rank's positions would read this rank's shards from the wrong places
            "num_logical_workers": self.num_logical_workers,
            "pack": self.cfg.pack,
        }
        mismatched = {k: (state.get(k), v) for k, v in expected.items() if state.get(k) != v}
        if mismatched:
            raise ValueError(f"loader state does not fit this loader (saved, current): {mismatched}")
        self._delivered = int(state["delivered"])
        # States without it (older ones) come from loaders whose workers all had data: the turn is the count's.
        self._next_worker = int(state.get("next_worker", self._delivered % self.num_logical_workers))
        self._finished = bool(state.get("finished", False))
        self._states = {int(k): copy.deepcopy(v) for k, v in state["workers"].items()}


def build_loader(
    data_cfg: DataConfig,
    model_cfg: ModelConfig,
    tokenizer: Any,
    split: str = "train",
    rank: int = 0,
    world_size: int = 1,
) -> Loader:
    """A resumable loader of PackedBatch for one split and rank."""
    data_cfg.validate()
    if data_cfg.num_workers:
        # Forked workers cannot use the tokenizer's thread pool; say so once instead of a warning per worker.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return Loader(data_cfg, model_cfg, tokenizer, split, rank, world_size)
