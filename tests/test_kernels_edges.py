"""Edge inputs and input checking of the kernel families and their twins; each twin against an independent
few-line computation on one case.

CPU only (the Triton interpreter): tiny shapes, fp32 unless a test is about another dtype.
"""

from __future__ import annotations

import pytest
import torch

from dualtower_kernels.decode_attention import decode_attention, decode_attention_op, decode_attention_reference
from dualtower_kernels.linear_cross_entropy import (
    linear_cross_entropy,
    linear_cross_entropy_chunked,
    linear_cross_entropy_fwd,
    linear_cross_entropy_reference,
)
from dualtower_kernels.prefix_attention import prefix_attention, prefix_attention_fwd
from dualtower_kernels.prefix_attention_reference import prefix_attention_reference
from dualtower_kernels.projector import pixel_shuffle_project, pixel_shuffle_project_reference
from dualtower_kernels.testing import assert_close, offsets, packed_attention

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")
IGNORE = -100
CE_PATHS = pytest.mark.parametrize(
    "impl",
    [linear_cross_entropy, linear_cross_entropy_chunked, linear_cross_entropy_reference],
    ids=["triton_rows", "torch_rows", "reference"],
)
CE_FAST_PATHS = pytest.mark.parametrize(
    "impl", [linear_cross_entropy, linear_cross_entropy_chunked], ids=["triton_rows", "torch_rows"]
)


# ----------------------------------------------------------------------------------------------------------------
# Decode attention
# ----------------------------------------------------------------------------------------------------------------


def _decode_inputs(rows=2, q_heads=4, kv_heads=2, capacity=20, head_dim=16, dtype=torch.float32):
    q = torch.randn(rows, q_heads, head_dim).to(dtype)
    k_cache, v_cache = (torch.randn(rows, kv_heads, capacity, head_dim).to(dtype) for _ in range(2))
    return q, k_cache, v_cache


def test_decode_lengths_past_the_capacity_see_the_whole_cache() -> None:
    """The twin's mask makes every cached position visible; the kernel must not read past the cache (into the
    next row's, or off the buffer)."""
    q, k_cache, v_cache = _decode_inputs(capacity=20)
    lengths = torch.tensor([25, 100])
    expected = decode_attention_reference(q, k_cache, v_cache, torch.tensor([20, 20]))
    assert_close(decode_attention_reference(q, k_cache, v_cache, lengths), expected, atol=0, rtol=0, name="twin")
    assert_close(decode_attention(q, k_cache, v_cache, lengths), expected, atol=1e-5, rtol=1e-5, name="out")


def test_decode_empty_row_full_row_and_a_batch_of_one() -> None:
    q, k_cache, v_cache = _decode_inputs(rows=3)
    lengths = torch.tensor([0, 20, 7], dtype=torch.int32)  # int32 lengths, as int64 elsewhere
    ours = decode_attention(q, k_cache, v_cache, lengths)
    expected = decode_attention_reference(q, k_cache, v_cache, lengths.long())
    assert torch.equal(ours[0], torch.zeros_like(ours[0])) and torch.equal(expected[0], ours[0])
    assert_close(ours, expected, atol=1e-5, rtol=1e-5, name="out")
    one = decode_attention(q[1:2], k_cache[1:2], v_cache[1:2], lengths[1:2])
    assert_close(one, expected[1:2], atol=1e-5, rtol=1e-5, name="batch of one")


def test_decode_fp16_close_to_fp32() -> None:
    q, k_cache, v_cache = _decode_inputs()
    lengths = torch.tensor([20, 3])
    ours = decode_attention(q.half(), k_cache.half(), v_cache.half(), lengths)
    assert ours.dtype == torch.float16
    expected = decode_attention_reference(q, k_cache, v_cache, lengths)
    assert_close(ours.float(), expected, atol=3e-3, rtol=3e-3, name="out")


def _decode_bad_inputs() -> dict:
    q, k_cache, v_cache = _decode_inputs()
    lengths = torch.tensor([5, 20])
    return {
        "more_query_rows": (torch.randn(3, 4, 16), k_cache, v_cache, torch.tensor([5, 20, 1])),
        "head_dim": (torch.randn(2, 4, 8), k_cache, v_cache, lengths),
        "lengths_short": (q, k_cache, v_cache, lengths[:1]),
        "float_lengths": (q, k_cache, v_cache, lengths.float()),
        "q_dtype": (q.double(), k_cache, v_cache, lengths),
        "cache_dtype": (q, k_cache, v_cache.half(), lengths),
        "q_rank": (q[0], k_cache, v_cache, lengths),
    }


