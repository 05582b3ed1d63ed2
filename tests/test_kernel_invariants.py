"""Kernel properties the twin comparisons on small random inputs cannot see.

- Softmax is shift-invariant: scores (or logits) far below zero must give the same attention / loss as any
  others. The kernels start their running max at a finite -1e30 so that exp2(s - m) never underflows to an
  empty sum; random inputs have scores near zero and cannot tell that start from 0.
- The dispatch (dualtower.ops): fp64 on CUDA takes the twins, and the library (flash / torch_varlen) glue gives
  an empty prefix that requires grad a gradient and scales queries itself for a varlen_attn without `scale`.
- The interpreter runs each kernel with one small config, but GPUs run the autotuner's configs, whose block
  shapes differ (BLOCK_N != BLOCK_K in the projector). The heuristics derived from the block sizes (EVEN_C)
  must hold for those shapes too, so the projector runs here, under the interpreter, with each GPU block shape.
"""

from __future__ import annotations

import pytest
import torch
import triton

from dualtower import ops
from dualtower_kernels import linear_cross_entropy as lce
from dualtower_kernels import projector
from dualtower_kernels.decode_attention import decode_attention, decode_attention_reference
from dualtower_kernels.linear_cross_entropy import (
    linear_cross_entropy,
    linear_cross_entropy_chunked,
    linear_cross_entropy_reference,
)
from dualtower_kernels.prefix_attention import prefix_attention
from dualtower_kernels.prefix_attention_reference import prefix_attention_reference
from dualtower_kernels.testing import assert_close, packed_attention

pytestmark = [
    pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning"),
    # The interpreter evaluates exp on masked lanes too (loaded as 0, so exp(0 - SHIFT) overflows); the store
    # masks drop those lanes, and the comparisons below check every kept value.
    pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:invalid value encountered in matmul:RuntimeWarning"),
]

# A common score offset far enough below zero that exp2(score * log2(e)) is 0 in fp32 (below 2^-149), yet small
# enough that fp32 keeps the scores' differences to ~1e-5 (the spacing of fp32 near 200).
SHIFT = -200.0


def _shift_scores(q: torch.Tensor, keys: list[torch.Tensor], scale: float) -> None:
    """In place: every key gets feature 0 = 1 and every query feature 0 = SHIFT / scale, so each score moves by
    exactly SHIFT; the softmax, and so the attention, is unchanged."""
    with torch.no_grad():
        q[..., 0] = SHIFT / scale
        for k in keys:
            k[..., 0] = 1.0


def test_prefix_attention_with_scores_far_below_zero() -> None:
    # GQA 2 with two K/V heads, a document with no prefix, one with no text, odd lengths past one block.
    batch = packed_attention([5, 0, 37], [3, 4, 0], 4, 2, 16, pad_text=2, pad_prefix=1)
    _shift_scores(batch.q, [batch.k, batch.k_prefix], 16**-0.5)
    grad_out = torch.randn_like(batch.q)
    ours = prefix_attention(*batch.args)
    wide = batch.cast(torch.float64)
    expected = prefix_attention_reference(*wide.args)
    # An empty softmax sum (running max started at 0, say) gives zero rows, not the average of the values.
    assert_close(ours, expected, atol=1e-4, rtol=1e-4, name="out")
    grads = torch.autograd.grad(ours, batch.leaves, grad_out)
    expected_grads = torch.autograd.grad(expected, wide.leaves, grad_out.double())
    for name, a, e in zip(("dq", "dk", "dv", "dk_prefix", "dv_prefix"), grads, expected_grads, strict=True):
        # dq's feature 0 scales with SHIFT / scale (800): compare relative to the gradient's size.
        assert_close(a, e, atol=1e-4 * max(1.0, e.abs().max().item()), rtol=1e-4, name=name)


def test_decode_attention_with_scores_far_below_zero() -> None:
    rows, q_heads, kv_heads, capacity, head_dim = 3, 6, 2, 37, 16
    q = torch.randn(rows, q_heads, head_dim)
    k_cache, v_cache = torch.randn(rows, kv_heads, capacity, head_dim), torch.randn(rows, kv_heads, capacity, head_dim)
    _shift_scores(q, [k_cache], head_dim**-0.5)
    lengths = torch.tensor([capacity, 1, 20])  # the full cache over every split, one key, a partial split
    ours = decode_attention(q, k_cache, v_cache, lengths)
    expected = decode_attention_reference(q.double(), k_cache.double(), v_cache.double(), lengths)
    assert_close(ours, expected, atol=1e-4, rtol=1e-4, name="out")


