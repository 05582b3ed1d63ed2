"""The measuring tools' edge cases: the step profiler's files, the trace breakdown's nesting, phases and busy time,
the benchmark summary's ratios and formatting, benchmarks/_common.py's timing helpers, and gpu_check's stage plan.
(test_profiling.py and test_benchmark_tools.py cover their main paths.)"""

from __future__ import annotations

import gzip
import importlib.util
import itertools
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest
import torch

from dualtower.trace_breakdown import breakdown, category, format_breakdown
from dualtower.trace_breakdown import main as breakdown_main
from dualtower.training.profiling import StepProfiler

ROOT = Path(__file__).resolve().parents[1]


def _script(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _event(name: str, ts: float, dur: float, cat: str = "cpu_op", tid: int = 1, ext: int | None = None) -> dict:
    args = {} if ext is None else {"External id": ext}
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "pid": 0, "tid": tid, "args": args}


# -- the step profiler -----------------------------------------------------------------------------------------


def test_a_disabled_profiler_neither_traces_nor_warns(tmp_path: Path, caplog) -> None:
    cfg = SimpleNamespace(enabled=False, steps=(1,), folder="traces")
    profiler = StepProfiler(cfg, tmp_path, rank=0, device=torch.device("cpu"))
    with caplog.at_level(logging.WARNING, logger="dualtower.training.profiling"):
        with profiler.step(1):
            torch.ones(4).sum()
        profiler.warn_untraced(5, 9)  # step 1 is out of range, but nothing was asked for
    assert not (tmp_path / "traces").exists() and not caplog.records


def test_traces_go_to_the_configured_folder_under_the_ranks_name(tmp_path: Path) -> None:
    cfg = SimpleNamespace(enabled=True, steps=(1,), folder="traces")
    profiler = StepProfiler(cfg, tmp_path, rank=3, device=torch.device("cpu"))
    with profiler.step(1):
        torch.ones(8, 8).mm(torch.ones(8, 8))
    # Each rank traces its own step: one file per rank, or the ranks would overwrite each other's.
    written = sorted(p.name for p in (tmp_path / "traces").iterdir())
    assert written == ["step_000001_rank3.json", "step_000001_rank3.txt"]


# -- the trace breakdown ---------------------------------------------------------------------------------------


def test_zero_grad_is_optimizer_time() -> None:
    events = [
        _event("aten::mm", 0, 10),
        _event("Optimizer.zero_grad#AdamW.zero_grad", 20, 10, cat="user_annotation"),
        _event("aten::zero_", 21, 8),
    ]
    assert dict(breakdown(events).phases) == pytest.approx({"forward": 0.010, "optimizer": 0.008})


def test_ops_run_by_a_custom_ops_backward_event_count_under_its_category() -> None:
    """The gradient bookkeeping autograd runs inside `evaluate_function: GeneratedBackwardFor_dualtower_...` but
    beside the node's own event is still the loss's backward."""
    node = "GeneratedBackwardFor_dualtower_linear_cross_entropy_fwd_defaultBackward"
    events = [
        _event(f"autograd::engine::evaluate_function: {node}", 0, 100),
        _event("aten::mm", 2, 20),
        _event(node, 30, 70),
    ]
    assert dict(breakdown(events).categories) == pytest.approx({"cross-entropy": 0.100})


def test_back_to_back_ops_and_ops_that_start_with_their_parent() -> None:
    """An op starting where the previous one ends is its sibling; one starting with a longer op is its child."""
    siblings = breakdown([_event("aten::mm", 0, 10), _event("aten::add", 10, 5)])
    assert siblings.names["aten::mm"] == [1, pytest.approx(0.010)]
    assert siblings.names["aten::add"] == [1, pytest.approx(0.005)]
    nested = breakdown([_event("aten::mm", 0, 80), _event("aten::linear", 0, 100)])  # the child listed first
    assert nested.names["aten::linear"][1] == pytest.approx(0.020)
    assert nested.names["aten::mm"][1] == pytest.approx(0.080)


def test_overlapping_kernels_are_busy_time_once_and_the_span_starts_at_the_earliest() -> None:
    """Two streams: kernels overlap, and the trace lists them out of time order."""
    events = [
        _event("nvjet_hsh_gemm", 50, 30, cat="kernel"),
        _event("ncclDevKernel_AllGather_RING_LL", 0, 40, cat="kernel"),
        _event("triton_per_fused_rms_norm", 30, 30, cat="kernel"),
    ]
    result = breakdown(events)
    assert result.total_ms == pytest.approx(0.100)
    assert result.span_ms == pytest.approx(0.080)
    assert result.busy_ms == pytest.approx(0.080)


