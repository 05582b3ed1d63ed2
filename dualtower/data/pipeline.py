"""One shard's pipeline: raw samples -> documents -> packing buffer -> PackedBatch, with an exact state.

The state after each batch is small: (epoch, next position in the shard stream, the packer clock, the keys and
arrival times of the documents still in the buffer, the counters). Restoring re-reads the buffered documents
by key and rebuilds them (document building is deterministic), so the batches that follow are identical.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from collections.abc import Iterator
from typing import Any

from dualtower.batch import PackedBatch
from dualtower.data.collate import collate
from dualtower.data.config import DataConfig
from dualtower.data.counters import LoaderStats
from dualtower.data.document import (
    Document,
    DocumentLimits,
    PreparedDocument,
    SampleError,
    check_placeholders,
    prepare_document,
)
from dualtower.data.images import ImageLoadError, ImageProcessor
from dualtower.data.packing import Item, Row, StreamPacker
from dualtower.data.sources import Source, UnreadableSample
from dualtower.model.config import ModelConfig

logger = logging.getLogger(__name__)
_LOUD_DROPS = 3  # per reason and worker, drops are logged as warnings this many times, then at debug level


class ShardPipeline:
    def __init__(
        self,
        source: Source,
        cfg: DataConfig,
        model_cfg: ModelConfig,
        tokenizer: Any,
        shard: int,
        num_shards: int,
        infinite: bool,
        state: dict[str, Any] | None = None,
    ) -> None:
        self.source, self.cfg, self.model_cfg, self.tokenizer = source, cfg, model_cfg, tokenizer
        self.shard, self.num_shards, self.infinite = shard, num_shards, infinite
        self.processor = ImageProcessor(model_cfg)
        self.limits = DocumentLimits(
            max_tokens=cfg.sample_token_limit,
            max_tiles=cfg.max_tiles_per_row,
            max_images=cfg.max_images_per_sample,
            min_image_side=cfg.min_image_side,
            allow_text_only=cfg.allow_text_only,
        )
        buffer_size = cfg.shuffle_buffer if cfg.pack else cfg.rows_per_batch
        self.packer: StreamPacker[PreparedDocument] = StreamPacker(
            cfg.max_tokens_per_row, cfg.max_tiles_per_row, buffer_size, cfg.max_wait_batches
        )
        self.stats = LoaderStats()
        self.epoch, self.position, self.exhausted = 0, 0, False
        self._logged: Counter = Counter()
        if state is not None:
            self._restore(state)

    def __iter__(self) -> Iterator[tuple[PackedBatch, dict[str, Any]]]:
        documents = self._documents()
        while True:
            while not self.packer.full and not self.exhausted:
                entry = next(documents, None)
                if entry is not None:
                    key, doc = entry
                    self.packer.add(Item(key, doc.num_tokens, doc.num_tiles, doc))
            rows = self._take_rows()
            if not rows:
                return
            batch = self._emit(rows)
            if batch is not None:
                yield batch, self.state()

    def _take_rows(self) -> list[Row[PreparedDocument]]:
        if self.cfg.pack:
            return self.packer.take_rows(self.cfg.rows_per_batch)
        count = self.cfg.rows_per_batch
        taken, self.packer.buffer = self.packer.buffer[:count], self.packer.buffer[count:]
        self.packer.batches += 1
        rows = []
        for item in taken:
            rows.append(Row())
            rows[-1].add(item)
        return rows

    def _emit(self, rows: list[Row[PreparedDocument]]) -> PackedBatch | None:
        """Make the tiles of the chosen documents (only now: the buffer holds none) and collate them."""
        docs, row_ids, kept_rows = [], [], []
        for row in rows:
            kept = [doc for doc in map(self._materialize, row.items) if doc is not None]
            if kept:
                row_ids += [len(kept_rows)] * len(kept)
                docs += kept
                kept_rows.append(kept)
        if not docs:
            return None
        capacity = self.cfg.max_tokens_per_row if self.cfg.pack else 0
        batch = collate(
            docs, self.model_cfg.image_token_id, row_ids, capacity, tokens_per_tile=self.model_cfg.image_tokens_per_tile
        )
        stats = self.stats
        stats.samples += len(docs)
        stats.batches += 1
        stats.rows += len(kept_rows)
        stats.tokens += batch.num_tokens
        stats.capacity += len(kept_rows) * (capacity or max(sum(d.num_tokens for d in row) for row in kept_rows))
        stats.tiles += batch.pixel_values.shape[0]
        stats.supervised += batch.num_supervised
        return batch

    def _materialize(self, item: Item[PreparedDocument]) -> Document | None:
        """The document with its tiles, checked as collate will check it: one bad document must not fail a batch.

        Its images were readable when it entered the buffer, but a file may have vanished or changed since.
        """
        try:
            doc = item.payload.materialize(self.processor)
            check_placeholders(doc.input_ids, doc.num_tiles, self.model_cfg)
            return doc
        except (ImageLoadError, OSError) as error:
            self._drop("bad_image", str(error), self.stats, item.key)
        except SampleError as error:
            self._drop(error.reason, str(error), self.stats, item.key)
        except Exception as error:  # as in _build: an input nobody foresaw must not stop training
            self._drop("error", f"{type(error).__name__}: {error}", self.stats, item.key)
        return None

    def state(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "exhausted": self.exhausted,
            "batches": self.packer.batches,
            "buffer": [[*item.key, item.born] for item in self.packer.buffer],
            "stats": self.stats.to_dict(),
        }

    def _documents(self) -> Iterator[tuple[tuple[int, int], PreparedDocument]]:
        """Documents of this shard from (epoch, position) on; the state advances as they are consumed."""
        while True:
            whole_epoch, produced = self.position == 0, False
            for position, sample in self.source.iterate(self.epoch, self.shard, self.num_shards, self.position):
                self.position = position + 1
                self.stats.read += 1
                doc = self._build(sample, self.stats, (self.epoch, position))
                if doc is not None:
                    produced = True
                    yield (self.epoch, position), doc
            if not self.infinite:
                self.exhausted = True
                return
            if whole_epoch and not produced:  # another epoch would spin forever; say what went wrong
                raise RuntimeError(
                    f"shard {self.shard} of {self.num_shards} has no usable sample in a whole epoch "
                    f"(dropped so far, by reason: {dict(self.stats.dropped) or 'none: the shard is empty'})"
                )
            self.epoch, self.position = self.epoch + 1, 0

    def _build(
        self, sample: Any, stats: LoaderStats | None, key: tuple[int, int] | None = None
    ) -> PreparedDocument | None:
        """The document, or None when dropped (counted in `stats` when given, and logged)."""
        events: Counter = Counter()  # merged only if the sample is kept: a dropped one counts as a drop alone
        try:
            if isinstance(sample, UnreadableSample):
                raise SampleError("unreadable", sample.error)
            doc = prepare_document(
                sample, self.processor, self.tokenizer, self.model_cfg, limits=self.limits, events=events
            )
        except SampleError as error:
            self._drop(error.reason, str(error), stats, key)
            return None
        except Exception as error:  # a bug or an input nobody foresaw must not stop training
            self._drop("error", f"{type(error).__name__}: {error}", stats, key)
            return None
        if stats is not None:
            stats.events.update(events)
        return doc

    def _drop(self, reason: str, detail: str, stats: LoaderStats | None, key: tuple[int, int] | None) -> None:
        if stats is None:
            return
        stats.dropped[reason] += 1
        self._logged[reason] += 1
        if self._logged[reason] > _LOUD_DROPS and not logger.isEnabledFor(logging.DEBUG):
            return
        level = logging.WARNING if self._logged[reason] <= _LOUD_DROPS else logging.DEBUG
        logger.log(level, "skipped a sample (shard %d, epoch %d, %s): %s", self.shard, self.epoch, self._where(key),
                   detail[:300])

    def _where(self, key: tuple[int, int] | None) -> str:
        """Where a sample lives (a file and row for local data), so that a bad row can be found and fixed."""
        if key is None:
            return "?"
        try:
            return self.source.locate(key[0], self.shard, self.num_shards, key[1])
        except Exception as error:  # a log line must not stop training
            return f"position {key[1]} ({type(error).__name__})"

    def _restore(self, state: dict[str, Any]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self.exhausted = bool(state["exhausted"])
        self.packer.batches = int(state["batches"])
        self.stats = LoaderStats.from_dict(state["stats"])
        wanted: dict[int, list[int]] = defaultdict(list)
        for epoch, position, _ in state["buffer"]:
            wanted[int(epoch)].append(int(position))
        samples = {
            (epoch, position): sample
            for epoch, positions in wanted.items()
            for position, sample in self.source.fetch(epoch, self.shard, self.num_shards, positions).items()
        }
        for epoch, position, born in state["buffer"]:
            doc = self._build(samples.get((int(epoch), int(position))), None)
            if doc is None:  # read before the save, so counted as read: count it as dropped too
                self.stats.dropped["gone_on_resume"] += 1
                logger.warning("resume: buffered sample (%d, %d) is gone; batches will differ", epoch, position)
                continue
            self.packer.buffer.append(Item((int(epoch), int(position)), doc.num_tokens, doc.num_tiles, doc, int(born)))
