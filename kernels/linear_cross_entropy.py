"""Linear cross-entropy: sum of token losses of `hidden @ weight.T` without keeping (tokens x vocab) logits.

Shape legend:
    N   tokens, C hidden width, V vocabulary
    S   supervised tokens (label != ignore_index), R rows of one chunk

Algorithm (fast paths): gather the supervised rows, then per chunk of R rows
    logits = h_chunk @ W.T                     (R, V), cuBLAS / MKL, in the activation dtype
    a row pass: logsumexp over V (fp32) and the loss; when gradients are wanted, the logits are overwritten
    in place with dlogits = softmax - onehot
    d_hidden[chunk] = dlogits @ W,  d_weight += dlogits.T @ h_chunk
The gradients are computed in the forward (no second logits GEMM), kept in fp32 (fp64 for fp64 inputs), and
scaled by the incoming gradient in the backward, which rounds them to the input dtype once. A 16-bit copy in
between would round twice (the scale is 1 / supervised tokens in training); the version that did so measured
2.01x PyTorch's own bf16 error on d_hidden on an H200, where 2x is allowed. Peak extra memory is one (R, V)
chunk plus the fp32 gradients; R is sized from LOGITS_CHUNK_BYTES.

The row pass is one Triton program per row (`linear_cross_entropy`, CUDA or the interpreter) or a few PyTorch
ops over the chunk (`linear_cross_entropy_chunked`, the CPU path). On CPUs the win is skipping unsupervised
rows: the reference computes logits for every text token, and only the answers of a chat are supervised.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.nn.functional import cross_entropy

from dualtower_kernels._common import INTERPRET, check_triton_device

# Budget for one chunk of logits. 256 MiB is 2,727 bf16 rows of a 49,218-token vocabulary: big enough for
# efficient GEMMs, small next to eager's ~10 bytes x tokens x vocab.
LOGITS_CHUNK_BYTES = 256 * 2**20


def _wide(x: Tensor) -> Tensor:
    """x in at least fp32: 16-bit floats are upcast, fp32 / fp64 returned as they are."""
    return x if x.dtype.itemsize >= 4 else x.float()


def _loss_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def linear_cross_entropy_reference(hidden: Tensor, weight: Tensor, labels: Tensor, ignore_index: int = -100) -> Tensor:
    """Sum (fp32, or fp64 for fp64 inputs) of cross-entropy over tokens whose label is not ignore_index; materializes
    the logits."""
    logits = _wide(hidden @ weight.t())
    return cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")


@triton.jit
def _ce_rows_kernel(LOGITS, LABELS, LOSS, n_cols, row_stride, ignore_index,
                    WRITE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr, WIDE: tl.constexpr):
    """One row: loss = logsumexp(x) - x[label]; optionally x <- softmax(x) - onehot(label), in place.

    WIDE is the arithmetic dtype: fp32, or fp64 for fp64 logits (whose loss and gradients are fp64 in the twin).
    """
    row = tl.program_id(0).to(tl.int64)
    base = LOGITS + row * row_stride
    label = tl.load(LABELS + row)
    cols = tl.arange(0, BLOCK_V)
    # Pass 1: a running max and rescaled sum per lane (no reduction inside the loop), merged at the end.
    # The finite start keeps fully masked lanes at exp(-inf) = 0 instead of exp(-inf + inf) = nan.
    m = tl.full([BLOCK_V], -1.0e30, WIDE)
    s = tl.zeros([BLOCK_V], WIDE)
    for v0 in range(0, n_cols, BLOCK_V):
        x = tl.load(base + v0 + cols, mask=v0 + cols < n_cols, other=-float("inf")).to(WIDE)
        m_new = tl.maximum(m, x)
        s = s * tl.exp(m - m_new) + tl.exp(x - m_new)
        m = m_new
    row_max = tl.max(m, 0)
    lse = row_max + tl.log(tl.sum(s * tl.exp(m - row_max), 0))
    valid = label != ignore_index
    target = tl.load(base + label, mask=valid, other=0.0).to(WIDE)
    tl.store(LOSS + row, tl.where(valid, lse - target, 0.0))
    if WRITE_GRAD:
        for v0 in range(0, n_cols, BLOCK_V):
            in_row = v0 + cols < n_cols
            x = tl.load(base + v0 + cols, mask=in_row, other=0.0).to(WIDE)
            grad = tl.exp(x - lse) - tl.where(v0 + cols == label, 1.0, 0.0)
            grad = tl.where(valid, grad, 0.0)
            tl.store(base + v0 + cols, grad.to(LOGITS.dtype.element_ty), mask=in_row)


def _ce_rows_triton(logits: Tensor, labels: Tensor, ignore_index: int, write_grad: bool) -> Tensor:
    """Per-row losses (fp32, fp64 for fp64 logits) of a (R, V) logits chunk; overwrites it with dlogits when
    write_grad."""
    wide = _loss_dtype(logits.dtype)
    losses = torch.empty(logits.shape[0], dtype=wide, device=logits.device)
    block_v = 64 if INTERPRET else 4096
    _ce_rows_kernel[(logits.shape[0],)](
        logits, labels, losses, logits.shape[1], logits.stride(0), ignore_index,
        WRITE_GRAD=write_grad, BLOCK_V=block_v, WIDE=tl.float64 if wide == torch.float64 else tl.float32,
        num_warps=1 if INTERPRET else 8,
    )
    return losses


def _ce_rows_torch(logits: Tensor, labels: Tensor, ignore_index: int, write_grad: bool) -> Tensor:
    """`_ce_rows_triton` in PyTorch ops, same contract: whole-chunk passes, in place where the logits are fp32."""
    x = _wide(logits)  # the chunk itself when fp32 / fp64, else an fp32 copy
    valid = labels != ignore_index
    targets = torch.where(valid, labels, 0)[:, None]
    row_max = x.amax(1, keepdim=True)
    target_logits = x.gather(1, targets)
    x.sub_(row_max).exp_()
    sums = x.sum(1, keepdim=True)
    losses = (row_max + sums.log() - target_logits).squeeze(1)
    if write_grad:
        x.div_(sums).scatter_add_(1, targets, torch.full_like(target_logits, -1.0))
        x.mul_(valid[:, None])
        if x is not logits:
            logits.copy_(x)
    return torch.where(valid, losses, 0.0)


def _chunk_rows(n_rows: int, vocab: int, dtype: torch.dtype, chunk_rows: int) -> int:
    """Rows per chunk: the explicit request, else the byte budget split evenly over the chunks it needs."""
    if chunk_rows > 0 or n_rows == 0:
        return max(chunk_rows, 1)
    budget_rows = max(1, LOGITS_CHUNK_BYTES // (vocab * dtype.itemsize))
    n_chunks = triton.cdiv(n_rows, budget_rows)
    return triton.cdiv(n_rows, n_chunks)


def _has_fp32_out_mm(x: Tensor) -> bool:
    """cuBLAS bf16/fp16 GEMMs can write fp32 (aten mm.dtype, CUDA only): the products then skip a rounding."""
    return x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and _fp32_out_mm_works(x.dtype)


@functools.cache
def _fp32_out_mm_works(dtype: torch.dtype) -> bool:
    """Probe once: the overload exists since torch 2.8, but only some builds implement it."""
    if not hasattr(torch.ops.aten.mm, "dtype"):
        return False
    tiny = torch.ones(2, 2, device="cuda", dtype=dtype)
    try:
        return torch.ops.aten.mm.dtype(tiny, tiny, torch.float32).dtype == torch.float32
    except (RuntimeError, NotImplementedError):
        return False


def _check_inputs(hidden: Tensor, weight: Tensor, labels: Tensor) -> None:
    """What F.cross_entropy (the twin) rejects: without these checks integer activations gave a loss, float labels
    a Triton type error and a 1-D weight a misleading vocabulary error."""
    # Rows are picked by label: with fewer labels than rows the others would be dropped from the loss silently.
    if hidden.dim() != 2 or labels.shape != hidden.shape[:1]:
        raise ValueError(f"labels {tuple(labels.shape)} must hold one label per row of hidden {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"weight {tuple(weight.shape)} must be (vocab, {hidden.shape[1]}) for hidden "
                         f"{tuple(hidden.shape)}")
    if not (hidden.is_floating_point() and weight.is_floating_point()):
        raise ValueError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must be floating point")
    if labels.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"labels must be integer (int32 / int64) class indices, got {labels.dtype}")


@torch.library.custom_op("dualtower::linear_cross_entropy_fwd", mutates_args=())
def linear_cross_entropy_fwd(
    hidden: Tensor, weight: Tensor, labels: Tensor, ignore_index: int, need_d_hidden: bool, need_d_weight: bool,
    chunk_rows: int, triton_rows: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """-> loss, d_hidden (N, C) or empty, d_weight (V, C) or empty: the loss and its gradients, all in fp32 (fp64
    for fp64 inputs).

    triton_rows picks the row pass: the Triton kernel (CUDA, the interpreter) or PyTorch ops (any device).
    """
    if triton_rows:
        check_triton_device(hidden, weight)
    _check_inputs(hidden, weight, labels)
    ce_rows = _ce_rows_triton if triton_rows else _ce_rows_torch
    hidden, weight = hidden.contiguous(), weight.contiguous()
    # The Triton row pass would read another row's logit for a label outside the vocabulary; F.cross_entropy
    # raises. Asynchronous on CUDA (a device-side assert, as F.cross_entropy's), immediate on the CPU.
    in_vocab = (labels >= 0) & (labels < weight.shape[0])
    torch._assert_async((in_vocab | (labels == ignore_index)).all(), "labels must be ignore_index or in [0, vocab)")
    # One host sync: work only on supervised rows (often a minority of the text tokens).
    rows = (labels != ignore_index).nonzero().squeeze(1)
    need_grad = need_d_hidden or need_d_weight
    wide = _loss_dtype(hidden.dtype)
    loss = torch.zeros((), dtype=wide, device=hidden.device)
    d_hidden = torch.zeros(hidden.shape if need_d_hidden else 0, dtype=wide, device=hidden.device)
    d_weight = torch.zeros(weight.shape if need_d_weight else 0, dtype=wide, device=weight.device)
    fp32_out = _has_fp32_out_mm(hidden)
    step = _chunk_rows(rows.numel(), weight.shape[0], hidden.dtype, chunk_rows)
    for start in range(0, rows.numel(), step):
        chunk = rows[start : start + step]
        h = hidden.index_select(0, chunk)
        logits = h @ weight.t()
        loss += ce_rows(logits, labels.index_select(0, chunk), ignore_index, need_grad).sum()
        if need_d_hidden:
            d_hidden.index_copy_(0, chunk, _product(logits, weight, fp32_out))
        if need_d_weight:
            d_weight.add_(_product(logits.t(), h, fp32_out))  # (V, C), summed over chunks in fp32
    return loss, d_hidden, d_weight


def _product(a: Tensor, b: Tensor, fp32_out: bool) -> Tensor:
    """a @ b in at least fp32: written as fp32 by the GEMM where it can, else rounded to a's dtype and widened."""
    return torch.ops.aten.mm.dtype(a, b, torch.float32) if fp32_out else _wide(a @ b)


