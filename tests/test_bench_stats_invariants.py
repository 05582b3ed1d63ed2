"""Invariants of the benchmark support code that its other tests leave open (a mutation audit's findings).

- benchmarks/original_step.py, the training baseline: padding is invisible to the original's loss (center
  padding as P-OCR's collator makes it, left padding of the prefix as P-CAULDRON's), and the step itself clips
  at 1.0, zeroes the gradients, runs without autocast when told so, and does the original's wasted norm;
- synthetic_rows and bench_compare.compare_batch: the two layouts carry the same work;
- _kernel_timing.measure: ratio = baseline time / fast time, TFLOP/s and GB/s from the median;
- dualtower/data/stats.py: the report's arithmetic; dualtower/data/synthetic.py: the 80/10/10 split and the grid.
"""

from __future__ import annotations

import math
import sys
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from test_train_utils import one_thread, tiny_model  # noqa: F401

from dualtower.batch import IGNORE_INDEX
from dualtower.data import stats as stats_cli

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import _kernel_timing as kernel_timing  # noqa: E402
from bench_compare import compare_batch  # noqa: E402
from bench_train import Case  # noqa: E402
from original_step import OriginalBatch, original_loss, original_train_step, synthetic_rows  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


# -- the training baseline with padded rows --------------------------------------------------------------------


def _padded(batch: OriginalBatch, left: int, middle: int, pad_ids: torch.Tensor) -> OriginalBatch:
    """`batch` with `left` pads before the prefix and `middle` pads between prefix and text (the prefix right-padded,
    as the P-OCR collator does; the split moves past them). Pads: mask 0, target -100, ids taken from `pad_ids`."""
    rows, n_img = batch.input_ids.shape[0], batch.last_img_idx + 1
    ids = pad_ids.view(rows, left + middle)

    def insert(values: torch.Tensor, fill: torch.Tensor | int) -> torch.Tensor:
        pads = fill if isinstance(fill, torch.Tensor) else torch.full((rows, left + middle), fill)
        return torch.cat([pads[:, :left], values[:, :n_img], pads[:, left:], values[:, n_img:]], dim=1)

    return OriginalBatch(
        input_ids=insert(batch.input_ids, ids),
        attention_mask=insert(batch.attention_mask, 0),
        targets=insert(batch.targets, IGNORE_INDEX),
        images=batch.images,
        last_img_idx=batch.last_img_idx + left + middle,
    )


def _fp64_rows() -> tuple[Any, OriginalBatch]:
    model = tiny_model().double()  # tiny_config: 4 query heads over 2 K/V heads, 2 blocks
    original, _ = synthetic_rows(model, rows=2, tiles=1, text_len=5, seed=3)
    original.images = original.images.double()
    return model, original


@torch.no_grad()
def test_center_padding_is_invisible_to_the_baseline_loss() -> None:
    """P-OCR's center padding puts pads between prefix and text: the right tower's key-padding mask must hide
    them from every text row, so the padded batch has exactly the unpadded batch's loss, whatever the pad ids."""
    model, original = _fp64_rows()
    expected = original_loss(model, original)
    for pad_ids in (torch.full((6,), 2), torch.tensor([7, 311, 45, 999, 3, 128])):
        padded = _padded(original, left=0, middle=3, pad_ids=pad_ids)
        torch.testing.assert_close(original_loss(model, padded), expected, rtol=1e-10, atol=1e-12)


@torch.no_grad()
def test_left_padded_prefix_tokens_never_reach_the_baseline_loss() -> None:
    """P-CAULDRON left-pads: the original's left tower then gives arange positions to pads too (a quirk kept on
    purpose), but its key-padding mask keeps the pads' content out of every real row. Changing only the pad ids
    must not move the loss by a rounding error."""
    model, original = _fp64_rows()
    losses = [
        original_loss(model, _padded(original, left=2, middle=1, pad_ids=pad_ids))
        for pad_ids in (torch.full((6,), 2), torch.tensor([500, 17, 42, 801, 9, 260]))
    ]
    assert torch.isfinite(losses[0])
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-12, atol=1e-12)


