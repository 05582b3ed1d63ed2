"""Invariants of the data pipeline and the trainer that a plausible one-token / one-count bug would break
(each test was written against a mutation of the library that the rest of the suite let through)."""

from __future__ import annotations

import itertools
import math
from typing import Any

import pytest
import torch
from test_train_utils import build_trainer, default_job, make_batches, one_thread, read_metrics, tiny_model  # noqa: F401

pytest_plugins = ["data_fixtures"]
pytestmark = pytest.mark.usefixtures("one_thread")

LAYOUT = [(1, 2, 5), (0, 0, 3)]


@pytest.mark.parametrize("implementation", ["foreach", "fused"])
def test_a_nonfinite_loss_with_finite_gradients_is_left_out_of_the_logged_loss(tmp_path, implementation: str) -> None:
    """A loss that overflows (inf/NaN) while the gradients stay finite (here: a NaN added as a constant, which
    has no gradient) must not poison the window: the module contract counts a step with a non-finite loss OR
    gradient norm neither in the logged loss nor in its supervised tokens. Checking only the norm logs NaN."""
    model = tiny_model()
    batches = make_batches(model, [LAYOUT] * 3, seed=1)
    cfg = default_job()
    cfg.optim.implementation = implementation
    cfg.training.steps = 3
    cfg.metrics.log_every = 3  # one window holding the poisoned step and two clean ones
    trainer = build_trainer(model, batches, tmp_path, cfg)
    real_loss = model.loss_sum
    nan = torch.tensor(math.nan)
    model.loss_sum = lambda batch: real_loss(batch) + (nan if trainer.step + 1 == 2 else 0.0)
    trainer.train()
    (record,) = [r for r in read_metrics(tmp_path) if "loss" in r]
    assert record["step"] == 3
    assert math.isfinite(record["grad_norm"])
    assert record["loss"] is not None and math.isfinite(record["loss"])
    # Only the supervised tokens of steps 1 and 3 count.
    assert record["supervised_tokens"] == batches[0].num_supervised + batches[2].num_supervised


def test_warmup_ratio_rounds_to_the_nearest_step() -> None:
    """schedule.warmup_steps = -1 means round(warmup_ratio * steps) (config.py): truncating instead loses a step
    whenever the float product lands just below an integer (0.29 * 100 = 28.999999999999996) or has a large
    fraction (0.027 * 100 = 2.7); the suite's ratios (0.03 of 1000 or 50,000) give exact integers either way."""
    from dualtower.training.schedule import warmup_steps_for

    assert 0.29 * 100 < 29  # the float product the truncation would get wrong
    assert warmup_steps_for(100, -1, 0.29) == 29
    assert warmup_steps_for(100, -1, 0.027) == 3
    assert warmup_steps_for(100, -1, 0.022) == 2


def test_changed_eps_and_lr_take_effect_on_resume_and_are_what_the_scheduler_reports(tmp_path) -> None:
    """Every optimizer hyperparameter comes from the config on resume (checkpoint.py), eps included: the
    checkpoint's param groups carry the old eps, and a load that forgets to put the config's back keeps it.
    The scheduler's get_last_lr() must report the LRs the groups now hold, not the checkpoint's."""
    batches = make_batches(tiny_model(), [LAYOUT], seed=1)
    cfg = default_job()
    cfg.training.steps = 1
    cfg.schedule.warmup_steps = 3  # the resumed position (step 1 of 3) shows in the LR
    cfg.optim.eps = 1e-8
    cfg.checkpoint.enabled, cfg.checkpoint.every = True, 1
    build_trainer(tiny_model(), batches, tmp_path, cfg).train()
    cfg.training.steps = 2
    cfg.optim.eps = 1e-5
    cfg.optim.lr_left = 5e-4
    resumed = build_trainer(tiny_model(), batches, tmp_path, cfg)
    assert resumed._resume() and resumed.step == 1
    groups = resumed.optimizer.param_groups
    assert [group["eps"] for group in groups] == [1e-5] * len(groups)
    expected = {g["name"]: (5e-4 if g["name"].startswith("left") else 1e-3) * 2 / 3 for g in groups}
    assert {g["name"]: g["lr"] for g in groups} == pytest.approx(expected)
    assert resumed.parts.scheduler.get_last_lr() == pytest.approx([g["lr"] for g in groups])


