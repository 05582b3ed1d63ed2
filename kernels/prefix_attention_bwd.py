"""Backward kernels of cross-tower prefix attention (the forward, the launchers and the shape legend are in
prefix_attention.py).

    dq    grid (cdiv(max_text_len, BLOCK_M), Hq, B): the forward's key walk; also computes
          delta = rowsum(dO * O), which dkdv reads.
    dkdv  grid (cdiv(max_prefix_len, BLOCK_N) + cdiv(max_text_len, BLOCK_N), Hkv, B): one key block (of the
          prefix or of the text) loops over the query heads of its KV group and over the queries that see it,
          so GQA gradients accumulate in registers, with no atomics and no repeated K/V.
1.4426950408889634 is log2(e): Triton kernels cannot read Python globals that are not constexpr.
"""

from __future__ import annotations

import triton
import triton.language as tl

from dualtower_kernels._common import autotune, row_offsets, zero_rows


@triton.jit
def _dq_key_range(
    dq, q, do, lse2, delta, k_ptrs, v_ptrs, row_step, lo, hi, n_keys, query_pos, d_mask, qk_scale,
    CAUSAL: tl.constexpr, MASK: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
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
        p = tl.math.exp2(s - lse2[:, None])
        if MASK:
            visible = key_pos[None, :] < n_keys
            if CAUSAL:
                visible = visible & (key_pos[None, :] <= query_pos[:, None])
            p = tl.where(visible, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)
    return dq


@autotune(
    [
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 32}, num_warps=4, num_stages=3),
    ],
    fp32=triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=2),
    interpreter=triton.Config({"BLOCK_M": 32, "BLOCK_N": 16}),
    key=["HEAD_DIM", "UPCAST", "PRECISION"],
)
@triton.jit
def _prefix_attn_dq_kernel(
    Q, K, V, KP, VP, OUT, DO, LSE, DELTA, DQ, CU_TEXT, CU_PREFIX,
    n_text_total, n_q_heads, n_kv_heads, group, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    tl.static_assert(BLOCK_M % BLOCK_N == 0)
    block, head, doc = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t_start, t_end = tl.load(CU_TEXT + doc), tl.load(CU_TEXT + doc + 1)
    if block == 0 and doc == tl.num_programs(2) - 1:  # rows after the last document get zero gradients
        zero_rows(DQ, t_end, n_text_total, n_q_heads, head, HEAD_DIM, BLOCK_D, BLOCK_M)
    m0 = block * BLOCK_M
    if m0 >= t_end - t_start:
        return
    p_start, p_end = tl.load(CU_PREFIX + doc), tl.load(CU_PREFIX + doc + 1)
    n_text, n_prefix = t_end - t_start, p_end - p_start
    kv_head = head // group
    qk_scale = sm_scale * 1.4426950408889634
    query_pos = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    row_mask = (query_pos[:, None] < n_text) & d_mask[None, :]
    q_offsets = row_offsets(t_start + m0, BLOCK_M, n_q_heads, head, offs_d, HEAD_DIM)  # also OUT, dO, dQ
    q = tl.load(Q + q_offsets, mask=row_mask, other=0.0)
    do = tl.load(DO + q_offsets, mask=row_mask, other=0.0)
    o = tl.load(OUT + q_offsets, mask=row_mask, other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    stat_offsets = head * n_text_total + t_start + query_pos
    tl.store(DELTA + stat_offsets, delta, mask=query_pos < n_text)
    # Rows past the document load lse = 0 and q = dO = 0, so their terms vanish (p * (0 - 0)).
    lse2 = tl.load(LSE + stat_offsets, mask=query_pos < n_text, other=0.0) * 1.4426950408889634
    if UPCAST:
        q, do = q.to(tl.float32), do.to(tl.float32)
    kv_step = n_kv_heads * HEAD_DIM

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    kp_ptrs = KP + row_offsets(p_start, BLOCK_N, n_kv_heads, kv_head, offs_d, HEAD_DIM)
    vp_ptrs = VP + row_offsets(p_start, BLOCK_N, n_kv_heads, kv_head, offs_d, HEAD_DIM)
    full = n_prefix - n_prefix % BLOCK_N
    dq = _dq_key_range(dq, q, do, lse2, delta, kp_ptrs, vp_ptrs, kv_step, 0, full, n_prefix, query_pos, d_mask,
                       qk_scale, False, False, BLOCK_N, UPCAST, PRECISION)
    dq = _dq_key_range(dq, q, do, lse2, delta, kp_ptrs, vp_ptrs, kv_step, full, n_prefix, n_prefix, query_pos,
                       d_mask, qk_scale, False, True, BLOCK_N, UPCAST, PRECISION)
    k_ptrs = K + row_offsets(t_start, BLOCK_N, n_kv_heads, kv_head, offs_d, HEAD_DIM)
    v_ptrs = V + row_offsets(t_start, BLOCK_N, n_kv_heads, kv_head, offs_d, HEAD_DIM)
    dq = _dq_key_range(dq, q, do, lse2, delta, k_ptrs, v_ptrs, kv_step, 0, m0, n_text, query_pos, d_mask,
                       qk_scale, True, False, BLOCK_N, UPCAST, PRECISION)
    diag_end = tl.minimum(m0 + BLOCK_M, n_text)
    dq = _dq_key_range(dq, q, do, lse2, delta, k_ptrs, v_ptrs, kv_step, m0, diag_end, n_text, query_pos, d_mask,
                       qk_scale, True, True, BLOCK_N, UPCAST, PRECISION)
    tl.store(DQ + q_offsets, (dq * sm_scale).to(DQ.dtype.element_ty), mask=row_mask)


@triton.jit
def _dkdv_query_range(
    dk, dv, k, v, q_ptrs, do_ptrs, stat_ptrs, delta_ptrs, q_step, lo, hi, n_text, key_pos, d_mask, qk_scale,
    CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """Accumulate one key block's dK/dV over text queries [lo, hi) of one query head.

    Transposed formulation: scores are (keys, queries), so dK/dV come out of plain dots with Q and dO.
    Rows past the document load q = dO = lse = delta = 0: their contributions are exactly zero.
    """
    offs_m = tl.arange(0, BLOCK_M)
    for m0 in range(lo, hi, BLOCK_M):
        query_pos = m0 + offs_m
        in_doc = query_pos < n_text
        row_mask = in_doc[:, None] & d_mask[None, :]
        q = tl.load(q_ptrs + m0 * q_step, mask=row_mask, other=0.0)
        do = tl.load(do_ptrs + m0 * q_step, mask=row_mask, other=0.0)
        lse2 = tl.load(stat_ptrs + m0, mask=in_doc, other=0.0) * 1.4426950408889634
        delta = tl.load(delta_ptrs + m0, mask=in_doc, other=0.0)
        if UPCAST:
            q, do = q.to(tl.float32), do.to(tl.float32)
        s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale
        p_t = tl.math.exp2(s_t - lse2[None, :])
        if CAUSAL:
            p_t = tl.where(key_pos[:, None] <= query_pos[None, :], p_t, 0.0)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=PRECISION)
    return dk, dv


@triton.jit
def _dkdv_block(
    KB, VB, DKB, DVB, key_start, n_keys, n0, Q, DO, LSE, DELTA, t_start, n_text, kv_head, group, n_q_heads,
    n_kv_heads, n_text_total, sm_scale,
    IS_TEXT: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """dK/dV of keys [n0, n0 + BLOCK_N) of one buffer (prefix or text) for one KV head, over its query heads."""
    qk_scale = sm_scale * 1.4426950408889634
    key_pos = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    kv_mask = (key_pos[:, None] < n_keys) & d_mask[None, :]
    kv_offsets = row_offsets(key_start + n0, BLOCK_N, n_kv_heads, kv_head, offs_d, HEAD_DIM)  # also dK, dV
    k = tl.load(KB + kv_offsets, mask=kv_mask, other=0.0)
    v = tl.load(VB + kv_offsets, mask=kv_mask, other=0.0)
    if UPCAST:
        k, v = k.to(tl.float32), v.to(tl.float32)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    q_step = n_q_heads * HEAD_DIM
    for g in range(group):
        head = kv_head * group + g
        q_offsets = row_offsets(t_start, BLOCK_M, n_q_heads, head, offs_d, HEAD_DIM)
        q_ptrs, do_ptrs = Q + q_offsets, DO + q_offsets
        stat_offsets = head * n_text_total + t_start + tl.arange(0, BLOCK_M)
        stat_ptrs, delta_ptrs = LSE + stat_offsets, DELTA + stat_offsets
        if IS_TEXT:
            # Queries [n0, n0 + BLOCK_N) straddle the diagonal (masked); later queries see the whole block.
            diag_end = tl.minimum(n0 + (BLOCK_N + BLOCK_M - 1) // BLOCK_M * BLOCK_M, n_text)
            dk, dv = _dkdv_query_range(dk, dv, k, v, q_ptrs, do_ptrs, stat_ptrs, delta_ptrs, q_step, n0, diag_end,
                                       n_text, key_pos, d_mask, qk_scale, True, BLOCK_M, UPCAST, PRECISION)
            dk, dv = _dkdv_query_range(dk, dv, k, v, q_ptrs, do_ptrs, stat_ptrs, delta_ptrs, q_step, diag_end,
                                       n_text, n_text, key_pos, d_mask, qk_scale, False, BLOCK_M, UPCAST, PRECISION)
        else:
            dk, dv = _dkdv_query_range(dk, dv, k, v, q_ptrs, do_ptrs, stat_ptrs, delta_ptrs, q_step, 0, n_text,
                                       n_text, key_pos, d_mask, qk_scale, False, BLOCK_M, UPCAST, PRECISION)
    tl.store(DKB + kv_offsets, (dk * sm_scale).to(DKB.dtype.element_ty), mask=kv_mask)
    tl.store(DVB + kv_offsets, dv.to(DVB.dtype.element_ty), mask=kv_mask)


@autotune(
    [
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 128}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 32, "BLOCK_N": 128}, num_warps=4, num_stages=3),
    ],
    fp32=triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=2),
    interpreter=triton.Config({"BLOCK_M": 16, "BLOCK_N": 32}),
    key=["HEAD_DIM", "UPCAST", "PRECISION"],
)
@triton.jit
def _prefix_attn_dkdv_kernel(
    Q, K, V, KP, VP, DO, LSE, DELTA, DK, DV, DKP, DVP, CU_TEXT, CU_PREFIX,
    n_text_total, n_prefix_total, n_q_heads, n_kv_heads, group, sm_scale, max_prefix_len,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    block, kv_head, doc = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t_start, t_end = tl.load(CU_TEXT + doc), tl.load(CU_TEXT + doc + 1)
    p_start, p_end = tl.load(CU_PREFIX + doc), tl.load(CU_PREFIX + doc + 1)
    if block == 0 and doc == tl.num_programs(2) - 1:  # rows after the last document get zero gradients
        zero_rows(DK, t_end, n_text_total, n_kv_heads, kv_head, HEAD_DIM, BLOCK_D, BLOCK_N)
        zero_rows(DV, t_end, n_text_total, n_kv_heads, kv_head, HEAD_DIM, BLOCK_D, BLOCK_N)
        zero_rows(DKP, p_end, n_prefix_total, n_kv_heads, kv_head, HEAD_DIM, BLOCK_D, BLOCK_N)
        zero_rows(DVP, p_end, n_prefix_total, n_kv_heads, kv_head, HEAD_DIM, BLOCK_D, BLOCK_N)
    n_text, n_prefix = t_end - t_start, p_end - p_start
    prefix_blocks = tl.cdiv(max_prefix_len, BLOCK_N)
    if block < prefix_blocks:
        n0 = block * BLOCK_N
        # A prefix key with no text queries (T_i = 0) still gets its (zero) gradient written.
        if n0 < n_prefix:
            _dkdv_block(KP, VP, DKP, DVP, p_start, n_prefix, n0, Q, DO, LSE, DELTA, t_start, n_text, kv_head, group,
                        n_q_heads, n_kv_heads, n_text_total, sm_scale, False, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N,
                        UPCAST, PRECISION)
    else:
        n0 = (block - prefix_blocks) * BLOCK_N
        if n0 < n_text:
            _dkdv_block(K, V, DK, DV, t_start, n_text, n0, Q, DO, LSE, DELTA, t_start, n_text, kv_head, group,
                        n_q_heads, n_kv_heads, n_text_total, sm_scale, True, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N,
                        UPCAST, PRECISION)
