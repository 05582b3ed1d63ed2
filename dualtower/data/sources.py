"""Raw sample sources in The Cauldron's schema: `{"images": [...], "texts": [{"user", "assistant"}, ...]}`.

A source is read per (epoch, shard): shard s of n sees a disjoint part of the split, in an order fixed by the
seed and the epoch, and every sample has a position inside that stream. The loader resumes by position:
random-access sources (synthetic, local files) fetch positions directly; streams (The Cauldron) re-read from
the earliest position it needs.

Images are kept undecoded (`{"bytes", "path"}` dicts or PIL images) so that a broken file becomes one dropped
sample in our own decoding instead of an exception inside `datasets`.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dualtower.data.config import DataConfig
from dualtower.data.synthetic import SyntheticSource

logger = logging.getLogger(__name__)


class UnreadableSample:
    """Stands in for a sample the source itself could not read (counted as a drop by the loader)."""

    def __init__(self, error: Exception) -> None:
        self.error = f"{type(error).__name__}: {error}"[:300]


class Source(ABC):
    random_access: bool = False

    @abstractmethod
    def iterate(self, epoch: int, shard: int, num_shards: int, start: int = 0) -> Iterator[tuple[int, Any]]:
        """(position, sample) pairs of one shard and epoch, from position `start` on."""

    def fetch(self, epoch: int, shard: int, num_shards: int, positions: Sequence[int]) -> dict[int, Any]:
        """Samples at the given positions (a stream re-reads from the smallest one)."""
        wanted, found = set(positions), {}
        if not wanted:
            return found
        for position, sample in self.iterate(epoch, shard, num_shards, start=min(wanted)):
            if position in wanted:
                found[position] = sample
                if len(found) == len(wanted):
                    break
        return found


class IndexedSource(Source):
    """Any sized, indexable collection; epochs are seeded permutations, shards take every n-th element."""

    random_access = True

    def __init__(self, items: Any, seed: int, shuffle: bool) -> None:
        self.items, self.seed, self.shuffle = items, seed, shuffle
        self._order_epoch: int | None = None
        self._order = np.arange(0)

    def __len__(self) -> int:
        return len(self.items)

    def shard_indices(self, epoch: int, shard: int, num_shards: int) -> np.ndarray:
        if self._order_epoch != epoch:
            n = len(self.items)
            self._order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
            self._order_epoch = epoch
        return self._order[shard::num_shards]

    def iterate(self, epoch: int, shard: int, num_shards: int, start: int = 0) -> Iterator[tuple[int, Any]]:
        indices = self.shard_indices(epoch, shard, num_shards)
        for position in range(start, len(indices)):
            yield position, self._read(int(indices[position]))

    def fetch(self, epoch: int, shard: int, num_shards: int, positions: Sequence[int]) -> dict[int, Any]:
        indices = self.shard_indices(epoch, shard, num_shards)
        return {p: self._read(int(indices[p])) for p in positions}

    def _read(self, index: int) -> Any:
        try:
            return self.items[index]
        except Exception as error:  # a corrupt row must not stop the stream
            return UnreadableSample(error)


def build_source(cfg: DataConfig, split: str) -> Source:
    """The source named by `cfg.source` for a split ("train", "val", "heldout")."""
    shuffle = split == "train"
    if cfg.source == "synthetic":
        return IndexedSource(SyntheticSource.from_config(cfg.synthetic, cfg.seed, split), cfg.seed, shuffle)
    if cfg.source == "cauldron":
        return CauldronSource(cfg.cauldron_id, cfg.cauldron_configs, split, cfg.seed, cfg.val_ratio)
    path = Path(cfg.source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"data.source {cfg.source!r} is neither 'synthetic', 'cauldron' nor a path")
    return IndexedSource(load_local_split(path, split, cfg.val_ratio, cfg.seed), cfg.seed, shuffle)


def _datasets() -> Any:
    try:
        import datasets
    except ImportError as error:
        raise ImportError("this data source needs `datasets`: pip install 'dualtower[data]'") from error
    return datasets


def load_local_split(path: Path, split: str, val_ratio: float, seed: int) -> Any:
    """A local parquet/arrow dataset (file, folder of files, or `save_to_disk` folder) cut to one split."""
    datasets = _datasets()
    if path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists()):
        loaded = datasets.load_from_disk(str(path))
    else:
        files = sorted(path.rglob("*.parquet")) + sorted(path.rglob("*.arrow")) if path.is_dir() else [path]
        if not files:
            raise FileNotFoundError(f"no .parquet or .arrow files under {path}")
        kind = "arrow" if files[0].suffix == ".arrow" else "parquet"
        loaded = datasets.load_dataset(kind, data_files=[str(f) for f in files], split="train")
    if isinstance(loaded, datasets.DatasetDict):
        names = {"train": ("train",), "val": ("validation", "val", "test"), "heldout": ("test", "heldout")}[split]
        name = next((n for n in names if n in loaded), None)
        if name is None:
            raise KeyError(f"{path} has splits {list(loaded)}, none of {names} for split {split!r}")
        return _undecoded(loaded[name])
    return _undecoded(_ratio_split(loaded, split, val_ratio, seed))


def _ratio_split(dataset: Any, split: str, val_ratio: float, seed: int) -> Any:
    """Deterministic train/val cut of a single-split dataset; "heldout" reads the val part."""
    order = np.random.default_rng([seed, 7919]).permutation(len(dataset))
    num_val = int(len(dataset) * val_ratio)
    if split != "train" and num_val == 0:
        raise ValueError(f"split {split!r} is empty: set data.val_ratio > 0 or provide a validation split")
    return dataset.select(sorted(order[:num_val] if split != "train" else order[num_val:]))


def _undecoded(dataset: Any) -> Any:
    """Keep image bytes undecoded so that our loader decodes (and survives) each image."""
    datasets = _datasets()
    feature = (dataset.features or {}).get("images")
    inner = getattr(feature, "feature", None)
    if isinstance(inner, datasets.Image) and inner.decode:
        dataset = dataset.cast_column("images", datasets.List(datasets.Image(decode=False)))
    return dataset


class CauldronSource(Source):
    """The Cauldron through HF `datasets` streaming, as the original's P-CAULDRON loader.

    Per config: the first share (`val_ratio`, stratified: largest-remainder over config sizes) is validation;
    training streams skip it, shuffle (buffer 10,000, seed + config index) and interleave with probabilities
    proportional to the training sizes until all are exhausted. Validation concatenates the held-out parts.
    `load_config(name)` and `config_size(name)` can be replaced (tests use a local fake of the same schema).
    """

    def __init__(
        self,
        dataset_id: str,
        configs: Sequence[str],
        split: str,
        seed: int,
        val_ratio: float,
        load_config: Callable[[str], Any] | None = None,
        config_size: Callable[[str], int] | None = None,
    ) -> None:
        self.dataset_id, self.configs, self.split = dataset_id, tuple(configs), split
        self.seed, self.val_ratio = seed, val_ratio
        self._load_config = load_config or self._load_from_hub
        self._config_size = config_size or self._size_from_hub
        self._sizes: dict[str, int] | None = None

    def _load_from_hub(self, name: str) -> Any:
        return _datasets().load_dataset(self.dataset_id, name, split="train", streaming=True)

    def _size_from_hub(self, name: str) -> int:
        builder = _datasets().load_dataset_builder(self.dataset_id, name)
        return int(builder.info.splits["train"].num_examples)

    def val_counts(self) -> dict[str, int]:
        if self._sizes is None:
            self._sizes = {name: self._config_size(name) for name in self.configs}
        return stratified_counts(self._sizes, int(sum(self._sizes.values()) * self.val_ratio))

    def _stream(self) -> Any:
        datasets = _datasets()
        val = self.val_counts()
        parts, weights = [], []
        for index, name in enumerate(self.configs):
            stream = _undecoded(self._load_config(name))
            if self.split == "train":
                stream = stream.skip(val[name]).shuffle(seed=self.seed + index, buffer_size=10_000)
                weights.append(max(self._sizes[name] - val[name], 0))
            else:
                stream = stream.take(val[name])
            parts.append(stream)
        if self.split != "train":
            return datasets.concatenate_datasets(parts)
        probabilities = [w / sum(weights) for w in weights] if sum(weights) else None
        return datasets.interleave_datasets(
            parts, probabilities=probabilities, seed=self.seed, stopping_strategy="all_exhausted"
        )

    def iterate(self, epoch: int, shard: int, num_shards: int, start: int = 0) -> Iterator[tuple[int, Any]]:
        from datasets.distributed import split_dataset_by_node

        stream = split_dataset_by_node(self._stream(), rank=shard, world_size=num_shards)
        stream.set_epoch(epoch)
        if start:
            stream = stream.skip(start)
        # .iter() rather than iter(): inside a DataLoader worker the latter re-shards by worker on its own.
        for position, batch in enumerate(stream.iter(batch_size=1), start=start):
            yield position, {key: values[0] for key, values in batch.items()}


def stratified_counts(sizes: dict[str, int], total: int) -> dict[str, int]:
    """Split `total` across configs proportionally to `sizes` with largest-remainder rounding."""
    whole = sum(sizes.values())
    if whole == 0 or total == 0:
        return dict.fromkeys(sizes, 0)
    exact = {name: total * size / whole for name, size in sizes.items()}
    counts = {name: int(value) for name, value in exact.items()}
    by_remainder = sorted(sizes, key=lambda name: (-(exact[name] - counts[name]), name))
    for name in by_remainder[: total - sum(counts.values())]:
        counts[name] += 1
    return counts