def test_a_cpu_trace_counts_operators_not_the_annotations_around_them() -> None:
    events = [
        _event("aten::mm", 0, 40),
        _event("Optimizer.step#AdamW.step", 50, 50, cat="user_annotation"),
        _event("aten::_foreach_add_", 60, 30),
    ]
    result = breakdown(events)
    assert result.total_ms == pytest.approx(0.070)
    assert dict(result.phases) == pytest.approx({"forward": 0.040, "optimizer": 0.030})


def test_communication_kernels_are_not_memory_or_elementwise_time() -> None:
    # Their names also contain "gather", "scatter" or "reduce", which the later categories match.
    for name in ("ncclDevKernel_AllGather_RING_LL", "ncclKernel_ReduceScatter_Sum_bf16", "c10d::allreduce_"):
        assert category(name) == "communication", name
    assert category("aten::index_select") == "memory"


def test_the_report_lists_the_heaviest_ops_by_time_and_skips_empty_phases() -> None:
    events = [_event("aten::add", t, 1) for t in (0, 2, 4)] + [_event("aten::mm", 10, 10)]
    text = format_breakdown(breakdown(events), top=1)
    assert "| aten::mm | 1 | 0.01 | 76.9% |" in text and "aten::add" not in text
    assert "| forward |" in text and "| backward |" not in text
    assert format_breakdown(breakdown([])) == "no timed events in this trace"


