"""Cross-tower prefix attention: text queries over [prefix K/V (all visible) | text K/V (causal)], per document.

Shape legend:
    Nt  text (query) tokens of all documents, concatenated
    Np  prefix tokens of all documents, concatenated
    Hq  query heads, Hkv key/value heads (Hq % Hkv == 0, GQA without repeating K/V)
    D   head dim
    B   documents; cu_text / cu_prefix are (B + 1,) int32 cumulative lengths

With an empty prefix (cu_prefix all zero) this is plain causal varlen attention. Rows of q past cu_text[-1]
(padding at the end of a packed row) belong to no document: their output and gradients are zero.

Kernels (FlashAttention-2 style, online softmax in the exp2 domain, fp32 statistics; 1.4426950408889634 is
log2(e), spelled out because Triton kernels cannot read Python globals that are not constexpr):
    forward   grid (cdiv(max_text_len, BLOCK_M), Hq, B): one query block of one head of one document walks the
              document's prefix keys (no mask but the length), then its text keys up to the diagonal (the
              diagonal blocks masked). Saves the natural-log LSE (Hq, Nt).
    dq        same grid and key walk; also computes delta = rowsum(dO * O), which dkdv reads.
    dkdv      grid (cdiv(max_prefix_len, BLOCK_N) + cdiv(max_text_len, BLOCK_N), Hkv, B): one key block (of the
              prefix or of the text) loops over the query heads of its KV group and over the queries that see it,
              so GQA gradients accumulate in registers, with no atomics and no repeated K/V.
Prefix and text K/V are read from their own buffers; nothing is concatenated. Outputs and gradients are
allocated uninitialized: the first block of the last document writes the zeros of the padding rows.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from dualtower_kernels._common import (
    autotune,
    check_kernel_dtype,
    check_offsets,
    check_triton_device,
    dot_precision,
    row_offsets,
    upcast_dots,
    zero_rows,
)
from dualtower_kernels.prefix_attention_bwd import _prefix_attn_dkdv_kernel, _prefix_attn_dq_kernel


def concat_prefix_text(
    k: Tensor, v: Tensor, k_prefix: Tensor, v_prefix: Tensor, cu_text: Tensor, cu_prefix: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Per document [prefix; text] K and V rows in one buffer each (Np + Nt, Hkv, D) and their cu offsets.

    What flash-attn / varlen_attn need (their causal mask is bottom-right aligned, which is exactly our
    semantics with K = [prefix; text]). No host sync. Padding rows after the last document go to the end.
    """
    n_prefix, n_text, device = k_prefix.shape[0], k.shape[0], k.device
    cu_text64, cu_prefix64 = cu_text.long(), cu_prefix.long()
    prefix_rows, text_rows = torch.arange(n_prefix, device=device), torch.arange(n_text, device=device)
    # searchsorted (right) gives i + 1 for a row of document i, and B + 1 for padding rows.
    prefix_slot = torch.searchsorted(cu_prefix64, prefix_rows, right=True)
    text_slot = torch.searchsorted(cu_text64, text_rows, right=True)
    # Prefix row j of document i lands at cu_k[i] + (j - cu_prefix[i]) = j + cu_text[i].
    prefix_dst = prefix_rows + cu_text64[prefix_slot - 1]
    # Text row t of document i lands after the whole prefix of i: t + cu_prefix[i + 1] (padding: t + Np).
    text_dst = text_rows + torch.cat([cu_prefix64, cu_prefix64.new_full((1,), n_prefix)])[text_slot]

    def merge(text: Tensor, prefix: Tensor) -> Tensor:
        merged = text.new_empty((n_prefix + n_text, *text.shape[1:]))
        return merged.index_copy(0, prefix_dst, prefix).index_copy(0, text_dst, text)

    return merge(k, k_prefix), merge(v, v_prefix), (cu_text + cu_prefix).to(torch.int32)


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------------
# Buffers are contiguous (tokens, heads, HEAD_DIM); a row step is heads * HEAD_DIM elements. Positions inside
# the loops are document-local; pointers are built once per block and advanced by position * row step.


