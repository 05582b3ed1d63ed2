"""metrics.jsonl: the training record of a logging window (sums over its steps and micro-batches, packing
efficiency, tokens/s without pauses, logged LRs and gradient norm) and the MetricsLogger file itself."""

from __future__ import annotations

import json
import resource
import sys
import time
from dataclasses import replace

import pytest
import torch
from test_train_utils import build_trainer, default_job, make_batches, one_thread, read_metrics, tiny_model  # noqa: F401

from dualtower.config import MetricsSection
from dualtower.model.config import ConfigError
from dualtower.training.metrics import MetricsLogger, peak_memory_gib
from dualtower.training.trainer import _Window

pytestmark = pytest.mark.usefixtures("one_thread")

LAYOUTS = [[(1, 2, 5), (0, 0, 3)], [(2, 1, 17), (1, 0, 9), (0, 0, 11)], [(0, 0, 7), (1, 3, 4)]]
LRS = {"vision": 1e-4, "projector": 2e-3, "left": 5e-4, "right": 3e-4}


def _packed_batches(model, count: int, capacity: int = 300):
    """Batches of one document per packed row (num_rows > 1), so row capacity is rows x capacity."""
    batches = make_batches(model, [LAYOUTS[i % len(LAYOUTS)] for i in range(count)], seed=4)
    return [replace(b, doc_row=torch.arange(b.num_docs), num_rows=b.num_docs, row_capacity=capacity) for b in batches]


def _job(steps: int, log_every: int, micro_batches: int = 1):
    cfg = default_job()
    cfg.optim.lr_vision, cfg.optim.lr_projector, cfg.optim.lr_left, cfg.optim.lr_right = LRS.values()
    cfg.training.steps, cfg.training.micro_batches, cfg.metrics.log_every = steps, micro_batches, log_every
    return cfg


def test_windows_sum_their_micro_batches_and_the_last_step_is_logged(tmp_path) -> None:
    model = tiny_model()
    batches = _packed_batches(model, 6)
    build_trainer(model, batches, tmp_path, _job(steps=3, log_every=2, micro_batches=2)).train()
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [2, 3]  # every log_every steps, and the final step
    for record, window in zip(records, (batches[:4], batches[4:]), strict=True):
        tokens = sum(b.num_tokens for b in window)
        assert record["supervised_tokens"] == sum(b.num_supervised for b in window)
        assert record["packing_efficiency"] == pytest.approx(tokens / sum(b.num_rows * 300 for b in window))


def test_unpacked_batches_log_no_packing_efficiency(tmp_path) -> None:
    model = tiny_model()
    batches = [replace(b, row_capacity=0) for b in _packed_batches(model, 2)]  # as collated with data.pack off
    build_trainer(model, batches, tmp_path, _job(steps=2, log_every=1)).train()
    assert [r["packing_efficiency"] for r in read_metrics(tmp_path)] == [None, None]


def test_a_logged_record_has_the_window_loss_rates_lrs_and_the_unclipped_norm(tmp_path) -> None:
    model = tiny_model().double()
    batches = _packed_batches(model, 3)
    cfg = _job(steps=2, log_every=2)
    cfg.training.max_grad_norm = 1e-4  # clipping acts; the record keeps the norm before it
    trainer = build_trainer(model, batches, tmp_path, cfg)
    window, loss_sums = _Window(), []
    for micro in (batches[:2], batches[2:]):  # two optimizer steps, the first one accumulating two batches
        with torch.no_grad():
            loss_sums.append(sum(float(model.loss_sum(b)) for b in micro))
        trainer.train_step(micro, window)
    trainer.step = 2
    # 20 s of training and 80 s of evaluation: long enough that the time _log itself takes stays within 5%.
    window.start, window.paused = time.perf_counter() - 100.0, 80.0
    trainer._log(window)
    (record,) = read_metrics(tmp_path)
    supervised = sum(b.num_supervised for b in batches)
    assert record["supervised_tokens"] == supervised
    assert record["loss"] == pytest.approx(sum(loss_sums) / supervised, rel=1e-6)  # fp32 step sums
    assert record["tokens_per_s"] == pytest.approx(sum(b.num_tokens for b in batches) / 20.0, rel=0.05)
    assert record["grad_norm"] == pytest.approx(float(trainer.last_grad_norm)) and record["grad_norm"] > 1e-2
    assert {k: v for k, v in record.items() if k.startswith("lr/")} == {f"lr/{k}": v for k, v in LRS.items()}
    assert record["lr"] == LRS["projector"]  # the largest tower LR