def test_pack_bfd_keeps_the_tile_budget_when_tokens_still_fit() -> None:
    """The best-fit baseline (the packing efficiency it is compared against) must respect both budgets: two
    tile-heavy documents with few tokens each fit one row by tokens, not by tiles. A best fit that checks only
    the token room puts them together (4 tiles in a 3-tile row)."""
    from dualtower.data.packing import Item, pack_bfd

    items = [Item((0, 0), 10, 2), Item((0, 1), 11, 2), Item((0, 2), 40, 1), Item((0, 3), 7, 0)]
    rows = pack_bfd(items, max_tokens=100, max_tiles=3)
    assert sorted(key for row in rows for key in (item.key for item in row.items)) == [it.key for it in items]
    for row in rows:
        assert row.tokens == sum(item.tokens for item in row.items) <= 100
        assert row.tiles == sum(item.tiles for item in row.items) <= 3
    assert len(rows) == 2  # the fewest rows the tiles allow (5 tiles > 3): nothing is wasted either


def test_an_image_prefix_that_fills_the_token_limit_exactly_is_too_long(tokenizer: Any, debug_cfg: Any) -> None:
    """A prefix of exactly max_tokens leaves no room for a single text token: the drop reason is "too_long" (the
    images do not fit with any text), not the "no_supervised_tokens" a cut-to-the-limit conversation ends in.
    One token more is still no room for an answer; the limit at which an answer fits is accepted."""
    from collections import Counter

    from data_helpers import sample
    from PIL import Image

    from dualtower.data.document import DocumentLimits, SampleError, document_from_sample
    from dualtower.data.images import ImageProcessor

    raw = sample([Image.new("RGB", (64, 64))], ("what?", "a fairly long answer of several words"))
    processor = ImageProcessor(debug_cfg)

    def build(max_tokens: int | None) -> Any:
        limits = DocumentLimits(max_tokens=max_tokens)
        return document_from_sample(raw, processor, tokenizer, debug_cfg, limits=limits, events=Counter())

    whole = build(None)
    prefix = whole.prefix_len
    assert 0 < prefix < whole.num_tokens - 10
    with pytest.raises(SampleError) as info:
        build(prefix)
    assert info.value.reason == "too_long"
    with pytest.raises(SampleError) as info:
        build(prefix + 1)
    assert info.value.reason == "no_supervised_tokens"
    cut = build(whole.num_tokens - 3)
    assert cut.prefix_len == prefix and cut.num_tokens == whole.num_tokens - 3 and cut.num_supervised > 0


@pytest.mark.parametrize("min_side", [1, 3])
def test_an_image_exactly_min_image_side_is_kept_one_pixel_less_is_dropped(
    tokenizer: Any, debug_cfg: Any, min_side: int
) -> None:
    """data.min_image_side is the smallest side allowed ("a side below min_image_side" is dropped): the boundary
    image is a sample, not an "image_too_small" drop (with the default 1 every decodable image is kept)."""
    from collections import Counter

    from data_helpers import sample
    from PIL import Image

    from dualtower.data.document import DocumentLimits, SampleError, prepare_document
    from dualtower.data.images import ImageProcessor

    processor = ImageProcessor(debug_cfg)
    limits = DocumentLimits(min_image_side=min_side)

    def prepare(width: int, height: int) -> Any:
        raw = sample([Image.new("RGB", (width, height), (9, 200, 30))], ("q", "an answer"))
        return prepare_document(raw, processor, tokenizer, debug_cfg, limits=limits, events=Counter())

    assert prepare(min_side, 40).num_tiles >= 1
    assert prepare(40, min_side).num_tiles >= 1
    if min_side > 1:
        with pytest.raises(SampleError) as info:
            prepare(40, min_side - 1)
        assert info.value.reason == "image_too_small"


def test_an_empty_prediction_never_matches_even_an_answer_that_normalizes_to_nothing() -> None:
    """Exact match compares normalized strings, and an answer of punctuation only ("?", "...") normalizes to ""
    like an empty prediction: the explicit empty-prediction rule must keep that from counting as a hit."""
    from dualtower.training.evaluate import answer_accuracy

    assert answer_accuracy([""], ["?"]) == 0.0
    assert answer_accuracy(["", "Yes!"], ["", "yes"]) == pytest.approx(1 / 2)


