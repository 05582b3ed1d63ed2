"""Documents -> one PackedBatch (dualtower.batch): prefixes and texts concatenated, offsets, positions, tiles.

Shape legend (as in dualtower/batch.py):
    D   documents        Np  prefix tokens (sum P_i)     Nt  text tokens (sum T_i)
    N   image tiles      I   image placeholders (N * tokens_per_tile)
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor

from dualtower.batch import IGNORE_INDEX, PackedBatch
from dualtower.data.document import Document


class CollateError(ValueError):
    """Documents whose placeholders do not match their tiles, or inconsistent row assignments."""


def collate(
    documents: list[Document],
    image_token_id: int,
    rows: list[int] | None = None,
    row_capacity: int = 0,
    tokens_per_tile: int | None = None,
) -> PackedBatch:
    """Concatenate documents into a PackedBatch; `rows[i]` is the packed row of document i (None: one per row).

    `tokens_per_tile` checks that every document has exactly tiles * tokens_per_tile placeholders; when it is
    None, one value must fit all documents of the batch.
    """
    if not documents:
        raise CollateError("cannot collate an empty list of documents")
    rows = list(range(len(documents))) if rows is None else list(rows)
    # Rows are 0, 1, ... in document order, none empty: num_rows and the row capacity count every one of them.
    in_order = all(b - a in (0, 1) for a, b in itertools.pairwise(rows))
    if len(rows) != len(documents) or rows[0] != 0 or not in_order:
        raise CollateError(
            f"row ids {rows[:8]}{' ...' if len(rows) > 8 else ''} for {len(documents)} documents: one per document, "
            "0, 1, ... in document order, no row skipped"
        )
    prefix_lens = [doc.prefix_len for doc in documents]
    text_lens = [doc.num_tokens - doc.prefix_len for doc in documents]
    prefix_ids = torch.cat([doc.input_ids[: doc.prefix_len] for doc in documents])
    text_ids = torch.cat([doc.input_ids[doc.prefix_len :] for doc in documents])
    labels = torch.cat([doc.labels[doc.prefix_len :] for doc in documents])
    tiles = [doc.num_tiles for doc in documents]
    image_token_index = _image_token_index(prefix_ids, documents, image_token_id, tokens_per_tile)
    return PackedBatch(
        prefix_ids=prefix_ids,
        text_ids=text_ids,
        labels=labels,
        cu_prefix=_offsets(prefix_lens),
        cu_text=_offsets(text_lens),
        prefix_positions=_positions(prefix_lens, starts=[0] * len(documents)),
        text_positions=_positions(text_lens, starts=prefix_lens),
        pixel_values=torch.cat([doc.tiles for doc in documents]),
        tiles_per_doc=torch.tensor(tiles, dtype=torch.int64),
        image_token_index=image_token_index,
        doc_row=torch.tensor(rows, dtype=torch.int64),
        max_prefix_len=max(prefix_lens),
        max_text_len=max(text_lens),
        num_rows=max(rows) + 1,
        row_capacity=row_capacity,
        num_supervised=int((labels != IGNORE_INDEX).sum()),
    )


def _offsets(lengths: list[int]) -> Tensor:
    offsets = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    offsets[1:] = torch.tensor(lengths, dtype=torch.int64).cumsum(0)
    return offsets


def _positions(lengths: list[int], starts: list[int]) -> Tensor:
    """Per document: start, start + 1, ..., start + length - 1, concatenated."""
    total = sum(lengths)
    if total == 0:
        return torch.zeros(0, dtype=torch.int64)
    lengths_t = torch.tensor(lengths, dtype=torch.int64)
    doc_start = torch.repeat_interleave(torch.cumsum(lengths_t, 0) - lengths_t, lengths_t)
    offset = torch.repeat_interleave(torch.tensor(starts, dtype=torch.int64), lengths_t)
    return torch.arange(total, dtype=torch.int64) - doc_start + offset


def _image_token_index(
    prefix_ids: Tensor, documents: list[Document], image_token_id: int, tokens_per_tile: int | None
) -> Tensor:
    index = (prefix_ids == image_token_id).nonzero().flatten()
    total_tiles = sum(doc.num_tiles for doc in documents)
    if tokens_per_tile is None and total_tiles:
        tokens_per_tile = index.numel() // total_tiles
    for i, doc in enumerate(documents):
        found = int((doc.input_ids[: doc.prefix_len] == image_token_id).sum())
        expected = doc.num_tiles * (tokens_per_tile or 0)
        if found != expected:
            raise CollateError(
                f"document {i}: {found} image placeholder tokens but {doc.num_tiles} tiles x "
                f"{tokens_per_tile} tokens per tile = {expected}"
            )
    return index
