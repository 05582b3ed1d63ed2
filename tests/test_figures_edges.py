"""Edge cases of the figures a training run reports: time the profiler takes outside the traced step itself is
not training time."""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from dualtower.training.profiling import StepProfiler


def test_starting_the_profiler_is_not_training_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The profiler's first start can take seconds (2.7 s on a CPU here): like writing the trace, it is profiling
    overhead, which take_writing_seconds() hands to the trainer to leave out of tokens/s and MFU."""
    real_start = torch.profiler.profile.start

    def slow_start(self) -> None:
        time.sleep(0.3)
        real_start(self)

    monkeypatch.setattr(torch.profiler.profile, "start", slow_start)
    cfg = SimpleNamespace(enabled=True, steps=(1,), folder="profile")
    profiler = StepProfiler(cfg, tmp_path, rank=0, device=torch.device("cpu"))
    with profiler.step(1):
        torch.randn(8, 8).sum()
    assert profiler.take_writing_seconds() >= 0.3


def test_mfu_is_the_windows_model_flops_per_second_over_the_peak(tmp_path: Path) -> None:
    """mfu = FLOPs of every micro-batch of the window / (training seconds x devices x peak), the paused seconds
    (evaluation, checkpoints, traces) left out; tokens_per_s counts prefix and text tokens over the same time."""
    from test_train_utils import build_trainer, default_job, make_batches, read_metrics, tiny_model

    from dualtower.training import FlopCounter
    from dualtower.training.trainer import _Window

    model = tiny_model()
    batches = make_batches(model, [[(1, 2, 5), (0, 0, 3)], [(2, 1, 7)], [(1, 0, 4)]], seed=1)
    cfg = default_job()
    cfg.training.steps, cfg.training.micro_batches = 2, 2
    trainer = build_trainer(model, batches, tmp_path, cfg)
    trainer.peak = 1e6  # a made-up device peak, FLOP/s
    expected = sum(FlopCounter(model).batch_flops(b) for b in batches[:2]) / 20.0 / 1e6
    window = _Window()
    trainer.train_step(batches[:2], window)
    trainer.step = 1
    window.start, window.paused = time.perf_counter() - 100.0, 80.0  # 20 s of training
    trainer._log(window)
    (record,) = read_metrics(tmp_path)
    assert record["mfu"] == pytest.approx(expected, rel=0.05)
    prefix_and_text = sum(b.prefix_ids.numel() + b.text_ids.numel() for b in batches[:2])
    assert record["tokens_per_s"] == pytest.approx(prefix_and_text / 20.0, rel=0.05)


def test_peak_memory_is_the_largest_over_ranks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rank 0 writes the record: its own peak would hide the rank that is closest to running out of memory."""
    from test_train_utils import build_trainer, default_job, make_batches, read_metrics, tiny_model

    from dualtower.training import trainer as trainer_module
    from dualtower.training.trainer import _Window

    model = tiny_model()
    batches = make_batches(model, [[(1, 2, 5)]], seed=1)
    trainer = build_trainer(model, batches, tmp_path, default_job())
    window = _Window()
    trainer.train_step(batches, window)
    trainer.step = 1

    def all_reduce(tensor: torch.Tensor, op: object = None) -> None:  # one other rank, peaking at 7.5 GiB
        if op == torch.distributed.ReduceOp.MAX:
            tensor.clamp_(min=7.5)

    monkeypatch.setattr(trainer_module.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(trainer_module.dist, "all_reduce", all_reduce)
    trainer._log(window)
    (record,) = read_metrics(tmp_path)
    assert record["peak_mem_gib"] == 7.5


def test_an_annotation_inside_an_operator_is_that_operators_time() -> None:
    """CPU traces count operators' exclusive time: a record_function annotation run inside an operator (a Python
    op implementation may open one) is part of that operator's time, minus only the operators run within it."""
    from dualtower.trace_breakdown import breakdown

    def event(name: str, ts: float, dur: float, cat: str = "cpu_op") -> dict:
        return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "pid": 0, "tid": 1, "args": {}}

    events = [
        event("dualtower::linear_cross_entropy", 0, 100),
        event("chunk", 10, 80, cat="user_annotation"),
        event("aten::mm", 20, 40),
    ]
    result = breakdown(events)
    assert result.names["dualtower::linear_cross_entropy"][1] == pytest.approx(0.060)
    assert result.names["aten::mm"][1] == pytest.approx(0.040)
    assert result.total_ms == pytest.approx(0.100)  # the operator's whole span, counted once