@pytest.mark.parametrize("case", list(_decode_bad_inputs()))
def test_decode_rejects_inconsistent_inputs(case: str) -> None:
    """The kernels index the caches with q's rows and head dim and one length per row: a mismatch must raise,
    not read past a buffer or reinterpret its bits."""
    with pytest.raises(ValueError, match=r"decode shapes|lengths must|one dtype"):
        decode_attention(*_decode_bad_inputs()[case])


def test_decode_twin_against_explicit_softmax() -> None:
    q, k_cache, v_cache = _decode_inputs(rows=2, q_heads=6, kv_heads=2, capacity=9, head_dim=8)
    lengths = torch.tensor([4, 9])
    out = torch.empty_like(q)
    for b in range(2):
        for h in range(6):
            keys, values = k_cache[b, h // 3, : lengths[b]], v_cache[b, h // 3, : lengths[b]]
            weights = torch.softmax(keys @ q[b, h] * 0.7, 0)
            out[b, h] = weights @ values
    assert_close(decode_attention_reference(q, k_cache, v_cache, lengths, scale=0.7), out, atol=1e-6, rtol=1e-5,
                 name="twin")


def test_decode_opcheck_without_rows() -> None:
    q, k_cache, v_cache = _decode_inputs(rows=0)
    torch.library.opcheck(decode_attention_op, (q, k_cache, v_cache, torch.zeros(0, dtype=torch.long), 0.25))


# ----------------------------------------------------------------------------------------------------------------
# Linear cross-entropy
# ----------------------------------------------------------------------------------------------------------------


def _ce_inputs(tokens: int = 6, width: int = 8, vocab: int = 30, dtype=torch.float32):
    hidden = torch.randn(tokens, width).to(dtype).requires_grad_()
    weight = torch.randn(vocab, width).to(dtype).requires_grad_()
    return hidden, weight, torch.randint(0, vocab, (tokens,))


@CE_PATHS
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("tokens", [0, 4], ids=["no_rows", "all_ignored"])
def test_ce_nothing_supervised_is_zero_not_nan(impl, dtype: torch.dtype, tokens: int) -> None:
    hidden, weight, labels = _ce_inputs(tokens=tokens, dtype=dtype)
    labels.fill_(IGNORE)
    loss = impl(hidden, weight, labels, IGNORE)
    d_hidden, d_weight = torch.autograd.grad(loss, (hidden, weight))
    assert loss.item() == 0.0
    assert d_hidden.dtype == dtype and torch.equal(d_hidden, torch.zeros_like(hidden))
    assert torch.equal(d_weight, torch.zeros_like(weight))


@pytest.mark.parametrize("n_labels", [3, 7], ids=["fewer", "more"])
@pytest.mark.parametrize("triton_rows", [True, False], ids=["triton_rows", "torch_rows"])
def test_ce_rejects_labels_unlike_the_rows(n_labels: int, triton_rows: bool) -> None:
    """F.cross_entropy (the twin) raises; fewer labels than rows used to drop the other rows' losses silently."""
    hidden, weight, _ = _ce_inputs(tokens=5)
    labels = torch.randint(0, 30, (n_labels,))
    with pytest.raises(ValueError, match="labels"):
        linear_cross_entropy_fwd(hidden, weight, labels, IGNORE, True, True, 0, triton_rows)


def test_ce_non_contiguous_fp16_inputs() -> None:
    hidden, weight, labels = _ce_inputs(tokens=7)
    labels[2] = IGNORE
    hidden16 = hidden.detach().half().t().contiguous().t().requires_grad_()  # column-major
    weight16 = weight.detach().half().repeat(1, 2)[:, :8].requires_grad_()  # rows 16 elements apart
    assert not hidden16.is_contiguous() and not weight16.is_contiguous()
    expected = linear_cross_entropy_reference(hidden16, weight16, labels)
    for impl in (linear_cross_entropy, linear_cross_entropy_chunked):
        assert_close(impl(hidden16, weight16, labels, chunk_rows=2), expected, atol=1e-3, rtol=1e-3, name="loss")


@CE_FAST_PATHS
def test_ce_fp64_inputs_keep_fp64_precision(impl) -> None:
    """Loss and gradients are fp64 for fp64 inputs, as in the twin: not fp32 arithmetic returned as fp64."""
    hidden, weight, labels = _ce_inputs(tokens=6, dtype=torch.float64)
    labels[3] = IGNORE
    ours = impl(hidden, weight, labels, chunk_rows=4)
    expected = linear_cross_entropy_reference(hidden, weight, labels)
    assert ours.dtype == torch.float64
    for name, a, e in zip(("loss", "d_hidden", "d_weight"), (ours, *torch.autograd.grad(ours, (hidden, weight))),
                          (expected, *torch.autograd.grad(expected, (hidden, weight))), strict=True):
        assert_close(a, e, atol=1e-12, rtol=1e-12, name=name)


def test_ce_twin_against_log_softmax() -> None:
    hidden, weight, labels = _ce_inputs(tokens=5)
    labels[1] = IGNORE
    log_probs = torch.log_softmax(hidden @ weight.t(), 1)
    expected = -sum(log_probs[i, labels[i]] for i in (0, 2, 3, 4))
    assert_close(linear_cross_entropy_reference(hidden, weight, labels), expected, atol=1e-5, rtol=1e-6, name="twin")


def test_ce_opcheck_nothing_supervised() -> None:
    hidden, weight, labels = _ce_inputs(tokens=4)
    labels.fill_(IGNORE)
    for triton_rows in (True, False):
        torch.library.opcheck(linear_cross_entropy_fwd, (hidden, weight, labels, IGNORE, True, True, 0, triton_rows))


# ----------------------------------------------------------------------------------------------------------------
# Prefix attention
# ----------------------------------------------------------------------------------------------------------------


def test_prefix_int64_offsets_fp16_and_one_document() -> None:
    batch = packed_attention([5], [3], 2, 1, 16, requires_grad=False)
    args = list(batch.args)
    args[5], args[6] = batch.cu_text.long(), batch.cu_prefix.long()
    expected = prefix_attention_reference(*batch.args, scale=0.4)
    assert_close(prefix_attention(*args, scale=0.4), expected, atol=1e-5, rtol=1e-5, name="int64 offsets")
    half = prefix_attention(*(t.half() for t in batch.leaves), *batch.args[5:], scale=0.4)
    assert half.dtype == torch.float16
    assert_close(half.float(), expected, atol=3e-3, rtol=3e-3, name="fp16")


def _prefix_bad_offsets() -> dict:
    return {
        "fewer_prefix_offsets": (offsets([3, 2], "cpu"), offsets([2], "cpu")),
        "more_prefix_offsets": (offsets([3, 2], "cpu"), offsets([2, 0, 4], "cpu")),
        "float_offsets": (offsets([3, 2], "cpu").float(), offsets([2, 4], "cpu").float()),
        "two_dim_offsets": (offsets([3, 2], "cpu")[None], offsets([2, 4], "cpu")[None]),
        "no_offsets": (torch.zeros(0, dtype=torch.int32), torch.zeros(0, dtype=torch.int32)),
    }


@pytest.mark.parametrize("case", list(_prefix_bad_offsets()))
@pytest.mark.parametrize("impl", [prefix_attention, prefix_attention_reference], ids=["triton", "reference"])
def test_prefix_rejects_offsets_of_another_shape_or_dtype(impl, case: str) -> None:
    """cu_text and cu_prefix describe the same documents: one (B + 1,) integer tensor each. The kernel reads
    cu_prefix[doc + 1] for every text document (past the end when it is shorter)."""
    batch = packed_attention([3, 2], [2, 4], 2, 1, 16, requires_grad=False)
    cu_text, cu_prefix = _prefix_bad_offsets()[case]
    with pytest.raises(ValueError, match="cu_text"):
        impl(*batch.leaves, cu_text, cu_prefix, 3, 4)


@pytest.mark.parametrize(
    "cu_text", [[1, 3, 5], [0, 3, 2], [0, 3, 6]], ids=["not_from_zero", "decreasing", "past_the_rows"]
)
def test_prefix_twin_rejects_offsets_that_are_no_packing(cu_text: list[int]) -> None:
    """The twin (the CPU path) reads the offsets on the host anyway, so it says what is wrong with them."""
    batch = packed_attention([3, 2], [2, 4], 2, 1, 16, requires_grad=False)
    bad = torch.tensor(cu_text, dtype=torch.int32)
    with pytest.raises(ValueError, match="start at 0, never decrease"):
        prefix_attention_reference(*batch.leaves, bad, batch.cu_prefix, 3, 4)


def test_prefix_twin_against_a_loop_over_queries() -> None:
    """Per document, query j sees the whole prefix and text keys 0..j; query head h uses K/V head h // group."""
    text, prefix, group = [3, 2], [2, 0], 3
    batch = packed_attention(text, prefix, 3, 1, 8, pad_text=1, requires_grad=False)
    expected = torch.zeros_like(batch.q)
    t0 = p0 = 0
    for n_text, n_prefix in zip(text, prefix, strict=True):
        for j in range(n_text):
            for h in range(3):
                keys = torch.cat([batch.k_prefix[p0 : p0 + n_prefix, h // group], batch.k[t0 : t0 + j + 1, h // group]])
                values = torch.cat([batch.v_prefix[p0 : p0 + n_prefix, h // group],
                                    batch.v[t0 : t0 + j + 1, h // group]])
                expected[t0 + j, h] = torch.softmax(keys @ batch.q[t0 + j, h] * 0.5, 0) @ values
        t0, p0 = t0 + n_text, p0 + n_prefix
    assert_close(prefix_attention_reference(*batch.args, scale=0.5), expected, atol=1e-6, rtol=1e-5, name="twin")


def test_prefix_opcheck_without_text() -> None:
    batch = packed_attention([0, 0], [3, 2], 2, 1, 16)
    torch.library.opcheck(prefix_attention_fwd, (*batch.args, 0.25))


# ----------------------------------------------------------------------------------------------------------------
# Projector
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("factor", [0, -2])
@pytest.mark.parametrize("impl", [pixel_shuffle_project, pixel_shuffle_project_reference], ids=["triton", "reference"])
def test_projector_rejects_a_factor_below_one(impl, factor: int) -> None:
    with pytest.raises(ValueError, match="factor"):
        impl(torch.randn(2, 16, 8), torch.randn(5, 32), factor)


def test_projector_factor_one_fp16_and_non_contiguous() -> None:
    x, weight = torch.randn(2, 16, 8), torch.randn(5, 8)
    strided = x.transpose(0, 1).contiguous().transpose(0, 1)
    assert_close(pixel_shuffle_project(strided, weight, 1), x @ weight.t(), atol=1e-5, rtol=1e-5, name="factor 1")
    weight = torch.randn(5, 32)
    half = pixel_shuffle_project(strided.half(), weight.half(), 2)
    assert half.dtype == torch.float16
    expected = pixel_shuffle_project_reference(x, weight, 2)
    assert_close(half.float(), expected, atol=2e-2, rtol=2e-2, name="fp16")


def test_projector_twin_against_the_spec_index_map() -> None:
    """reference_spec 1.3: token h_out * side/f + w_out, feature (dh * f + dw) * C + c, from patch
    (h_out * f + dh) * side + w_out * f + dw."""
    tiles, side, width, factor = 2, 4, 3, 2
    x = torch.randn(tiles, side * side, width)
    shuffled = torch.empty(tiles, (side // factor) ** 2, factor * factor * width)
    for n in range(tiles):
        for h_out in range(side // factor):
            for w_out in range(side // factor):
                for dh in range(factor):
                    for dw in range(factor):
                        patch = (h_out * factor + dh) * side + w_out * factor + dw
                        feature = (dh * factor + dw) * width
                        shuffled[n, h_out * (side // factor) + w_out, feature : feature + width] = x[n, patch]
    weight = torch.randn(5, factor * factor * width)
    expected = shuffled @ weight.t()
    assert_close(pixel_shuffle_project_reference(x, weight, factor), expected, atol=1e-6, rtol=1e-6, name="twin")
