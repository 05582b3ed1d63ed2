"""Kernel benchmarks: each fused Triton kernel against its baselines in the same run (pytest-benchmark).

    pytest benchmarks/bench_kernels.py [--benchmark-json out.json] [-m "not compiled"]

CUDA: the model's real shapes (packed 4096-token rows, SmolLM2-135M/360M heads, SigLIP2 tiles, the 49,218-token
vocabulary), bf16. Every provider gets its own entry; the `triton` entry also times its baselines in the same
test and records `ratio` (primary baseline time / triton time), `ratio_vs_<baseline>` and, for memory,
`mem_ratio_vs_<baseline>` (triton peak / baseline peak). `peak_mem_gib` here is the memory one call allocates
beyond its live inputs. The torch.compile'd baselines (`compiled_reference`, `flex_attention`) are marked
`compiled` and compared through their own entries (scripts/summarize_benchmarks.py lists every pair).

CPU: tiny fp32 shapes, except the chunked linear cross-entropy (the CPU training path, timed at the debug
recipe's head against the eager reference). The eager baselines are timed (for the suite's own sake, not as
speed claims); the Triton kernels run once through the interpreter (TRITON_INTERPRET=1, set by conftest.py),
are checked against the reference, and are then skipped: interpreter timings say nothing about a kernel's speed.

Targets (H100): prefix attention fwd+bwd >= 1.2x varlen_attn (its K/V concatenation included); projector
>= 1.5x eager and >= 85% of a cuBLAS GEMM of the same size; linear CE <= 25% of eager peak memory at <= 5%
more time; decode >= 2x SDPA (the reference: SDPA with enable_gqa over a boolean mask) at batch 1 with a 2k
cache, each timed per call inside CUDA graphs (DECODE_GRAPH_CALLS), as the captured decode step runs them.
Host cost (CUDA): the prefix attention's eager path against its registered op, forward + backward of one
8-token document back to back, where the wall time is Python, dispatch and launches (`us_per_call`).
"""

from __future__ import annotations

import functools
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
    repeated_calls,
    synced,
)
from _kernel_timing import (
    COMPILED,
    DTYPE,
    TRITON_AVAILABLE,
    Providers,
    forward_only,
    measure,
    skip_compiled_on_cpu,
    with_backward,
)
from torch.nn.attention.flex_attention import create_block_mask, flex_attention
from torch.nn.functional import scaled_dot_product_attention

from dualtower import ops
from dualtower_kernels.decode_attention import decode_attention_reference
from dualtower_kernels.linear_cross_entropy import linear_cross_entropy_reference
from dualtower_kernels.prefix_attention import concat_prefix_text, prefix_attention, prefix_attention_fwd
from dualtower_kernels.prefix_attention_reference import prefix_attention_reference
from dualtower_kernels.projector import pixel_shuffle, pixel_shuffle_project_reference
from dualtower_kernels.testing import PackedAttention, packed_attention, random_packing

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")

# ----------------------------------------------------------------------------------------------------------------
# Prefix attention (right tower) and the left tower's causal pass
# ----------------------------------------------------------------------------------------------------------------

ATTENTION_CASES = {  # name: (q heads, kv heads, right tower (with prefix) or left tower (causal over prefixes))
    "right_135m": (9, 3, True),
    "right_360m": (15, 5, True),
    "left_135m": (9, 3, False),
}
FLEX_CASES = ("right_360m",)  # one shape: each flex compile (fwd, fwd+bwd) costs tens of seconds
_compiled_flex = torch.compile(flex_attention) if CUDA else None


@functools.cache
def _attention_batch(case: str) -> PackedAttention:
    q_heads, kv_heads, right = ATTENTION_CASES[case]
    if CUDA:
        text, prefix = random_packing(rows=8, row_tokens=4096, seed=q_heads)
        head_dim = 64
    else:
        text, prefix, head_dim = [13, 1, 0, 6], [16, 0, 9, 5], 16
        q_heads, kv_heads = q_heads // 3, kv_heads // 3
    if not right:
        text, prefix = prefix, [0] * len(prefix)
    return packed_attention(text, prefix, q_heads, kv_heads, head_dim, dtype=DTYPE, device=DEVICE)


