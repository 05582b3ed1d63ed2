"""Invariants of the training support code that the other tests left free to break (found by a mutation audit):
the schedule past its last step and its configured kind and floor, parameter groups of a tower whose LR is 0,
the data counters summed over ranks, the CUDA peak-memory window, the held-out accuracy's sample count, the
FLOP count of a partly frozen tower, GPU model names, validation turned off, cut metric lines moved aside, and a
quiet console."""

from __future__ import annotations

import json
from collections import Counter
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
from test_train_utils import ListLoader, default_job, make_batches, single_env, tiny_model

from dualtower.config import EvalSection, ScheduleSection
from dualtower.data.counters import LoaderStats
from dualtower.training import evaluate
from dualtower.training.evaluate import Evaluator
from dualtower.training.flops import FlopCounter, _names_model
from dualtower.training.metrics import MetricsLogger, peak_memory_gib
from dualtower.training.optim import apply_freezing, param_groups
from dualtower.training.schedule import build_scheduler, lr_multiplier


def test_a_constant_schedule_stays_at_the_peak_past_its_last_step() -> None:
    """kind = "constant" is the peak after warmup, whatever the step: a run extended past training.steps (or a
    resumed one with a longer horizon) must not drop to the cosine floor."""
    for step in (7, 99, 100, 101, 10_000):
        assert lr_multiplier(step, 100, 7, 0.1, "constant") == 1.0, step


@pytest.mark.parametrize(("kind", "floor"), [("cosine", 0.25), ("constant", 1.0)])
def test_the_scheduler_follows_the_configured_kind_and_floor(kind: str, floor: float) -> None:
    """build_scheduler must hand [schedule]'s kind and min_lr_ratio on (not the defaults cosine / 0.1): a
    constant run stays at the peak, a cosine one ends at its own floor. 5 steps, 2 of warmup, peak 4e-3."""
    weight = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.AdamW([weight], lr=4e-3)
    schedule = ScheduleSection(kind=kind, warmup_steps=2, min_lr_ratio=0.25)
    scheduler = build_scheduler(optimizer, schedule, total_steps=5)
    seen = []
    for _ in range(7):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen[:3] == pytest.approx([2e-3, 4e-3, 4e-3])  # warmup (s + 1) / 2, then the peak
    assert seen[5:] == pytest.approx([4e-3 * floor, 4e-3 * floor])  # at and past the last step


def test_a_tower_whose_lr_is_zero_gets_no_group_even_when_it_still_requires_grad() -> None:
    """param_groups is public: a model whose flags were not set by apply_freezing must still get no group (and so
    no AdamW state) for a tower with LR 0."""
    model = tiny_model()
    assert all(p.requires_grad for p in model.vision_encoder.parameters())
    cfg = default_job().optim
    cfg.lr_vision, cfg.lr_projector, cfg.lr_left, cfg.lr_right = 0.0, 2e-3, 0.0, 3e-4
    for decay_all in (True, False):
        cfg.decay_norms_and_biases = decay_all
        names = {group["name"].removesuffix("_no_decay") for group in param_groups(model, cfg)}
        assert names == {"projector", "right"}, decay_all


def test_the_data_counters_record_sums_every_ranks_share(tmp_path: Path) -> None:
    """Each rank reads its own shard: the record must be the sum over all the shares, not rank 0's alone."""
    shares = [
        LoaderStats(read=5, samples=3, rows=2, tiles=3, dropped=Counter(too_long=2), events=Counter(truncated=1)),
        LoaderStats(read=7, samples=4, rows=3, tiles=9, dropped=Counter(bad_image=3)),
        LoaderStats(read=1, samples=1, rows=1, tiles=0, events=Counter(truncated=4, repaired=1)),
    ]
    logger = MetricsLogger(default_job().metrics, tmp_path, True, 4, {})
    logger.log_data_counts(4, [share.to_dict() for share in shares])
    logger.close()
    (record,) = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert record == {
        "step": 4, "data/read": 13, "data/samples": 8, "data/dropped": 5, "data/tiles_per_row": 2.0,
        "data/dropped/bad_image": 3, "data/dropped/too_long": 2,
        "data/converted/repaired": 1, "data/converted/truncated": 5,
    }  # fmt: skip


def test_cuda_peak_memory_is_per_window(monkeypatch: pytest.MonkeyPatch) -> None:
    """On CUDA each call reports the peak since the previous call: the counter must be reset, or one evaluation's
    peak would show in every later training record."""
    allocated = {"peak": 3 * 2**30}

    def reset(device: torch.device | None = None) -> None:
        allocated["peak"] = 0

    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: allocated["peak"])
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", reset)
    cuda = torch.device("cuda", 0)
    assert peak_memory_gib(cuda) == 3.0
    allocated["peak"] = max(allocated["peak"], 2**29)  # the next window allocates only half a GiB
    assert peak_memory_gib(cuda) == 0.5


