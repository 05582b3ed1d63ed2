"""What every benchmark file shares: the device, synchronized timing, peak memory, and the extra_info keys.

extra_info keys (the same names in every file, each where it applies; scripts/summarize_benchmarks.py reads
them): tokens_per_s where the work has tokens (train, compare, decode, data), mfu where it has model FLOPs
(train, compare, kernels; decode is bound by memory and reports gb_s instead), nothing device-side for the
host-only data pipeline.
    device           the device name ("NVIDIA H100 80GB HBM3", "cpu")
    provider, role   the implementation timed by this entry; role "fast" (dualtower's path) or "baseline"
    baseline         the name of the primary baseline the fast path is compared with
    ratio            baseline time / fast-path time for the same work, both timed in the same run (> 1: faster)
    ratio_vs_<name>  the same against each further baseline timed in the same test
    tokens_per_s     tokens per second (training: B x T / step time, the original's definition)
    tflops, gb_s     achieved model TFLOP/s or GB/s (bytes the operation must move / time)
    mfu              model FLOPs utilization against the device's bf16 dense peak (null on CPUs / unknown GPUs)
    peak_mem_gib     peak device memory (GiB) of the timed work; null on CPU (no allocator statistics)
    baseline_<key>   a metric of the primary baseline, measured in the same test
Every timed call ends with a device synchronize, so a time covers the GPU work and not just its launch.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
# The torch.compile'd baselines and cases (minutes of compilation on a GPU); `-m "not compiled"` leaves them out.
COMPILED_MARK = "compiled"


def device_name() -> str:
    return torch.cuda.get_device_name() if CUDA else "cpu"


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def synced(fn: Callable[[], Any]) -> Callable[[], None]:
    """`fn` followed by a device synchronize: what every timed call runs."""

    def run() -> None:
        fn()
        sync()

    return run


def median_ms(fn: Callable[[], Any], rounds: int, warmup: int = 0) -> float:
    """Median wall time of `fn` (synchronized) in milliseconds; for baselines timed next to a benchmark."""
    run = synced(fn)
    for _ in range(warmup):
        run()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def reset_peak_memory() -> None:
    if CUDA:
        sync()
        torch.cuda.reset_peak_memory_stats()


def peak_mem_gib() -> float | None:
    """Peak allocated device memory since the last reset_peak_memory(), or None on CPU."""
    if not CUDA:
        return None
    sync()
    return torch.cuda.max_memory_allocated() / 2**30


def extra_peak_gib(fn: Callable[[], Any]) -> float | None:
    """Memory one call of `fn` allocates beyond what is live before it (GiB), or None on CPU."""
    if not CUDA:
        return None
    reset_peak_memory()
    before = torch.cuda.memory_allocated()
    fn()
    sync()
    return (torch.cuda.max_memory_allocated() - before) / 2**30


def median_s(benchmark: Any) -> float | None:
    """The benchmark's median in seconds, or None when nothing was timed: --benchmark-disable, or a run stopped
    (gpu_check's stage limit) before the first timed round."""
    if not benchmark.enabled or benchmark.stats is None or not benchmark.stats.stats.data:
        return None
    return benchmark.stats.stats.median


# A 16-bit kernel differs from the 16-bit reference by rounding, a few parts in a thousand of the largest
# value; a wrong config or a broken kernel is off by order one. Accuracy itself is tested in tests/.
WRONG_RESULT = 5e-2


def _tensors(value: object) -> list[torch.Tensor]:
    return [value] if isinstance(value, torch.Tensor) else [t for t in value if isinstance(t, torch.Tensor)]


def relative_error(actual: object, expected: object) -> float:
    """max |actual - expected| / max |expected| over the outputs (or gradients): the worst one (empty ones: 0)."""
    pairs = [(a, b) for a, b in zip(_tensors(actual), _tensors(expected), strict=True) if b.numel()]
    return max(
        (((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item() for a, b in pairs),
        default=0.0,
    )


def env_list(name: str, default: str) -> list[str]:
    """A comma-separated environment variable (e.g. DUALTOWER_BENCH_FLAVORS=360m narrows a GPU run)."""
    return [item for item in os.environ.get(name, default).split(",") if item]


def repeated_calls(fn: Callable[[], Any], calls: int, warmup: int = 2) -> tuple[Callable[[], Any], str]:
    """`calls` back-to-back calls of `fn` as one callable that returns the last call's output, and how it runs them.

    "cuda_graph": one CUDA graph of the calls, captured over the tensors `fn` closes over (they stay its static
    inputs), replayed: what a captured decode step pays, without a launch from Python per call. Otherwise (no
    CUDA, or `fn` cannot be captured: a host sync, a CPU tensor) "eager: <why>", a Python loop of the calls.
    """
    try:
        stream = torch.cuda.Stream()  # raises without CUDA
        stream.wait_stream(torch.cuda.current_stream())
        graph = torch.cuda.CUDAGraph()
        # Warm-up (compilation, autotuning, lazy init) off the default stream, as capture requires. The outer
        # context restores the caller's stream even when a failed capture leaves torch.cuda.graph's unexited.
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                fn()
            with torch.cuda.graph(graph, stream=stream):
                for _ in range(calls):
                    out = fn()
        torch.cuda.current_stream().wait_stream(stream)
    except Exception as error:  # whatever stops a capture, the calls can still be timed eagerly
        why = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]

        def loop() -> Any:
            for _ in range(calls):
                result = fn()
            return result

        return loop, f"eager: {why}"

    def replay() -> Any:
        graph.replay()
        return out

    return replay, "cuda_graph"
