"""The one entry point for attention and the other hot ops; picks a backend per call.

Backends (see DESIGN.md section 2): "reference" (pure PyTorch, the CPU fallback and test oracle) and the fast
ones registered by the kernels package. `DUALTOWER_BACKEND` (environment) or `set_backend()` overrides the
automatic choice; "auto" picks the fastest available on the tensors' device.

Shape legend: Nt text tokens, Np prefix tokens, Hq / Hkv query / key-value heads, D head dim, B rows.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from dualtower_kernels.decode_attention import decode_attention_reference
from dualtower_kernels.linear_cross_entropy import linear_cross_entropy_reference
from dualtower_kernels.prefix_attention import prefix_attention_reference
from dualtower_kernels.projector import pixel_shuffle_project_reference

logger = logging.getLogger(__name__)

REFERENCE = "reference"
_override: str | None = None

# op name -> backend name -> implementation. Fast backends add themselves here.
_IMPLEMENTATIONS: dict[str, dict[str, Callable[..., Tensor]]] = {
    "prefix_attention": {REFERENCE: prefix_attention_reference},
    "decode_attention": {REFERENCE: decode_attention_reference},
    "linear_cross_entropy": {REFERENCE: linear_cross_entropy_reference},
    "pixel_shuffle_project": {REFERENCE: pixel_shuffle_project_reference},
}


def set_backend(name: str | None) -> None:
    """Force a backend for every op ("reference", ...), or None / "auto" for the automatic choice."""
    global _override
    _override = None if name in (None, "auto") else name


def available_backends(op: str) -> list[str]:
    return list(_IMPLEMENTATIONS[op])


def _resolve(op: str, device: torch.device) -> Callable[..., Tensor]:
    wanted = _override or os.environ.get("DUALTOWER_BACKEND") or "auto"
    impls = _IMPLEMENTATIONS[op]
    if wanted != "auto":
        if wanted not in impls:
            raise ValueError(f"backend {wanted!r} is not available for {op}; available: {', '.join(impls)}")
        return impls[wanted]
    return impls[REFERENCE]


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
    """q (Nt, Hq, D), k/v (Nt, Hkv, D), k_prefix/v_prefix (Np, Hkv, D) -> (Nt, Hq, D).

    Per document: its text queries see its whole prefix and its text causally. No document sees another.
    """
    impl = _resolve("prefix_attention", q.device)
    return impl(q, k, v, k_prefix, v_prefix, cu_text, cu_prefix, max_text_len, max_prefix_len, scale)


def causal_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_len: int) -> Tensor:
    """Causal varlen attention over packed documents: prefix_attention with empty prefixes."""
    empty = k.new_empty((0, *k.shape[1:]))
    no_prefix = torch.zeros_like(cu_seqlens)
    return prefix_attention(q, k, v, empty, empty, cu_seqlens, no_prefix, max_len, 0)


def dense_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Non-causal attention over fixed-length sequences (the ViT): (B, H, S, D) -> (B, H, S, D)."""
    return F.scaled_dot_product_attention(q, k, v)


def decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, lengths: Tensor, scale: float | None = None) -> Tensor:
    """q (B, Hq, D) over caches (B, Hkv, S, D) where row b holds lengths[b] valid positions -> (B, Hq, D)."""
    return _resolve("decode_attention", q.device)(q, k_cache, v_cache, lengths, scale)


def linear_cross_entropy(hidden: Tensor, weight: Tensor, labels: Tensor, ignore_index: int = -100) -> Tensor:
    """Sum over supervised tokens of CE(hidden @ weight.T, labels), fp32; hidden (N, C), weight (V, C)."""
    return _resolve("linear_cross_entropy", hidden.device)(hidden, weight, labels, ignore_index)


def pixel_shuffle_project(x: Tensor, weight: Tensor, factor: int) -> Tensor:
    """Pixel shuffle (N, S, C) -> (N, S / f^2, C f^2) then a bias-free linear layer with weight (O, C f^2)."""
    return _resolve("pixel_shuffle_project", x.device)(x, weight, factor)