@linear_cross_entropy_fwd.register_fake
def _(hidden, weight, labels, ignore_index, need_d_hidden, need_d_weight, chunk_rows, triton_rows):
    wide = _loss_dtype(hidden.dtype)
    loss = hidden.new_empty((), dtype=wide)
    d_hidden = hidden.new_empty(hidden.shape if need_d_hidden else 0, dtype=wide)
    d_weight = weight.new_empty(weight.shape if need_d_weight else 0, dtype=wide)
    return loss, d_hidden, d_weight


def _setup_context(ctx, inputs, output) -> None:
    _, d_hidden, d_weight = output
    ctx.save_for_backward(d_hidden, d_weight)
    ctx.need = inputs[4], inputs[5]
    ctx.dtypes = inputs[0].dtype, inputs[1].dtype
    ctx.mark_non_differentiable(d_hidden, d_weight)


def _backward(ctx, grad_loss: Tensor, *_):
    d_hidden, d_weight = ctx.saved_tensors
    (need_d_hidden, need_d_weight), (hidden_dtype, weight_dtype) = ctx.need, ctx.dtypes
    # Scaled in fp32 (a bf16 copy of 1 / n_tokens would bias every gradient by up to 0.4%), then rounded once.
    grad_hidden = (d_hidden * grad_loss).to(hidden_dtype) if need_d_hidden else None
    grad_weight = (d_weight * grad_loss).to(weight_dtype) if need_d_weight else None
    return grad_hidden, grad_weight, None, None, None, None, None, None


