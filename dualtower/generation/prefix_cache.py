"""An LRU cache, bounded in bytes, of left-tower prefix K/V keyed by image content and prefix tokens.

Shape legend:
    L   LM layers, P prefix tokens, Hkv key/value heads, D head dim

An entry is one document prefix's K/V for every layer, stacked as (L, 2, P, Hkv, D) (index 0 = K with RoPE
applied at positions 0..P-1, 1 = V). The prefix tokens are part of the key because they hold the chat header
and tile tags; the images are keyed by a digest of their content (the decoded source pixels, or the tile
bytes when only tiles are given), so the same picture asked about twice (or by two rows of one batch) runs
the vision tower and the left tower once. Entries hold for the left tower's weights they were made with: the
Generator empties the cache when those weights have changed in place since (`weights_version`).
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

PrefixKey = tuple[str, str]  # (tile digest, prefix-token digest)


def tensor_digest(tensor: Tensor) -> str:
    """sha256 of a tensor's dtype, shape and bytes (about 1 GB/s on one core)."""
    data = tensor.detach().contiguous().cpu()
    hasher = hashlib.sha256(f"{data.dtype}{tuple(data.shape)}".encode())
    if data.numel():
        hasher.update(memoryview(data.view(torch.uint8).numpy()).cast("B"))
    return hasher.hexdigest()


def image_digest(images: list[Any]) -> str:
    """sha256 of decoded PIL images (mode, size, pixels): the tiles are a function of these pixels."""
    hasher = hashlib.sha256(f"{len(images)} images".encode())
    for image in images:
        hasher.update(f"{image.mode}{image.size}".encode())
        hasher.update(image.tobytes())
        # A palette image's bytes are indices: its colours (and alpha, in an RGBA palette) are in the palette.
        palette = image.getpalette(None) if image.mode in ("P", "PA") else None
        if palette is not None:
            hasher.update(bytes(palette))
    return hasher.hexdigest()


def left_tower_parameters(model: Any) -> list[Tensor]:
    """The parameters the cached prefix K/V are a function of: vision tower, projector, left LM."""
    modules = (model.vision_encoder, model.projector, model.left_decoder)
    return [parameter for module in modules for parameter in module.parameters()]


def weights_version(parameters: list[Tensor]) -> int | None:
    """Sum of the parameters' in-place update counters: an optimizer step or load_state_dict changes it.

    None for parameters made under torch.inference_mode, which keep no counter (and cannot be updated).
    """
    try:
        return sum(parameter._version for parameter in parameters)
    except RuntimeError:
        return None


def weights_state(parameters: list[Tensor]) -> tuple[int | None, tuple[tuple[torch.dtype, torch.device], ...]]:
    """The update counters plus each parameter's dtype and device: `Module.to(bfloat16)` or a move to another
    device swaps a parameter's data without touching its counter, and the cached K/V would then be of the wrong
    dtype or device. (Not data_ptr: sharded parameters have no storage of their own.)"""
    placement = tuple((parameter.dtype, parameter.device) for parameter in parameters)
    return weights_version(parameters), placement


@dataclass
class PrefixCacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    bytes_used: int = 0
    entries: int = 0


class PrefixCache:
    """LRU by bytes: inserting beyond `max_bytes` evicts the least recently used entries first."""

    def __init__(self, max_bytes: int = 512 * 2**20):
        self.max_bytes = max_bytes
        self._entries: OrderedDict[PrefixKey, Tensor] = OrderedDict()
        self.stats = PrefixCacheStats()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: PrefixKey) -> bool:
        return key in self._entries

    def get(self, key: PrefixKey) -> Tensor | None:
        entry = self._entries.get(key)
        if entry is None:
            self.stats.misses += 1
            return None
        self._entries.move_to_end(key)
        self.stats.hits += 1
        return entry

    def put(self, key: PrefixKey, kv: Tensor) -> None:
        size = _nbytes(kv)
        if size > self.max_bytes:
            logger.debug("prefix K/V of %d bytes exceeds the cache budget of %d; not cached", size, self.max_bytes)
            return
        if key in self._entries:
            self._remove(key)
        while self._entries and self.stats.bytes_used + size > self.max_bytes:
            self._remove(next(iter(self._entries)))
            self.stats.evictions += 1
        self._entries[key] = kv
        self.stats.bytes_used += size
        self.stats.entries = len(self._entries)

    def clear(self) -> None:
        self._entries.clear()
        self.stats.bytes_used = 0
        self.stats.entries = 0

    def _remove(self, key: PrefixKey) -> None:
        self.stats.bytes_used -= _nbytes(self._entries.pop(key))
        self.stats.entries = len(self._entries)


def _nbytes(tensor: Tensor) -> int:
    return tensor.numel() * tensor.element_size()