@pytest.mark.parametrize(
    "impl", [linear_cross_entropy, linear_cross_entropy_chunked], ids=["triton_rows", "torch_rows"]
)
@pytest.mark.parametrize("vocab", [150, 40], ids=["several_blocks", "less_than_one_block"])
def test_linear_cross_entropy_with_logits_far_below_zero(impl, vocab: int) -> None:
    # vocab 40 is below the interpreter's 64-lane block: lanes 40..63 are masked in every block.
    hidden = torch.randn(9, 24)
    weight = torch.randn(vocab, 24) / 24**0.5
    hidden[:, 0], weight[:, 0] = 1.0, SHIFT  # every logit moves by SHIFT: the loss is unchanged
    hidden.requires_grad_()
    weight.requires_grad_()
    labels = torch.randint(0, vocab, (9,))
    labels[::4] = -100
    loss = impl(hidden, weight, labels)
    expected = linear_cross_entropy_reference(hidden.double(), weight.double(), labels)
    assert torch.isfinite(loss), loss
    torch.testing.assert_close(loss.double(), expected, atol=1e-3, rtol=1e-4)
    (d_hidden, d_weight), (e_hidden, e_weight) = (torch.autograd.grad(x, (hidden, weight)) for x in (loss, expected))
    # d_hidden's feature 0 is SHIFT x sum(softmax - onehot): 200 x fp32 rounding of a zero sum, not a signal.
    assert_close(d_hidden[:, 1:], e_hidden[:, 1:], atol=1e-4, rtol=1e-4, name="d_hidden")
    assert_close(d_weight, e_weight, atol=1e-4, rtol=1e-4, name="d_weight")


def _assert_bf16_close(actual: torch.Tensor, exact: torch.Tensor, name: str) -> None:
    """Within 2^-6 of the largest exact value: 4x bf16's rounding of the result (eps 2^-8, half an ulp each)."""
    assert actual.dtype == torch.bfloat16, f"{name}: {actual.dtype}"
    error = (actual.double() - exact).abs().max().item()
    assert error <= 2**-6 * exact.abs().max().item(), f"{name}: error {error:.3e} vs max {exact.abs().max():.3e}"


def test_bf16_inputs_under_the_interpreter() -> None:
    """bf16 is what training runs in. The interpreter computes bf16 tl.dot wrongly (errors of 1e8 measured with
    triton 3.6), so the kernels feed it fp32 operands (upcast_dots): without that every bf16 result is garbage,
    and no fp32 or fp16 comparison shows it."""
    batch = packed_attention([19, 1, 6], [5, 0, 21], 4, 2, 16, pad_text=1).cast(torch.bfloat16)
    wide = batch.cast(torch.float64)
    grad_out = torch.randn_like(batch.q)
    out = prefix_attention(*batch.args)
    exact = prefix_attention_reference(*wide.args)
    _assert_bf16_close(out, exact, "prefix out")
    grads = torch.autograd.grad(out, batch.leaves, grad_out)
    exact_grads = torch.autograd.grad(exact, wide.leaves, grad_out.double())
    for name, a, e in zip(("dq", "dk", "dv", "dk_prefix", "dv_prefix"), grads, exact_grads, strict=True):
        _assert_bf16_close(a, e, name)

    q, caches = torch.randn(2, 6, 16).bfloat16(), torch.randn(2, 2, 2, 37, 16).bfloat16()
    lengths = torch.tensor([37, 11])
    _assert_bf16_close(decode_attention(q, caches[0], caches[1], lengths),
                       decode_attention_reference(q.double(), caches[0].double(), caches[1].double(), lengths),
                       "decode out")

    x = torch.randn(2, 16, 24).bfloat16().requires_grad_()
    weight = (torch.randn(20, 96) / 10).bfloat16().requires_grad_()
    x64, weight64 = (t.detach().double().requires_grad_() for t in (x, weight))
    out = projector.pixel_shuffle_project(x, weight, 2)
    exact = projector.pixel_shuffle_project_reference(x64, weight64, 2)
    _assert_bf16_close(out, exact, "projector out")
    grad_out = torch.randn_like(out)
    for name, a, e in zip(("dx", "dw"), torch.autograd.grad(out, (x, weight), grad_out),
                          torch.autograd.grad(exact, (x64, weight64), grad_out.double()), strict=True):
        _assert_bf16_close(a, e, name)