@pytest.mark.parametrize(("every", "at_end"), [(0, True), (0, False), (3, True), (3, False)])
def test_evaluation_is_due_periodically_and_at_the_last_step_when_asked(every: int, at_end: bool) -> None:
    """eval.at_end adds the final step to eval.every's multiples (a run of 7 steps with every=3 evaluates at 3
    and 6, and at 7 only with at_end); eval.every=0 disables only the periodic part."""
    from types import SimpleNamespace

    from dualtower.parallel import DistEnv
    from dualtower.training.evaluate import Evaluator

    env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), mesh=None)
    evaluator = Evaluator(SimpleNamespace(every=every, at_end=at_end), None, None, env)
    due = [step for step in range(1, 8) if evaluator.due(step, 7)]
    periodic = [3, 6] if every else []
    assert due == periodic + ([7] if at_end else [])


def test_logged_packing_efficiency_counts_the_capacity_of_every_row(tmp_path) -> None:
    """packing_efficiency = tokens / (rows x row_capacity) over the window: a batch of several packed rows has
    that many rows of capacity. Counting one row per batch reports efficiencies above 1."""
    from dataclasses import replace

    model = tiny_model()
    two, one = make_batches(model, [[(1, 2, 5), (0, 0, 3), (0, 0, 4)], [(1, 0, 6)]], seed=2)
    two = replace(two, doc_row=torch.tensor([0, 0, 1]), num_rows=2, row_capacity=48)
    one = replace(one, doc_row=torch.tensor([0]), num_rows=1, row_capacity=48)
    cfg = default_job()
    cfg.training.steps = 2
    cfg.metrics.log_every = 2
    build_trainer(model, [two, one], tmp_path, cfg).train()
    (record,) = [r for r in read_metrics(tmp_path) if "packing_efficiency" in r]
    expected = (two.num_tokens + one.num_tokens) / (3 * 48)
    assert 0 < expected < 1
    assert record["packing_efficiency"] == pytest.approx(expected)


def test_a_checkpoint_with_the_same_group_names_but_other_tensor_counts_is_refused(tmp_path) -> None:
    """The optimizer state is laid out by [name, tensor count] per group: the same names with another count
    (e.g. a tower whose norms moved to or from a no-decay group under another model layout) cannot take the saved
    Adam moments, and must be refused before DCP fails on it. Matching layouts, or none recorded, pass."""
    from dualtower.adapters.common import CheckpointError
    from dualtower.training.checkpoint import check_param_groups

    params = [torch.nn.Parameter(torch.zeros(2)) for _ in range(5)]
    optimizer = torch.optim.AdamW([{"name": "projector", "params": params[:2]}, {"name": "left", "params": params[2:]}])
    check_param_groups({"param_groups": [["projector", 2], ["left", 3]]}, optimizer, tmp_path)
    check_param_groups({}, optimizer, tmp_path)
    with pytest.raises(CheckpointError, match="parameter groups"):
        check_param_groups({"param_groups": [["projector", 2], ["left", 4]]}, optimizer, tmp_path)
    with pytest.raises(CheckpointError, match="parameter groups"):
        check_param_groups({"param_groups": [["left", 3], ["projector", 2]]}, optimizer, tmp_path)



def test_a_row_whose_documents_all_fail_late_is_left_out_of_the_batch(tokenizer: Any, debug_cfg: Any) -> None:
    """Documents are materialized (pixels made) only when their row is emitted; one whose image went bad since is
    dropped. A row that loses every document must vanish, not stay as an empty row: rows are 0, 1, ... with none
    empty (collate refuses a skipped row id) and the counters count only rows that hold data."""
    from test_packing_edges import _pipeline

    from dualtower.data.packing import Item, Row

    pipeline = _pipeline(tokenizer, debug_cfg)
    documents = pipeline._documents()
    items = [Item(key, doc.num_tokens, doc.num_tiles, doc) for key, doc in itertools.islice(documents, 3)]
    rows = [Row(), Row()]
    rows[0].add(items[0])
    rows[1].add(items[1])
    rows[1].add(items[2])
    real = pipeline._materialize
    pipeline._materialize = lambda item: None if item is items[0] else real(item)
    batch = pipeline._emit(rows)
    assert batch is not None and batch.num_rows == 1 and batch.doc_row.tolist() == [0, 0]
    assert pipeline.stats.rows == 1 and pipeline.stats.samples == 2
    assert pipeline.stats.capacity == pipeline.cfg.max_tokens_per_row
