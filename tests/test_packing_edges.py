"""Packing and collation re-derived independently on random documents of awkward lengths.

The oracle here never reads the collator's offsets to check the collator: each document is rebuilt from the
packed tensors by walking lengths it knows (its own prefix, text and tiles), and compared with the document
it came from.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import replace

import pytest
import torch
from PIL import Image

from dualtower.batch import IGNORE_INDEX, PackedBatch
from dualtower.data.collate import CollateError, collate
from dualtower.data.config import DataConfig, SyntheticConfig
from dualtower.data.document import Document
from dualtower.data.packing import Item, StreamPacker
from dualtower.data.pipeline import ShardPipeline
from dualtower.data.sources import IndexedSource
from dualtower.data.synthetic import SyntheticSource

pytest_plugins = ["data_fixtures"]

IMAGE, PER_TILE = 7, 3  # placeholder id and placeholders per tile of the hand-made documents


def random_document(rng: random.Random, serial: int) -> Document:
    """A document with a known identity: every tile is filled with its global serial, ids are random non-image."""
    tiles = rng.choice([0, 0, 1, 2, 5])
    kind = rng.choice(["one_token", "unsupervised", "plain"])
    text_len = 1 if kind == "one_token" else rng.randint(1, 23)
    if tiles:
        head = [rng.randint(10, 99) for _ in range(rng.randint(0, 3))]
        body = [tok for _ in range(tiles) for tok in [rng.randint(10, 99)] + [IMAGE] * PER_TILE]
        prefix = head + body  # ends with a placeholder: the split point is the last one
    else:
        prefix = []
    text = [rng.randint(10, 99) for _ in range(text_len)]
    ids = prefix + text
    labels = [IGNORE_INDEX] * len(ids)
    if kind != "unsupervised":
        for t in range(len(prefix), len(ids) - 1):
            if rng.random() < 0.6:
                labels[t] = ids[t + 1]
    pixels = torch.arange(tiles, dtype=torch.float32).add(serial * 100).view(-1, 1, 1, 1).expand(-1, 3, 2, 2)
    return Document(torch.tensor(ids), torch.tensor(labels), pixels.contiguous(), len(prefix))


def unpack(batch: PackedBatch, lengths: list[tuple[int, int, int]]) -> list[tuple]:
    """Per document (prefix ids, text ids, labels, prefix pos, text pos, tiles), walked with known lengths."""
    out, p, t, n = [], 0, 0, 0
    for prefix_len, text_len, tiles in lengths:
        out.append((
            batch.prefix_ids[p : p + prefix_len].tolist(), batch.text_ids[t : t + text_len].tolist(),
            batch.labels[t : t + text_len].tolist(), batch.prefix_positions[p : p + prefix_len].tolist(),
            batch.text_positions[t : t + text_len].tolist(), batch.pixel_values[n : n + tiles].clone(),
        ))
        p, t, n = p + prefix_len, t + text_len, n + tiles
    assert (p, t, n) == (batch.prefix_ids.numel(), batch.text_ids.numel(), batch.pixel_values.shape[0])
    return out


@pytest.mark.parametrize("rows", [[1, 1], [0, 2], [0, 1, 0], [0]], ids=["from-1", "skips-a-row", "back", "count"])
def test_collate_refuses_rows_that_skip_reorder_or_miss_documents(rows):
    """A skipped row would count as an empty row of `row_capacity` in the packing efficiency."""
    rng = random.Random(0)
    docs = [random_document(rng, serial) for serial in range(len(rows) if len(rows) > 1 else 2)]
    with pytest.raises(CollateError, match=r"one per document, 0, 1, \.\.\. in document order"):
        collate(docs, IMAGE, rows, row_capacity=64, tokens_per_tile=PER_TILE)


@pytest.mark.parametrize("seed", range(8))
def test_collate_rederived_on_random_documents(seed):
    rng = random.Random(seed)
    docs = [random_document(rng, serial) for serial in range(rng.randint(1, 14))]
    rows = list(itertools.accumulate(rng.randint(0, 1) for _ in docs[1:]))
    rows.insert(0, 0)  # rows 0, 1, ... with 1-14 documents each
    batch = collate(docs, IMAGE, rows, row_capacity=64, tokens_per_tile=PER_TILE)
    lengths = [(d.prefix_len, d.num_tokens - d.prefix_len, d.num_tiles) for d in docs]
    cu_p = [0] + [sum(p for p, _, _ in lengths[: i + 1]) for i in range(len(docs))]
    cu_t = [0] + [sum(t for _, t, _ in lengths[: i + 1]) for i in range(len(docs))]
    assert batch.cu_prefix.tolist() == cu_p and batch.cu_text.tolist() == cu_t
    assert batch.cu_prefix.dtype == batch.cu_text.dtype == torch.int32
    assert batch.max_prefix_len == max(p for p, _, _ in lengths)
    assert batch.max_text_len == max(t for _, t, _ in lengths)
    assert batch.tiles_per_doc.tolist() == [n for _, _, n in lengths]
    assert batch.doc_row.tolist() == rows and batch.num_rows == rows[-1] + 1 and batch.num_docs == len(docs)
    for doc, (pre, text, labels, ppos, tpos, tiles) in zip(docs, unpack(batch, lengths), strict=True):
        ids, p = doc.input_ids.tolist(), doc.prefix_len
        assert pre == ids[:p] and text == ids[p:]
        assert ppos == list(range(p)) and tpos == list(range(p, len(ids)))  # restart per document
        assert labels == doc.labels[p:].tolist()
        assert labels[-1] == IGNORE_INDEX  # the shift never reaches the next document's first token
        for t, label in enumerate(labels[:-1]):
            assert label in (IGNORE_INDEX, text[t + 1])
        assert torch.equal(tiles, doc.tiles)
    expected_supervised = sum(int((d.labels[d.prefix_len :] != IGNORE_INDEX).sum()) for d in docs)
    assert batch.num_supervised == expected_supervised == int((batch.labels != IGNORE_INDEX).sum())
    # Placeholder k of the batch is filled by tile k // PER_TILE: tiles follow the placeholders' order.
    index = batch.image_token_index
    assert index.numel() == batch.pixel_values.shape[0] * PER_TILE
    assert bool((batch.prefix_ids[index] == IMAGE).all()) and bool((index[1:] > index[:-1]).all())
    owner = torch.searchsorted(batch.cu_prefix[1:].long(), index, right=True)  # document of each placeholder
    tile_owner = torch.repeat_interleave(torch.arange(len(docs)), batch.tiles_per_doc)
    assert torch.equal(owner, tile_owner.repeat_interleave(PER_TILE))


def test_packed_equals_unpacked_in_content():
    rng = random.Random(11)
    docs = [random_document(rng, serial) for serial in range(9)]
    packed = collate(docs, IMAGE, [0, 0, 0, 1, 1, 2, 2, 2, 2], row_capacity=128, tokens_per_tile=PER_TILE)
    plain = collate(docs, IMAGE, tokens_per_tile=PER_TILE)
    assert plain.num_rows == len(docs) and plain.doc_row.tolist() == list(range(len(docs)))
    for name in ("prefix_ids", "text_ids", "labels", "cu_prefix", "cu_text", "prefix_positions", "text_positions",
                 "pixel_values", "tiles_per_doc", "image_token_index"):
        assert torch.equal(getattr(packed, name), getattr(plain, name)), name
    assert (packed.num_supervised, packed.max_text_len) == (plain.num_supervised, plain.max_text_len)


def test_text_only_batch_has_empty_prefix_and_no_tiles():
    docs = [Document(torch.tensor([11]), torch.tensor([IGNORE_INDEX]), torch.empty(0, 3, 2, 2), 0),
            Document(torch.tensor([12, 13]), torch.tensor([13, IGNORE_INDEX]), torch.empty(0, 3, 2, 2), 0)]
    batch = collate(docs, IMAGE, [0, 0], tokens_per_tile=PER_TILE)
    assert batch.prefix_ids.numel() == 0 and batch.max_prefix_len == 0 and batch.cu_prefix.tolist() == [0, 0, 0]
    assert batch.cu_text.tolist() == [0, 1, 3] and batch.text_positions.tolist() == [0, 0, 1]
    assert batch.labels.tolist() == [IGNORE_INDEX, 13, IGNORE_INDEX] and batch.num_supervised == 1
    assert batch.pixel_values.shape == (0, 3, 2, 2) and batch.image_token_index.numel() == 0


@pytest.mark.parametrize("seed", range(10))
def test_stream_packer_rederived_on_awkward_lengths(seed):
    """Every item exactly once, none split, budgets kept, rows non-empty; exact-fit and 1-token items included."""
    rng = random.Random(100 + seed)
    max_tokens, max_tiles = rng.choice([(17, 3), (97, 5), (4096, 64)])
    pool = [(max_tokens, 0), (max_tokens, max_tiles), (1, 0), (1, max_tiles), (max_tokens // 2 + 1, 1)]
    lengths = [rng.choice(pool) if rng.random() < 0.3 else (rng.randint(1, max_tokens), rng.randint(0, max_tiles))
               for _ in range(rng.randint(1, 120))]
    buffer, rows_per_batch = rng.randint(1, 30), rng.randint(1, 4)
    packer: StreamPacker[int] = StreamPacker(max_tokens, max_tiles, buffer, rng.randint(1, 5))
    seen: list[int] = []
    for index, (tokens, tiles) in enumerate(lengths):
        packer.add(Item((0, index), tokens, tiles, payload=index))
        while packer.full:
            batch = packer.take_rows(rows_per_batch)
            assert 1 <= len(batch) <= rows_per_batch
            for row in batch:
                assert row.items and row.tokens <= max_tokens and row.tiles <= max_tiles
                assert (row.tokens, row.tiles) == (sum(lengths[i.payload][0] for i in row.items),
                                                   sum(lengths[i.payload][1] for i in row.items))
                seen += [item.payload for item in row.items]
    while packer.buffer:
        seen += [item.payload for row in packer.take_rows(rows_per_batch) for item in row.items]
    assert sorted(seen) == list(range(len(lengths)))


def test_packer_refuses_an_item_longer_than_a_row():
    packer: StreamPacker[None] = StreamPacker(10, 2, buffer_size=4, max_wait=2)
    with pytest.raises(ValueError, match="exceeds a row"):
        packer.add(Item((0, 0), 11, 0))
    assert not packer.buffer


def _pipeline(tokenizer, debug_cfg, seed: int = 0, **overrides) -> ShardPipeline:
    cfg = DataConfig(max_tokens_per_row=300, max_tiles_per_row=6, rows_per_batch=3, shuffle_buffer=7,
                     num_workers=0, max_wait_batches=2, seed=seed,
                     synthetic=SyntheticConfig(num_train=30, num_val=4, num_heldout=4))
    cfg = replace(cfg, **overrides)
    source = IndexedSource(SyntheticSource(0, "train", 30), seed, shuffle=True)
    return ShardPipeline(source, cfg, debug_cfg, tokenizer, 0, 1, infinite=False)


def test_pipeline_counters_and_budgets_match_the_batches(tokenizer, debug_cfg):
    pipeline = _pipeline(tokenizer, debug_cfg)
    batches = [batch for batch, _ in pipeline]
    stats = pipeline.stats
    rows = tokens = tiles = supervised = docs = 0
    for batch in batches:
        row_tokens = torch.zeros(batch.num_rows, dtype=torch.int64)
        row_tiles = torch.zeros(batch.num_rows, dtype=torch.int64)
        lengths = batch.cu_prefix.diff() + batch.cu_text.diff()
        row_tokens.index_add_(0, batch.doc_row, lengths.long())
        row_tiles.index_add_(0, batch.doc_row, batch.tiles_per_doc)
        assert int(row_tokens.max()) <= 300 and int(row_tiles.max()) <= 6 and int(row_tokens.min()) > 0
        rows, tokens, docs = rows + batch.num_rows, tokens + batch.num_tokens, docs + batch.num_docs
        tiles, supervised = tiles + batch.pixel_values.shape[0], supervised + batch.num_supervised
    assert (stats.batches, stats.rows, stats.tokens, stats.tiles) == (len(batches), rows, tokens, tiles)
    assert (stats.samples, stats.supervised, stats.capacity) == (docs, supervised, rows * 300)
    assert stats.read == 30 == stats.samples + stats.num_dropped  # nothing lost: every read is kept or counted


def test_pipeline_is_deterministic_from_the_seed(tokenizer, debug_cfg):
    def texts(seed: int) -> list[list[int]]:
        return [b.text_ids.tolist() for b, _ in _pipeline(tokenizer, debug_cfg, seed)]

    assert texts(3) == texts(3)
    assert texts(3) != texts(4)


def test_unpacked_pipeline_batches_are_one_document_per_row(tokenizer, debug_cfg):
    pipeline = _pipeline(tokenizer, debug_cfg, pack=False)
    batches = [batch for batch, _ in pipeline]
    assert sum(b.num_docs for b in batches) == pipeline.stats.samples == pipeline.stats.rows
    for batch in batches:
        assert batch.doc_row.tolist() == list(range(batch.num_docs)) and batch.row_capacity == 0
    longest = [int((b.cu_prefix.diff() + b.cu_text.diff()).max()) for b in batches]
    assert pipeline.stats.capacity == sum(n * b.num_docs for n, b in zip(longest, batches, strict=True))


def _pipeline_documents(pipeline: ShardPipeline) -> list[tuple]:
    """Every document of a pass: its prefix, text, labels, text positions and pixel sum, walked by offsets."""
    out = []
    for batch, _ in pipeline:
        tile = 0
        for i in range(batch.num_docs):
            p0, p1, t0, t1 = *batch.cu_prefix[i : i + 2].tolist(), *batch.cu_text[i : i + 2].tolist()
            n = int(batch.tiles_per_doc[i])
            out.append((batch.prefix_ids[p0:p1].tolist(), batch.text_ids[t0:t1].tolist(),
                        batch.labels[t0:t1].tolist(), batch.text_positions[t0:t1].tolist(),
                        round(float(batch.pixel_values[tile : tile + n].double().sum()), 4)))
            tile += n
    return out


def test_packed_and_unpacked_passes_hold_the_same_documents(tokenizer, debug_cfg):
    packed = _pipeline_documents(_pipeline(tokenizer, debug_cfg, seed=1))
    plain = _pipeline_documents(_pipeline(tokenizer, debug_cfg, seed=1, pack=False))
    assert len(packed) == len(plain) == 30 and sorted(packed) == sorted(plain)


def test_an_over_long_sample_is_truncated_to_the_row_and_counted(tokenizer, debug_cfg):
    image = Image.new("RGB", (64, 48), (200, 0, 0))
    raw = [{"images": [image], "texts": [{"user": "q", "assistant": " ".join(["word"] * 900)}]},
           {"images": [image], "texts": [{"user": "short?", "assistant": "yes"}]}]
    cfg = DataConfig(max_tokens_per_row=256, max_tiles_per_row=18, rows_per_batch=2, shuffle_buffer=2, num_workers=0)
    pipeline = ShardPipeline(IndexedSource(raw, 0, False), cfg, debug_cfg, tokenizer, 0, 1, infinite=False)
    batches = [batch for batch, _ in pipeline]
    assert sum(b.num_docs for b in batches) == 2 and pipeline.stats.events["truncated"] == 1
    lengths = [int(n) for b in batches for n in b.cu_prefix.diff() + b.cu_text.diff()]
    assert max(lengths) == 256  # cut at the row budget, kept


def _mixed_source() -> IndexedSource:
    """Synthetic samples with a few bad ones in between (dropped at build time)."""
    synthetic = SyntheticSource(0, "train", 26)
    raw = [synthetic[i] for i in range(26)]
    raw[4] = {"images": [b"not an image"], "texts": [{"user": "q", "assistant": "a"}]}
    raw[13] = {"images": [Image.new("RGB", (64, 48))]}
    return IndexedSource(raw, 5, shuffle=True)


@pytest.mark.parametrize("pack", [True, False])
def test_resume_at_every_batch_boundary_yields_the_rest(pack, tokenizer, debug_cfg):
    cfg = DataConfig(max_tokens_per_row=300, max_tiles_per_row=6, rows_per_batch=2, shuffle_buffer=5,
                     num_workers=0, max_wait_batches=2, pack=pack)
    whole = [(b.text_ids.tolist(), b.doc_row.tolist(), state)
             for b, state in ShardPipeline(_mixed_source(), cfg, debug_cfg, tokenizer, 0, 1, infinite=False)]
    assert len(whole) >= 4
    for k in range(len(whole)):
        resumed = ShardPipeline(_mixed_source(), cfg, debug_cfg, tokenizer, 0, 1, infinite=False, state=whole[k][2])
        rest = [(b.text_ids.tolist(), b.doc_row.tolist(), state) for b, state in resumed]
        assert [r[:2] for r in rest] == [w[:2] for w in whole[k + 1 :]], k
        if rest:
            assert rest[-1][2]["stats"] == whole[-1][2]["stats"]


def test_events_count_only_the_samples_that_were_kept(tokenizer, debug_cfg):
    """A sample converted or truncated and then dropped is a drop, not a conversion (LoaderStats.events)."""
    cmyk = Image.new("RGB", (64, 48), (0, 90, 0)).convert("CMYK")
    raw = [
        {"images": [cmyk] * 3, "texts": [{"user": "q", "assistant": "a"}]},  # converted, then too many images
        {"images": [cmyk], "texts": [{"user": " ".join(["w"] * 400), "assistant": "a"}]},  # cut inside the question
        {"images": [cmyk], "texts": [{"user": "kept?", "assistant": "yes"}]},  # converted and kept
    ]
    cfg = DataConfig(max_tokens_per_row=200, max_tiles_per_row=18, rows_per_batch=2, shuffle_buffer=3,
                     num_workers=0, max_images_per_sample=2)
    pipeline = ShardPipeline(IndexedSource(raw, 0, False), cfg, debug_cfg, tokenizer, 0, 1, infinite=False)
    assert sum(batch.num_docs for batch, _ in pipeline) == 1
    stats = pipeline.stats
    assert dict(stats.dropped) == {"too_many_images": 1, "no_supervised_tokens": 1}
    assert dict(stats.events) == {"image_converted": 1}
