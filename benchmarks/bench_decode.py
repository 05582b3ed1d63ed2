"""Decode benchmark: the generation engine against the original-style generate loop, in the same run.

    pytest benchmarks/bench_decode.py --benchmark-only [--benchmark-json out.json]

Shapes (random weights, greedy, EOS disabled so every row generates the whole budget):
- CUDA: flavors `135m` and `360m`; one 5-tile image (prefix 3 + 5 x 65 = 328 tokens) + 61 text tokens = a
  389-token prompt; 64 new tokens; batch 1 and 16. Engine in bf16, decode block torch.compiled and the whole
  decode step captured in one CUDA graph.
- CPU: the `debug` flavor, 2 tiles, 16 text tokens, 8 new tokens, batch 1 and 16, eager fp32.

Baseline = the original's generate (reference_spec 2.6): fp32, the right tower over the whole prompt with a
dense float mask, K/V grown with torch.cat, GQA by repeat_interleave, additive padding masks, max_new_tokens
model steps (one more than needed: the last step's output is thrown away).

extra_info per case: ms_per_token (one decode step), tokens_per_s (generated tokens per second of decoding),
ttft_ms (cold: vision + left tower + prefill + first token), ttft_cached_ms (the image's K/V from the prefix
cache), the same for the baseline, and speedups. GPU targets (reported, not asserted): 360m batch 1
<= 2 ms/token, batch 16 >= 5000 tokens/s, TTFT <= 30 ms; 135m batch 1 <= 1.5 ms/token.

Shape legend: B rows, L prompt tokens, P prefix tokens, H / Hkv heads, D head dim, C width.
"""

from __future__ import annotations

import copy
import os
import statistics
import time

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from dualtower.generation import Generator, PreparedPrompt, SamplingConfig
from dualtower.generation.engine import left_tower_batch
from dualtower.model import DualTowerVLM

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
# DUALTOWER_BENCH_FLAVORS=360m (comma list) narrows a GPU run that must fit a time budget.
FLAVORS = os.environ.get("DUALTOWER_BENCH_FLAVORS", "135m,360m" if CUDA else "debug").split(",")
BATCHES = [1, 16]
TILES, TEXT_TOKENS, NEW_TOKENS = (5, 61, 64) if CUDA else (2, 16, 8)
ROUNDS = 5 if CUDA else 2
# DUALTOWER_BENCH_COMPILE=0: CUDA graph of the eager step only (no torch.compile: seconds instead of a minute).
COMPILE = CUDA and os.environ.get("DUALTOWER_BENCH_COMPILE", "1") != "0"
TARGETS = {("360m", 1): {"ms_per_token": 2.0, "ttft_ms": 30.0}, ("360m", 16): {"tokens_per_s": 5000.0}}
TARGETS[("135m", 1)] = {"ms_per_token": 1.5}


def synchronize() -> None:
    if CUDA:
        torch.cuda.synchronize()


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


# -- the original-style loop -----------------------------------------------------------------------------------


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def _dense_layer(block, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, left_kv=None, past=None) -> Tensor:
    """One block as the original runs it: x (B, L, C); `past` is the [k, v] cache list, grown in place."""
    rows, length, width = x.shape
    attn = block.attn
    h = block.norm1(x)
    q = attn.q_proj(h).view(rows, length, attn.n_heads, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(h).view(rows, length, attn.n_kv_heads, attn.head_dim).transpose(1, 2)
    v = attn.v_proj(h).view(rows, length, attn.n_kv_heads, attn.head_dim).transpose(1, 2)
    q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
    if left_kv is not None:  # the prefix K/V are overwritten by the left tower's
        k_left, v_left = left_kv
        k = torch.cat([k_left, k[:, :, k_left.shape[2] :]], dim=2)
        v = torch.cat([v_left, v[:, :, v_left.shape[2] :]], dim=2)
    if past is not None:
        if past:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        past[:] = [k, v]
    group = attn.n_heads // attn.n_kv_heads
    y = F.scaled_dot_product_attention(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), attn_mask=mask)
    x = x + attn.out_proj(y.transpose(1, 2).reshape(rows, length, width))
    return x + block.mlp(block.norm2(x))


def _prefill_mask(length: int, prefix: int, rows: int) -> Tensor:
    allowed = torch.ones(length, length, dtype=torch.bool, device=DEVICE).tril()
    allowed[:, :prefix] = True
    allowed[:prefix, prefix:] = False
    dense = torch.zeros(length, length, device=DEVICE).masked_fill(~allowed, float("-inf"))
    return dense.expand(rows, 1, length, length)