def test_baseline_step_clips_at_one_zeroes_gradients_and_keeps_fp32_without_autocast() -> None:
    """original_train_step: the loss it returns is the forward's (no autocast when autocast_dtype is None), the
    update is the gradient clipped to global norm 1.0 (with SGD lr 1 the step IS the clipped gradient), and the
    gradients are gone afterwards (the original's zero_grad; a stale gradient would add to the next step's)."""
    model = tiny_model()
    original, _ = synthetic_rows(model, rows=2, tiles=1, text_len=6, seed=1)
    scale = 1e3  # a gradient norm far above 1, so the clip must act

    def loss_fn(m: Any, b: OriginalBatch) -> torch.Tensor:
        return scale * original_loss(m, b)

    expected = loss_fn(model, original)
    expected.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])) > 10  # the precondition
    model.zero_grad(set_to_none=True)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    loss = original_train_step(model, optimizer, original, None, loss_fn=loss_fn)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-6, atol=0)  # bf16 autocast: off by ~1e-3
    step = torch.cat([(b - p.detach()).flatten() for b, p in zip(before, model.parameters(), strict=True)])
    assert step.norm().item() == pytest.approx(1.0, rel=1e-4)
    assert all(p.grad is None for p in model.parameters())


def test_baseline_runs_every_norm_of_the_original(monkeypatch: pytest.MonkeyPatch) -> None:
    """The original computes the left LM's final norm and throws it away (reference_spec 2.3 item 4): the
    baseline must pay for it too. RMSNorms per forward: two per block in each tower plus each tower's final one.
    (The FLOP test cannot see a norm: it counts matmuls.)"""
    import original_step

    calls: list[int] = []
    rms = original_step._rms
    monkeypatch.setattr(original_step, "_rms", lambda *args: calls.append(1) or rms(*args))
    model = tiny_model()
    original, _ = synthetic_rows(model, rows=1, tiles=1, text_len=3, seed=0)
    with torch.no_grad():
        original_loss(model, original)
    blocks = model.cfg.lm.n_blocks
    assert len(calls) == 2 * (2 * blocks + 1)


# -- the benchmark batches -------------------------------------------------------------------------------------


def test_synthetic_rows_carry_the_same_work_in_both_layouts() -> None:
    """bench_train times the original on one layout and dualtower on the other: tokens, labels, images, the
    supervised count and the row capacity must describe the same data."""
    model = tiny_model()
    rows, tiles, text_len = 3, 2, 7
    original, packed = synthetic_rows(model, rows=rows, tiles=tiles, text_len=text_len, seed=5)
    n_img = original.last_img_idx + 1
    assert original.input_ids.shape == (rows, n_img + text_len)
    prefix = packed.prefix_ids.view(rows, -1)
    assert torch.equal(torch.cat([prefix, packed.text_ids.view(rows, -1)], 1), original.input_ids)
    assert prefix.shape[1] == n_img and int(original.input_ids[0, n_img - 1]) == model.cfg.image_token_id
    assert torch.equal(original.targets[:, n_img:].flatten(), packed.labels)
    assert (original.targets[:, :n_img] == IGNORE_INDEX).all()
    supervised = int((packed.labels != IGNORE_INDEX).sum())
    assert packed.num_supervised == supervised == int((original.targets != IGNORE_INDEX).sum()) == rows * text_len
    assert packed.row_capacity == n_img + text_len == int(packed.cu_prefix[1] + packed.cu_text[1])
    assert packed.pixel_values is original.images and original.images.shape[0] == rows * tiles
    assert packed.image_token_index.numel() == rows * tiles * model.cfg.image_tokens_per_tile
    assert len({tile.sum().item() for tile in original.images}) == rows * tiles  # every tile its own pixels


def test_compare_batch_keeps_every_tenth_text_label_on_cpu() -> None:
    """bench_compare's CPU case supervises 10% of the text, as the synthetic data does: the kept labels are
    positions 0, 10, 20, ... of the flattened text and num_supervised counts exactly them."""
    model = tiny_model()
    case = Case("t", "debug", "cpu", rows=2, tiles=1, text_len=23, trainable="all", compile=False, rounds=1)
    tokens, packed = compare_batch(model, case)
    original, full = synthetic_rows(model, case.rows, case.tiles, case.text_len)
    assert tokens == original.input_ids.numel()
    kept = (packed.labels != IGNORE_INDEX).nonzero().flatten()
    assert kept.tolist() == list(range(0, 2 * 23, 10))
    assert packed.num_supervised == kept.numel() == math.ceil(2 * 23 / 10)
    assert torch.equal(packed.labels[kept], full.labels[kept])


# -- _kernel_timing.measure's figures --------------------------------------------------------------------------


class _FakeBenchmark:
    """pytest-benchmark's fixture, reduced to what measure() uses, with a chosen median."""

    def __init__(self, median_s: float) -> None:
        self.enabled, self.extra_info, self.stats, self._median = True, {}, None, median_s

    def pedantic(self, fn: Any, rounds: int, warmup_rounds: int, iterations: int) -> None:
        for _ in range(rounds + warmup_rounds):
            fn()
        self.stats = SimpleNamespace(stats=SimpleNamespace(data=[self._median] * rounds, median=self._median))


