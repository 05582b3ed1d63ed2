"""Documents and collation: the dual-tower split, PackedBatch fields, and bad input (skipped or converted)."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from data_helpers import png_bytes, sample
from PIL import Image

from dualtower.batch import IGNORE_INDEX
from dualtower.data import chat
from dualtower.data.collate import CollateError, collate
from dualtower.data.document import (
    DROP_REASONS,
    Document,
    DocumentLimits,
    SampleError,
    document_from_prompt,
    document_from_sample,
)
from dualtower.data.images import ImageProcessor

pytest_plugins = ["data_fixtures"]


def build(sample_, tokenizer, cfg, **limits):
    events = Counter()
    doc = document_from_sample(
        sample_, ImageProcessor(cfg), tokenizer, cfg, limits=DocumentLimits(**limits), events=events
    )
    return doc, events


def test_document_split_and_fields(tokenizer, debug_cfg):
    image = Image.new("RGB", (300, 120), (0, 0, 255))
    doc, _ = build(sample([image], ("What color?", "blue"), ("Sure?", "yes")), tokenizer, debug_cfg)
    assert doc.grids == ((1, 2),) and doc.num_tiles == 3 and doc.tiles.shape == (3, 3, 128, 128)
    ids = doc.input_ids.tolist()
    assert ids[doc.prefix_len - 1] == 49152 and 49152 not in ids[doc.prefix_len :]
    assert doc.prefix_len == 3 + 3 * 17  # <|im_start|> user \n, then 3 x (tag + 16 placeholders)
    assert (doc.labels[: doc.prefix_len] == IGNORE_INDEX).all()
    assert doc.num_supervised == 2 * 3  # "blue" / "yes" + <|im_end|> + "\n" each
    assert doc.text_len == doc.num_tokens - doc.prefix_len


def test_prompt_document(tokenizer, debug_cfg):
    doc = document_from_prompt(
        [png_bytes(Image.new("RGB", (64, 64)))], "Describe.", ImageProcessor(debug_cfg), tokenizer, debug_cfg
    )
    assert doc.input_ids[-4:].tolist() == [1, 520, 9531, 198]
    assert doc.num_supervised == 0 and doc.num_tiles == 5


def random_document(rng: np.random.Generator, tiles: int, tokens_per_tile: int = 4) -> Document:
    """A document with `tiles` tiles: 3 header tokens, the placeholders, then text."""
    prefix = [1, 2, 3] + [49152] * (tiles * tokens_per_tile)
    prefix_len = len(prefix) if tiles else 0
    prefix = prefix if tiles else []
    text = rng.integers(10, 1000, int(rng.integers(1, 30))).tolist()
    ids = torch.tensor(prefix + text)
    labels = torch.where(torch.rand(len(ids)) < 0.5, ids, torch.tensor(IGNORE_INDEX))
    labels[:prefix_len] = IGNORE_INDEX
    return Document(ids, labels, torch.rand(tiles, 3, 8, 8), prefix_len)


def test_collate_offsets_positions_and_placeholders():
    rng = np.random.default_rng(0)
    docs = [random_document(rng, t) for t in (2, 0, 5, 1)]
    batch = collate(docs, 49152, rows=[0, 0, 1, 1], row_capacity=200, tokens_per_tile=4)
    assert batch.cu_prefix.dtype == batch.cu_text.dtype == torch.int32
    assert batch.cu_prefix.tolist() == [0, 11, 11, 34, 41]
    assert batch.tiles_per_doc.tolist() == [2, 0, 5, 1] and batch.pixel_values.shape[0] == 8
    assert batch.num_rows == 2 and batch.row_capacity == 200 and batch.doc_row.tolist() == [0, 0, 1, 1]
    for i, doc in enumerate(docs):
        p0, p1 = batch.cu_prefix[i : i + 2].tolist()
        t0, t1 = batch.cu_text[i : i + 2].tolist()
        assert torch.equal(torch.cat([batch.prefix_ids[p0:p1], batch.text_ids[t0:t1]]), doc.input_ids)
        assert batch.prefix_positions[p0:p1].tolist() == list(range(doc.prefix_len))
        assert batch.text_positions[t0:t1].tolist() == list(range(doc.prefix_len, doc.num_tokens))
        assert torch.equal(batch.labels[t0:t1], doc.labels[doc.prefix_len :])
    assert torch.equal(batch.prefix_ids[batch.image_token_index], torch.full((32,), 49152))
    assert batch.image_token_index.numel() == batch.pixel_values.shape[0] * 4
    assert batch.max_prefix_len == 23 and batch.max_text_len == max(d.text_len for d in docs)
    assert batch.num_supervised == sum(d.num_supervised for d in docs)
    unpacked = collate(docs, 49152)
    assert unpacked.num_rows == 4 and unpacked.row_capacity == 0


def test_collate_names_both_counts_on_mismatch():
    rng = np.random.default_rng(1)
    doc = random_document(rng, 2)
    broken = Document(doc.input_ids, doc.labels, doc.tiles[:1], doc.prefix_len)
    with pytest.raises(CollateError, match=r"8 image placeholder tokens but 1 tiles x 4 tokens per tile = 4"):
        collate([broken], 49152, tokens_per_tile=4)


# Bad input: (sample, expected drop reason or None when converted, expected event)
def _bad_inputs():
    ok = Image.new("RGB", (40, 30), (9, 9, 9))
    return [
        (sample([b"garbage"], ("q", "a")), "bad_image", None),
        (sample([png_bytes(ok)[:50]], ("q", "a")), "bad_image", None),
        (sample([Image.new("RGB", (1, 1))], ("q", "a")), "image_too_small", None),
        (sample([ok] * 11, ("q", "a")), "too_many_images", None),
        (sample([ok], ("q", "")), "no_turns", None),
        (sample([ok], ("q", None)), "no_turns", None),
        ({"images": [ok]}, "no_turns", None),
        ({"texts": [{"user": "q", "assistant": "a"}]}, "no_images", None),
        ({"images": None, "texts": [{"user": "q", "assistant": "a"}]}, "no_images", None),
        ({"images": [ok], "texts": "just a string"}, "bad_schema", None),
        ("not a dict", "bad_schema", None),
        (sample([Image.new("RGB", (2000, 16), (1, 2, 3))], ("q", "a")), None, None),  # huge aspect ratio: fine
        (sample([ok.convert("CMYK")], ("q", "a")), None, "image_converted"),
        (sample([ok.convert("RGBA")], ("q", "a")), None, "image_converted"),
        (sample([ok.convert("P")], ("q", "a")), None, "image_converted"),
        (sample([Image.new("I;16", (40, 30), 60000)], ("q", "a")), None, "image_converted"),
        (sample([png_bytes(ok.convert("L"))], ("q", "a")), None, "image_converted"),
        (sample([ok], ("q", "a"), ("empty answer", "  "), ("q2", "a2")), None, "turn_dropped"),
        ({"images": [ok], "texts": [{"assistant": "no question"}, "junk"]}, None, "turn_dropped"),
        (sample([ok], ("<|image|>q", "a")), None, "image_token_stripped"),
        (sample([ok], ("look <|ima<|image|>ge|> here", "a")), None, "image_token_stripped"),
    ]


@pytest.mark.parametrize(("raw", "reason", "event"), _bad_inputs())
def test_bad_input_is_skipped_or_converted(raw, reason, event, tokenizer, debug_cfg):
    limits = {"max_tokens": 512, "max_tiles": 18, "max_images": 10, "min_image_side": 4, "allow_text_only": False}
    if reason is not None:
        with pytest.raises(SampleError) as info:
            build(raw, tokenizer, debug_cfg, **limits)
        assert info.value.reason == reason
        return
    doc, events = build(raw, tokenizer, debug_cfg, **limits)
    assert doc.num_supervised > 0 and doc.tiles.shape[1:] == (3, 128, 128)
    assert int((doc.input_ids == debug_cfg.image_token_id).sum()) == doc.num_tiles * debug_cfg.image_tokens_per_tile
    if event is not None:
        assert events[event] >= 1


@pytest.mark.parametrize("images", [[Image.new("RGB", (64, 64))], []])
def test_placeholders_that_do_not_match_the_tiles_drop_the_sample(images, monkeypatch, tokenizer, debug_cfg):
    monkeypatch.setattr(chat, "strip_image_tokens", lambda text: text)  # as if a literal <|image|> got through
    with pytest.raises(SampleError) as info:
        build(sample(images, ("look <|image|> here", "ok")), tokenizer, debug_cfg)
    assert info.value.reason == "image_placeholders"


def test_too_many_tiles_is_skipped_before_any_pixel_work(tokenizer, cfg_135m):
    raw = sample([Image.new("RGB", (800, 800))] * 2, ("q", "a"))  # 2 x 17 tiles at 135m
    with pytest.raises(SampleError) as info:
        build(raw, tokenizer, cfg_135m, max_tiles=18)
    assert info.value.reason == "too_many_tiles"


def test_a_20000_token_sample_is_truncated(tokenizer, debug_cfg):
    long_answer = " ".join(["word"] * 20_000)
    raw = sample([Image.new("RGB", (64, 64))], ("short", "ok"), ("long?", long_answer), ("after", "x"))
    doc, events = build(raw, tokenizer, debug_cfg, max_tokens=1024)
    assert events["truncated"] == 1
    assert doc.num_tokens < 1024 and doc.input_ids.tolist()[-2:] == [2, 198]  # whole first turn kept
    only_long = sample([Image.new("RGB", (64, 64))], ("long?", long_answer))
    doc, _ = build(only_long, tokenizer, debug_cfg, max_tokens=1024)
    ids = doc.input_ids.tolist()
    answer_start = max(i for i in range(len(ids)) if ids[i : i + 4] == [1, 520, 9531, 198]) + 4
    assert doc.num_tokens == 1024 and doc.labels[-1] == IGNORE_INDEX
    assert doc.num_supervised == 1024 - answer_start  # every answer token after the first predicts the next
    with pytest.raises(SampleError) as info:
        build(only_long, tokenizer, debug_cfg, max_tokens=80)  # the image prefix alone is 88 tokens
    assert info.value.reason == "too_long"


def test_truncation_keeps_the_turns_that_fill_the_limit_exactly(tokenizer, debug_cfg):
    image = Image.new("RGB", (64, 64))
    turns = [("first?", "one"), ("second?", "two words"), ("third?", "three")]
    two, _ = build(sample([image], *turns[:2]), tokenizer, debug_cfg)
    three, _ = build(sample([image], *turns), tokenizer, debug_cfg)
    assert three.num_tokens > two.num_tokens
    doc, events = build(sample([image], *turns), tokenizer, debug_cfg, max_tokens=two.num_tokens)
    assert events["truncated"] == 1
    assert torch.equal(doc.input_ids, two.input_ids) and torch.equal(doc.labels, two.labels)
    one, _ = build(sample([image], *turns[:1]), tokenizer, debug_cfg)
    doc, _ = build(sample([image], *turns), tokenizer, debug_cfg, max_tokens=two.num_tokens - 1)
    assert torch.equal(doc.input_ids, one.input_ids)  # one token short of two turns: one turn


def test_drop_reasons_list_every_reason_the_pipeline_counts():
    """`data/dropped/<reason>` keys come from these literals: the documented list must be exactly them."""
    sources = "".join(path.read_text() for path in (Path(__file__).parents[1] / "dualtower" / "data").glob("*.py"))
    used = set(re.findall(r'(?:SampleError|_drop)\(\s*"(\w+)"', sources))
    assert used == set(DROP_REASONS)
