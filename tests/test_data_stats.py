"""Loader counters (LoaderStats), the pipeline's bookkeeping of them, and `python -m dualtower.data.stats`."""

from __future__ import annotations

from collections import Counter
from dataclasses import fields
from types import SimpleNamespace

import pytest
import torch
from data_helpers import sample
from PIL import Image

from dualtower.data import stats as stats_cli
from dualtower.data.config import DataConfig
from dualtower.data.counters import LoaderStats
from dualtower.data.pipeline import ShardPipeline
from dualtower.data.sources import IndexedSource

pytest_plugins = ["data_fixtures"]

NUMBERS = ("read", "samples", "batches", "rows", "tokens", "capacity", "tiles", "supervised")


def test_merge_adds_every_counter_and_the_ratios_are_per_row() -> None:
    a = LoaderStats(**{name: i + 1 for i, name in enumerate(NUMBERS)}, dropped=Counter(bad=1))
    b = LoaderStats(**{name: 10 * (i + 1) for i, name in enumerate(NUMBERS)}, dropped=Counter(bad=2, odd=1))
    assert {f.name for f in fields(LoaderStats)} == {*NUMBERS, "dropped", "events"}
    a.merge(b)
    assert {name: getattr(a, name) for name in NUMBERS} == {name: 11 * (i + 1) for i, name in enumerate(NUMBERS)}
    assert a.dropped == Counter(bad=3, odd=1) and a.num_dropped == 4
    assert LoaderStats.from_dict(a.to_dict()) == a
    ratios = LoaderStats(batches=2, rows=4, tiles=10, tokens=300, capacity=400)
    assert ratios.tiles_per_row == 2.5 and ratios.packing_efficiency == 0.75
    assert LoaderStats().tiles_per_row == 0.0 and LoaderStats().packing_efficiency == 0.0


@pytest.mark.parametrize("pack", [True, False])
def test_pipeline_counters_match_the_batches_it_made(tokenizer, debug_cfg, pack: bool) -> None:
    images = [Image.new("RGB", (40 + 30 * (i % 3), 50), (i * 20, 90, 0)) for i in range(9)]
    raw = [sample([images[i]] if i % 4 else [], (f"question {i}?", "answer " * (1 + i % 5))) for i in range(9)]
    cfg = DataConfig(
        max_tokens_per_row=512,
        max_tiles_per_row=18,
        rows_per_batch=2,
        shuffle_buffer=6,
        num_workers=0,
        pack=pack,
        allow_text_only=True,
    )
    pipeline = ShardPipeline(IndexedSource(raw, 0, shuffle=False), cfg, debug_cfg, tokenizer, 0, 1, infinite=False)
    batches = [batch for batch, _ in pipeline]
    stats = pipeline.stats
    assert stats.samples == sum(b.num_docs for b in batches) == 9 and stats.batches == len(batches)
    assert stats.rows == sum(b.num_rows for b in batches)
    assert stats.tokens == sum(b.num_tokens for b in batches)
    assert stats.tiles == sum(b.pixel_values.shape[0] for b in batches) > stats.samples  # images span tiles
    assert stats.supervised == sum(b.num_supervised for b in batches) > 0
    if pack:
        assert stats.capacity == stats.rows * 512
    else:  # one document per row: each batch's rows are as long as its longest document
        docs = [(b.cu_prefix.diff() + b.cu_text.diff()).tolist() for b in batches]
        assert stats.capacity == sum(len(d) * max(d) for d in docs) and stats.rows == 9


def test_stats_cli_records_documents_and_rows_of_a_batch() -> None:
    # Three documents in two rows: (prefix, text) = (5, 3), (0, 4), (7, 2); tiles 1, 0, 2.
    batch = SimpleNamespace(
        cu_prefix=torch.tensor([0, 5, 5, 12]),
        cu_text=torch.tensor([0, 3, 7, 9]),
        tiles_per_doc=torch.tensor([1, 0, 2]),
        doc_row=torch.tensor([0, 0, 1]),
        num_rows=2,
    )
    seen = {"tokens": [], "prefix": [], "text": [], "tiles": [], "row_tiles": [], "row_docs": []}
    stats_cli._record(batch, seen)
    assert seen == {
        "tokens": [8, 4, 9],
        "prefix": [5, 0, 7],
        "text": [3, 4, 2],
        "tiles": [1, 0, 2],
        "row_tiles": [1, 2],
        "row_docs": [2, 1],
    }


def test_stats_cli_passes_every_option_to_the_loader(monkeypatch: pytest.MonkeyPatch) -> None:
    built = {}

    def build_loader(cfg, model_cfg, tokenizer, split):
        built.update(cfg=cfg, split=split)
        return _EmptyLoader()

    monkeypatch.setattr(stats_cli, "load_tokenizer", lambda tokenizer_id: None)
    monkeypatch.setattr(stats_cli, "build_loader", build_loader)
    options = "--split val --max-tokens 700 --max-tiles 9 --rows-per-batch 3 --shuffle-buffer 17 --num-workers 2"
    stats_cli.main(["--flavor", "debug", *options.split(), "--no-pack", "--seed", "5"])
    cfg = built["cfg"]
    assert built["split"] == "val"
    assert (
        cfg.max_tokens_per_row,
        cfg.max_tiles_per_row,
        cfg.rows_per_batch,
        cfg.shuffle_buffer,
        cfg.num_workers,
        cfg.pack,
        cfg.seed,
    ) == (700, 9, 3, 17, 2, False, 5)


class _EmptyLoader:
    stats = LoaderStats()

    def __iter__(self):
        return iter(())


@pytest.mark.parametrize("count", ["0", "-3"])
def test_stats_cli_refuses_a_sample_count_below_one(count: str, capsys: pytest.CaptureFixture) -> None:
    """It would read and report a first batch anyway, as if asked for it."""
    with pytest.raises(SystemExit) as exit_info:
        stats_cli.parse_args(["--num-samples", count])
    assert exit_info.value.code == 2 and f"--num-samples must be >= 1, got {count}" in capsys.readouterr().err
