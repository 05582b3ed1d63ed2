"""Helpers shared by the kernel families: interpreter detection, autotuning, dot precision, SM counts."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import torch
import triton
import triton.language as tl
from torch import Tensor

# Read once at import: tests/conftest.py sets TRITON_INTERPRET before anything imports this package.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# DUALTOWER_AUTOTUNE=0 keeps only the first (default) GPU config: quick GPU checks skip the tuning sweep.
AUTOTUNE = os.environ.get("DUALTOWER_AUTOTUNE", "1") != "0"


def autotune(
    gpu: list[triton.Config], *, fp32: triton.Config, interpreter: triton.Config, key: list[str]
) -> Callable:
    """`triton.autotune` over `gpu` for 16-bit inputs and over `fp32` alone for fp32 inputs.

    fp32 inputs take exact ("ieee") dots, which Triton lowers to FMA loops instead of tensor-core MMAs; on the
    large tiles tuned for bf16 that took 17-73 s of compilation per config and kernel (sm_90, measured with
    `python -m dualtower_kernels.compile_check`), for a path that exists for exactness, not speed. The kernel
    must take a PRECISION constexpr. The interpreter gets its single small config (it cannot autotune over
    two or more).
    """
    if INTERPRET:
        return triton.autotune(configs=[interpreter], key=key)
    fast = gpu if AUTOTUNE else gpu[:1]

    def by_precision(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
        return [fp32] if kwargs["PRECISION"] == "ieee" else fast

    return triton.autotune(configs=[*fast, fp32], key=key, prune_configs_by={"early_config_prune": by_precision})


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs get exact fp32 products (TF32 would break fp32 parity); 16-bit inputs ignore this."""
    return "ieee" if dtype == torch.float32 else "tf32"


def upcast_dots(dtype: torch.dtype) -> bool:
    """The interpreter computes bf16 tl.dot wrongly (errors of 1e8 with triton 3.6; fp16 came out right, but is
    upcast too so that both 16-bit types take one path); feed it fp32 operands instead."""
    return INTERPRET and dtype != torch.float32


@functools.cache
def sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def check_triton_device(*tensors: torch.Tensor) -> None:
    """Triton runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1; say so instead of crashing."""
    for t in tensors:
        if t.device.type != "cuda" and not (INTERPRET and t.device.type == "cpu"):
            raise RuntimeError(
                f"the triton backend needs CUDA tensors (or TRITON_INTERPRET=1 on CPU), got a {t.device} tensor; "
                "use the 'reference' backend instead"
            )


# What the kernels compute in: their statistics and accumulators are fp32, so fp64 would silently get fp32
# precision, and integers garbage. fp64 runs through the twins (the 'reference' backend).
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_kernel_dtype(*tensors: Tensor) -> None:
    """Raise unless every tensor is float16, bfloat16 or float32."""
    for t in tensors:
        if t.dtype not in KERNEL_DTYPES:
            raise ValueError(
                f"the triton kernels take float16, bfloat16 or float32 tensors, got {t.dtype}; "
                "use the 'reference' backend for other dtypes"
            )


def check_offsets(cu_text: Tensor, cu_prefix: Tensor) -> None:
    """Prefix attention's cu_text / cu_prefix: one (B + 1,) integer tensor each, over the same B documents.

    Metadata only (no host sync). The kernels read cu_prefix[doc + 1] for every document of cu_text.
    """
    integer = (torch.int32, torch.int64)
    same_shape = cu_text.dim() == 1 and cu_text.numel() >= 1 and cu_text.shape == cu_prefix.shape
    if not same_shape or not {cu_text.dtype, cu_prefix.dtype} <= set(integer):
        raise ValueError(
            f"cu_text {tuple(cu_text.shape)} {cu_text.dtype} and cu_prefix {tuple(cu_prefix.shape)} {cu_prefix.dtype} "
            "must be (documents + 1,) int32 / int64 offsets of the same documents"
        )


@triton.jit
def row_offsets(start, n_rows: tl.constexpr, n_heads, head, offs_d, HEAD_DIM: tl.constexpr):
    """Element offsets of rows start .. start + n_rows of one head."""
    rows = start + tl.arange(0, n_rows)
    return (rows[:, None] * n_heads + head) * HEAD_DIM + offs_d[None, :]


@triton.jit
def zero_rows(ptr, start, end, n_heads, head, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_ROWS: tl.constexpr):
    """Store zeros to rows [start, end) of one head of a (rows, heads, HEAD_DIM) buffer."""
    offs_d = tl.arange(0, BLOCK_D)
    zeros = tl.zeros([BLOCK_ROWS, BLOCK_D], ptr.dtype.element_ty)
    for r0 in range(start, end, BLOCK_ROWS):
        rows = r0 + tl.arange(0, BLOCK_ROWS)
        offsets = row_offsets(r0, BLOCK_ROWS, n_heads, head, offs_d, HEAD_DIM)
        tl.store(ptr + offsets, zeros, mask=(rows[:, None] < end) & (offs_d[None, :] < HEAD_DIM))