@functools.cache
def _flex_forward(case: str) -> Callable[[], torch.Tensor]:
    """flex_attention over [prefix; text] per document; its block mask is built once per case (not timed)."""
    batch = _attention_batch(case)
    n_text, n_prefix = batch.q.shape[0], batch.k_prefix.shape[0]
    docs = torch.arange(len(batch.cu_text) - 1, device=DEVICE)
    text_doc = torch.repeat_interleave(docs, (batch.cu_text[1:] - batch.cu_text[:-1]).long(), output_size=n_text)
    prefix_doc = torch.repeat_interleave(docs, (batch.cu_prefix[1:] - batch.cu_prefix[:-1]).long(),
                                         output_size=n_prefix)
    text_pos = torch.arange(n_text, device=DEVICE) - batch.cu_text.long()[text_doc]
    kv_doc, kv_pos, _ = concat_prefix_text(text_doc, text_pos, prefix_doc, torch.full_like(prefix_doc, -1),
                                           batch.cu_text, batch.cu_prefix)

    def visible(b, h, q_idx, kv_idx):
        return (text_doc[q_idx] == kv_doc[kv_idx]) & (kv_pos[kv_idx] <= text_pos[q_idx])

    mask = create_block_mask(visible, None, None, n_text, n_text + n_prefix, device=DEVICE)

    def forward() -> torch.Tensor:
        keys, values, _ = concat_prefix_text(batch.k, batch.v, batch.k_prefix, batch.v_prefix, batch.cu_text,
                                             batch.cu_prefix)
        heads_first = lambda t: t.transpose(0, 1).unsqueeze(0)
        out = _compiled_flex(heads_first(batch.q), heads_first(keys), heads_first(values), block_mask=mask,
                             enable_gqa=True)
        return out.squeeze(0).transpose(0, 1)

    return forward


def _library_forward(attend: Callable, batch: PackedAttention) -> Callable[[], torch.Tensor]:
    """A library's varlen call as a user would make it: merge [prefix; text] K/V per document, then attend."""

    def forward() -> torch.Tensor:
        keys, values, cu_k = batch.k, batch.v, batch.cu_text  # the left tower's pass needs no merge
        if batch.k_prefix.shape[0]:
            keys, values, cu_k = concat_prefix_text(batch.k, batch.v, batch.k_prefix, batch.v_prefix,
                                                    batch.cu_text, batch.cu_prefix)
        return attend(batch.q, keys, values, batch.cu_text, cu_k, batch.max_text_len,
                      batch.max_text_len + batch.max_prefix_len)

    return forward


def _attention_providers(case: str, provider: str) -> Providers:
    batch = _attention_batch(case)
    providers: Providers = {"reference": lambda: prefix_attention_reference(*batch.args)}
    if TRITON_AVAILABLE:
        providers["triton"] = lambda: ops.implementation("prefix_attention", "triton")(*batch.args)
    if ops.is_available("torch_varlen", DEVICE):
        providers["varlen_attn"] = _library_forward(ops.torch_varlen_attention, batch)
    if ops.is_available("flash", DEVICE):
        from flash_attn import flash_attn_varlen_func

        flash = lambda q, k, v, cu_q, cu_k, max_q, max_k: flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k,
                                                                                  causal=True)
        providers["flash"] = _library_forward(flash, batch)
    if provider == "flex_attention" and CUDA and case in FLEX_CASES:
        providers["flex_attention"] = _flex_forward(case)
    return providers


@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("case", list(ATTENTION_CASES))
@pytest.mark.parametrize(
    "provider", ["triton", "varlen_attn", "flash", pytest.param("flex_attention", marks=COMPILED), "reference"]
)
def test_prefix_attention(benchmark, provider: str, case: str, mode: str) -> None:
    skip_compiled_on_cpu(provider)
    batch = _attention_batch(case)
    providers = _attention_providers(case, provider)
    if mode == "fwd_bwd":
        # The left tower's empty prefix K/V are not inputs of every provider (the libraries skip the merge).
        leaves = [leaf for leaf in batch.leaves if leaf.numel()]
        providers = {name: with_backward(fn, leaves) for name, fn in providers.items()}
        flops = 3.5 * batch.flops  # backward = 2.5 x forward, as FlashAttention counts it
    else:
        providers = forward_only(providers)
        flops = batch.flops
    benchmark.group = f"prefix_attention {case} {mode}"
    measure(benchmark, ("attn", case, mode), providers, provider, ["varlen_attn", "flash", "reference"], flops)


HOST_COST_CALLS = 200