@torch.inference_mode()
def original_generate(model: DualTowerVLM, prompts: list[PreparedPrompt], new_tokens: int):
    """Greedy tokens (B, new_tokens), prefill seconds, decode seconds; prompts of one length (no padding)."""
    synchronize()
    start = time.perf_counter()
    cfg, decoder, prefix, rows = model.cfg.lm, model.text_decoder, prompts[0].prefix_len, len(prompts)
    left = model.prefix_kv(left_tower_batch(prompts, model.cfg).to(DEVICE))
    left = [
        (k.view(rows, prefix, -1, cfg.head_dim).transpose(1, 2), v.view(rows, prefix, -1, cfg.head_dim).transpose(1, 2))
        for k, v in left
    ]
    ids = torch.stack([p.input_ids for p in prompts]).to(DEVICE)
    length = ids.shape[1]
    cos, sin = decoder.rotary(torch.arange(length, device=DEVICE))
    x, caches = decoder.token_embedding(ids), [[] for _ in decoder.blocks]
    mask = _prefill_mask(length, prefix, rows)
    for block, left_kv, past in zip(decoder.blocks, left, caches, strict=True):
        x = _dense_layer(block, x, cos, sin, mask, left_kv, past)
    logits = decoder.head(decoder.norm(x[:, -1]))
    synchronize()
    decode_start = time.perf_counter()
    tokens = []
    for step in range(new_tokens):  # the last iteration's forward is the original's extra step
        token = logits.argmax(-1)
        tokens.append(token)
        position = length + step
        cos, sin = decoder.rotary(torch.tensor([position], device=DEVICE))
        padding = torch.zeros(rows, 1, 1, position + 1, device=DEVICE)  # additive key-padding mask, all visible
        x = decoder.token_embedding(token)[:, None]
        for block, past in zip(decoder.blocks, caches, strict=True):
            x = _dense_layer(block, x, cos, sin, padding, past=past)
        logits = decoder.head(decoder.norm(x[:, -1]))
    synchronize()
    end = time.perf_counter()
    return torch.stack(tokens, 1), decode_start - start, end - decode_start


# -- fixtures and the benchmark --------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=FLAVORS)
def models(request) -> tuple[str, DualTowerVLM, DualTowerVLM]:
    """(flavor, fp32 model for the baseline, the engine's model: bf16 on CUDA)."""
    torch.manual_seed(0)
    reference = DualTowerVLM.from_flavor(request.param, device=DEVICE).requires_grad_(False)
    fast = copy.deepcopy(reference).to(torch.bfloat16) if CUDA else reference
    return request.param, reference, fast


@pytest.mark.parametrize("rows", BATCHES)
def test_decode(benchmark, models, rows: int) -> None:
    flavor, reference, fast = models
    prompts = [make_prompt(reference, TILES, TEXT_TOKENS, seed=row) for row in range(rows)]  # distinct images
    prompt = prompts[0]
    config = SamplingConfig(max_new_tokens=NEW_TOKENS)
    cold = Generator(fast, eos_token_ids=(), prefix_cache_bytes=0, compile=COMPILE)  # no prefix cache
    cold.generate_prepared(prompts, config)  # compile, capture the CUDA graph
    runs = []

    def generate() -> None:
        cold.generate_prepared(prompts, config)
        runs.append(cold.stats)

    benchmark.pedantic(generate, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    warm = Generator(fast, eos_token_ids=(), compile=COMPILE)  # shares the compiled block with `cold`
    warm.generate_prepared(prompts, config)  # fills the prefix cache
    cached = [_ttft(warm, prompts, config) for _ in range(ROUNDS)]

    original_generate(reference, prompts, NEW_TOKENS)  # warm up
    baseline = [original_generate(reference, prompts, NEW_TOKENS) for _ in range(max(2, ROUNDS // 2))]
    if not CUDA:  # same fp32 weights and math: the two must agree token for token
        engine_tokens = [r.token_ids for r in cold.generate_prepared(prompts, config)]
        assert engine_tokens == baseline[0][0].tolist()

    ms_per_token = statistics.median(1e3 * s.decode_s / s.decode_steps for s in runs)
    baseline_ms = statistics.median(1e3 * decode / NEW_TOKENS for _, _, decode in baseline)
    info = {
        "device": torch.cuda.get_device_name() if CUDA else "cpu",
        "flavor": flavor,
        "rows": rows,
        "prompt_tokens": prompt.input_ids.numel(),
        "prefix_tokens": prompt.prefix_len,
        "new_tokens": NEW_TOKENS,
        "engine_dtype": str(fast.text_decoder.head.weight.dtype),
        "engine_compiled": COMPILE,
        "engine_cuda_graph": CUDA,
        "ms_per_token": ms_per_token,
        "tokens_per_s": rows * 1e3 / ms_per_token,
        "end_to_end_tokens_per_s": statistics.median(s.tokens_per_s for s in runs),
        "ttft_ms": statistics.median(1e3 * s.ttft_s for s in runs),
        "ttft_cached_ms": statistics.median(cached),
        "baseline_ms_per_token": baseline_ms,
        "baseline_tokens_per_s": rows * 1e3 / baseline_ms,
        "baseline_ttft_ms": statistics.median(1e3 * prefill for _, prefill, _ in baseline),
        "speedup_per_token": baseline_ms / ms_per_token,
    }
    if CUDA:
        info["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    for metric, target in TARGETS.get((flavor, rows), {}).items():
        info[f"target_{metric}"] = target
        info[f"meets_{metric}"] = info[metric] >= target if metric == "tokens_per_s" else info[metric] <= target
    benchmark.extra_info.update(info)


def _ttft(engine: Generator, prompts: list[PreparedPrompt], config: SamplingConfig) -> float:
    engine.generate_prepared(prompts, config)
    assert engine.stats.vision_tower_runs == 0
    return 1e3 * engine.stats.ttft_s
