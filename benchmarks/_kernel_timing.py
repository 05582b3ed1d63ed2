"""Measuring for the kernel benchmarks: time a provider, and on the fast entry its baselines, once per shape.

Shared by bench_kernels.py's families. Each test builds `providers` (name -> a call with no arguments) and calls
`measure`; the fast entry (`triton` by default) also checks its result against the reference first (CUDA) and
records `ratio`, `ratio_vs_<baseline>` and `mem_ratio_vs_<baseline>`. Baselines are timed once per key and
reused by later entries of the same shape.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from _common import (
    CUDA,
    DEVICE,
    WRONG_RESULT,
    device_name,
    extra_peak_gib,
    median_ms,
    median_s,
    relative_error,
    synced,
)

from dualtower import ops
from dualtower.training import peak_flops

DTYPE = torch.bfloat16 if CUDA else torch.float32
ROUNDS, WARMUP = (20, 3) if CUDA else (3, 1)
TRITON_AVAILABLE = ops.is_available("triton", DEVICE)  # CUDA, or the interpreter on CPU
COMPILED = pytest.mark.compiled
_baseline_ms: dict[tuple, float] = {}
_baseline_peak: dict[tuple, float | None] = {}

Providers = dict[str, Callable[[], object]]


def smoke_check(providers: Providers) -> None:
    """CPU: run the Triton kernel once through the interpreter, compare with the reference, then skip."""
    actual, expected = providers["triton"](), providers["reference"]()
    torch.testing.assert_close(actual, expected, atol=2e-4, rtol=2e-3)
    pytest.skip("triton ran once under TRITON_INTERPRET and matched the reference; interpreter timings are not "
                "speed figures (timed on CUDA only)")


_errors: dict[tuple, float] = {}


def check_result(key: tuple, providers: Providers, fast: str) -> float:
    """CUDA: the timed kernel against the reference, once per case. Autotuning picks its config at this shape,
    and that config is the one timed; the tests check the configs they run, at their own shapes."""
    if key not in _errors:
        _errors[key] = relative_error(providers[fast](), providers["reference"]())
    assert _errors[key] < WRONG_RESULT, f"{fast} differs from the reference: relative error {_errors[key]:.3g}"
    return _errors[key]


def measure(benchmark, key: tuple, providers: Providers, provider: str, baselines: list[str],
             flops: float = 0.0, bytes_moved: float = 0.0, fast: str = "triton") -> None:
    """Time `provider`; on the `fast` entry also time each available baseline once per key and record ratios."""
    if provider not in providers:
        pytest.skip(f"{provider} is not available on {DEVICE.type}")
    if provider == "triton" and not CUDA:
        smoke_check(providers)
    error = check_result(key, providers, fast) if provider == fast and CUDA else None
    run = synced(providers[provider])
    if provider != fast:  # a library baseline may lack a case here (e.g. a backward): say so, not fail
        try_baseline(provider, run)
    benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=WARMUP, iterations=1)
    seconds = median_s(benchmark)
    if seconds is None:  # --benchmark-disable: the call ran once, nothing to report
        return
    ms = seconds * 1e3
    info = benchmark.extra_info
    info.update(device=device_name(), provider=provider, role="fast" if provider == fast else "baseline", ms=ms,
                peak_mem_gib=extra_peak_gib(run))
    if error is not None:
        info["rel_err_vs_reference"] = error
    if flops:
        info["tflops"] = flops / ms / 1e9
        peak = peak_flops(DEVICE)
        info["mfu"] = flops / seconds / peak if peak else None
    if bytes_moved:
        info["gb_s"] = bytes_moved / ms / 1e6
    if provider != fast:
        return
    for name in (b for b in baselines if b in providers):
        if (*key, name) not in _baseline_ms:
            try:
                _baseline_ms[(*key, name)] = median_ms(providers[name], ROUNDS, WARMUP)
            except BASELINE_ERRORS as error:
                info[f"error_vs_{name}"] = first_line(error)
                continue
            _baseline_peak[(*key, name)] = extra_peak_gib(synced(providers[name]))
        info.setdefault("baseline", name)  # the first available baseline is the primary one
        info.setdefault("ratio", _baseline_ms[(*key, name)] / ms)
        info[f"ratio_vs_{name}"] = _baseline_ms[(*key, name)] / ms
        peak = _baseline_peak[(*key, name)]
        if peak and info["peak_mem_gib"] is not None:
            info[f"mem_ratio_vs_{name}"] = info["peak_mem_gib"] / peak


BASELINE_ERRORS = (RuntimeError, NotImplementedError, TypeError, ValueError)


def first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:200]


def try_baseline(provider: str, run: Callable[[], None]) -> None:
    try:
        run()
    except BASELINE_ERRORS as error:
        pytest.skip(f"{provider} cannot run this case here: {first_line(error)}")


def skip_compiled_on_cpu(provider: str) -> None:
    if provider in ("compiled_reference", "flex_attention") and not CUDA:
        pytest.skip("compiling on a 2-core CPU costs more than the benchmark")


def with_backward(forward: Callable[[], torch.Tensor], leaves: list[torch.Tensor]) -> Callable[[], object]:
    def run() -> tuple[torch.Tensor, ...]:
        out = forward()
        return torch.autograd.grad(out, leaves, torch.ones_like(out))

    return run


def forward_only(providers: Providers) -> Providers:
    return {name: (lambda fn=fn: torch.no_grad()(fn)()) for name, fn in providers.items()}
