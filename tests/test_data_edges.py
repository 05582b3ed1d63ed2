"""Edge cases of the data pipeline: repaired or counted bad input, and resume where workers end unevenly."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace

import pytest
import torch
from data_helpers import sample
from PIL import Image

from dualtower.data.config import DataConfig, SyntheticConfig
from dualtower.data.document import DocumentLimits, prepare_document
from dualtower.data.images import ImageProcessor
from dualtower.data.loader import build_loader
from dualtower.data.sources import IndexedSource

pytest_plugins = ["data_fixtures"]


def prepare(raw, tokenizer, cfg):
    events = Counter()
    doc = prepare_document(raw, ImageProcessor(cfg), tokenizer, cfg, limits=DocumentLimits(max_tokens=512),
                           events=events)
    return doc, events


def test_a_missing_image_entry_is_counted(tokenizer, debug_cfg):
    """A None among the images is left out; the sample changes (one image fewer), so that must be counted."""
    image = Image.new("RGB", (64, 64), (9, 9, 9))
    doc, events = prepare(sample([image, None], ("q", "a")), tokenizer, debug_cfg)
    assert len(doc.grids) == 1 and events["image_missing"] == 1
    _, events = prepare(sample([image], ("q", "a")), tokenizer, debug_cfg)
    assert events["image_missing"] == 0


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("smile \ud83d\ude00", "smile \U0001f600"),  # a surrogate pair (UTF-16 code units from JSON) is joined
        ("lone \ud800 half", "lone \ufffd half"),  # a lone surrogate cannot be encoded: replacement character
        (b"caf\xc3\xa9 \xff", "caf\u00e9 \ufffd"),  # bytes are UTF-8 text, not "b'...'"
    ],
)
def test_text_that_is_not_valid_unicode_is_repaired_and_counted(answer, expected, tokenizer, debug_cfg):
    doc, events = prepare(sample([Image.new("RGB", (64, 64))], ("q \ud800", answer)), tokenizer, debug_cfg)
    _, clean_events = prepare(sample([Image.new("RGB", (64, 64))], ("q \ufffd", expected)), tokenizer, debug_cfg)
    text = tokenizer.decode(doc.input_ids[doc.prefix_len :].tolist())
    assert text == f"q \ufffd<|im_end|>\n<|im_start|>assistant\n{expected}<|im_end|>\n"
    assert events["text_repaired"] >= 1 and clean_events["text_repaired"] == 0


def _uneven_cfg() -> DataConfig:
    return DataConfig(
        max_tokens_per_row=512, max_tiles_per_row=18, rows_per_batch=1, pack=False, shuffle_buffer=4, num_workers=3,
        worker_start_method="fork", prefetch_factor=1, synthetic=SyntheticConfig(num_train=8, num_val=8, num_heldout=8),
    )


def _uneven_loader(tokenizer, debug_cfg, dry_shards=(1,)):
    """A finite split over 3 workers where the logical workers of `dry_shards` run out after one batch and the
    others go on.

    Shard k holds samples k, k + 3, k + 6, k + 9; every later sample of a dry shard is undecodable.
    """
    image = Image.new("RGB", (64, 64), (0, 120, 0))
    raw = [sample([image], (f"question {i}?", f"answer {i}")) for i in range(12)]
    for shard in dry_shards:
        for index in (shard + 3, shard + 6, shard + 9):
            raw[index] = sample([b"not an image"], ("q", "a"))
    loader = build_loader(_uneven_cfg(), debug_cfg, tokenizer, "val")
    loader.source = IndexedSource(raw, 0, shuffle=False)
    return loader


def _answers(tokenizer, batches) -> list[str]:
    return [tokenizer.decode(b.text_ids.tolist()).split("assistant\n")[-1].split("<")[0] for b in batches]


@pytest.mark.filterwarnings("ignore:This DataLoader will create 3 worker processes")  # 3 workers on 2 cores
def test_resume_of_a_finite_pass_after_a_worker_ran_out(tokenizer, debug_cfg):
    """The torch DataLoader hands batches round-robin over the workers that still have data; once worker 1 is
    done the order is 0, 2, 0, 2. A resume must continue with the worker whose turn it is (not `delivered % W`)."""
    torch.set_num_threads(1)
    whole = _answers(tokenizer, list(_uneven_loader(tokenizer, debug_cfg)))
    assert whole == [f"answer {i}" for i in (0, 1, 2, 3, 5, 6, 8, 9, 11)]
    for cut in range(1, len(whole)):
        first = _uneven_loader(tokenizer, debug_cfg)
        head = []
        for batch in first:
            head.append(batch)
            if len(head) == cut:
                break
        resumed = _uneven_loader(tokenizer, debug_cfg)
        resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
        assert _answers(tokenizer, head) + _answers(tokenizer, list(resumed)) == whole, cut


@pytest.mark.filterwarnings("ignore:This DataLoader will create 3 worker processes")  # 3 workers on 2 cores
def test_a_second_pass_starts_again_from_the_first_worker(tokenizer, debug_cfg):
    """Only worker 0 has data at the end, so the pass ends on its turn (the next would be worker 1). A second
    pass over the same loader starts from scratch: its order must begin with worker 0 again, not worker 1."""
    torch.set_num_threads(1)
    loader = _uneven_loader(tokenizer, debug_cfg, dry_shards=(1, 2))
    first = _answers(tokenizer, list(loader))
    assert first == [f"answer {i}" for i in (0, 1, 2, 3, 6, 9)]
    assert _answers(tokenizer, list(loader)) == first


def test_state_of_another_rank_is_refused(tokenizer, debug_cfg):
    cfg = replace(_uneven_cfg(), num_workers=0, synthetic=SyntheticConfig(num_train=8, num_val=8, num_heldout=8))
    loader = build_loader(cfg, debug_cfg, tokenizer, "val", rank=0, world_size=2)
    next(iter(loader))
    with pytest.raises(ValueError, match="'rank'"):
        build_loader(cfg, debug_cfg, tokenizer, "val", rank=1, world_size=2).load_state_dict(loader.state_dict())


def test_an_answer_that_is_only_image_placeholders_is_an_empty_turn(tokenizer, debug_cfg):
    """Stripping literal `<|image|>` leaves nothing: that turn must be dropped like any empty answer, not teach
    the model to answer with a bare `<|im_end|>`."""
    image = Image.new("RGB", (64, 64))
    doc, events = prepare(sample([image], ("q", " <|image|> "), ("q2", "a2")), tokenizer, debug_cfg)
    plain, _ = prepare(sample([image], ("q2", "a2")), tokenizer, debug_cfg)
    assert events["turn_dropped"] == 1 and torch.equal(doc.input_ids, plain.input_ids)


def test_turns_stored_as_columns_are_read_as_turns(tokenizer, debug_cfg):
    """`datasets.Sequence({"user", "assistant"})` hands `texts` out as a dict of lists: the same turns."""
    import datasets

    features = datasets.Features({"texts": datasets.Sequence({"user": datasets.Value("string"),
                                                              "assistant": datasets.Value("string")})})
    columns = datasets.Dataset.from_dict({"texts": [{"user": ["q1", "q2"], "assistant": ["a1", "a2"]}]},
                                         features=features)[0]["texts"]
    assert columns == {"user": ["q1", "q2"], "assistant": ["a1", "a2"]}
    image = Image.new("RGB", (64, 64))
    doc, _ = prepare({"images": [image], "texts": columns}, tokenizer, debug_cfg)
    rows, _ = prepare(sample([image], ("q1", "a1"), ("q2", "a2")), tokenizer, debug_cfg)
    assert torch.equal(doc.input_ids, rows.input_ids) and torch.equal(doc.labels, rows.labels)
    single, _ = prepare({"images": [image], "texts": {"user": "q1", "assistant": "a1"}}, tokenizer, debug_cfg)
    assert torch.equal(single.input_ids, prepare(sample([image], ("q1", "a1")), tokenizer, debug_cfg)[0].input_ids)


def test_an_epoch_without_usable_samples_names_the_drop_reasons(tokenizer, debug_cfg):
    from dualtower.data.pipeline import ShardPipeline

    raw = [sample([Image.new("RGB", (64, 64))] * 3, ("q", "a")) for _ in range(4)]  # 15 tiles each
    cfg = replace(_uneven_cfg(), num_workers=0, max_tiles_per_row=8)
    pipeline = ShardPipeline(IndexedSource(raw, 0, False), cfg, debug_cfg, tokenizer, 0, 1, infinite=True)
    with pytest.raises(RuntimeError, match=r"no usable sample.*too_many_tiles.*4"):
        next(iter(pipeline))