# (BLOCK_M, BLOCK_N, BLOCK_K) of the projector's GPU configs (projector._GEMM_CONFIGS) and its fp32 config.
GPU_BLOCK_SHAPES = [(128, 64, 64), (128, 128, 64), (64, 128, 64), (128, 256, 64), (32, 32, 32)]


@pytest.mark.parametrize("blocks", GPU_BLOCK_SHAPES, ids=["x".join(map(str, b)) for b in GPU_BLOCK_SHAPES])
@pytest.mark.parametrize("width", [64, 96], ids=["width64", "width96"])
def test_projector_with_every_gpu_block_shape(blocks: tuple[int, int, int], width: int,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Width 64 divides BLOCK_K but not every BLOCK_N (128, 256): dX and dW tile the features by BLOCK_N, so their
    contiguous-gather shortcut (EVEN_C) must be decided by BLOCK_N, the forward's by BLOCK_K. Width 96 divides
    neither 64 nor 128. The interpreter's own 16 x 16 x 16 config cannot tell BLOCK_N from BLOCK_K."""
    block_m, block_n, block_k = blocks
    config = triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k})
    for kernel in (projector._project_fwd_kernel, projector._project_dx_kernel, projector._project_dw_kernel):
        monkeypatch.setattr(kernel, "configs", [config])  # one config: the autotuner runs it without timing
    tiles, side, factor, out_width = 3, 4, 2, 40
    x = torch.randn(tiles, side * side, width, requires_grad=True)
    weight = torch.randn(out_width, width * factor * factor, requires_grad=True)
    grad_out = torch.randn(tiles, side * side // factor**2, out_width)
    ours = projector.pixel_shuffle_project(x, weight, factor)
    expected = projector.pixel_shuffle_project_reference(x, weight, factor)
    assert_close(ours, expected, atol=1e-4, rtol=1e-5, name="out")
    for name, a, e in zip(("dx", "dw"), torch.autograd.grad(ours, (x, weight), grad_out),
                          torch.autograd.grad(expected, (x, weight), grad_out), strict=True):
        assert_close(a, e, atol=1e-4, rtol=1e-5, name=name)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("op", sorted(ops._IMPLEMENTATIONS))
def test_auto_backend_on_cuda_sends_fp64_to_the_twins(op: str, dtype: torch.dtype,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernels compute in fp32 at most: fp64 inputs on a GPU (parity checks) must not reach them. Only the
    choice is asked for, so no GPU is needed."""
    # The automatic choice, whatever another test or the environment forced.
    monkeypatch.delenv("DUALTOWER_BACKEND", raising=False)
    monkeypatch.setattr(ops, "_override", None)
    monkeypatch.setattr(ops, "_op_overrides", {})
    chosen = ops.selected_backend(op, "cuda", dtype)
    if dtype == torch.float64:
        assert chosen == (ops.CHUNKED if op == "linear_cross_entropy" else ops.REFERENCE)
    else:
        assert chosen == ops.TRITON


@pytest.mark.parametrize(("backend", "op"), [("chunked", "prefix_attention"), ("flash", "decode_attention"),
                                            ("torch_varlen", "pixel_shuffle_project")])
def test_forcing_one_op_onto_a_backend_it_lacks_raises(backend: str, op: str,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Named for one op, a backend it does not implement must be refused: otherwise the op silently keeps its
    automatic choice while the user believes it runs on the named one."""
    monkeypatch.setattr(ops, "_op_overrides", {})  # whatever the call does stays in this test
    with pytest.raises(ValueError, match=f"{op} has no '{backend}' backend"):
        ops.set_backend(backend, op=op)
    assert op not in ops._op_overrides


def _bottom_right_causal(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, cu_q: torch.Tensor,
                         cu_k: torch.Tensor, scale: float | None) -> torch.Tensor:
    """A CPU stand-in for flash-attn / varlen_attn: per segment, causal aligned to the bottom right; rows past the
    last segment zero (the glue masks them anyway)."""
    out = q.new_zeros(q.shape[0], q.shape[1], values.shape[2])
    for q0, q1, k0, k1 in zip(cu_q[:-1].tolist(), cu_q[1:].tolist(), cu_k[:-1].tolist(), cu_k[1:].tolist(),
                              strict=True):
        visible = torch.arange(k1 - k0)[None, :] <= torch.arange(q1 - q0)[:, None] + (k1 - k0) - (q1 - q0)
        attended = torch.nn.functional.scaled_dot_product_attention(
            q[q0:q1].transpose(0, 1), keys[k0:k1].transpose(0, 1), values[k0:k1].transpose(0, 1),
            attn_mask=visible, scale=scale, enable_gqa=True)
        out = out.index_copy(0, torch.arange(q0, q1), attended.transpose(0, 1))
    return out


def test_library_glue_gives_an_empty_prefix_that_requires_grad_a_gradient() -> None:
    """The left tower's empty prefix still requires grad (a text-only batch): flash / torch_varlen must give it a
    (zero) gradient like the other backends, not None, or sharded data parallelism sees different graphs."""
    batch = packed_attention([5, 2, 3], [0, 0, 0], 4, 2, 16, pad_text=2)
    library = lambda q, keys, values, cu_q, cu_k, max_q, max_k, scale: _bottom_right_causal(
        q, keys, values, cu_q, cu_k, scale)
    out = ops._library_prefix_attention(library, *batch.args)
    assert_close(out, prefix_attention_reference(*batch.args), atol=1e-5, rtol=1e-5, name="out")
    # allow_unused=False: a prefix left out of the graph raises here.
    d_k_prefix, d_v_prefix = torch.autograd.grad(out.sum(), (batch.k_prefix, batch.v_prefix))
    assert d_k_prefix.shape == batch.k_prefix.shape and d_v_prefix.shape == batch.v_prefix.shape


def test_torch_varlen_without_a_scale_argument_scales_the_queries(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch 2.10's varlen_attn has neither `scale` nor `enable_gqa`: the glue must fold the scale into q (against
    varlen_attn's own 1 / sqrt(D)) and repeat the K/V heads."""

    def old_varlen_attn(q, keys, values, cu_q, cu_k, max_q, max_k, *, is_causal=False):
        assert is_causal and q.shape[1] == keys.shape[1]
        return _bottom_right_causal(q, keys, values, cu_q, cu_k, None)

    monkeypatch.setattr("torch.nn.attention.varlen.varlen_attn", old_varlen_attn)
    monkeypatch.setattr(ops, "_VARLEN_PARAMS", frozenset({"query", "key", "value", "is_causal"}))
    batch = packed_attention([5, 2, 3], [4, 0, 6], 4, 2, 16, pad_text=3, pad_prefix=2, requires_grad=False)
    ours = ops._library_prefix_attention(ops.torch_varlen_attention, *batch.args, 0.3)
    assert_close(ours, prefix_attention_reference(*batch.args, scale=0.3), atol=1e-5, rtol=1e-5, name="out")


def test_ce_chunks_fill_the_logits_budget_evenly() -> None:
    """Rows per chunk: as many as the logits budget holds, split evenly. Fewer rows per chunk would not change the
    loss, only multiply the GEMM launches (1-row chunks: thousands per step); more would overrun the budget."""
    vocab, dtype = 49_218, torch.bfloat16
    budget_rows = lce.LOGITS_CHUNK_BYTES // (vocab * dtype.itemsize)
    for n_rows in (1, 100, budget_rows, budget_rows + 1, 3 * budget_rows + 5):
        step = lce._chunk_rows(n_rows, vocab, dtype, 0)
        n_chunks = -(-n_rows // step)
        assert step <= budget_rows, (n_rows, step)
        assert n_chunks == -(-n_rows // budget_rows), (n_rows, step)  # no more chunks than the budget needs
        assert n_chunks * step - n_rows < n_chunks, (n_rows, step)  # evenly: the last chunk is not a remnant
    assert lce._chunk_rows(500, vocab, dtype, 7) == 7  # an explicit request wins


def test_dot_precision_keeps_fp32_exact() -> None:
    """fp32 dots must be 'ieee': TF32 would break fp32 parity on a GPU. The interpreter ignores the precision,
    so only this checks the choice."""
    from dualtower_kernels._common import dot_precision

    assert dot_precision(torch.float32) == "ieee"
    assert dot_precision(torch.bfloat16) == dot_precision(torch.float16) == "tf32"
