"""Decode benchmark: the generation engine against the original's generate, in the same run.

    pytest benchmarks/bench_decode.py [--benchmark-json out.json]

Shapes (random weights, greedy, EOS disabled so every row generates the whole budget):
- CUDA: flavors `360m` and `135m` (DUALTOWER_BENCH_FLAVORS narrows them); one 5-tile image (prefix 3 + 5 x 65 =
  328 tokens) + 61 text tokens = a 389-token prompt; 64 new tokens; batch 1 and 16: reference_throughput.md's
  generation shape. Engine in bf16, decoder block torch.compiled (DUALTOWER_BENCH_COMPILE=0: eager) and the
  whole decode step captured in one CUDA graph; the prefill's blocks compiled too (`compile_prefill`).
- CPU: the `debug` flavor, 2 tiles, 16 text tokens, 8 new tokens, batch 1 and 4, eager fp32.

Baseline: original_generate.py, the original algorithm (full left LM, right tower over the whole prompt with a
dense mask, K/V grown with torch.cat, repeat_interleave GQA, one extra model step), fp32 weights under bf16
autocast on CUDA as reference_throughput.md measured it. On CPU both run fp32 and must produce the same tokens.

extra_info (see _common.py): ms_per_token (one decode step), tokens_per_s (generated tokens per second of
decoding), gb_s (right-tower weights + K/V read per decode step / step time), ttft_ms (cold: vision + left tower
+ prefill + first token), ttft_cached_ms (the image's K/V from the prefix cache), peak_mem_gib (the engine's
weights, caches and activations), ratio (baseline ms per step / engine ms per step), ratio_ttft,
baseline_ms_per_token, baseline_tokens_per_s, baseline_ttft_ms, baseline_peak_mem_gib (the original's fp32
weights, caches and activations, without the engine's resident model).
Targets (reported, not asserted): 360m batch 1 <= 2 ms/token and TTFT <= 30 ms, batch 16 >= 5000 tokens/s;
135m batch 1 <= 1.5 ms/token.
DUALTOWER_BENCH_PROFILE_DIR=DIR: after timing, one more batch-1 generation runs under the torch profiler into
DIR/decode_<flavor>_rows1.json (time to first token is where the engine trails its targets).

Shape legend: B rows, L prompt tokens, P prefix tokens.
"""

from __future__ import annotations

import copy
import os
import statistics
from pathlib import Path

import pytest
import torch
from _common import CUDA, DEVICE, device_name, env_list, median_s, peak_mem_gib, reset_peak_memory, synced
from original_generate import original_batch, original_generate

from dualtower.generation import Generator, PreparedPrompt, SamplingConfig
from dualtower.model import DualTowerVLM
from dualtower.training.profiling import trace_to

FLAVORS = env_list("DUALTOWER_BENCH_FLAVORS", "360m,135m" if CUDA else "debug")  # 360m first: the headline
BATCHES = [1, 16] if CUDA else [1, 4]
TILES, TEXT_TOKENS, NEW_TOKENS = (5, 61, 64) if CUDA else (2, 16, 8)
ROUNDS = 5 if CUDA else 2
COMPILE = CUDA and os.environ.get("DUALTOWER_BENCH_COMPILE", "1") != "0"
TARGETS = {
    ("360m", 1): {"ms_per_token": 2.0, "ttft_ms": 30.0},
    ("360m", 16): {"tokens_per_s": 5000.0},
    ("135m", 1): {"ms_per_token": 1.5},
}


def make_prompt(model: DualTowerVLM, tiles: int, text_tokens: int, seed: int = 0) -> PreparedPrompt:
    """Same length for every seed; the seed changes the image and the question."""
    cfg, generator = model.cfg, torch.Generator().manual_seed(seed)
    ids = [1, 9, 10]  # <|im_start|> user \n
    for _ in range(tiles):
        ids += [cfg.global_image_token_id, *[cfg.image_token_id] * cfg.image_tokens_per_tile]
    prefix_len = len(ids)
    ids += torch.randint(3, 40000, (text_tokens,), generator=generator).tolist()
    pixels = torch.rand(tiles, 3, cfg.tile_size, cfg.tile_size, generator=generator)
    return PreparedPrompt(torch.tensor(ids), pixels, prefix_len)


@pytest.fixture(scope="module", params=FLAVORS)
def models(request) -> tuple[str, DualTowerVLM, DualTowerVLM]:
    """(flavor, fp32 model for the baseline (kept on the CPU between its runs), the engine's model)."""
    torch.manual_seed(0)
    reference = DualTowerVLM.from_flavor(request.param).requires_grad_(False)
    fast = copy.deepcopy(reference).to(DEVICE, torch.bfloat16 if CUDA else torch.float32)
    return request.param, reference, fast


def _bytes_per_step(model: DualTowerVLM, rows: int, cached_tokens: float) -> float:
    """Right-tower weights (the tied head once) + the K/V a decode step reads."""
    decoder = model.text_decoder
    weights = sum(p.numel() * p.element_size() for p in decoder.parameters())
    cfg, elem = decoder.cfg, decoder.head.weight.element_size()
    kv = 2 * cfg.n_blocks * rows * cfg.n_kv_heads * cfg.head_dim * cached_tokens * elem
    return weights + kv