def test_prefix_attention_host_cost(benchmark) -> None:
    """Host time of one forward + backward of a single 8-token document, where the kernels take microseconds: the
    wall time of back-to-back calls is their Python, dispatch and launch cost. Timed: the eager path (an
    autograd.Function); baseline: the registered custom op with its registered backward, called eagerly (what
    the eager path used to be, and what compiled code calls)."""
    if not CUDA:
        pytest.skip("needs real launches: the interpreter runs the kernels themselves in Python")
    batch = packed_attention([8], [8], 9, 3, 64, dtype=DTYPE, device=DEVICE)
    grad_out = torch.ones_like(batch.q)

    def calls(attend: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            for _ in range(HOST_COST_CALLS):
                torch.autograd.grad(attend(), batch.leaves, grad_out)
        return run

    eager = calls(lambda: prefix_attention(*batch.args))
    registered = calls(lambda: prefix_attention_fwd(*batch.args, batch.q.shape[-1] ** -0.5)[0])
    benchmark.group = "prefix_attention host cost"
    benchmark.pedantic(synced(eager), rounds=5, warmup_rounds=1, iterations=1)
    seconds = median_s(benchmark)
    if seconds is None:
        return
    baseline_us = median_ms(registered, rounds=5, warmup=1) * 1e3 / HOST_COST_CALLS
    us = seconds * 1e6 / HOST_COST_CALLS
    benchmark.extra_info.update(device=device_name(), provider="eager_function", role="fast", us_per_call=us,
                                baseline="registered_op", baseline_us_per_call=baseline_us, ratio=baseline_us / us)


# ----------------------------------------------------------------------------------------------------------------
# Projector, linear cross-entropy, decode
# ----------------------------------------------------------------------------------------------------------------

PROJECTOR_CASES = {"135m": 576, "360m": 960}


@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("case", list(PROJECTOR_CASES))
@pytest.mark.parametrize(
    "provider", ["triton", "reference", pytest.param("compiled_reference", marks=COMPILED), "cublas_gemm"]
)
def test_projector(benchmark, provider: str, case: str, mode: str) -> None:
    skip_compiled_on_cpu(provider)
    tiles, side, width, factor, out_width = (256, 32, 768, 4, PROJECTOR_CASES[case]) if CUDA else (2, 4, 16, 2, 24)
    x = torch.randn(tiles, side * side, width, device=DEVICE, dtype=DTYPE, requires_grad=True)
    weight = (torch.randn(out_width, width * factor**2, device=DEVICE) * 0.01).to(DTYPE).requires_grad_()
    shuffled = pixel_shuffle(x.detach(), factor).reshape(-1, width * factor**2).contiguous().requires_grad_()
    providers: Providers = {
        "reference": lambda: pixel_shuffle_project_reference(x, weight, factor),
        "cublas_gemm": lambda: shuffled @ weight.t(),  # the GEMM alone, on an already shuffled copy
    }
    if TRITON_AVAILABLE:
        providers["triton"] = lambda: ops.implementation("pixel_shuffle_project", "triton")(x, weight, factor)
    if provider == "compiled_reference":
        compiled = torch.compile(pixel_shuffle_project_reference)
        providers["compiled_reference"] = lambda: compiled(x, weight, factor)
    gemms = 1
    if mode == "fwd_bwd":
        gemms = 3
        leaves = {"cublas_gemm": [shuffled, weight]}
        providers = {n: with_backward(fn, leaves.get(n, [x, weight])) for n, fn in providers.items()}
    else:
        providers = forward_only(providers)
    flops = 2.0 * gemms * shuffled.shape[0] * shuffled.shape[1] * out_width
    benchmark.group = f"projector {case} {mode}"
    measure(benchmark, ("proj", case, mode), providers, provider, ["reference", "cublas_gemm"], flops=flops)


LCE_CASES = {"135m": 576, "360m": 960}


@pytest.mark.parametrize("case", list(LCE_CASES))
@pytest.mark.parametrize("provider", ["triton", "reference", pytest.param("compiled_reference", marks=COMPILED)])
def test_linear_cross_entropy(benchmark, provider: str, case: str) -> None:
    """Forward + backward (the training use). Half the tokens are supervised; TFLOP/s counts those."""
    skip_compiled_on_cpu(provider)
    tokens, width, vocab = (16384, LCE_CASES[case], 49218) if CUDA else (24, 16, 100)
    hidden = torch.randn(tokens, width, device=DEVICE, dtype=DTYPE, requires_grad=True)
    weight = (torch.randn(vocab, width, device=DEVICE) / width**0.5).to(DTYPE).requires_grad_()
    labels = torch.randint(0, vocab, (tokens,), device=DEVICE)
    labels[::2] = -100
    providers: Providers = {"reference": lambda: linear_cross_entropy_reference(hidden, weight, labels)}
    if TRITON_AVAILABLE:
        impl = ops.implementation("linear_cross_entropy", "triton")
        providers["triton"] = lambda: impl(hidden, weight, labels)
    if provider == "compiled_reference":
        compiled = torch.compile(linear_cross_entropy_reference)
        providers["compiled_reference"] = lambda: compiled(hidden, weight, labels)
    providers = {name: with_backward(fn, [hidden, weight]) for name, fn in providers.items()}
    # logits, d_hidden, d_weight of the supervised tokens: the work the loss requires, which the fused kernel does
    # (as flops.py counts the head); the eager baseline's logits of the ignored tokens are its own overhead
    supervised = int((labels != -100).sum())
    flops = 3 * 2.0 * supervised * width * vocab
    benchmark.group = f"linear_cross_entropy {case} fwd_bwd"
    measure(benchmark, ("lce", case), providers, provider, ["reference"], flops=flops)


@pytest.mark.parametrize("provider", ["chunked", "reference"])
def test_linear_cross_entropy_chunked(benchmark, provider: str) -> None:
    """The PyTorch row pass (the CPU training path), forward + backward, at the debug recipe's head: 1,024 text
    tokens of width 128, one in 8 supervised (CUDA: 16,384 tokens of the 135m width), the real vocabulary."""
    tokens, width = (16384, 576) if CUDA else (1024, 128)
    hidden = torch.randn(tokens, width, device=DEVICE, dtype=DTYPE, requires_grad=True)
    weight = (torch.randn(49218, width, device=DEVICE) / width**0.5).to(DTYPE).requires_grad_()
    labels = torch.full((tokens,), -100, device=DEVICE)
    labels[::8] = torch.randint(0, 49218, (tokens // 8,), device=DEVICE)
    chunked = ops.implementation("linear_cross_entropy", "chunked")
    providers: Providers = {
        "chunked": lambda: chunked(hidden, weight, labels),
        "reference": lambda: linear_cross_entropy_reference(hidden, weight, labels),
    }
    providers = {name: with_backward(fn, [hidden, weight]) for name, fn in providers.items()}
    flops = 3 * 2.0 * (tokens // 8) * width * weight.shape[0]  # the supervised tokens, as test_linear_cross_entropy
    benchmark.group = "linear_cross_entropy debug-head fwd_bwd"
    measure(benchmark, ("lce_chunked",), providers, provider, ["reference"], flops=flops, fast="chunked")


DECODE_ROWS = [1, 8, 64] if CUDA else [1, 4]
# CUDA: one timed round replays a CUDA graph of this many calls and the figures are per call. The product runs
# decode attention inside the captured decode step, where the ~0.1 ms host and launch cost of an eager call is
# gone; timing eager calls would compare only that. The graph's own launch and the round's synchronize add a
# few microseconds per round, a few tenths of one per call.
DECODE_GRAPH_CALLS = 32
DECODE_BASELINES = ["reference", "sdpa_grouped"]


def _sdpa_grouped_decode(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor
) -> torch.Tensor:
    """SDPA without its GQA path: the G query heads of one K/V head become G query positions (B, Hkv, G, D) over
    their shared cache, so no K/V head is repeated and a fused backend that takes a mask may run it."""
    rows, q_heads, head_dim = q.shape
    kv_heads, capacity = k_cache.shape[1], k_cache.shape[2]
    visible = torch.arange(capacity, device=q.device)[None, :] < lengths[:, None]  # (B, S)
    grouped = q.reshape(rows, kv_heads, q_heads // kv_heads, head_dim)
    out = scaled_dot_product_attention(grouped, k_cache, v_cache, attn_mask=visible[:, None, None, :])
    return out.reshape(rows, q_heads, head_dim)


def _decode_graphed(providers: Providers, provider: str) -> tuple[Providers, dict[str, str]]:
    """CUDA: what this entry times (the fast entry: also its reference and baselines) as DECODE_GRAPH_CALLS calls
    per call, and how each runs them (`repeated_calls`: a graph replay, or an eager loop where capture fails)."""
    needed = {provider, *DECODE_BASELINES} if provider == "triton" else {provider}
    timed, how = {}, {}
    for name in sorted(needed & providers.keys()):
        timed[name], how[name] = repeated_calls(providers[name], DECODE_GRAPH_CALLS)
    return timed, how


def _report_per_call(benchmark, providers: Providers, provider: str, how: dict[str, str]) -> None:
    """`measure` timed rounds of DECODE_GRAPH_CALLS calls; its ratios compare equal rounds and stand. Make its
    statistics and `ms` per call (as pytest-benchmark's `iterations` would), record how each side was timed, and
    take peak memory from one eager call (a replay allocates nothing: its memory is the graph's pool)."""
    calls, info, metadata = DECODE_GRAPH_CALLS, benchmark.extra_info, benchmark.stats
    per_call = type(metadata.stats)()
    for seconds in metadata.stats.data:
        per_call.update(seconds / calls)
    metadata.stats, metadata.iterations = per_call, calls
    info["ms"] /= calls
    info["calls_per_replay"] = calls
    info["peak_mem_gib"] = extra_peak_gib(synced(providers[provider]))
    for name, mode in how.items():
        suffix = "" if name == provider else f"_{name}"
        if suffix and f"ratio_vs_{name}" not in info:
            continue  # a baseline measure could not run
        timing, _, why = mode.partition(": ")
        info[f"timing{suffix}"] = timing
        if why:
            info[f"graph_capture_error{suffix}"] = why
        if suffix:  # measure's memory ratio compared replays
            info.pop(f"mem_ratio_vs_{name}", None)
            if base_peak := extra_peak_gib(synced(providers[name])):
                info[f"mem_ratio_vs_{name}"] = info["peak_mem_gib"] / base_peak


@pytest.mark.parametrize("rows", DECODE_ROWS)
@pytest.mark.parametrize(
    "provider", ["triton", "reference", "sdpa_grouped", pytest.param("compiled_reference", marks=COMPILED)]
)
def test_decode_attention(benchmark, provider: str, rows: int) -> None:
    """One decode step of SmolLM2-135M attention over a 2k static cache, rows filled to random lengths; on CUDA
    timed inside CUDA graphs (DECODE_GRAPH_CALLS). `reference` is SDPA with enable_gqa over a boolean mask."""
    skip_compiled_on_cpu(provider)
    q_heads, kv_heads, capacity, head_dim = (9, 3, 2048, 64) if CUDA else (3, 1, 40, 16)
    q = torch.randn(rows, q_heads, head_dim, device=DEVICE, dtype=DTYPE)
    k_cache, v_cache = (torch.randn(rows, kv_heads, capacity, head_dim, device=DEVICE, dtype=DTYPE) for _ in "kv")
    lengths = torch.randint(capacity // 2, capacity + 1, (rows,), device=DEVICE)
    lengths[0] = capacity
    args = (q, k_cache, v_cache, lengths)
    providers: Providers = {
        "reference": lambda: decode_attention_reference(*args),
        "sdpa_grouped": lambda: _sdpa_grouped_decode(*args),
    }
    if TRITON_AVAILABLE:
        impl = ops.implementation("decode_attention", "triton")
        providers["triton"] = lambda: impl(*args)
    if provider == "compiled_reference":
        compiled = torch.compile(decode_attention_reference)
        providers["compiled_reference"] = lambda: compiled(*args)
    error = None
    if provider not in ("triton", "reference") and provider in providers:  # the fast one: measure checks it
        error = relative_error(providers[provider](), providers["reference"]())
        assert error < WRONG_RESULT, f"{provider} differs from the reference: relative error {error:.3g}"
    timed, how = _decode_graphed(providers, provider) if CUDA else (providers, {})
    calls = DECODE_GRAPH_CALLS if CUDA else 1
    bytes_moved = 2.0 * lengths.sum().item() * kv_heads * head_dim * k_cache.element_size()
    benchmark.group = f"decode_attention rows={rows}"
    measure(benchmark, ("decode", rows), timed, provider, DECODE_BASELINES, bytes_moved=calls * bytes_moved)
    if median_s(benchmark) is None:
        return
    if error is not None:
        benchmark.extra_info["rel_err_vs_reference"] = error
    if CUDA:
        _report_per_call(benchmark, providers, provider, how)
    else:
        benchmark.extra_info["timing"] = "eager"
