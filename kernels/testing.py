"""Helpers shared by the kernel tests and benchmarks: packed varlen layouts, inputs, error checks.

Shape legend: Nt text tokens, Np prefix tokens, Hq / Hkv query / key-value heads, D head dim.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

TILE_TOKENS = 65  # 64 image tokens + 1 tile tag per 512x512 tile


@dataclass
class PackedAttention:
    """Inputs of prefix_attention for one packed batch (tensors are leaves that may require grad)."""

    q: Tensor
    k: Tensor
    v: Tensor
    k_prefix: Tensor
    v_prefix: Tensor
    cu_text: Tensor
    cu_prefix: Tensor
    max_text_len: int
    max_prefix_len: int

    @property
    def args(self) -> tuple:
        return (self.q, self.k, self.v, self.k_prefix, self.v_prefix, self.cu_text, self.cu_prefix,
                self.max_text_len, self.max_prefix_len)

    @property
    def leaves(self) -> tuple[Tensor, ...]:
        return self.q, self.k, self.v, self.k_prefix, self.v_prefix

    def cast(self, dtype: torch.dtype) -> PackedAttention:
        """Same values in another dtype, as fresh leaves with the same requires_grad."""
        fresh = [t.detach().to(dtype).requires_grad_(t.requires_grad) for t in self.leaves]
        return PackedAttention(*fresh, self.cu_text, self.cu_prefix, self.max_text_len, self.max_prefix_len)

    @property
    def flops(self) -> float:
        """Forward FLOPs of the visible (query, key) pairs: 4 * D * Hq per pair (QK^T and PV)."""
        text = (self.cu_text[1:] - self.cu_text[:-1]).double()
        prefix = (self.cu_prefix[1:] - self.cu_prefix[:-1]).double()
        pairs = (text * prefix + text * (text + 1) / 2).sum().item()
        return 4.0 * pairs * self.q.shape[1] * self.q.shape[2]


def offsets(lengths: list[int], device: torch.device | str) -> Tensor:
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    return torch.tensor(cu, dtype=torch.int32, device=device)


def packed_attention(
    text_lens: list[int],
    prefix_lens: list[int],
    q_heads: int,
    kv_heads: int,
    head_dim: int,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    pad_text: int = 0,
    pad_prefix: int = 0,
    requires_grad: bool = True,
) -> PackedAttention:
    """Random q/k/v for documents with these text / prefix lengths, plus optional padding rows at the end."""
    n_text, n_prefix = sum(text_lens) + pad_text, sum(prefix_lens) + pad_prefix

    def leaf(rows: int, heads: int) -> Tensor:
        return torch.randn(rows, heads, head_dim, device=device).to(dtype).requires_grad_(requires_grad)

    return PackedAttention(
        leaf(n_text, q_heads), leaf(n_text, kv_heads), leaf(n_text, kv_heads),
        leaf(n_prefix, kv_heads), leaf(n_prefix, kv_heads),
        offsets(text_lens, device), offsets(prefix_lens, device),
        max(text_lens, default=0), max(prefix_lens, default=0),
    )


def random_packing(
    rows: int, row_tokens: int = 4096, tiles: tuple[int, int] = (5, 17), text: tuple[int, int] = (1, 512),
    seed: int = 0,
) -> tuple[list[int], list[int]]:
    """(text_lens, prefix_lens) of documents packed into rows of row_tokens (prefix + text) tokens.

    Prefixes are whole tiles of TILE_TOKENS; the first row also holds a one-token text and an empty text.
    """
    rng = random.Random(seed)
    text_lens, prefix_lens = [1, 0], [tiles[0] * TILE_TOKENS, tiles[0] * TILE_TOKENS]
    used = sum(text_lens) + sum(prefix_lens)
    for _ in range(rows):
        while True:
            n_prefix = rng.randint(*tiles) * TILE_TOKENS
            n_text = rng.randint(*text)
            if used + n_prefix + n_text > row_tokens:
                break
            text_lens.append(n_text)
            prefix_lens.append(n_prefix)
            used += n_prefix + n_text
        used = 0
    return text_lens, prefix_lens


def other_layout(t: Tensor) -> Tensor:
    """The same values with the first two dimensions swapped in memory (a non-contiguous view), grad as t."""
    if t.dim() < 2:
        return t
    swapped = t.detach().transpose(0, 1).contiguous().transpose(0, 1)
    return swapped.requires_grad_(t.requires_grad)


def max_error(actual: Tensor, expected: Tensor) -> float:
    return (actual.double() - expected.double()).abs().max().item() if actual.numel() else 0.0


def assert_close(actual: Tensor, expected: Tensor, *, atol: float, rtol: float, name: str = "tensor") -> None:
    """torch.testing-style check that reports how many elements miss, the worst one and NaN disagreements."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.double(), expected.double()
    nan_mismatch = (a.isnan() != e.isnan()).sum().item()
    bad = ((a - e).abs() > atol + rtol * e.abs()) | (a.isnan() != e.isnan())
    if bad.any():
        worst = (a - e).abs().nan_to_num(float("inf")).argmax()
        index = tuple(int(i) for i in torch.unravel_index(worst, a.shape))
        raise AssertionError(
            f"{name}: {bad.sum().item()} / {a.numel()} elements differ (atol={atol}, rtol={rtol}), "
            f"{nan_mismatch} NaN disagreements; worst at {index}: {a[index].item()} vs {e[index].item()}"
        )


def assert_error_within(
    actual: Tensor, low_precision: Tensor, exact: Tensor, *, factor: float = 2.0, atol: float = 0.0,
    name: str = "tensor",
) -> None:
    """The kernel's max error vs the exact (fp64) result is at most `factor` x PyTorch's own low-precision error.

    `atol` is for scalars only: one number's rounding luck is not a statistic, a max over many elements is.
    """
    ours, theirs = max_error(actual, exact), max_error(low_precision, exact)
    assert ours <= factor * theirs + atol, f"{name}: error {ours:.3e} > {factor} x PyTorch's {theirs:.3e} + {atol}"


@contextlib.contextmanager
def eager_low_precision() -> Iterator[None]:
    """SDPA as eager bf16/fp16 attention: the math kernel with low-precision reductions allowed.

    Without this, a boolean mask plus GQA sends SDPA to the math kernel, which upcasts to fp32 internally:
    that measures fp32 attention, not PyTorch's own bf16 error.
    """
    allowed = torch.backends.cuda.fp16_bf16_reduction_math_sdp_allowed()
    torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp(True)
    try:
        with sdpa_kernel([SDPBackend.MATH]):
            yield
    finally:
        torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp(allowed)