def test_gzipped_traces_are_read_and_a_broken_one_is_one_error_line(tmp_path: Path, capsys) -> None:
    # gpu_check.sh gzips each trace once it is summarized; the CLI must read them back.
    with gzip.open(tmp_path / "step_000002_rank0.json.gz", "wt") as handle:
        json.dump({"traceEvents": [_event("aten::mm", 0, 10)]}, handle)
    assert breakdown_main([str(tmp_path / "step_000002_rank0.json.gz")]) == 0
    assert capsys.readouterr().out.startswith("CPU operator time (exclusive): 0.01 ms")
    assert breakdown_main([str(tmp_path)]) == 0  # a folder that holds only gzipped traces
    (tmp_path / "broken.json.gz").write_bytes(b"not gzip")
    assert breakdown_main([str(tmp_path / "broken.json.gz")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "is not a chrome trace" in err[0], err


# -- the benchmark summary -------------------------------------------------------------------------------------


def _results(tmp_path: Path, name: str, *benchmarks: dict) -> Path:
    report = {
        "machine_info": {"node": "box", "cpu": {"brand_raw": "EPYC"}},
        "datetime": "2026-11-27T10:00",
        "benchmarks": list(benchmarks),
    }
    path = tmp_path / name
    path.write_text(json.dumps(report))
    return path


def _bench(name: str, group: str, median: float, **extra) -> dict:
    return {
        "name": name,
        "fullname": f"bench_x.py::{name}",
        "group": group,
        "stats": {"median": median},
        "extra_info": extra,
    }


def _rows(table: str) -> dict[str, str]:
    return {line.split(" | ")[0].strip("| "): line for line in table.splitlines() if line.startswith("| test_")}


def test_summary_anchor_ratio_number_format_and_one_header_per_machine(tmp_path: Path) -> None:
    summarize = _script("summarize_benchmarks", ROOT / "scripts" / "summarize_benchmarks.py")
    first = _results(
        tmp_path,
        "a.json",
        _bench("test_train[dualtower]", "train", 0.5, role="fast", tokens_per_s=30_000.0, anchor_tokens_per_s=10_000.0),
    )
    second = _results(tmp_path, "b.json", _bench("test_data", "data", 0.1, tokens_per_s=1000.0, done=True))
    table = summarize.summarize(summarize.load([first, second]))
    rows = _rows(table)
    assert "| 3.00x the anchor |" in rows["test_train[dualtower]"]  # faster than the anchor: above 1
    assert "| 1,000 |" in rows["test_data"]
    assert table.splitlines()[0] == "node: box  cpu: EPYC  date: 2026-11-27" and table.count("node: box") == 1


def test_only_a_baseline_of_the_same_named_group_gets_a_speedup(tmp_path: Path) -> None:
    summarize = _script("summarize_benchmarks", ROOT / "scripts" / "summarize_benchmarks.py")
    path = _results(
        tmp_path,
        "run.json",
        _bench("test_fast", "", 0.1, role="fast", provider="dualtower"),  # no group: matches nothing
        _bench("test_slow", "", 0.4, role="baseline", provider="original"),
    )
    assert "faster" not in summarize.summarize(summarize.load([path]))


# -- benchmarks/_common.py -------------------------------------------------------------------------------------


def test_median_ms_runs_the_warmup_untimed_and_takes_the_median(monkeypatch: pytest.MonkeyPatch) -> None:
    common = _script("bench_common", ROOT / "benchmarks" / "_common.py")
    clock = itertools.chain([0.0, 0.001, 1.0, 1.004, 2.0, 2.002], itertools.repeat(9.0))
    monkeypatch.setattr(common.time, "perf_counter", lambda: next(clock))
    calls = []
    assert common.median_ms(lambda: calls.append(1), rounds=3, warmup=2) == pytest.approx(2.0)
    assert len(calls) == 5


def test_nothing_timed_has_no_median_and_empty_list_items_are_dropped(monkeypatch: pytest.MonkeyPatch) -> None:
    common = _script("bench_common", ROOT / "benchmarks" / "_common.py")
    cut_short = SimpleNamespace(enabled=True, stats=SimpleNamespace(stats=SimpleNamespace(data=[], median=0.0)))
    assert common.median_s(cut_short) is None  # gpu_check stopped the stage before its first round
    timed = SimpleNamespace(enabled=True, stats=SimpleNamespace(stats=SimpleNamespace(data=[0.2], median=0.2)))
    assert common.median_s(timed) == 0.2
    monkeypatch.setenv("DUALTOWER_BENCH_FLAVORS", "360m,,2b,")
    assert common.env_list("DUALTOWER_BENCH_FLAVORS", "debug") == ["360m", "2b"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the eager fallback is what a CPU gets")
def test_repeated_calls_fall_back_to_an_eager_loop_without_cuda() -> None:
    common = _script("bench_common", ROOT / "benchmarks" / "_common.py")
    calls = []
    run, how = common.repeated_calls(lambda: calls.append(1) or len(calls), calls=3)
    assert how.startswith("eager: ")
    assert run() == 3 and len(calls) == 3  # the last call's output


# -- gpu_check.sh's plan ---------------------------------------------------------------------------------------


def _plan(**env: str) -> dict[str, tuple[int, str]]:
    script = str(ROOT / "scripts" / "gpu_check.sh")
    done = subprocess.run(
        ["bash", script, "--dry-run", "OUT"],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    stages = {}
    for line in done.stdout.splitlines():
        name, _, limit, _, command = line.split(maxsplit=4)
        stages[name] = (int(limit), command)
    return stages


needs_bash = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


@needs_bash
def test_gpu_check_limits_each_stage_to_the_budget_left_before_the_summary() -> None:
    nominal = {
        "install": 60,
        "gpu_tests": 150,
        "train": 90,
        "train_compiled": 180,
        "decode": 100,
        "kernels": 90,
        "other_benchmarks": 60,
        "profile_360m": 600,
        "compiled": 600,
    }
    plan = _plan(GPU_CHECK_BUDGET_S="100")
    assert list(plan) == list(nominal)
    # Each stage gets its own limit, capped at what is left of 100 s less the 20 s kept for the summary (a second
    # or two may pass while the script starts).
    for name, (limit, _) in plan.items():
        assert min(nominal[name], 78) <= limit <= min(nominal[name], 80), name


@needs_bash
def test_gpu_check_install_can_be_skipped_and_each_bench_stage_has_its_files_and_json() -> None:
    plan = _plan(GPU_CHECK_INSTALL="0")
    assert "install" not in plan and next(iter(plan)) == "gpu_tests"
    assert "--benchmark-json=OUT/train.json" in plan["train"][1]  # OUT_DIR from the command line
    own_stage = {"bench_train.py", "bench_decode.py", "bench_kernels.py"}
    others = sorted(p.name for p in (ROOT / "benchmarks").glob("bench_*.py") if p.name not in own_stage)
    listed = sorted(Path(word).name for word in plan["other_benchmarks"][1].split() if word.endswith(".py"))
    assert listed == others
