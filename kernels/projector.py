"""Pixel-shuffle projector: space-to-depth of the ViT patch grid followed by a bias-free linear layer.

Shape legend:
    N   image tiles
    S   patches per tile (side * side), C ViT width
    f   pixel-shuffle factor; S / f^2 image tokens per tile, C * f^2 features per token
    O   output width (LM hidden size)
    M   N * S / f^2 output tokens (GEMM rows), K = C * f^2 (GEMM reduction)

The fused kernels never build the shuffled (M, K) copy. Element (m, k) of the shuffled matrix lives at
    x_offset(m, k) = row_base(m) + col_offset(k)
    row_base(m)    = (tile * S + h * f * side + w * f) * C      m = tile * S/f^2 + h * side/f + w
    col_offset(k)  = (dh * side + dw) * C + c                   k = (dh * f + dw) * C + c
so a GEMM tile loads it with one gather per row and contiguous runs of C along k. The forward computes
out = Xs @ W.T; the backward dX = dOut @ W scattered back through the same map, and dW = dOut.T @ Xs.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from dualtower_kernels._common import autotune, check_kernel_dtype, check_triton_device, dot_precision, upcast_dots


def pixel_shuffle(x: Tensor, factor: int) -> Tensor:
    """(N, S, C) -> (N, S / f^2, C f^2); feature index = (dh * f + dw) * C + c, token index = h_out * side/f + w_out."""
    tiles, patches, width = x.shape
    out_side = _grid_side(patches, factor) // factor
    x = x.reshape(tiles, out_side, factor, out_side, factor, width).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(tiles, out_side * out_side, factor * factor * width)


def _grid_side(patches: int, factor: int) -> int:
    """Side of the square patch grid; raises unless it splits into factor x factor blocks."""
    side = math.isqrt(patches)
    # A factor below 1 would pass the divisibility test (-2 divides 4) and shuffle with negative strides.
    if factor < 1 or side * side != patches or side % factor:
        raise ValueError(f"pixel_shuffle needs a square patch grid divisible by factor {factor}, got {patches} patches")
    return side


def pixel_shuffle_project_reference(x: Tensor, weight: Tensor, factor: int) -> Tensor:
    """(N, S, C) x (O, C f^2) -> (N, S / f^2, O), with the shuffled copy materialized."""
    return pixel_shuffle(x, factor) @ weight.t()


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _row_base(rows, tokens_per_tile: tl.constexpr, out_side: tl.constexpr, side: tl.constexpr, C,
              FACTOR: tl.constexpr):
    """Offset in x of the first feature of shuffled rows `rows` (int64: x can exceed 2^31 elements).

    The patch-grid sizes are constexpr: dW evaluates this once per step of its token loop, and division by a
    constant (a power of two for 512-px tiles: 64 tokens, 8 per side) is a shift, not an int64 division.
    """
    rows = rows.to(tl.int64)
    tile = rows // tokens_per_tile
    token = rows % tokens_per_tile
    h, w = token // out_side, token % out_side
    return (tile * side * side + (h * side + w) * FACTOR) * C


@triton.jit
def _col_offset(k0, cols, side, C, FACTOR: tl.constexpr, EVEN_C: tl.constexpr):
    """Offsets in x of shuffled features k0 + cols. EVEN_C: the block sits inside one (dh, dw) group."""
    if EVEN_C:
        group = k0 // C
        start = ((group // FACTOR) * side + group % FACTOR) * C + (k0 - group * C)
        return tl.multiple_of(start, 16) + cols
    else:
        k = k0 + cols
        group = k // C
        return ((group // FACTOR) * side + group % FACTOR) * C + (k - group * C)


# Tuned once per (O, C, factor), not per tile count: batches carry varying numbers of tiles.
_GEMM_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64}, num_warps=8, num_stages=3),
]
_FP32_CONFIG = triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4, num_stages=2)
_INTERPRETER_CONFIG = triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16})
_AUTOTUNE = autotune(_GEMM_CONFIGS, fp32=_FP32_CONFIG, interpreter=_INTERPRETER_CONFIG, key=["n_out", "C", "FACTOR"])
_EVEN_C = triton.heuristics({"EVEN_C": lambda a: a["C"] % a["BLOCK_K"] == 0})


@_AUTOTUNE
@_EVEN_C
@triton.jit
def _project_fwd_kernel(
    X, W, OUT, M, n_out, C, tokens_per_tile: tl.constexpr, out_side: tl.constexpr, side: tl.constexpr,
    FACTOR: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_C: tl.constexpr,
):
    """OUT (M, n_out) = Xs (M, K) @ W.T, with Xs read from x through the shuffle map.

    A 1-D grid with the N tiles of one M block adjacent: they run in the same wave, so that block's rows of x
    come from HBM once and from L2 for the other N tiles. With the M tiles fastest, as a 2-D grid launches them,
    x (400 MB for 256 tiles at 135m) was streamed from HBM about once per wave's worth of N tiles (two of the
    nine at 135m on an H200's 132 SMs).
    """
    n_tiles = tl.cdiv(n_out, BLOCK_N)
    pid_m, pid_n = tl.program_id(0) // n_tiles, tl.program_id(0) % n_tiles
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    outs = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_K)
    row_ok, out_ok = rows < M, outs < n_out
    x_rows = X + _row_base(rows, tokens_per_tile, out_side, side, C, FACTOR)[:, None]
    K = C * FACTOR * FACTOR
    w_ptrs = W + outs.to(tl.int64)[None, :] * K + cols[:, None]  # (BLOCK_K, BLOCK_N) view of W.T
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_C:
            a = tl.load(x_rows + _col_offset(k0, cols, side, C, FACTOR, True)[None, :], mask=row_ok[:, None],
                        other=0.0)
            b = tl.load(w_ptrs + k0, mask=out_ok[None, :], other=0.0)
        else:
            col_ok = k0 + cols < K
            a = tl.load(x_rows + _col_offset(k0, cols, side, C, FACTOR, False)[None, :],
                        mask=row_ok[:, None] & col_ok[None, :], other=0.0)
            b = tl.load(w_ptrs + k0, mask=out_ok[None, :] & col_ok[:, None], other=0.0)
        if UPCAST:
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    out_ptrs = OUT + rows.to(tl.int64)[:, None] * n_out + outs[None, :]
    tl.store(out_ptrs, acc.to(OUT.dtype.element_ty), mask=row_ok[:, None] & out_ok[None, :])


@_AUTOTUNE
@triton.heuristics({"EVEN_C": lambda a: a["C"] % a["BLOCK_N"] == 0})
@triton.jit
def _project_dx_kernel(
    G, W, DX, M, n_out, C, tokens_per_tile: tl.constexpr, out_side: tl.constexpr, side: tl.constexpr,
    FACTOR: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_C: tl.constexpr,
):
    """dXs (M, K) = G (M, n_out) @ W (n_out, K), each tile stored straight into the unshuffled dX layout.

    Here BLOCK_N tiles the features k (the output columns) and BLOCK_K the reduction over n_out.
    """
    pid_m, pid_k = tl.program_id(0), tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    k0 = pid_k * BLOCK_N
    cols = tl.arange(0, BLOCK_N)
    outs = tl.arange(0, BLOCK_K)
    K = C * FACTOR * FACTOR
    row_ok, col_ok = rows < M, k0 + cols < K
    g_ptrs = G + rows.to(tl.int64)[:, None] * n_out + outs[None, :]
    w_ptrs = W + outs.to(tl.int64)[:, None] * K + (k0 + cols)[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for o0 in range(0, n_out, BLOCK_K):
        out_ok = o0 + outs < n_out
        g = tl.load(g_ptrs + o0, mask=row_ok[:, None] & out_ok[None, :], other=0.0)
        w = tl.load(w_ptrs + o0 * K, mask=out_ok[:, None] & col_ok[None, :], other=0.0)
        if UPCAST:
            g, w = g.to(tl.float32), w.to(tl.float32)
        acc = tl.dot(g, w, acc, input_precision=PRECISION)
    x_offsets = _row_base(rows, tokens_per_tile, out_side, side, C, FACTOR)[:, None] + \
        _col_offset(k0, cols, side, C, FACTOR, EVEN_C)[None, :]
    tl.store(DX + x_offsets, acc.to(DX.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@_AUTOTUNE
@triton.heuristics({"EVEN_C": lambda a: a["C"] % a["BLOCK_N"] == 0})
@triton.jit
def _project_dw_kernel(
    G, X, DW, M, n_out, C, tokens_per_tile: tl.constexpr, out_side: tl.constexpr, side: tl.constexpr,
    FACTOR: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_C: tl.constexpr,
):
    """dW (n_out, K) = G.T (n_out, M) @ Xs (M, K), Xs gathered through the shuffle map.

    BLOCK_M tiles the outputs o, BLOCK_N the features k, BLOCK_K the reduction over tokens m.
    """
    pid_o, pid_k = tl.program_id(0), tl.program_id(1)
    outs = pid_o * BLOCK_M + tl.arange(0, BLOCK_M)
    k0 = pid_k * BLOCK_N
    cols = tl.arange(0, BLOCK_N)
    toks = tl.arange(0, BLOCK_K)
    K = C * FACTOR * FACTOR
    out_ok, col_ok = outs < n_out, k0 + cols < K
    col_offsets = _col_offset(k0, cols, side, C, FACTOR, EVEN_C)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for m0 in range(0, M, BLOCK_K):
        rows = m0 + toks
        row_ok = rows < M
        g_t = tl.load(G + rows.to(tl.int64)[None, :] * n_out + outs[:, None],
                      mask=out_ok[:, None] & row_ok[None, :], other=0.0)
        x_offsets = _row_base(rows, tokens_per_tile, out_side, side, C, FACTOR)[:, None] + col_offsets[None, :]
        xs = tl.load(X + x_offsets, mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        if UPCAST:
            g_t, xs = g_t.to(tl.float32), xs.to(tl.float32)
        acc = tl.dot(g_t, xs, acc, input_precision=PRECISION)
    dw_ptrs = DW + outs.to(tl.int64)[:, None] * K + (k0 + cols)[None, :]
    tl.store(dw_ptrs, acc.to(DW.dtype.element_ty), mask=out_ok[:, None] & col_ok[None, :])


# ----------------------------------------------------------------------------------------------------------------
# Launchers and torch.library registration
# ----------------------------------------------------------------------------------------------------------------


def _geometry(x: Tensor, weight: Tensor, factor: int) -> dict:
    if x.dim() != 3 or weight.dim() != 2:
        raise ValueError(f"x must be (tiles, patches, width) and weight (out, features), got {tuple(x.shape)} and "
                         f"{tuple(weight.shape)}")
    tiles, patches, width = x.shape
    side = _grid_side(patches, factor)
    if weight.shape[1] != width * factor * factor:
        raise ValueError(f"weight has {weight.shape[1]} input features, expected {width} * {factor}^2")
    if x.dtype != weight.dtype:
        raise ValueError(f"x ({x.dtype}) and weight ({weight.dtype}) must share a dtype")
    check_kernel_dtype(x)
    check_triton_device(x, weight)
    tokens_per_tile = patches // (factor * factor)
    return {
        "M": tiles * tokens_per_tile, "n_out": weight.shape[0], "C": width, "tokens_per_tile": tokens_per_tile,
        "out_side": side // factor, "side": side, "FACTOR": factor, "UPCAST": upcast_dots(x.dtype),
        "PRECISION": dot_precision(x.dtype),
    }


@torch.library.custom_op("dualtower::pixel_shuffle_project", mutates_args=())
def pixel_shuffle_project_op(x: Tensor, weight: Tensor, factor: int) -> Tensor:
    geo = _geometry(x, weight, factor)
    x, weight = x.contiguous(), weight.contiguous()
    out = x.new_empty((x.shape[0], geo["tokens_per_tile"], weight.shape[0]))
    if geo["M"] == 0 or geo["n_out"] == 0:
        return out.zero_()
    grid = lambda m: (triton.cdiv(geo["M"], m["BLOCK_M"]) * triton.cdiv(geo["n_out"], m["BLOCK_N"]),)
    _project_fwd_kernel[grid](x, weight, out, **geo)
    return out


@pixel_shuffle_project_op.register_fake
def _(x, weight, factor):
    return x.new_empty((x.shape[0], x.shape[1] // (factor * factor), weight.shape[0]))


@torch.library.custom_op("dualtower::pixel_shuffle_project_bwd", mutates_args=())
def pixel_shuffle_project_bwd(
    grad_out: Tensor, x: Tensor, weight: Tensor, factor: int, need_dx: bool, need_dw: bool
) -> tuple[Tensor, Tensor]:
    """-> dx (N, S, C) in x's own (unshuffled) layout, dw (n_out, C f^2); empty when not needed."""
    geo = _geometry(x, weight, factor)
    grad_out, x, weight = grad_out.contiguous(), x.contiguous(), weight.contiguous()
    dx, dw = x.new_empty(0), weight.new_empty(0)
    n_features = weight.shape[1]
    if need_dx:
        dx = torch.zeros_like(x) if geo["M"] == 0 or geo["n_out"] == 0 else torch.empty_like(x)
        if geo["M"] and geo["n_out"]:
            grid = lambda m: (triton.cdiv(geo["M"], m["BLOCK_M"]), triton.cdiv(n_features, m["BLOCK_N"]))
            _project_dx_kernel[grid](grad_out, weight, dx, **geo)
    if need_dw:
        dw = torch.zeros_like(weight) if geo["M"] == 0 else torch.empty_like(weight)
        if geo["M"] and geo["n_out"]:
            grid = lambda m: (triton.cdiv(geo["n_out"], m["BLOCK_M"]), triton.cdiv(n_features, m["BLOCK_N"]))
            _project_dw_kernel[grid](grad_out, x, dw, **geo)
    return dx, dw


@pixel_shuffle_project_bwd.register_fake
def _(grad_out, x, weight, factor, need_dx, need_dw):
    # Contiguous like the real outputs, which are computed from contiguous copies of the inputs.
    dx = x.new_empty(x.shape) if need_dx else x.new_empty(0)
    dw = weight.new_empty(weight.shape) if need_dw else weight.new_empty(0)
    return dx, dw


def _setup_context(ctx, inputs, output) -> None:
    x, weight, factor = inputs
    ctx.save_for_backward(x, weight)
    ctx.factor = factor


def _backward(ctx, grad_out: Tensor):
    x, weight = ctx.saved_tensors
    need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    dx, dw = pixel_shuffle_project_bwd(grad_out, x, weight, ctx.factor, need_dx, need_dw)
    return (dx if need_dx else None), (dw if need_dw else None), None


pixel_shuffle_project_op.register_autograd(_backward, setup_context=_setup_context)


def pixel_shuffle_project(x: Tensor, weight: Tensor, factor: int) -> Tensor:
    """Fused Triton pixel shuffle + projection; same signature and result as the reference."""
    return pixel_shuffle_project_op(x, weight, factor)