def test_kernel_measure_ratio_is_baseline_time_over_fast_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 2 ms fast entry against an 8 ms baseline is 4x faster (ratio > 1: faster); 6 GFLOP in 2 ms is
    3 TFLOP/s and 4 MB in 2 ms is 2 GB/s."""
    monkeypatch.setattr(kernel_timing, "median_ms", lambda fn, rounds, warmup=0: 8.0)
    providers = {"fast": lambda: torch.ones(3), "slow": lambda: torch.ones(3)}
    benchmark = _FakeBenchmark(0.002)
    kernel_timing.measure(benchmark, ("audit", 1), providers, "fast", ["missing", "slow"], flops=6e9,
                          bytes_moved=4e6, fast="fast")  # fmt: skip
    info = benchmark.extra_info
    assert info["role"] == "fast" and info["baseline"] == "slow"  # the first available baseline
    assert info["ratio"] == pytest.approx(4.0) and info["ratio_vs_slow"] == pytest.approx(4.0)
    assert info["ms"] == pytest.approx(2.0)
    assert info["tflops"] == pytest.approx(3.0) and info["gb_s"] == pytest.approx(2.0)
    assert info["mfu"] is None  # no known peak on a CPU


# -- the data statistics -------------------------------------------------------------------------------------


def test_stats_report_counts_the_buffer_and_the_percentiles() -> None:
    """`buffered` is what was read but neither batched nor dropped; p99 is the 99th percentile."""
    args = SimpleNamespace(source="synthetic", split="train", flavor="debug", no_pack=False, max_tokens=64,
                           max_tiles=4)
    values = list(range(1, 101))
    seen = {"tokens": values, "prefix": values, "text": values, "tiles": [1] * 100, "row_tiles": [2] * 50,
            "row_docs": [2] * 50}
    loader_stats = SimpleNamespace(packing_efficiency=0.5, tiles_per_row=2.0, read=120, samples=100,
                                   num_dropped=7, dropped=Counter(too_long=7), events=Counter())
    summary = stats_cli.report(args, seen, 2.0, loader_stats)
    assert summary["buffered"] == 13 and summary["samples_per_s"] == 50.0
    dist = summary["tokens_per_doc"]
    assert dist["p99"] == pytest.approx(99.01) and dist["p90"] == pytest.approx(90.1)
    assert dist["min"] == 1 and dist["max"] == 100 and dist["mean"] == 50.5
    assert stats_cli.distribution([]) == {}


def test_distribution_of_one_value_has_every_quantile_equal_to_it() -> None:
    """The JSON line's keys, in order, for the smallest input the CLI can report (one document)."""
    assert stats_cli.distribution([7]) == {"mean": 7.0, "min": 7.0, "p10": 7.0, "p50": 7.0, "p90": 7.0,
                                           "p99": 7.0, "max": 7.0}


def test_synthetic_scene_fingerprints_split_80_10_10() -> None:
    """synthetic.py's documented split: 80% of fingerprints train, 10% val, 10% heldout. 6000 distinct scenes
    (deterministic hashes) land within 1.5 points of each share; a shifted bucket moves a share by 10."""
    from dualtower.data.synthetic import _split_of

    scenes = [[{"width": 100 + i % 97, "height": i, "shape": "circle", "count": i % 5}] for i in range(6000)]
    shares = Counter(_split_of(s) for s in scenes)
    assert set(shares) == {"train", "val", "heldout"}
    for split, share in {"train": 0.8, "val": 0.1, "heldout": 0.1}.items():
        assert abs(shares[split] / len(scenes) - share) < 0.015, shares


@pytest.mark.parametrize(("width", "height"), [(384, 128), (128, 384), (200, 180)])
def test_synthetic_shapes_sit_in_distinct_cells_with_one_more_along_a_long_side(width: int, height: int) -> None:
    """_Level.cells: several shapes sit in distinct cells of a cells x cells grid, one cell more along a side
    over 1.4x the other. Each centre stays inside its cell, so mapped onto that grid no two share a cell; a
    grid without the extra column (or row) puts centres where two of them meet in one cell."""
    import random

    from dualtower.data.synthetic import LEVELS, _grid_objects

    level = LEVELS["hard"]
    cols = level.cells + (width > height * 1.4)
    rows = level.cells + (height > width * 1.4)
    for seed in range(150):
        objects = _grid_objects(random.Random(seed), level, width, height, level.max_count)
        cells = {(int(cx // (width / cols)), int(cy // (height / rows))) for cx, cy, _ in objects}
        assert len(cells) == len(objects), (seed, objects)
