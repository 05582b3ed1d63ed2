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
more time; decode >= 2x the eager reference at batch 1 with a 2k cache.
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
    synced,
)
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from dualtower import ops
from dualtower.training import peak_flops
from dualtower_kernels.decode_attention import decode_attention_reference
from dualtower_kernels.linear_cross_entropy import linear_cross_entropy_reference
from dualtower_kernels.prefix_attention import concat_prefix_text
from dualtower_kernels.prefix_attention_reference import prefix_attention_reference
from dualtower_kernels.projector import pixel_shuffle, pixel_shuffle_project_reference
from dualtower_kernels.testing import PackedAttention, packed_attention, random_packing

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")

DTYPE = torch.bfloat16 if CUDA else torch.float32
ROUNDS, WARMUP = (20, 3) if CUDA else (3, 1)
TRITON_AVAILABLE = ops.is_available("triton", DEVICE)  # CUDA, or the interpreter on CPU
COMPILED = pytest.mark.compiled
_baseline_ms: dict[tuple, float] = {}
_baseline_peak: dict[tuple, float | None] = {}

Providers = dict[str, Callable[[], object]]


# ----------------------------------------------------------------------------------------------------------------
# Measuring
# ----------------------------------------------------------------------------------------------------------------


def _smoke_check(providers: Providers) -> None:
    """CPU: run the Triton kernel once through the interpreter, compare with the reference, then skip."""
    actual, expected = providers["triton"](), providers["reference"]()
    torch.testing.assert_close(actual, expected, atol=2e-4, rtol=2e-3)
    pytest.skip("triton ran once under TRITON_INTERPRET and matched the reference; interpreter timings are not "
                "speed figures (timed on CUDA only)")


_errors: dict[tuple, float] = {}


def _check_result(key: tuple, providers: Providers, fast: str) -> float:
    """CUDA: the timed kernel against the reference, once per case. Autotuning picks its config at this shape,
    and that config is the one timed; the tests check the configs they run, at their own shapes."""
    if key not in _errors:
        _errors[key] = relative_error(providers[fast](), providers["reference"]())
    assert _errors[key] < WRONG_RESULT, f"{fast} differs from the reference: relative error {_errors[key]:.3g}"
    return _errors[key]


def _measure(benchmark, key: tuple, providers: Providers, provider: str, baselines: list[str],
             flops: float = 0.0, bytes_moved: float = 0.0, fast: str = "triton") -> None:
    """Time `provider`; on the `fast` entry also time each available baseline once per key and record ratios."""
    if provider not in providers:
        pytest.skip(f"{provider} is not available on {DEVICE.type}")
    if provider == "triton" and not CUDA:
        _smoke_check(providers)
    error = _check_result(key, providers, fast) if provider == fast and CUDA else None
    run = synced(providers[provider])
    if provider != fast:  # a library baseline may lack a case here (e.g. a backward): say so, not fail
        _try_baseline(provider, run)
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
                info[f"error_vs_{name}"] = _first_line(error)
                continue
            _baseline_peak[(*key, name)] = extra_peak_gib(synced(providers[name]))
        info.setdefault("baseline", name)  # the first available baseline is the primary one
        info.setdefault("ratio", _baseline_ms[(*key, name)] / ms)
        info[f"ratio_vs_{name}"] = _baseline_ms[(*key, name)] / ms
        peak = _baseline_peak[(*key, name)]
        if peak and info["peak_mem_gib"] is not None:
            info[f"mem_ratio_vs_{name}"] = info["peak_mem_gib"] / peak


BASELINE_ERRORS = (RuntimeError, NotImplementedError, TypeError, ValueError)


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:200]


def _try_baseline(provider: str, run: Callable[[], None]) -> None:
    try:
        run()
    except BASELINE_ERRORS as error:
        pytest.skip(f"{provider} cannot run this case here: {_first_line(error)}")


def _skip_compiled_on_cpu(provider: str) -> None:
    if provider in ("compiled_reference", "flex_attention") and not CUDA:
        pytest.skip("compiling on a 2-core CPU costs more than the benchmark")


def _with_backward(forward: Callable[[], torch.Tensor], leaves: list[torch.Tensor]) -> Callable[[], object]:
    def run() -> tuple[torch.Tensor, ...]:
        out = forward()
        return torch.autograd.grad(out, leaves, torch.ones_like(out))

    return run


