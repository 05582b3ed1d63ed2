"""Vanilla (single tower) vs dual tower: the same Trainer.train_step on the same packed batch, same run.

    pytest benchmarks/bench_compare.py [--benchmark-json out.json]

Providers (one benchmark entry each, the baseline first):
    vanilla    the `vanilla-*` flavor: vision encoder + projector + one LM over the whole sequence
    dual       the dual-tower flavor: the left LM over the prefix, the right LM over the text only
Both run dualtower's training step (varlen attention, fused linear cross-entropy, AdamW, clipping at 1.0) with
the same freezing rule (bench_train._job): the dual tower's extra cost is its second LM's weights, gradients
and optimizer state; its saving, none in FLOPs (each token still crosses one LM), so the ratio measures the
overhead of the second tower.
Cases:
    debug-cpu           the debug recipe's batch size: 4 rows x 512 tokens (15 tiles = 255 prefix tokens + 257
                        text tokens per row), 10% of the text supervised (as the synthetic data), all trainable
    135m-default-eager  (CUDA) reference_throughput.md's shape, 4 rows x 2048 tokens, the P-CAULDRON freezing
                        (projector + left LM train; in the vanilla model the left LM is the only LM)
    360m-all-eager      (CUDA) the same shape, everything trainable

extra_info (see _common.py): tokens_per_s, tflops and mfu (FLOPs as dualtower.training.flops counts them for
each architecture and freezing), peak_mem_gib (CUDA: the allocator's peak, weights included; CPU: the growth of
the process's peak resident memory over its resident memory before the model was built, `mem_source` says
which), and on the dual entry ratio (vanilla step / dual step: > 1 means the dual tower is faster) and the
vanilla figures as baseline_*.
"""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import re
from pathlib import Path

import pytest
import torch
from _common import CUDA, device_name, median_s, peak_mem_gib, reset_peak_memory
from bench_train import Case, _dualtower_step, _job
from original_step import synthetic_rows

from dualtower.batch import IGNORE_INDEX, PackedBatch
from dualtower.model import DualTowerVLM
from dualtower.training import FlopCounter, apply_freezing, peak_flops

CASES = [
    pytest.param(Case("debug-cpu", "debug", "cpu", 4, 15, 257, "all", compile=False, rounds=3), id="debug-cpu"),
    pytest.param(Case("135m-default-eager", "135m", "cuda", 4, 5, 1723, "default", False, 8), id="135m-default-eager"),
    pytest.param(Case("360m-all-eager", "360m", "cuda", 4, 5, 1723, "all", False, 8), id="360m-all-eager"),
]
SUPERVISED_FRACTION = {"cpu": 0.1, "cuda": 1.0}  # the synthetic data's share on CPU; bench_train's on CUDA
FLAVOR = {"vanilla": "vanilla-{}", "dual": "{}"}
BASELINES: dict[str, dict[str, float | None]] = {}  # case name -> the vanilla provider's figures


# -- CPU memory: the process's peak resident set, reset through /proc (Linux) ----------------------------------


def _status_gib(field: str) -> float | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) / 2**20 if match else None


def _cpu_memory_baseline() -> float | None:
    """Resident memory with earlier benchmarks' memory handed back, after resetting the peak (VmHWM)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # glibc keeps freed pages otherwise, hiding new allocations
        Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak resident set size
    except OSError:
        return None
    return _status_gib("VmRSS")


# -- the batch -----------------------------------------------------------------------------------------------


def compare_batch(model: DualTowerVLM, case: Case) -> tuple[int, PackedBatch]:
    """(tokens per step, packed batch): bench_train's rows, keeping every k-th text label supervised."""
    original, packed = synthetic_rows(model, case.rows, case.tiles, case.text_len)
    keep_every = round(1 / SUPERVISED_FRACTION[case.device])
    labels = packed.labels.clone()
    labels[torch.arange(labels.numel()) % keep_every != 0] = IGNORE_INDEX
    supervised = int((labels != IGNORE_INDEX).sum())
    return original.input_ids.numel(), dataclasses.replace(packed, labels=labels, num_supervised=supervised)


@pytest.mark.parametrize("provider", ["vanilla", "dual"])  # the baseline first: the ratio needs it
@pytest.mark.parametrize("case", CASES)
def test_vanilla_vs_dual_train_step(benchmark, case: Case, provider: str, tmp_path: Path) -> None:
    if case.device == "cuda" and not CUDA:
        pytest.skip("needs a CUDA device")
    device = torch.device(case.device)
    cpu_base = _cpu_memory_baseline() if device.type == "cpu" else None
    case = dataclasses.replace(case, flavor=FLAVOR[provider].format(case.flavor))
    model = DualTowerVLM.from_flavor(case.flavor, device=device)
    tokens, packed = compare_batch(model, case)
    reset_peak_memory()  # after the weights: the peak still counts them
    step = _dualtower_step(case, model, packed, device, tmp_path)
    benchmark.group = f"vanilla vs dual {case.name}"
    benchmark.pedantic(step, rounds=case.rounds, iterations=1, warmup_rounds=3 if device.type == "cuda" else 1)
    median = median_s(benchmark)
    if median is None:
        return
    apply_freezing(model, _job(case).optim)
    flops = FlopCounter(model).batch_flops(packed)
    peak = peak_flops(device)
    if device.type == "cuda":
        memory, source = peak_mem_gib(), "cuda allocator peak"
    else:
        high = _status_gib("VmHWM")
        memory = high - cpu_base if high is not None and cpu_base is not None else None
        source = "cpu resident set growth"
    figures = {
        "tokens_per_s": tokens / median,
        "tflops": flops / median / 1e12,
        "mfu": flops / median / peak if peak else None,
        "peak_mem_gib": memory,
        "step_ms": median * 1e3,
    }
    info = benchmark.extra_info
    info.update(device=device_name() if device.type == "cuda" else "cpu", case=case.name, provider=provider,
                flavor=case.flavor, role="baseline" if provider == "vanilla" else "fast", tokens_per_step=tokens,
                supervised_per_step=packed.num_supervised, parameters=model.num_parameters(),
                trainable_parameters=model.num_parameters(trainable_only=True), mem_source=source,
                model_tflops_per_step=flops / 1e12, **figures)  # fmt: skip
    if provider == "vanilla":
        BASELINES[case.name] = figures
    elif case.name in BASELINES:
        baseline = BASELINES[case.name]
        info.update(baseline="vanilla", ratio=baseline["step_ms"] / figures["step_ms"])
        info.update({f"baseline_{key}": value for key, value in baseline.items()})
