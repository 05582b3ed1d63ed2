"""Helpers shared by the kernel families: interpreter detection, launch configs, dot precision, SM counts."""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

# Read once at import: tests/conftest.py sets TRITON_INTERPRET before anything imports this package.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# DUALTOWER_AUTOTUNE=0 keeps only the first (default) GPU config: quick GPU checks skip the tuning sweep.
AUTOTUNE = os.environ.get("DUALTOWER_AUTOTUNE", "1") != "0"


def tuning_configs(gpu: list[triton.Config], interpreter: triton.Config) -> list[triton.Config]:
    """The GPU sweep, or the single small config the interpreter needs (it cannot autotune over 2+ configs)."""
    if INTERPRET:
        return [interpreter]
    return gpu if AUTOTUNE else gpu[:1]


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs get exact fp32 products (TF32 would break fp32 parity); 16-bit inputs ignore this."""
    return "ieee" if dtype == torch.float32 else "tf32"


def upcast_dots(dtype: torch.dtype) -> bool:
    """The interpreter computes 16-bit tl.dot wrongly; feed it fp32 operands instead."""
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


@triton.jit
def row_offsets(start, n_rows: tl.constexpr, n_heads, head, offs_d, HEAD_DIM: tl.constexpr):
    """Element offsets of rows start .. start + n_rows of one head."""
    rows = start + tl.arange(0, n_rows)
    return (rows[:, None] * n_heads + head) * HEAD_DIM + offs_d[None, :]
