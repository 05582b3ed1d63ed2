"""Kernels against their twins on inputs the other kernel tests do not build: offsets and lengths that are strided
views, and dtypes the kernels cannot compute in (they must say so, not return garbage or fp32-precision results).
"""

from __future__ import annotations

import pytest
import torch

from dualtower_kernels.decode_attention import decode_attention, decode_attention_reference
from dualtower_kernels.linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_chunked
from dualtower_kernels.prefix_attention import prefix_attention
from dualtower_kernels.prefix_attention_reference import prefix_attention_reference
from dualtower_kernels.projector import pixel_shuffle_project
from dualtower_kernels.testing import assert_close, packed_attention

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")


def _every_other(t: torch.Tensor) -> torch.Tensor:
    """The same values as a stride-2 view; the elements in between repeat them, so a kernel that ignores the
    stride reads in-bounds, wrong values instead of crashing."""
    view = torch.stack([t, t], 1)[:, 0]
    assert not view.is_contiguous() and torch.equal(view, t)
    return view


def test_prefix_offsets_that_are_strided_views() -> None:
    batch = packed_attention([5, 3, 7], [4, 0, 2], 4, 2, 16)
    cu_text, cu_prefix = _every_other(batch.cu_text), _every_other(batch.cu_prefix)
    args = (*batch.leaves, cu_text, cu_prefix, batch.max_text_len, batch.max_prefix_len)
    out = prefix_attention(*args)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, batch.leaves, grad_out)
    expected = prefix_attention_reference(*batch.args)
    expected_grads = torch.autograd.grad(expected, batch.leaves, grad_out)
    assert_close(out, expected, atol=1e-5, rtol=1e-5, name="out")
    for name, ours, theirs in zip(("dq", "dk", "dv", "dk_prefix", "dv_prefix"), grads, expected_grads, strict=True):
        assert_close(ours, theirs, atol=1e-5, rtol=1e-5, name=name)


@pytest.mark.parametrize(
    "layout",
    [([15, 16, 17], [0, 16, 1], 4, 1, 8, 0, 0), ([63, 1], [65, 64], 2, 1, 16, 2, 3)],
    ids=["around_16_gqa4_dim8", "around_64_padded"],
)
def test_prefix_lengths_around_the_block_sizes(layout) -> None:
    """Texts and prefixes one short of, at and one past the interpreter's 16 / 32-row blocks and of 64; a head
    dim below the smallest dot tile; cu_text int32 beside cu_prefix int64 (check_offsets allows the mix)."""
    text, prefix, q_heads, kv_heads, head_dim, pad_text, pad_prefix = layout
    batch = packed_attention(text, prefix, q_heads, kv_heads, head_dim, pad_text=pad_text, pad_prefix=pad_prefix)
    args = (*batch.leaves, batch.cu_text, batch.cu_prefix.long(), batch.max_text_len, batch.max_prefix_len, 0.3)
    out = prefix_attention(*args)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, batch.leaves, grad_out)
    expected = prefix_attention_reference(*batch.args, 0.3)
    expected_grads = torch.autograd.grad(expected, batch.leaves, grad_out)
    assert_close(out, expected, atol=1e-5, rtol=1e-5, name="out")
    for name, ours, theirs in zip(("dq", "dk", "dv", "dk_prefix", "dv_prefix"), grads, expected_grads, strict=True):
        assert_close(ours, theirs, atol=1e-5, rtol=1e-5, name=name)


def test_decode_lengths_that_are_a_strided_view() -> None:
    q = torch.randn(3, 4, 16)
    k_cache, v_cache = torch.randn(3, 2, 20, 16), torch.randn(3, 2, 20, 16)
    lengths = _every_other(torch.tensor([5, 20, 1]))
    expected = decode_attention_reference(q, k_cache, v_cache, lengths)
    assert_close(decode_attention(q, k_cache, v_cache, lengths), expected, atol=1e-5, rtol=1e-5, name="out")


@pytest.mark.parametrize("dtype", [torch.int32, torch.float64], ids=["int32", "fp64"])
def test_prefix_rejects_dtypes_it_cannot_compute_in(dtype: torch.dtype) -> None:
    batch = packed_attention([5, 3], [4, 2], 2, 1, 16, requires_grad=False)
    leaves = [t.to(dtype) for t in batch.leaves]
    with pytest.raises(ValueError, match="float16, bfloat16 or float32"):
        prefix_attention(*leaves, *batch.args[5:])


@pytest.mark.parametrize("dtype", [torch.int64, torch.float64], ids=["int64", "fp64"])
def test_decode_rejects_dtypes_it_cannot_compute_in(dtype: torch.dtype) -> None:
    q, cache = torch.randn(2, 4, 16).to(dtype), torch.randn(2, 2, 20, 16).to(dtype)
    with pytest.raises(ValueError, match="float16, bfloat16 or float32"):
        decode_attention(q, cache, cache, torch.tensor([5, 20]))


@pytest.mark.parametrize("dtype", [torch.int32, torch.float64], ids=["int32", "fp64"])
def test_projector_rejects_dtypes_it_cannot_compute_in(dtype: torch.dtype) -> None:
    x, weight = torch.randn(1, 16, 8).to(dtype), torch.randn(5, 32).to(dtype)
    with pytest.raises(ValueError, match="float16, bfloat16 or float32"):
        pixel_shuffle_project(x, weight, 2)


def _ce_bad_inputs() -> dict:
    hidden, weight, labels = torch.randn(4, 8), torch.randn(30, 8), torch.tensor([1, -100, 3, 29])
    return {
        "integer_activations": (hidden.long(), weight.long(), labels, "floating"),
        "float_labels": (hidden, weight, labels.float(), "integer"),
        "weight_rank": (hidden, weight[0], labels, "weight"),
    }


@pytest.mark.parametrize("triton_rows", [True, False], ids=["triton_rows", "torch_rows"])
@pytest.mark.parametrize("case", list(_ce_bad_inputs()))
def test_ce_rejects_dtypes_and_shapes_the_twin_rejects(case: str, triton_rows: bool) -> None:
    """The twin (F.cross_entropy) raises on each; the fast paths must too, with a message that names the problem
    (integer activations gave a loss, float labels an interpreter error, a 1-D weight a vocabulary error)."""
    hidden, weight, labels, problem = _ce_bad_inputs()[case]
    impl = linear_cross_entropy if triton_rows else linear_cross_entropy_chunked
    with pytest.raises(ValueError, match=problem):
        impl(hidden, weight, labels)