def test_accuracy_reports_the_number_of_questions_actually_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fewer held-out examples than eval.accuracy_samples: the record's sample count is how many were scored
    (the accuracy's denominator), not the configured maximum."""
    heldout = [{"images": [], "question": "q0", "answer": "red"}, {"images": [], "question": "q1", "answer": "3"}]
    monkeypatch.setattr(evaluate, "greedy_answers", lambda model, tokenizer, examples, max_new_tokens: ["Red", "4"])
    evaluator = Evaluator(EvalSection(accuracy_samples=5, max_new_tokens=2), None, None, single_env(), heldout)
    assert evaluator.accuracy(torch.nn.Linear(1, 1)) == {"eval/accuracy": 0.5, "eval/accuracy_samples": 2}


def test_a_left_tower_that_trains_around_its_frozen_unused_weights_still_takes_gradients() -> None:
    """Only the left LM trains (lr_vision = lr_projector = lr_right = 0). apply_freezing also freezes the left
    tower's unused parameters (its last block's non-K/V path), so the tower is trainable without every parameter
    being so: it must still count as training, with backward (3x attention, 6 per matmul weight) through it."""
    model = tiny_model()
    cfg = default_job().optim
    cfg.lr_vision, cfg.lr_projector, cfg.lr_left, cfg.lr_right = 0.0, 0.0, 5e-4, 0.0
    apply_freezing(model, cfg)
    left = model.left_decoder
    assert any(p.requires_grad for p in left.parameters()) and not all(p.requires_grad for p in left.parameters())
    counter = FlopCounter(model)
    assert counter.left_flow and counter.text_flow  # the frozen right LM passes gradients to the left's K/V
    lm = model.cfg.lm
    assert counter.left_pair == 4 * lm.n_heads * lm.head_dim * (lm.n_blocks - 1) * 3
    last = left.blocks[-1].attn
    counted = [*left.blocks[:-1], last.k_proj, last.v_proj]
    weights = sum(m.weight.numel() for b in counted for m in b.modules() if isinstance(m, torch.nn.Linear))
    assert counter.left_per_token == 6 * weights  # all of them train: forward, weight and input gradients


@pytest.mark.parametrize(
    ("name", "model", "named"),
    [
        ("NVIDIA GB200", "B200", False),  # GB200 is its own model, whatever order the peak table lists them in
        ("NVIDIA GH200 480GB", "H200", False),
        ("NVIDIA RTX A1000", "A100", False),
        ("NVIDIA A100-SXM4-80GB", "A100", True),
        ("NVIDIA B200", "B200", True),
    ],
)
def test_a_gpu_model_is_matched_only_as_a_whole_word(name: str, model: str, named: bool) -> None:
    assert _names_model(name, model) is named


def test_zero_validation_batches_means_no_validation_loss() -> None:
    """eval.val_batches = 0 (allowed by the config) turns the validation loss off even with a loader: it must not
    read the whole loader instead."""
    model = tiny_model().double()
    loader = ListLoader(make_batches(model, [[(1, 0, 5)], [(0, 0, 7), (1, 1, 3)]], seed=3))
    evaluator = Evaluator(EvalSection(val_batches=0), loader, None, single_env())
    assert evaluator.validation_loss(model, nullcontext) == {}


def test_two_resumes_after_kills_keep_every_superseded_line_whole(tmp_path: Path) -> None:
    """A line cut by a kill is moved aside with a newline of its own: the next resume appends its superseded
    records on lines of their own, not glued to the cut fragment."""
    metrics = tmp_path / "metrics.jsonl"
    logger = MetricsLogger(default_job().metrics, tmp_path, True, 5, {})
    for step in (1, 2, 3):
        logger.log({"step": step, "loss": float(step)})
    logger.close()
    with metrics.open("a") as file:
        file.write('{"step": 4, "lo')  # killed mid-write
    for resume_at, logged in ((2, 3), (1, 2)):  # resumed at 2 (logs 3 again), killed, then resumed at 1
        resumed = MetricsLogger(default_job().metrics, tmp_path, True, 5, {})
        resumed.rewind(resume_at)
        resumed.log({"step": logged, "loss": 10.0 * logged})
        resumed.close()
    aside = (tmp_path / "metrics.superseded.jsonl").read_text()
    assert aside.endswith("\n")
    assert aside.splitlines() == [
        '{"step": 3, "loss": 3.0}', '{"step": 4, "lo', '{"step": 2, "loss": 2.0}', '{"step": 3, "loss": 30.0}'
    ]
    assert [json.loads(line) for line in metrics.read_text().splitlines()] == [
        {"step": 1, "loss": 1.0}, {"step": 2, "loss": 20.0}
    ]


def test_progress_none_writes_nothing_to_the_console(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """metrics.progress = "none" keeps stderr clean (the record still goes to metrics.jsonl)."""
    cfg = default_job().metrics
    assert cfg.progress == "none"
    logger = MetricsLogger(cfg, tmp_path, True, 3, {})
    logger.log({"step": 1, "loss": 2.5, "lr": 1e-3})
    logger.log({"step": 1, "eval/loss": 2.0})
    logger.close()
    assert capsys.readouterr().err == ""
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2
