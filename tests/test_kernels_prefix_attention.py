"""Cross-tower prefix attention kernel vs its pure-PyTorch twin: forward and every gradient.

CPU: the Triton interpreter, tiny awkward shapes, fp32, 1e-5. GPU: real sizes in bf16, error vs fp64 at most
twice PyTorch's own bf16 error.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from dualtower_kernels.prefix_attention import (
    prefix_attention,
    prefix_attention_bwd,
    prefix_attention_fwd,
)
from dualtower_kernels.prefix_attention_reference import (
    prefix_attention_reference,
    prefix_attention_reference_backward,
    prefix_attention_reference_op,
)
from dualtower_kernels.testing import (
    PackedAttention,
    assert_close,
    assert_error_within,
    eager_low_precision,
    other_layout,
    packed_attention,
    random_packing,
)

# The interpreter turns 1-element arrays into loop bounds; numpy (< 2.4, pinned) only warns about it.
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")

GRAD_NAMES = ("dq", "dk", "dv", "dk_prefix", "dv_prefix")

# (text lengths, prefix lengths, q heads, kv heads, head dim, text padding rows, prefix padding rows)
CPU_CASES = {
    # GQA 3; an empty document with a prefix; a one-token text; a text-only document; odd lengths
    "gqa3_mixed": ([5, 1, 0, 40], [3, 0, 20, 17], 3, 1, 16, 0, 0),
    # no prefixes: the left tower's causal varlen attention; GQA 1; head dim 32
    "causal_gqa1": ([33, 7, 1], [0, 0, 0], 2, 2, 32, 0, 0),
    # GQA 5; a head dim that is not a power of two; padding rows after the last document in both buffers
    "gqa5_padded": ([7, 9, 1], [19, 0, 4], 5, 1, 24, 3, 2),
    # several K/V heads, each shared by a group of query heads: catches a query head -> K/V head mix-up
    "gqa2_kv2": ([6, 3], [5, 0], 4, 2, 16, 1, 1),
}


def _run(impl, batch: PackedAttention, grad_out: torch.Tensor) -> tuple[torch.Tensor, ...]:
    out = impl(*batch.args)
    grads = torch.autograd.grad(out, batch.leaves, grad_out, allow_unused=True)
    return out, *(torch.zeros_like(t) if g is None else g for t, g in zip(batch.leaves, grads, strict=True))


def _registered_op(*args) -> torch.Tensor:
    """The path torch.compile takes: the custom op and its registered backward (eager calls skip both)."""
    return prefix_attention_fwd(*args, 1.0 / args[0].shape[-1] ** 0.5)[0]


@pytest.mark.parametrize("impl", [prefix_attention, _registered_op], ids=["eager", "registered_op"])
@pytest.mark.parametrize("case", list(CPU_CASES), ids=list(CPU_CASES))
def test_matches_reference(case: str, impl) -> None:
    text, prefix, q_heads, kv_heads, head_dim, pad_text, pad_prefix = CPU_CASES[case]
    batch = packed_attention(text, prefix, q_heads, kv_heads, head_dim, pad_text=pad_text, pad_prefix=pad_prefix)
    grad_out = torch.randn_like(batch.q)
    ours = _run(impl, batch, grad_out)
    expected = _run(prefix_attention_reference, batch, grad_out)
    for name, a, e in zip(("out", *GRAD_NAMES), ours, expected, strict=True):
        assert_close(a, e, atol=1e-5, rtol=1e-5, name=name)


@pytest.mark.parametrize(
    "layout",
    [([7, 9, 1], [19, 0, 4], 3, 1, 16), ([4, 0], [3, 5], 3, 1, 16), ([0, 6], [2, 0], 3, 1, 16),
     ([5, 2], [6, 3], 4, 2, 24)],
    ids=["last_text_one_token", "last_text_empty", "last_prefix_empty", "two_kv_heads_dim24"],
)
def test_writes_every_row_of_uninitialized_outputs(layout, monkeypatch: pytest.MonkeyPatch) -> None:
    """Outputs and gradients are allocated uninitialized: the kernels must write every row themselves, the
    padding rows after the last document (zeros) included. NaN-filled allocations make a missed row show."""
    text, prefix, q_heads, kv_heads, head_dim = layout
    batch = packed_attention(text, prefix, q_heads, kv_heads, head_dim, pad_text=21, pad_prefix=18)
    grad_out = torch.randn_like(batch.q)
    expected = _run(prefix_attention_reference, batch, grad_out)
    real_empty, real_empty_like = torch.empty, torch.empty_like
    monkeypatch.setattr(torch, "empty", lambda *a, **k: real_empty(*a, **k).fill_(float("nan")))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: real_empty_like(*a, **k).fill_(float("nan")))
    ours = _run(prefix_attention, batch, grad_out)
    for name, a, e in zip(("out", *GRAD_NAMES), ours, expected, strict=True):
        assert_close(a, e, atol=1e-5, rtol=1e-5, name=name)
    _, lse = prefix_attention_fwd(*batch.args, 0.25)
    assert torch.equal(lse[:, sum(text):], torch.zeros_like(lse[:, sum(text):]))  # deterministic, like out
    assert not lse[:, : sum(text)].isnan().any()


@pytest.mark.parametrize("impl", [prefix_attention, _registered_op], ids=["eager", "registered_op"])
def test_double_backward_raises(impl) -> None:
    """Neither path has a second derivative: asking for one must fail, not drop this op's term. The q ** 2 term
    gives the first gradient a graph of its own, so only the attention's part can make the second one fail."""
    batch = packed_attention([3, 2], [2, 0], 2, 1, 16)
    loss = impl(*batch.args).sum() + (batch.q**2).sum()
    (dq,) = torch.autograd.grad(loss, batch.q, create_graph=True)
    with pytest.raises(RuntimeError, match="autograd"):
        torch.autograd.grad(dq.sum(), batch.q)