@triton.jit
def _fwd_key_range(
    acc, l_i, m_i, q, k_ptrs, v_ptrs, row_step, lo, hi, n_keys, query_pos, d_mask, qk_scale,
    CAUSAL: tl.constexpr, MASK: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Online-softmax update of one query block over keys [lo, hi) of one K/V buffer (n_keys long)."""
    offs_n = tl.arange(0, BLOCK_N)
    for n0 in range(lo, hi, BLOCK_N):
        key_pos = n0 + offs_n
        kv_mask = d_mask[None, :]
        if MASK:
            kv_mask = kv_mask & (key_pos[:, None] < n_keys)
        k = tl.load(k_ptrs + n0 * row_step, mask=kv_mask, other=0.0)
        v = tl.load(v_ptrs + n0 * row_step, mask=kv_mask, other=0.0)
        if UPCAST:
            k, v = k.to(tl.float32), v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        if MASK:
            visible = key_pos[None, :] < n_keys
            if CAUSAL:
                visible = visible & (key_pos[None, :] <= query_pos[:, None])
            s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@autotune(
    [
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=3),
    ],
    fp32=triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=2),
    interpreter=triton.Config({"BLOCK_M": 32, "BLOCK_N": 16}),
    key=["HEAD_DIM", "UPCAST", "PRECISION"],
)
@triton.jit
def _prefix_attn_fwd_kernel(
    Q, K, V, KP, VP, OUT, LSE, CU_TEXT, CU_PREFIX,
    n_text_total, n_q_heads, n_kv_heads, group, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    tl.static_assert(BLOCK_M % BLOCK_N == 0)
    block, head, doc = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t_start, t_end = tl.load(CU_TEXT + doc), tl.load(CU_TEXT + doc + 1)
    offs_d = tl.arange(0, BLOCK_D)
    if block == 0 and doc == tl.num_programs(2) - 1:  # rows after the last document: zeros (outputs are empty)
        zero_rows(OUT, t_end, n_text_total, n_q_heads, head, HEAD_DIM, BLOCK_D, BLOCK_M)
        for r0 in range(t_end, n_text_total, BLOCK_M):
            rows = r0 + tl.arange(0, BLOCK_M)
            tl.store(LSE + head * n_text_total + rows, tl.zeros([BLOCK_M], tl.float32), mask=rows < n_text_total)
    m0 = block * BLOCK_M
    if m0 >= t_end - t_start:
        return
    p_start, p_end = tl.load(CU_PREFIX + doc), tl.load(CU_PREFIX + doc + 1)
    n_text, n_prefix = t_end - t_start, p_end - p_start
    kv_head = head // group
    qk_scale = sm_scale * 1.4426950408889634
    query_pos = m0 + tl.arange(0, BLOCK_M)
    d_mask = offs_d < HEAD_DIM
    row_mask = (query_pos[:, None] < n_text) & d_mask[None, :]
    q = tl.load(Q + row_offsets(t_start + m0, BLOCK_M, n_q_heads, head, offs_d, HEAD_DIM), mask=row_mask, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    kv_step = n_kv_heads * HEAD_DIM

    # A finite start for the running max: a fully masked block then gives exp2(-inf) = 0, never inf - inf.
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # Prefix: every key visible; only the last partial block needs the length mask.
    kp_ptrs = KP + row_offsets(p_start, BLOCK_N, n_kv_heads, kv_head, offs_d, HEAD_DIM)
    vp_ptrs = VP + row_offsets(p_start, BLOCK_N, n_kv_heads, kv_head, offs_d, HEAD_DIM)
    full = n_prefix - n_prefix % BLOCK_N
    acc, l_i, m_i = _fwd_key_range(acc, l_i, m_i, q, kp_ptrs, vp_ptrs, kv_step, 0, full, n_prefix, query_pos,
                                   d_mask, qk_scale, False, False, BLOCK_N, UPCAST, PRECISION)
    acc, l_i, m_i = _fwd_key_range(acc, l_i, m_i, q, kp_ptrs, vp_ptrs, kv_step, full, n_prefix, n_prefix,
                                   query_pos, d_mask, qk_scale, False, True, BLOCK_N, UPCAST, PRECISION)
    # Text: keys before this block's first query are visible to all its rows; the diagonal blocks are masked.
    k_ptrs = K + row_offsets(t_start, BLOCK_N, n_kv_heads, kv_head, offs_d, HEAD_DIM)
    v_ptrs = V + row_offsets(t_start, BLOCK_N, n_kv_heads, kv_head, offs_d, HEAD_DIM)
    acc, l_i, m_i = _fwd_key_range(acc, l_i, m_i, q, k_ptrs, v_ptrs, kv_step, 0, m0, n_text, query_pos, d_mask,
                                   qk_scale, True, False, BLOCK_N, UPCAST, PRECISION)
    diag_end = tl.minimum(m0 + BLOCK_M, n_text)
    acc, l_i, m_i = _fwd_key_range(acc, l_i, m_i, q, k_ptrs, v_ptrs, kv_step, m0, diag_end, n_text, query_pos,
                                   d_mask, qk_scale, True, True, BLOCK_N, UPCAST, PRECISION)

    l_safe = tl.where(l_i > 0, l_i, 1.0)
    out = (acc / l_safe[:, None]).to(OUT.dtype.element_ty)
    tl.store(OUT + row_offsets(t_start + m0, BLOCK_M, n_q_heads, head, offs_d, HEAD_DIM), out, mask=row_mask)
    lse = (m_i + tl.math.log2(l_safe)) / 1.4426950408889634
    tl.store(LSE + head * n_text_total + t_start + query_pos, lse, mask=query_pos < n_text)


# ----------------------------------------------------------------------------------------------------------------
# Launchers and torch.library registration
# ----------------------------------------------------------------------------------------------------------------


def _kernel_meta(q: Tensor, k: Tensor) -> dict:
    head_dim = q.shape[-1]
    return {
        "n_q_heads": q.shape[1],
        "n_kv_heads": k.shape[1],
        "group": q.shape[1] // k.shape[1],
        "HEAD_DIM": head_dim,
        "BLOCK_D": max(16, triton.next_power_of_2(head_dim)),
        "UPCAST": upcast_dots(q.dtype),
        "PRECISION": dot_precision(q.dtype),
    }


def _check_inputs(
    q: Tensor, k: Tensor, v: Tensor, k_prefix: Tensor, v_prefix: Tensor, cu_text: Tensor, cu_prefix: Tensor
) -> None:
    """Shapes, dtypes and devices, from metadata only. The offsets' values are not read (a host sync): they must
    start at 0 and never decrease, and cu_text[-1] / cu_prefix[-1] must not exceed the rows of q / k_prefix."""
    check_offsets(cu_text, cu_prefix)
    if any(t.dim() != 3 for t in (q, k, v, k_prefix, v_prefix)):
        raise ValueError("q, k, v, k_prefix and v_prefix must be (tokens, heads, head_dim)")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]})")
    same_tokens_and_dim = k.shape[0] == q.shape[0] and k.shape[2] == q.shape[2]
    if not (same_tokens_and_dim and k.shape == v.shape and k_prefix.shape[1:] == k.shape[1:]
            and v_prefix.shape == k_prefix.shape):
        raise ValueError(
            f"mismatched shapes: q {tuple(q.shape)}, text K/V {tuple(k.shape)} / {tuple(v.shape)}, "
            f"prefix K/V {tuple(k_prefix.shape)} / {tuple(v_prefix.shape)}"
        )
    if len({t.dtype for t in (q, k, v, k_prefix, v_prefix)}) != 1:
        raise ValueError("q, k, v, k_prefix and v_prefix must share one dtype")
    check_kernel_dtype(q)
    check_triton_device(q, k, v, k_prefix, v_prefix)
    if len({t.device for t in (q, k, v, k_prefix, v_prefix, cu_text, cu_prefix)}) != 1:
        raise ValueError("q, k, v, k_prefix, v_prefix, cu_text and cu_prefix must be on one device")


def _launch_forward(
    q: Tensor, k: Tensor, v: Tensor, k_prefix: Tensor, v_prefix: Tensor, cu_text: Tensor, cu_prefix: Tensor,
    max_text_len: int, max_prefix_len: int, scale: float,
) -> tuple[Tensor, Tensor]:
    _check_inputs(q, k, v, k_prefix, v_prefix, cu_text, cu_prefix)
    # The offsets too: the kernels read them as flat arrays, and a strided view would give other documents.
    q, k, v, k_prefix, v_prefix, cu_text, cu_prefix = (
        t.contiguous() for t in (q, k, v, k_prefix, v_prefix, cu_text, cu_prefix)
    )
    lse_shape = (q.shape[1], q.shape[0])
    n_docs = cu_text.shape[0] - 1
    if max_text_len <= 0 or n_docs <= 0 or q.shape[0] == 0:
        return torch.zeros_like(q), torch.zeros(lse_shape, dtype=torch.float32, device=q.device)
    # The kernel writes every row, the padding after the last document included: no memset.
    out = torch.empty_like(q)
    lse = torch.empty(lse_shape, dtype=torch.float32, device=q.device)
    meta = _kernel_meta(q, k)
    grid = lambda m: (triton.cdiv(max_text_len, m["BLOCK_M"]), q.shape[1], n_docs)
    _prefix_attn_fwd_kernel[grid](
        q, k, v, k_prefix, v_prefix, out, lse, cu_text, cu_prefix, q.shape[0], sm_scale=scale, **meta
    )
    return out, lse


def _launch_backward(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, k_prefix: Tensor, v_prefix: Tensor, out: Tensor, lse: Tensor,
    cu_text: Tensor, cu_prefix: Tensor, max_text_len: int, max_prefix_len: int, scale: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    q, k, v, k_prefix, v_prefix, out, grad_out, cu_text, cu_prefix = (
        t.contiguous() for t in (q, k, v, k_prefix, v_prefix, out, grad_out, cu_text, cu_prefix)
    )
    n_docs = cu_text.shape[0] - 1
    if max_text_len <= 0 or n_docs <= 0 or q.shape[0] == 0:
        return tuple(torch.zeros_like(t) for t in (q, k, v, k_prefix, v_prefix))
    # The kernels write every row, the padding after the last document included: no memsets.
    grads = tuple(torch.empty_like(t) for t in (q, k, v, k_prefix, v_prefix))
    dq, dk, dv, dk_prefix, dv_prefix = grads
    meta = _kernel_meta(q, k)
    delta = torch.empty_like(lse)
    dq_grid = lambda m: (triton.cdiv(max_text_len, m["BLOCK_M"]), q.shape[1], n_docs)
    _prefix_attn_dq_kernel[dq_grid](
        q, k, v, k_prefix, v_prefix, out, grad_out, lse, delta, dq, cu_text, cu_prefix, q.shape[0],
        sm_scale=scale, **meta,
    )
    kv_blocks = lambda m: triton.cdiv(max_prefix_len, m["BLOCK_N"]) + triton.cdiv(max_text_len, m["BLOCK_N"])
    dkdv_grid = lambda m: (kv_blocks(m), k.shape[1], n_docs)
    _prefix_attn_dkdv_kernel[dkdv_grid](
        q, k, v, k_prefix, v_prefix, grad_out, lse, delta, dk, dv, dk_prefix, dv_prefix, cu_text, cu_prefix,
        q.shape[0], k_prefix.shape[0], sm_scale=scale, max_prefix_len=max_prefix_len, **meta,
    )
    return grads


@torch.library.custom_op("dualtower::prefix_attention_fwd", mutates_args=())
def prefix_attention_fwd(
    q: Tensor, k: Tensor, v: Tensor, k_prefix: Tensor, v_prefix: Tensor, cu_text: Tensor, cu_prefix: Tensor,
    max_text_len: int, max_prefix_len: int, scale: float,
) -> tuple[Tensor, Tensor]:
    """-> out (Nt, Hq, D), lse (Hq, Nt) fp32 (natural log)."""
    return _launch_forward(q, k, v, k_prefix, v_prefix, cu_text, cu_prefix, max_text_len, max_prefix_len, scale)


@prefix_attention_fwd.register_fake
def _(q, k, v, k_prefix, v_prefix, cu_text, cu_prefix, max_text_len, max_prefix_len, scale):
    # Contiguous like the real outputs, which are computed from contiguous copies of the inputs.
    return q.new_empty(q.shape), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


@torch.library.custom_op("dualtower::prefix_attention_bwd", mutates_args=())
def prefix_attention_bwd(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, k_prefix: Tensor, v_prefix: Tensor, out: Tensor, lse: Tensor,
    cu_text: Tensor, cu_prefix: Tensor, max_text_len: int, max_prefix_len: int, scale: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> dq, dk, dv, dk_prefix, dv_prefix (zero where no query sees a key)."""
    return _launch_backward(
        grad_out, q, k, v, k_prefix, v_prefix, out, lse, cu_text, cu_prefix, max_text_len, max_prefix_len, scale
    )


@prefix_attention_bwd.register_fake
def _(grad_out, q, k, v, k_prefix, v_prefix, out, lse, cu_text, cu_prefix, max_text_len, max_prefix_len, scale):
    return tuple(t.new_empty(t.shape) for t in (q, k, v, k_prefix, v_prefix))


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, k_prefix, v_prefix, cu_text, cu_prefix, max_text_len, max_prefix_len, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, k_prefix, v_prefix, out, lse, cu_text, cu_prefix)
    ctx.lengths = (max_text_len, max_prefix_len)
    ctx.scale = scale
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out: Tensor, grad_lse: Tensor | None):
    q, k, v, k_prefix, v_prefix, out, lse, cu_text, cu_prefix = ctx.saved_tensors
    grads = prefix_attention_bwd(
        grad_out, q, k, v, k_prefix, v_prefix, out, lse, cu_text, cu_prefix, *ctx.lengths, ctx.scale
    )
    return (*grads, None, None, None, None, None)