@pytest.mark.parametrize("rows", BATCHES)
def test_decode(benchmark, models, rows: int) -> None:
    flavor, reference, fast = models
    prompts = [make_prompt(reference, TILES, TEXT_TOKENS, seed=row) for row in range(rows)]  # distinct images
    config = SamplingConfig(max_new_tokens=NEW_TOKENS)
    # No prefix cache. The prefill's blocks are compiled in place too, so `warm` below gets them as well.
    cold = Generator(fast, eos_token_ids=(), prefix_cache_bytes=0, compile=COMPILE, compile_prefill=COMPILE)
    cold.generate_prepared(prompts, config)  # compile, capture the CUDA graph
    runs, engine_tokens = [], []

    def generate() -> None:
        engine_tokens[:] = [r.token_ids for r in cold.generate_prepared(prompts, config)]
        runs.append(cold.stats)

    reset_peak_memory()
    benchmark.group = f"decode {flavor} rows={rows}"
    benchmark.pedantic(synced(generate), rounds=ROUNDS, iterations=1, warmup_rounds=1 if CUDA else 0)
    engine_peak = peak_mem_gib()
    warm = Generator(fast, eos_token_ids=(), compile=COMPILE)  # shares the compiled block with `cold`
    warm.generate_prepared(prompts, config)  # fills the prefix cache
    cached = [_cached_ttft_ms(warm, prompts, config) for _ in range(ROUNDS)]
    folder = os.environ.get("DUALTOWER_BENCH_PROFILE_DIR")
    if folder and rows == 1:  # after the figures: profiling must not touch them
        with trace_to(Path(folder) / f"decode_{flavor}_rows{rows}.json", DEVICE):
            cold.generate_prepared(prompts, config)

    baseline_runs, baseline_tokens, baseline_peak = _baseline(reference, prompts)
    if not CUDA:  # the same fp32 weights and math: the two must agree token for token
        assert engine_tokens == baseline_tokens
    if median_s(benchmark) is None:
        return
    runs = runs[-ROUNDS:]  # the timed rounds, not the warm-up
    ms_per_token = statistics.median(1e3 * s.decode_s / s.decode_steps for s in runs)
    baseline_ms = statistics.median(1e3 * decode / NEW_TOKENS for _, decode in baseline_runs)
    ttft_ms = statistics.median(1e3 * s.ttft_s for s in runs)
    baseline_ttft = statistics.median(1e3 * prefill for prefill, _ in baseline_runs)
    prompt_len = prompts[0].input_ids.numel()
    info = {
        "device": device_name(),
        "provider": "engine",
        "role": "fast",
        "baseline": "original_generate",
        "flavor": flavor,
        "rows": rows,
        "prompt_tokens": prompt_len,
        "prefix_tokens": prompts[0].prefix_len,
        "new_tokens": NEW_TOKENS,
        "engine_dtype": str(fast.text_decoder.head.weight.dtype),
        "engine_compiled": COMPILE,
        "engine_compiled_prefill": COMPILE,
        "engine_cuda_graph": CUDA,
        "ms_per_token": ms_per_token,
        "tokens_per_s": rows * 1e3 / ms_per_token,
        "gb_s": _bytes_per_step(fast, rows, prompt_len + NEW_TOKENS / 2) / ms_per_token / 1e6,
        "end_to_end_tokens_per_s": statistics.median(s.tokens_per_s for s in runs),
        "ttft_ms": ttft_ms,
        "ttft_cached_ms": statistics.median(cached),
        "peak_mem_gib": engine_peak,
        "ratio": baseline_ms / ms_per_token,
        "ratio_ttft": baseline_ttft / ttft_ms,
        "baseline_ms_per_token": baseline_ms,
        "baseline_tokens_per_s": rows * 1e3 / baseline_ms,
        "baseline_ttft_ms": baseline_ttft,
        "baseline_peak_mem_gib": baseline_peak,
    }
    for metric, target in TARGETS.get((flavor, rows), {}).items() if CUDA else ():
        info[f"target_{metric}"] = target
        info[f"meets_{metric}"] = info[metric] >= target if metric == "tokens_per_s" else info[metric] <= target
    benchmark.extra_info.update(info)


def _baseline(reference: DualTowerVLM, prompts: list[PreparedPrompt]) -> tuple[list, list, float | None]:
    """[(ttft s, decode s)] of the original's generate, its greedy tokens and its peak memory (GiB).

    The fp32 model visits the device only for these runs (the engine's peak never holds it), and the baseline's
    peak counts only what it brings: its weights, caches and activations, not the engine's resident model."""
    reset_peak_memory()
    resident = torch.cuda.memory_allocated() / 2**30 if CUDA else 0.0
    reference.to(DEVICE)
    try:
        batch = original_batch(prompts, DEVICE)
        if CUDA:
            original_generate(reference, batch, NEW_TOKENS)  # warm-up (kernel selection, allocator)
        done = [original_generate(reference, batch, NEW_TOKENS) for _ in range(max(2, ROUNDS // 2))]
        peak = peak_mem_gib()
    finally:
        reference.to("cpu")
    peak = None if peak is None else peak - resident
    return [run[1:] for run in done], done[0][0].tolist(), peak


def _cached_ttft_ms(engine: Generator, prompts: list[PreparedPrompt], config: SamplingConfig) -> float:
    engine.generate_prepared(prompts, config)
    assert engine.stats.vision_tower_runs == 0
    return 1e3 * engine.stats.ttft_s
