"""Split-K decode attention kernel vs its pure-PyTorch twin (SDPA over the masked static cache)."""

from __future__ import annotations

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
    torch.library.opcheck(decode_attention_op, args, test_utils=("test_schema", "test_faketensor"))


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