prefix_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


class _EagerPrefixAttention(torch.autograd.Function):
    """The same launches as the registered ops, without the dispatcher between them and Python.

    An eager call of the custom op hops Python -> dispatcher -> autograd wrapper -> dispatcher -> Python, and its
    backward again. With the launches stubbed out, on a 2-core CPU: 308 us per forward + backward through the
    op, 189 us through this Function; 50 vs 26 us for a forward without grad. The model calls attention once per
    layer and tower, so eager training and generation pay that on every layer. torch.compile traces the
    registered ops instead (see prefix_attention).
    """

    @staticmethod
    def forward(ctx, q, k, v, k_prefix, v_prefix, cu_text, cu_prefix, max_text_len, max_prefix_len, scale):
        out, lse = _launch_forward(q, k, v, k_prefix, v_prefix, cu_text, cu_prefix, max_text_len, max_prefix_len,
                                   scale)
        ctx.save_for_backward(q, k, v, k_prefix, v_prefix, out, lse, cu_text, cu_prefix)
        ctx.lengths, ctx.scale = (max_text_len, max_prefix_len), scale
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        q, k, v, k_prefix, v_prefix, out, lse, cu_text, cu_prefix = ctx.saved_tensors
        # Under create_graph, through the registered op: it has no derivative, so a backward through these
        # gradients raises. Raw launches would return gradients that autograd treats as constants, and a second
        # derivative would silently drop this op's term.
        backward = prefix_attention_bwd if torch.is_grad_enabled() else _launch_backward
        grads = backward(grad_out, q, k, v, k_prefix, v_prefix, out, lse, cu_text, cu_prefix, *ctx.lengths, ctx.scale)
        return (*grads, None, None, None, None, None)


def prefix_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    k_prefix: Tensor,
    v_prefix: Tensor,
    cu_text: Tensor,
    cu_prefix: Tensor,
    max_text_len: int,
    max_prefix_len: int,
    scale: float | None = None,
) -> Tensor:
    """Fused Triton kernel; same signature and semantics as `prefix_attention_reference`.

    max_text_len / max_prefix_len must be >= every document's text / prefix length (they size the grid).
    cu_text / cu_prefix must start at 0, never decrease and end within the rows of q / k_prefix. Only their
    shapes and dtypes are checked here (reading the values is a host sync); the twin checks the values too.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    args = (q, k, v, k_prefix, v_prefix, cu_text, cu_prefix, max_text_len, max_prefix_len, scale)
    if torch.compiler.is_compiling():  # an opaque op in the graph, with its registered backward
        return prefix_attention_fwd(*args)[0]
    return _EagerPrefixAttention.apply(*args)
