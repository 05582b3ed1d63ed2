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
    """The benchmark's median in seconds, or None under --benchmark-disable (nothing was timed)."""
    return benchmark.stats.stats.median if benchmark.enabled and benchmark.stats is not None else None


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