def test_rejects_text_kv_rows_unlike_the_queries() -> None:
    batch = packed_attention([3, 2], [2, 0], 2, 1, 16)
    longer_k = torch.cat([batch.k, batch.k[:1]])
    with pytest.raises(ValueError, match="mismatched shapes"):
        prefix_attention(batch.q, longer_k, longer_k, *batch.args[3:])


def test_no_text_at_all() -> None:
    """Every document empty on the text side: zero output, zero gradients, no launch."""
    batch = packed_attention([0, 0], [3, 2], 2, 1, 16)
    out = prefix_attention(*batch.args)
    assert out.shape == (0, 2, 16)
    grads = torch.autograd.grad(out.sum(), (batch.k_prefix,))
    assert torch.equal(grads[0], torch.zeros_like(batch.k_prefix))


@pytest.mark.parametrize("layout", [lambda t: t, other_layout], ids=["contiguous", "strided"])
def test_opcheck(layout) -> None:
    batch = packed_attention([3, 2], [2, 0], 2, 1, 16)
    args = (*(layout(a) if isinstance(a, torch.Tensor) else a for a in batch.args), 0.25)
    torch.library.opcheck(prefix_attention_fwd, args)
    out, lse = prefix_attention_fwd(*args)
    detached = [t.detach() for t in batch.leaves]
    bwd_args = (torch.randn_like(out), *detached, out.detach(), lse, *batch.args[5:], 0.25)
    torch.library.opcheck(prefix_attention_bwd, bwd_args)


