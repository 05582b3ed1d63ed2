"""Raw sample sources in The Cauldron's schema: `{"images": [...], "texts": [{"user", "assistant"}, ...]}`.

A source is read per (epoch, shard): shard s of n sees a disjoint part of the split, in an order fixed by the
seed and the epoch, and every sample has a position inside that stream. The loader resumes by position:
random-access sources (synthetic, local files) fetch positions directly; streams (The Cauldron) re-read from
the earliest position it needs.

Train/validation cut of single-split data: local files take a seeded permutation (`_ratio_split`); The
Cauldron, a stream that `datasets` splits by file across ranks and workers, holds out the rows whose content
hash falls below `val_ratio` (`held_out`), which no sharding can change. That replaces the original's "first
`val_ratio` of each config" (its `take`/`skip` mean something else once the stream is split): validation is
about, no longer exactly, `val_ratio` of each config, spread over the whole config instead of its first rows.

Images are kept undecoded (`{"bytes", "path"}` dicts or PIL images) so that a broken file becomes one dropped
sample in our own decoding instead of an exception inside `datasets`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from dualtower.data.config import DataConfig
from dualtower.data.synthetic import SyntheticSource

logger = logging.getLogger(__name__)


class UnreadableSample:
    """Stands in for a sample the source itself could not read (counted as a drop by the loader)."""

    def __init__(self, error: Exception) -> None:
        self.error = f"{type(error).__name__}: {error}"[:300]


class Source(ABC):
    """One split of samples, read by shard and epoch from any position (what makes a loader resumable)."""

    @abstractmethod
    def iterate(self, epoch: int, shard: int, num_shards: int, start: int = 0) -> Iterator[tuple[int, Any]]:
        """(position, sample) pairs of one shard and epoch, from position `start` on."""

    def locate(self, epoch: int, shard: int, num_shards: int, position: int) -> str:
        """Where the sample at `position` lives, for log messages."""
        return f"position {position}"

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

    def locate(self, epoch: int, shard: int, num_shards: int, position: int) -> str:
        index = int(self.shard_indices(epoch, shard, num_shards)[position])
        locate = getattr(self.items, "locate", None)
        return locate(index) if callable(locate) else f"row {index}"

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
        _refuse_nested_splits(path)
        return _ratio_split(_read_files(path, files), split, val_ratio, seed)
    if isinstance(loaded, datasets.DatasetDict):
        names = {"train": ("train",), "val": ("validation", "val", "test"), "heldout": ("test", "heldout")}[split]
        name = next((n for n in names if n in loaded), None)
        if name is None:
            raise KeyError(f"{path} has splits {list(loaded)}, none of {names} for split {split!r}")
        return _undecoded(loaded[name])
    return _undecoded(_ratio_split(loaded, split, val_ratio, seed))


def _refuse_nested_splits(path: Path) -> None:
    """A folder pooling every file below it must not hold `save_to_disk` DatasetDicts: their validation and
    test files would be pooled into training."""
    if not path.is_dir():
        return
    nested = sorted(str(p.parent) for p in path.rglob("dataset_dict.json"))
    if nested:
        raise ValueError(
            f"{path} holds DatasetDict folders with their own splits ({', '.join(nested[:3])}"
            f"{', ...' if len(nested) > 3 else ''}); pooling their files would train on their validation rows: "
            "point data.source at one of them, or at a folder of plain parquet/arrow files"
        )


def _read_files(path: Path, files: Sequence[Path]) -> LocalFiles:
    """The files' rows: one `datasets` table per kind (parquet, arrow) when their schemas agree, else one per
    file. One load is much faster than one per file, but it fails on schema details that do not matter to us
    (a `path` typed null in one config and string in another, an extra text field) and without naming a file."""
    labels, parts = [], []
    for kind in ("parquet", "arrow"):
        group = [f for f in files if _kind(f) == kind]
        if not group:
            continue
        try:
            parts.append(_load_files(kind, group))
            labels.append(str(group[0]) if len(group) == 1 else f"one of {len(group)} {kind} files under {path}")
        except Exception as error:
            if len(group) == 1:
                raise
            logger.info("the %s files under %s do not load as one table (%s); reading them one by one", kind, path,
                        str(error.__cause__ or error)[:200])
            parts += [_load_files(kind, [f]) for f in group]
            labels += [str(f) for f in group]
    return LocalFiles(labels, [_undecoded(part) for part in parts])


def _kind(file: Path) -> str:
    return "arrow" if file.suffix == ".arrow" else "parquet"


def _load_files(kind: str, files: Sequence[Path]) -> Any:
    """One Dataset of the files; a failure of a single file names it (`datasets` often does not)."""
    try:
        return _datasets().load_dataset(kind, data_files=[str(f) for f in files], split="train")
    except Exception as error:
        if len(files) > 1:
            raise
        cause = error.__cause__ or error  # DatasetGenerationError hides what went wrong in its cause
        raise ValueError(f"cannot read {files[0]}: {type(cause).__name__}: {cause}"[:500]) from error


class LocalFiles:
    """The rows of several local tables as one sequence, table after table; a row that fails to read names
    its table's file(s) (`labels`)."""

    def __init__(self, labels: Sequence[str], parts: Sequence[Any], rows: np.ndarray | None = None) -> None:
        self.labels, self.parts = list(labels), list(parts)
        self._ends = np.cumsum([len(part) for part in self.parts])
        self.rows = np.arange(int(self._ends[-1])) if rows is None else rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> Any:
        part, local = self._part_of(index)
        try:
            return self.parts[part][local]
        except Exception as error:
            raise OSError(f"{self.labels[part]} row {local}: {type(error).__name__}: {error}") from error

    def locate(self, index: int) -> str:
        part, local = self._part_of(index)
        return f"{self.labels[part]} row {local}"

    def _part_of(self, index: int) -> tuple[int, int]:
        row = int(self.rows[index])
        part = int(np.searchsorted(self._ends, row, side="right"))
        return part, row - (int(self._ends[part - 1]) if part else 0)

    def select(self, indices: Sequence[int]) -> LocalFiles:
        return LocalFiles(self.labels, self.parts, self.rows[np.asarray(indices, dtype=np.int64)])