def test_non_finite_values_are_written_as_null(tmp_path) -> None:
    logger = MetricsLogger(default_job().metrics, tmp_path, True, 1, {})
    logger.log({"step": 1, "loss": float("inf"), "grad_norm": float("-inf"), "mfu": float("nan"), "lr": 1e-3})
    logger.close()

    def strict(constant: str):
        raise ValueError(f"not JSON: {constant}")

    (line,) = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert json.loads(line, parse_constant=strict) == {
        "step": 1,
        "loss": None,
        "grad_norm": None,
        "mfu": None,
        "lr": 1e-3,
    }


def test_a_resumed_run_appends_to_metrics_jsonl(tmp_path) -> None:
    for step in (1, 2):
        logger = MetricsLogger(default_job().metrics, tmp_path, True, 2, {})
        logger.log({"step": step, "loss": 1.0})
        logger.close()
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
    MetricsLogger(default_job().metrics, tmp_path / "other", False, 2, {}).log({"step": 1})  # rank != 0: nothing
    assert not (tmp_path / "other").exists()


def test_rewind_moves_later_steps_and_a_cut_line_aside(tmp_path) -> None:
    """A run resumed at step 2 logs steps 3.. again: metrics.jsonl must stay one timeline, nothing lost."""
    logger = MetricsLogger(default_job().metrics, tmp_path, True, 4, {})
    for step in (1, 2, 3):
        logger.log({"step": step, "loss": float(step)})
    logger.log({"step": 2, "eval/loss": 0.5})
    logger.log({"step": 4, "eval/loss": 0.25})
    logger.close()
    with (tmp_path / "metrics.jsonl").open("a") as file:
        file.write('{"step": 5, "lo')  # the kill came mid-write
    resumed = MetricsLogger(default_job().metrics, tmp_path, True, 4, {})
    resumed.rewind(2)
    resumed.log({"step": 3, "loss": 30.0})
    resumed.close()
    assert read_metrics(tmp_path) == [
        {"step": 1, "loss": 1.0}, {"step": 2, "loss": 2.0}, {"step": 2, "eval/loss": 0.5}, {"step": 3, "loss": 30.0}
    ]
    aside = (tmp_path / "metrics.superseded.jsonl").read_text().splitlines()
    assert aside == ['{"step": 3, "loss": 3.0}', '{"step": 4, "eval/loss": 0.25}', '{"step": 5, "lo']
    MetricsLogger(default_job().metrics, tmp_path / "other", False, 2, {}).rewind(1)  # rank != 0: nothing
    assert not (tmp_path / "other").exists()


def test_cpu_peak_memory_is_the_resident_peak_in_gib() -> None:
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak = peak_memory_gib(torch.device("cpu"))
    assert 0.05 < peak < 1024  # a process with torch loaded holds more than 50 MiB
    assert peak == pytest.approx(rss_kib / 2**20, rel=0.5)


def _with_counters(trainer, stats) -> None:
    trainer.parts.train_loader.stats = stats  # as the real loader exposes them