@pytest.mark.parametrize("case", list(CPU_CASES), ids=list(CPU_CASES))
def test_reference_backward_matches_autograd(case: str) -> None:
    """The written-out softmax backward (what the opaque op runs) against autograd through SDPA, in fp64."""
    text, prefix, q_heads, kv_heads, head_dim, pad_text, pad_prefix = CPU_CASES[case]
    batch = packed_attention(text, prefix, q_heads, kv_heads, head_dim, pad_text=pad_text, pad_prefix=pad_prefix)
    batch = batch.cast(torch.float64)
    grad_out = torch.randn_like(batch.q)
    detached = [t.detach() for t in batch.leaves]
    ours = prefix_attention_reference_backward(grad_out, *detached, batch.cu_text, batch.cu_prefix, 0.3)
    _, *expected = _run(lambda *args: prefix_attention_reference(*args, scale=0.3), batch, grad_out)
    for name, a, e in zip(GRAD_NAMES, ours, expected, strict=True):
        assert_close(a, e, atol=1e-12, rtol=1e-10, name=name)


def test_reference_op_compiles_once_for_any_document_count() -> None:
    """Under torch.compile the twin is one opaque op: no graph break, no recompile as documents come and go."""
    layouts = [([5, 1, 0, 40], [3, 0, 20, 17]), ([7, 9], [19, 0]), ([2, 3, 4, 1, 6], [0, 5, 5, 1, 0])]
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(prefix_attention_reference_op, backend=counter, fullgraph=True, dynamic=True)
    for text, prefix in layouts:
        batch = packed_attention(text, prefix, 3, 1, 16, pad_text=2, pad_prefix=1)
        grad_out = torch.randn_like(batch.q)
        ours = _run(compiled, batch, grad_out)
        expected = _run(prefix_attention_reference, batch, grad_out)
        for name, a, e in zip(("out", *GRAD_NAMES), ours, expected, strict=True):
            assert_close(a, e, atol=1e-5, rtol=1e-5, name=name)
    assert counter.frame_count == 1


@pytest.mark.parametrize("layout", [lambda t: t, other_layout], ids=["contiguous", "strided"])
def test_reference_ops_opcheck(layout) -> None:
    batch = packed_attention([3, 2], [2, 0], 2, 1, 16)
    args = (*(layout(a) if isinstance(a, torch.Tensor) else a for a in batch.args), 0.25)
    torch.library.opcheck(torch.ops.dualtower.prefix_attention_reference, args)
    detached = [t.detach() for t in batch.leaves]
    bwd_args = (torch.randn_like(batch.q), *detached, batch.cu_text, batch.cu_prefix, None)
    torch.library.opcheck(torch.ops.dualtower.prefix_attention_reference_bwd, bwd_args)


# ----------------------------------------------------------------------------------------------------------------
# GPU: real sizes, bf16 error vs fp64 at most twice PyTorch's own
# ----------------------------------------------------------------------------------------------------------------


def _bf16_within_twice_pytorch(batch: PackedAttention) -> None:
    exact = batch.cast(torch.float64)
    grad_out = torch.randn_like(exact.q)
    expected = _run(prefix_attention_reference, exact, grad_out)
    with eager_low_precision():  # PyTorch's own bf16 attention
        theirs = _run(prefix_attention_reference, batch.cast(torch.bfloat16), grad_out.bfloat16())
    ours = _run(prefix_attention, batch.cast(torch.bfloat16), grad_out.bfloat16())
    for name, a, t, e in zip(("out", *GRAD_NAMES), ours, theirs, expected, strict=True):
        assert_error_within(a, t, e, name=name)


@pytest.mark.gpu
@pytest.mark.parametrize("heads", [(9, 3), (15, 5)], ids=["135m", "360m"])
def test_gpu_bf16_packed_rows(heads: tuple[int, int]) -> None:
    text, prefix = random_packing(rows=2, row_tokens=4096, seed=heads[0])
    _bf16_within_twice_pytorch(packed_attention(text, prefix, *heads, 64, device="cuda", requires_grad=True))


@pytest.mark.gpu
def test_gpu_causal_left_tower() -> None:
    """The left tower's pass: causal varlen over the prefixes, no prefix buffer."""
    _, prefix = random_packing(rows=2, row_tokens=4096, seed=3)
    _bf16_within_twice_pytorch(packed_attention(prefix, [0] * len(prefix), 9, 3, 64, device="cuda"))
