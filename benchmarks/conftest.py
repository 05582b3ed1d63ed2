"""Benchmark setup: the Triton interpreter on CPU, a clean device before each benchmark, incremental results.

On CPU the benchmarks run on DUALTOWER_BENCH_THREADS torch threads (default 1): the CPU shapes are tiny, and on a
shared 2-core machine a second busy process makes multi-threaded timings swing by 10x or more (threads wait on
each other at every parallel region), which says nothing about the code. CPU figures are single-thread figures.

DUALTOWER_BENCH_LOG=path.jsonl appends one JSON line per finished benchmark (name, group, median, extra_info)
as soon as it finishes, so a run cut short by a time limit (scripts/gpu_check.sh) keeps what it measured;
--benchmark-json is only written at the end of the session.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch

# The bench files import their helpers (_common, original_step) by module name, whatever --import-mode says.
sys.path.insert(0, str(Path(__file__).resolve().parent))

# The Triton interpreter must be chosen before triton (and so dualtower_kernels) is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
from _common import COMPILED_MARK, CUDA, median_s, reset_peak_memory

LOG_ENV = "DUALTOWER_BENCH_LOG"
if not CUDA:
    torch.set_num_threads(int(os.environ.get("DUALTOWER_BENCH_THREADS", "1")))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", f"{COMPILED_MARK}: a torch.compile'd case or baseline (minutes on a GPU)")
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_sessionfinish(session: pytest.Session) -> Iterator[None]:
    """Drop benchmarks that have no round before pytest-benchmark writes its JSON.

    A run stopped by SIGINT (gpu_check's stage limit) interrupts a benchmark before its first round.
    pytest-benchmark's JSON writer fails on such an entry (`min()` of no timings) and loses the stage's
    finished benchmarks with it."""
    benchmark_session = getattr(session.config, "_benchmarksession", None)
    if benchmark_session is not None:
        benchmark_session.benchmarks[:] = [bench for bench in benchmark_session.benchmarks if bench]
    yield


@pytest.fixture(autouse=True)
def _clean_device(request: pytest.FixtureRequest) -> Iterator[None]:
    """Free what earlier benchmarks left and reset the peak-memory counter, so peaks are this benchmark's."""
    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()
    reset_peak_memory()
    torch.manual_seed(0)
    bench = request.getfixturevalue("benchmark") if "benchmark" in request.fixturenames else None
    yield
    if CUDA and request.node.get_closest_marker(COMPILED_MARK):
        # Compiled code can hold the model's tensors: let them go before the next benchmark measures its peak.
        torch._dynamo.reset()
    log = os.environ.get(LOG_ENV)
    if bench is not None and log and median_s(bench) is not None:
        _append_result(Path(log), bench)


def _append_result(path: Path, bench) -> None:
    record = {
        "name": bench.name,
        "fullname": bench.fullname,
        "group": bench.group,
        "median_s": median_s(bench),
        "rounds": bench.stats.stats.rounds,
        "extra_info": bench.extra_info,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    with path.open("a") as handle:
        handle.write(json.dumps(record, default=str) + "\n")
