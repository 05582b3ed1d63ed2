"""The packed varlen batch: the one contract between data, model, training and generation.

Shape legend:
    D   documents in the batch (several per packed row)
    Np  prefix tokens of all documents, concatenated (sum of P_i)
    Nt  text tokens of all documents, concatenated (sum of T_i)
    N   image tiles of all documents
    I   image placeholder tokens (N * tokens_per_tile)

Every document i is split at its last image placeholder: prefix = tokens [0, P_i), text = [P_i, P_i + T_i).
Documents without images have P_i = 0. Nothing is padded: rows only matter for packing budgets and stats.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor

IGNORE_INDEX = -100


@dataclass
class PackedBatch:
    prefix_ids: Tensor  # (Np,) int64, left-tower tokens (chat header, tile tags, image placeholders)
    text_ids: Tensor  # (Nt,) int64, right-tower tokens
    labels: Tensor  # (Nt,) int64, next-token targets of text tokens, IGNORE_INDEX where unsupervised
    cu_prefix: Tensor  # (D + 1,) int32, cumulative prefix lengths
    cu_text: Tensor  # (D + 1,) int32, cumulative text lengths
    prefix_positions: Tensor  # (Np,) int64, 0 .. P_i - 1 per document
    text_positions: Tensor  # (Nt,) int64, P_i .. P_i + T_i - 1 per document
    pixel_values: Tensor  # (N, 3, S, S) float, tiles of all documents in document order
    tiles_per_doc: Tensor  # (D,) int64
    image_token_index: Tensor  # (I,) int64, index into prefix_ids of each placeholder, in tile order
    doc_row: Tensor  # (D,) int64, packed row of each document
    max_prefix_len: int  # max_i P_i (host int: kernels need it without a device sync)
    max_text_len: int  # max_i T_i
    num_rows: int  # packed rows in this batch
    row_capacity: int  # token budget of one row (0 when unpacked)
    num_supervised: int  # (labels != IGNORE_INDEX).sum(), counted on the host at collation

    @property
    def num_docs(self) -> int:
        return self.cu_text.numel() - 1

    @property
    def num_tokens(self) -> int:
        return self.prefix_ids.numel() + self.text_ids.numel()

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PackedBatch:
        moved = {
            f.name: getattr(self, f.name).to(device, non_blocking=non_blocking)
            for f in fields(self)
            if isinstance(getattr(self, f.name), Tensor)
        }
        return replace(self, **moved)

    def pin_memory(self) -> PackedBatch:
        pinned = {
            f.name: getattr(self, f.name).pin_memory()
            for f in fields(self)
            if isinstance(getattr(self, f.name), Tensor)
        }
        return replace(self, **pinned)