def _ratio_split(dataset: Any, split: str, val_ratio: float, seed: int) -> Any:
    """Deterministic train/val cut of a single-split dataset; "heldout" reads the val part."""
    order = np.random.default_rng([seed, 7919]).permutation(len(dataset))
    num_val = int(len(dataset) * val_ratio)
    if split != "train" and num_val == 0:
        raise ValueError(
            f"split {split!r} is empty: data.val_ratio {val_ratio} of {len(dataset)} rows is no whole row; raise "
            "data.val_ratio or provide a validation split"
        )
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

    Validation membership is a property of the row, not of its position: a row is held out when the stable
    hash of its content (`held_out`) falls below `val_ratio`, so about `val_ratio` of every config (stratified
    in expectation) and the same rows whatever the number of data files, ranks and workers. The original's
    per-config `take`/`skip` cannot be kept: once `datasets` splits a stream by node or worker, both apply to
    each piece of it, and validation and training then overlap or lose rows depending on the sharding.
    Training interleaves the configs (each shuffled with buffer 10,000 and seed + config index) with
    probabilities proportional to their sizes until all are exhausted, leaving out configs without rows (an
    interleave with a zero-probability part never ends); validation concatenates them. Each loader shard reads
    its piece of that stream and keeps the rows of its split; positions count every row of the piece, so
    resuming skips the same rows. The price: validation rows are spread over the whole stream, so reading N of
    them reads about N / val_ratio rows (the trainer reads its `val_batches` once). `load_config(name)` and
    `config_size(name)` can be replaced (tests use a local fake of the same schema).
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

    def sizes(self) -> dict[str, int]:
        """Rows per config (both splits), which weight the training interleave."""
        if self._sizes is None:
            self._sizes = {name: self._config_size(name) for name in self.configs}
        return self._sizes

    def _stream(self) -> Any:
        datasets = _datasets()
        if self.split != "train":
            return datasets.concatenate_datasets([_undecoded(self._load_config(name)) for name in self.configs])
        sizes = self.sizes()
        parts, weights = [], []
        for index, name in enumerate(self.configs):
            if sizes[name] <= 0 and sum(sizes.values()) > 0:
                continue
            stream = _undecoded(self._load_config(name))
            parts.append(stream.shuffle(seed=self.seed + index, buffer_size=10_000))
            weights.append(max(sizes[name], 0))
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
        want_val = self.split != "train"
        # .iter() rather than iter(): inside a DataLoader worker the latter re-shards by worker on its own.
        for position, batch in enumerate(stream.iter(batch_size=1), start=start):
            row = {key: values[0] for key, values in batch.items()}
            if held_out(row, self.val_ratio) == want_val:
                yield position, row


def held_out(row: Any, val_ratio: float) -> bool:
    """Whether a row belongs to validation: the stable hash of its content, as a fraction of 2^64, < val_ratio.

    The content is the texts and the image bytes (or paths), so identical rows share a split. The hash does
    not depend on the seed: changing the seed keeps the validation set (as the original's, which did not
    depend on it either), and a larger `val_ratio` holds out a superset of the rows of a smaller one.
    """
    if val_ratio <= 0:
        return False
    digest = hashlib.blake2b(digest_size=8)
    if isinstance(row, Mapping):
        digest.update(json.dumps(row.get("texts"), sort_keys=True, default=str).encode())
        images = row.get("images")
        for image in images if isinstance(images, (list, tuple)) else [images]:
            digest.update(b"\x00image\x00")
            digest.update(_image_identity(image))
    else:
        digest.update(repr(row).encode())
    return int.from_bytes(digest.digest(), "big") < val_ratio * 2**64


def _image_identity(image: Any) -> bytes:
    """The bytes that identify an undecoded image: its encoded bytes, else its path, else its pixels."""
    if isinstance(image, Mapping):
        if image.get("bytes") is not None:
            return bytes(image["bytes"])
        return str(image.get("path")).encode()
    if isinstance(image, (bytes, bytearray)):
        return bytes(image)
    if isinstance(image, Image.Image):
        return f"{image.mode}{image.size}".encode() + image.tobytes()
    return repr(image).encode()