def test_the_train_datas_drops_are_recorded_at_checkpoints_and_the_end(tmp_path, capsys) -> None:
    from collections import Counter

    from dualtower.data.counters import LoaderStats

    model = tiny_model()
    cfg = _job(steps=3, log_every=1)
    cfg.checkpoint.enabled, cfg.checkpoint.every, cfg.metrics.progress = True, 2, "line"
    trainer = build_trainer(model, _packed_batches(model, 3), tmp_path, cfg)
    stats = LoaderStats(read=12, samples=8, rows=4, tiles=10, dropped=Counter(bad_image=3, too_long=1),
                        events=Counter(truncated=2))
    _with_counters(trainer, stats)
    trainer.train()
    data = [r for r in read_metrics(tmp_path) if "data/read" in r]
    expected = {"data/read": 12, "data/samples": 8, "data/dropped": 4, "data/tiles_per_row": 2.5,
                "data/dropped/bad_image": 3, "data/dropped/too_long": 1, "data/converted/truncated": 2}
    assert data == [{"step": 2, **expected}, {"step": 3, **expected}]  # the checkpoint at 2, the end at 3
    assert "data step 3: data/read 12" in capsys.readouterr().err


def test_a_final_checkpoint_records_the_data_counters_once(tmp_path) -> None:
    from dualtower.data.counters import LoaderStats

    model = tiny_model()
    cfg = _job(steps=2, log_every=1)
    cfg.checkpoint.enabled, cfg.checkpoint.every = True, 2
    trainer = build_trainer(model, _packed_batches(model, 2), tmp_path, cfg)
    _with_counters(trainer, LoaderStats(read=5, samples=5))
    trainer.train()
    assert [r["step"] for r in read_metrics(tmp_path) if "data/read" in r] == [2]


class _FakeWandbRun:
    def __init__(self, **init_kwargs) -> None:
        self.init_kwargs, self.logged, self.finished = init_kwargs, [], False

    def log(self, values: dict, step: int) -> None:
        self.logged.append((step, values))

    def finish(self) -> None:
        self.finished = True


def test_wandb_gets_every_record_at_its_step_without_nulls(tmp_path, monkeypatch) -> None:
    runs: list[_FakeWandbRun] = []
    fake = type("wandb", (), {"init": staticmethod(lambda **kwargs: runs.append(_FakeWandbRun(**kwargs)) or runs[-1])})
    monkeypatch.setitem(sys.modules, "wandb", fake)
    cfg = replace(default_job().metrics, wandb=True, wandb_project="proj", progress="none")
    logger = MetricsLogger(cfg, tmp_path / "run_a", True, 4, {"model": {"flavor": "debug"}})
    logger.log({"step": 2, "loss": 1.5, "mfu": None, "grad_norm": float("nan")})
    logger.log({"step": 2, "eval/loss": 0.5})
    logger.close()
    (run,) = runs
    assert run.init_kwargs == {"project": "proj", "entity": None, "name": "run_a", "mode": "offline",
                               "dir": str(tmp_path / "run_a"), "config": {"model": {"flavor": "debug"}}}
    assert run.logged == [(2, {"loss": 1.5}), (2, {"eval/loss": 0.5})] and run.finished
    MetricsLogger(cfg, tmp_path / "rank1", False, 4, {}).close()  # only rank 0 starts a run
    assert len(runs) == 1


def test_wandb_missing_is_a_config_error(tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    cfg = replace(default_job().metrics, wandb=True)
    with pytest.raises(ConfigError, match=r"metrics.wandb = true needs wandb: pip install"):
        MetricsLogger(cfg, tmp_path, True, 4, {})


def test_the_default_progress_bar_shows_the_step_and_every_training_figure(tmp_path, capsys) -> None:
    cfg = MetricsSection()
    assert cfg.progress == "bar"
    logger = MetricsLogger(cfg, tmp_path, True, 10, {})
    logger.log({"step": 5, "loss": 2.25, "lr": 1e-3, "grad_norm": 0.5, "tokens_per_s": 1234.5, "mfu": None,
                "peak_mem_gib": 1.0, "packing_efficiency": 0.875})
    logger.log({"step": 5, "eval/accuracy": 0.75})
    logger.close()
    bar_line, _, eval_line = capsys.readouterr().err.splitlines()
    assert bar_line.startswith("[" + "#" * 15 + "." * 15 + "] 5/10 loss 2.25  lr 0.001  grad_norm 0.5  ")
    assert "tokens_per_s 1234  mfu -  peak_mem_gib 1  packing_efficiency 0.875" in bar_line
    assert eval_line == "eval step 5: eval/accuracy 0.75"
