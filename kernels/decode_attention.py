"""Decode attention: one query per row over a static cache [prefix | generated] with per-row lengths.

Shape legend:
    B   rows (sequences being generated)
    Hq  query heads, Hkv key/value heads, G = Hq / Hkv query heads per KV head
    S   cache capacity (positions), D head dim
    P   splits of the cache (flash-decoding)

Kernels (flash-decoding):
    split   grid (B, Hkv, P): all G query heads of one KV head (padded to 16 rows for tl.dot) against one
            contiguous slice of the cache, each K/V tile loaded once for the whole group; writes a partial
            output normalized by its own softmax sum and its log2-sum-exp. Slices past the row's length
            write lse = -inf.
    combine grid (B * Hq,): merges the P partials of one (row, head) by their LSEs.
P depends only on (B, Hkv, S) and the GPU, never on the lengths: no host sync, and the launch is the same
every step, so the decode step can be captured in a CUDA graph. No autotuning for the same reason.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.nn.functional import scaled_dot_product_attention

from dualtower_kernels._common import (
    INTERPRET,
    check_kernel_dtype,
    check_triton_device,
    dot_precision,
    sm_count,
    upcast_dots,
)


def decode_attention_reference(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, lengths: Tensor, scale: float | None = None
) -> Tensor:
    """q (B, Hq, D), caches (B, Hkv, S, D), lengths (B,) -> (B, Hq, D); keys >= lengths[b] are invisible."""
    capacity = k_cache.shape[2]
    visible = torch.arange(capacity, device=q.device)[None, :] < lengths[:, None]  # (B, S)
    out = scaled_dot_product_attention(
        q.unsqueeze(2), k_cache, v_cache, attn_mask=visible[:, None, None, :], scale=scale, enable_gqa=True
    )
    return out.squeeze(2)


@triton.jit
def _decode_split_kernel(
    Q, K, V, LENGTHS, PART_O, PART_LSE,
    stride_lengths, stride_qb, stride_qh, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
    n_q_heads, group, capacity, split_len, n_splits, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    row, kv_head, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    # A length past the capacity sees the whole cache (as the twin's mask does), never memory past it.
    length = tl.minimum(tl.load(LENGTHS + row * stride_lengths), capacity)
    start = split * split_len
    end = tl.minimum(start + split_len, length)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    heads = kv_head * group + offs_h
    head_ok = offs_h < group
    d_ok = offs_d < HEAD_DIM
    q = tl.load(Q + row * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=head_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    qk_scale = sm_scale * 1.4426950408889634
    k_base = K + row.to(tl.int64) * stride_kb + kv_head * stride_kh + offs_d[None, :]
    v_base = V + row.to(tl.int64) * stride_vb + kv_head * stride_vh + offs_d[None, :]

    m_i = tl.full([BLOCK_H], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + offs_n
        pos_ok = pos < end
        k = tl.load(k_base + pos[:, None] * stride_ks, mask=pos_ok[:, None] & d_ok[None, :], other=0.0)
        v = tl.load(v_base + pos[:, None] * stride_vs, mask=pos_ok[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:
            k, v = k.to(tl.float32), v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        s = tl.where(pos_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new

    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), m_i + tl.math.log2(tl.where(empty, 1.0, l_i)))
    part = (row * n_q_heads + heads) * n_splits + split
    tl.store(PART_O + part[:, None] * HEAD_DIM + offs_d[None, :], out, mask=head_ok[:, None] & d_ok[None, :])
    tl.store(PART_LSE + part, lse, mask=head_ok)


@triton.jit
def _decode_combine_kernel(
    PART_O, PART_LSE, OUT, stride_ob, stride_oh, n_q_heads, n_splits,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr,
):
    pid = tl.program_id(0)
    row, head = pid // n_q_heads, pid % n_q_heads
    offs_p = tl.arange(0, BLOCK_P)
    offs_d = tl.arange(0, BLOCK_D)
    p_ok = offs_p < n_splits
    lse = tl.load(PART_LSE + pid * n_splits + offs_p, mask=p_ok, other=float("-inf"))
    top = tl.max(lse, 0)
    top = tl.where(top == float("-inf"), 0.0, top)  # a zero-length row: all weights 0, output 0
    weights = tl.math.exp2(lse - top)
    parts = tl.load(PART_O + (pid * n_splits + offs_p)[:, None] * HEAD_DIM + offs_d[None, :],
                    mask=p_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    total = tl.sum(weights, 0)
    out = tl.sum(parts * weights[:, None], 0) / tl.where(total > 0, total, 1.0)
    tl.store(OUT + row * stride_ob + head * stride_oh + offs_d, out.to(OUT.dtype.element_ty),
             mask=offs_d < HEAD_DIM)


def _split_plan(rows: int, kv_heads: int, capacity: int, device: torch.device, block_n: int) -> tuple[int, int]:
    """(n_splits, split_len): enough programs to fill the GPU twice over, each slice a whole number of tiles."""
    # Under the interpreter: few splits, still exercising the split + combine path.
    target = 3 if INTERPRET else triton.cdiv(2 * sm_count(device.index or 0), max(rows * kv_heads, 1))
    n_splits = max(1, min(target, triton.cdiv(capacity, block_n), 128))
    split_len = triton.cdiv(triton.cdiv(capacity, n_splits), block_n) * block_n
    return triton.cdiv(capacity, split_len), split_len


def _check_inputs(q: Tensor, k_cache: Tensor, v_cache: Tensor, lengths: Tensor) -> None:
    """Shapes, dtypes and devices, from metadata only (no host sync: the step is captured in CUDA graphs).

    The kernels index the caches by q's row and head dim and read one length per row: any mismatch would read
    past a buffer or misread it, silently.
    """
    consistent = q.dim() == 3 and k_cache.dim() == 4 and k_cache.shape == v_cache.shape
    if consistent:
        rows, q_heads, head_dim = q.shape
        kv_heads = k_cache.shape[1]
        consistent = kv_heads > 0 and q_heads % kv_heads == 0 and k_cache.shape[0] == rows
        consistent = consistent and k_cache.shape[3] == head_dim
    if not consistent:  # the message only now: formatting it costs more than the checks (every layer, every step)
        shapes = (q.shape, k_cache.shape, v_cache.shape, lengths.shape)
        raise ValueError("bad decode shapes: q {}, k {}, v {}, lengths {}".format(*map(tuple, shapes)))
    if lengths.shape != (rows,) or lengths.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"lengths must be (rows,) int32 or int64, got {tuple(lengths.shape)} {lengths.dtype}")
    if not q.dtype == k_cache.dtype == v_cache.dtype:
        dtypes = f"{q.dtype}, {k_cache.dtype}, {v_cache.dtype}"
        raise ValueError(f"q, k_cache and v_cache must share one dtype, got {dtypes}")
    check_kernel_dtype(q)
    if len({t.device for t in (q, k_cache, v_cache, lengths)}) != 1:
        raise ValueError("q, k_cache, v_cache and lengths must be on one device")
    check_triton_device(q, k_cache, v_cache)


@torch.library.custom_op("dualtower::decode_attention", mutates_args=())
def decode_attention_op(q: Tensor, k_cache: Tensor, v_cache: Tensor, lengths: Tensor, scale: float) -> Tensor:
    _check_inputs(q, k_cache, v_cache, lengths)
    rows, q_heads, head_dim = q.shape
    kv_heads, capacity = k_cache.shape[1], k_cache.shape[2]
    # The kernels take any strides but the head dim's: copy only a tensor whose head dim is strided, never a
    # cache merely because it is a view (a copy of the whole cache would cost more than the attention).
    q, k_cache, v_cache = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k_cache, v_cache))
    out = q.new_empty(q.shape)  # contiguous, as the fake says, whatever q's layout
    if rows == 0 or capacity == 0:
        return out.zero_()
    group = q_heads // kv_heads
    block_n = 16 if INTERPRET else 64
    n_splits, split_len = _split_plan(rows, kv_heads, capacity, q.device, block_n)
    part_o = torch.empty((rows * q_heads * n_splits, head_dim), dtype=torch.float32, device=q.device)
    part_lse = torch.empty((rows * q_heads * n_splits,), dtype=torch.float32, device=q.device)
    block_d = max(16, triton.next_power_of_2(head_dim))
    _decode_split_kernel[(rows, kv_heads, n_splits)](
        q, k_cache, v_cache, lengths, part_o, part_lse,
        lengths.stride(0), q.stride(0), q.stride(1), *k_cache.stride()[:3], *v_cache.stride()[:3],
        q_heads, group, capacity, split_len, n_splits, scale,
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_H=max(16, triton.next_power_of_2(group)), BLOCK_N=block_n,
        UPCAST=upcast_dots(q.dtype), PRECISION=dot_precision(q.dtype), num_warps=4, num_stages=2,
    )
    _decode_combine_kernel[(rows * q_heads,)](
        part_o, part_lse, out, out.stride(0), out.stride(1), q_heads, n_splits,
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_P=triton.next_power_of_2(n_splits), num_warps=1 if INTERPRET else 2,
    )
    return out


@decode_attention_op.register_fake
def _(q, k_cache, v_cache, lengths, scale):
    return q.new_empty(q.shape)


def decode_attention(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, lengths: Tensor, scale: float | None = None
) -> Tensor:
    """Split-K Triton decode; same signature and semantics as `decode_attention_reference`.

    A row of length 0 gives zeros (as the twin does), one longer than the cache sees the whole cache.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return decode_attention_op(q, k_cache, v_cache, lengths, scale)