linear_cross_entropy_fwd.register_autograd(_backward, setup_context=_setup_context)


def linear_cross_entropy(
    hidden: Tensor, weight: Tensor, labels: Tensor, ignore_index: int = -100, *, chunk_rows: int = 0
) -> Tensor:
    """Same result as `linear_cross_entropy_reference` without the (N, V) logits; chunk_rows=0 sizes chunks."""
    return _chunked(hidden, weight, labels, ignore_index, chunk_rows, triton_rows=True)


def linear_cross_entropy_chunked(
    hidden: Tensor, weight: Tensor, labels: Tensor, ignore_index: int = -100, *, chunk_rows: int = 0
) -> Tensor:
    """`linear_cross_entropy` with the PyTorch row pass: runs on any device (the CPU fast path)."""
    return _chunked(hidden, weight, labels, ignore_index, chunk_rows, triton_rows=False)


def _chunked(
    hidden: Tensor, weight: Tensor, labels: Tensor, ignore_index: int, chunk_rows: int, triton_rows: bool
) -> Tensor:
    grad_on = torch.is_grad_enabled()
    loss, _, _ = linear_cross_entropy_fwd(
        hidden, weight, labels, ignore_index, grad_on and hidden.requires_grad, grad_on and weight.requires_grad,
        chunk_rows, triton_rows,
    )
    return loss
