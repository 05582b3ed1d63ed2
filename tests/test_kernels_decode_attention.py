"""Split-K decode attention kernel vs its pure-PyTorch twin (SDPA over the masked static cache); its capture in a
CUDA graph, and the benchmarks' graph timing helper."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from dualtower_kernels.decode_attention import decode_attention, decode_attention_op, decode_attention_reference
from dualtower_kernels.testing import assert_close, assert_error_within, eager_low_precision, other_layout

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")

# (rows, q heads, kv heads, capacity, head dim)
CPU_CASES = {"gqa3": (3, 6, 2, 37, 16), "gqa5": (2, 5, 1, 50, 32), "gqa1_odd_dim": (2, 3, 3, 20, 24)}


def _cache(rows, kv_heads, capacity, head_dim, device="cpu", dtype=torch.float32):
    return [torch.randn(rows, kv_heads, capacity, head_dim, device=device).to(dtype) for _ in range(2)]


@pytest.mark.parametrize("case", list(CPU_CASES), ids=list(CPU_CASES))
def test_matches_reference(case: str) -> None:
    rows, q_heads, kv_heads, capacity, head_dim = CPU_CASES[case]
    q = torch.randn(rows, q_heads, head_dim)
    k_cache, v_cache = _cache(rows, kv_heads, capacity, head_dim)
    lengths = torch.randint(1, capacity + 1, (rows,))
    lengths[0], lengths[-1] = capacity, 1  # a full cache and a single visible position
    ours = decode_attention(q, k_cache, v_cache, lengths)
    assert_close(ours, decode_attention_reference(q, k_cache, v_cache, lengths), atol=1e-5, rtol=1e-5, name="out")


def test_strided_cache_view_and_scale() -> None:
    """A cache sliced out of a bigger preallocated one (non-contiguous) and an explicit scale."""
    big_k, big_v = _cache(2, 2, 64, 16)
    q = torch.randn(2, 4, 16)
    lengths = torch.tensor([5, 30])
    k_cache, v_cache = big_k[:, :, :40], big_v[:, :, :40]
    ours = decode_attention(q, k_cache, v_cache, lengths, scale=0.3)
    expected = decode_attention_reference(q, k_cache, v_cache, lengths, scale=0.3)
    assert_close(ours, expected, atol=1e-5, rtol=1e-5, name="out")


@pytest.mark.parametrize("layout", [lambda t: t, other_layout], ids=["contiguous", "strided"])
def test_opcheck(layout) -> None:
    k_cache, v_cache = _cache(2, 1, 20, 16)
    args = (layout(torch.randn(2, 3, 16)), layout(k_cache), layout(v_cache), torch.tensor([20, 3]), 0.25)
    torch.library.opcheck(decode_attention_op, args)


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 8, 64])
@pytest.mark.parametrize("heads", [(9, 3), (15, 5)], ids=["135m", "360m"])
def test_gpu_bf16_within_twice_pytorch(rows: int, heads: tuple[int, int]) -> None:
    capacity = 2048
    q = torch.randn(rows, heads[0], 64, device="cuda")
    k_cache, v_cache = _cache(rows, heads[1], capacity, 64, device="cuda")
    lengths = torch.randint(1, capacity + 1, (rows,), device="cuda")
    lengths[0] = capacity
    args = lambda dtype: [t.to(dtype) for t in (q, k_cache, v_cache)] + [lengths]
    expected = decode_attention_reference(*args(torch.float64))
    with eager_low_precision():  # PyTorch's own bf16 attention
        theirs = decode_attention_reference(*args(torch.bfloat16))
    assert_error_within(decode_attention(*args(torch.bfloat16)), theirs, expected, name="out")


def test_strided_queries_and_per_row_lengths_across_every_split() -> None:
    """q with its row and head dimensions swapped in memory (a decode step's q is a view of a projection), and
    rows whose lengths end in the first, the middle and the last (partial) split of a 37-position cache."""
    k_cache, v_cache = _cache(3, 2, 37, 16)
    q = other_layout(torch.randn(3, 4, 16))
    assert q.stride(-1) == 1 and not q.is_contiguous()
    lengths = torch.tensor([3, 20, 37])
    ours = decode_attention(q, k_cache, v_cache, lengths)
    assert_close(ours, decode_attention_reference(q, k_cache, v_cache, lengths), atol=1e-5, rtol=1e-5, name="out")


def test_queries_and_caches_whose_head_dim_is_not_contiguous() -> None:
    """The kernels index the head dim with unit stride: other layouts must be copied first, not misread."""
    q = torch.randn(2, 16, 4).transpose(1, 2)  # (B, Hq, D) with stride(-1) == 4
    k_cache, v_cache = (t.transpose(2, 3).contiguous().transpose(2, 3) for t in _cache(2, 2, 21, 16))
    assert q.stride(-1) != 1 and k_cache.stride(-1) != 1
    lengths = torch.tensor([21, 9])
    ours = decode_attention(q, k_cache, v_cache, lengths)
    assert_close(ours, decode_attention_reference(q, k_cache, v_cache, lengths), atol=1e-5, rtol=1e-5, name="out")


def test_only_a_tensor_whose_head_dim_is_strided_is_copied(monkeypatch: pytest.MonkeyPatch) -> None:
    """A cache that is a view (a slice of a bigger one) is read in place even when q must be copied: a copy of
    the whole cache on every decode step would cost more than the attention itself."""
    copied = []

    def spy(t: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = torch._C.TensorBase.contiguous(t, *args, **kwargs)
        if out.data_ptr() != t.data_ptr():
            copied.append(tuple(t.shape))
        return out

    q = torch.randn(2, 16, 4).transpose(1, 2)  # (B, Hq, D) with a strided head dim: must be copied
    big_k, v_cache = _cache(2, 2, 40, 16)
    k_cache = big_k[:, :, :21]  # a view, head dim contiguous
    lengths = torch.tensor([21, 9])
    monkeypatch.setattr(torch.Tensor, "contiguous", spy)
    ours = decode_attention(q, k_cache, v_cache[:, :, :21], lengths)
    monkeypatch.undo()
    assert copied == [(2, 4, 16)]
    expected = decode_attention_reference(q, k_cache, v_cache[:, :, :21], lengths)
    assert_close(ours, expected, atol=1e-5, rtol=1e-5, name="out")


@pytest.mark.gpu
def test_gpu_captured_in_a_cuda_graph_follows_new_queries_and_lengths() -> None:
    """The decode step is captured once and replayed with new tokens: no host sync may happen in the op (capture
    would fail) and no launch setting may depend on the lengths (a replay would reuse the captured one)."""
    q = torch.randn(2, 9, 64, device="cuda", dtype=torch.bfloat16)
    k_cache, v_cache = _cache(2, 3, 2048, 64, device="cuda", dtype=torch.bfloat16)
    lengths = torch.tensor([2048, 5], device="cuda")
    side = torch.cuda.Stream()  # warm-up (compiles the kernels) off the default stream, as capture requires
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        decode_attention(q, k_cache, v_cache, lengths)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = decode_attention(q, k_cache, v_cache, lengths)
    q.copy_(torch.randn_like(q))
    lengths.copy_(torch.tensor([1, 1500]))
    graph.replay()
    expected = decode_attention(q, k_cache, v_cache, lengths)
    torch.testing.assert_close(out, expected, atol=0, rtol=0)
    reference = decode_attention_reference(*[t.double() for t in (q, k_cache, v_cache)], lengths)
    torch.testing.assert_close(out.double(), reference, atol=2e-2, rtol=2e-2)


def _bench_common():
    """benchmarks/_common.py (benchmarks/ is no package)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "_common.py"
    spec = importlib.util.spec_from_file_location("bench_common_decode", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the calls are captured (the gpu test below)")
def test_repeated_calls_without_cuda_are_an_eager_loop_that_says_why() -> None:
    """bench_kernels times decode per call over rounds of repeated calls; without a graph each round must still
    make exactly `calls` calls, or the per-call figures and the ratios would be wrong."""
    outputs = iter(range(100))
    run, how = _bench_common().repeated_calls(lambda: next(outputs), calls=5)
    assert how.startswith("eager: ") and "CUDA" in how
    assert run() == 4 and run() == 9


@pytest.mark.gpu
def test_gpu_repeated_calls_replay_one_graph_and_fall_back_on_a_host_sync() -> None:
    repeated_calls = _bench_common().repeated_calls
    x = torch.ones(4, device="cuda")
    acc = torch.zeros(4, device="cuda")
    run, how = repeated_calls(lambda: acc.add_(x), calls=3, warmup=1)
    assert how == "cuda_graph"
    acc.zero_()
    x.fill_(2.0)  # a static input, read by the replay
    run()
    torch.testing.assert_close(acc, torch.full_like(acc, 6.0))
    run, how = repeated_calls(lambda: x.sum().item(), calls=3)
    assert how.startswith("eager: ") and run() == 8.0