def _forward_only(providers: Providers) -> Providers:
    return {name: (lambda fn=fn: torch.no_grad()(fn)()) for name, fn in providers.items()}


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
    _skip_compiled_on_cpu(provider)
    batch = _attention_batch(case)
    providers = _attention_providers(case, provider)
    if mode == "fwd_bwd":
        # The left tower's empty prefix K/V are not inputs of every provider (the libraries skip the merge).
        leaves = [leaf for leaf in batch.leaves if leaf.numel()]
        providers = {name: _with_backward(fn, leaves) for name, fn in providers.items()}
        flops = 3.5 * batch.flops  # backward = 2.5 x forward, as FlashAttention counts it
    else:
        providers = _forward_only(providers)
        flops = batch.flops
    benchmark.group = f"prefix_attention {case} {mode}"
    _measure(benchmark, ("attn", case, mode), providers, provider, ["varlen_attn", "flash", "reference"], flops)


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
    _skip_compiled_on_cpu(provider)
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
        providers = {n: _with_backward(fn, leaves.get(n, [x, weight])) for n, fn in providers.items()}
    else:
        providers = _forward_only(providers)
    flops = 2.0 * gemms * shuffled.shape[0] * shuffled.shape[1] * out_width
    benchmark.group = f"projector {case} {mode}"
    _measure(benchmark, ("proj", case, mode), providers, provider, ["reference", "cublas_gemm"], flops=flops)


LCE_CASES = {"135m": 576, "360m": 960}


@pytest.mark.parametrize("case", list(LCE_CASES))
@pytest.mark.parametrize("provider", ["triton", "reference", pytest.param("compiled_reference", marks=COMPILED)])
def test_linear_cross_entropy(benchmark, provider: str, case: str) -> None:
    """Forward + backward (the training use). Half the tokens are supervised."""
    _skip_compiled_on_cpu(provider)
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
    providers = {name: _with_backward(fn, [hidden, weight]) for name, fn in providers.items()}
    flops = 3 * 2.0 * tokens * width * vocab  # logits, d_hidden, d_weight (the eager baseline's work)
    benchmark.group = f"linear_cross_entropy {case} fwd_bwd"
    _measure(benchmark, ("lce", case), providers, provider, ["reference"], flops=flops)


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
    providers = {name: _with_backward(fn, [hidden, weight]) for name, fn in providers.items()}
    benchmark.group = "linear_cross_entropy debug-head fwd_bwd"
    _measure(benchmark, ("lce_chunked",), providers, provider, ["reference"], fast="chunked")


DECODE_ROWS = [1, 8, 64] if CUDA else [1, 4]


@pytest.mark.parametrize("rows", DECODE_ROWS)
@pytest.mark.parametrize("provider", ["triton", "reference", pytest.param("compiled_reference", marks=COMPILED)])
def test_decode_attention(benchmark, provider: str, rows: int) -> None:
    """One decode step of SmolLM2-135M attention over a 2k static cache, rows filled to random lengths."""
    _skip_compiled_on_cpu(provider)
    q_heads, kv_heads, capacity, head_dim = (9, 3, 2048, 64) if CUDA else (3, 1, 40, 16)
    q = torch.randn(rows, q_heads, head_dim, device=DEVICE, dtype=DTYPE)
    k_cache, v_cache = (torch.randn(rows, kv_heads, capacity, head_dim, device=DEVICE, dtype=DTYPE) for _ in "kv")
    lengths = torch.randint(capacity // 2, capacity + 1, (rows,), device=DEVICE)
    lengths[0] = capacity
    providers: Providers = {"reference": lambda: decode_attention_reference(q, k_cache, v_cache, lengths)}
    if TRITON_AVAILABLE:
        impl = ops.implementation("decode_attention", "triton")
        providers["triton"] = lambda: impl(q, k_cache, v_cache, lengths)
    if provider == "compiled_reference":
        compiled = torch.compile(decode_attention_reference)
        providers["compiled_reference"] = lambda: compiled(q, k_cache, v_cache, lengths)
    bytes_moved = 2.0 * lengths.sum().item() * kv_heads * head_dim * k_cache.element_size()
    benchmark.group = f"decode_attention rows={rows}"
    _measure(benchmark, ("decode", rows), providers, provider, ["reference"], bytes_moved=bytes_moved)
