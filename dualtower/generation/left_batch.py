"""The left tower's input at generation time: prompt prefixes (and their tiles) as text-free packed batches.

Shape legend:
    N   prompts in one left-tower pass, P prefix tokens of one prompt (image placeholders included)
    T   tiles, each `image_tokens_per_tile` placeholders in its prompt's prefix
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from dualtower.batch import PackedBatch
from dualtower.generation.requests import PreparedPrompt

MAX_TILES_PER_LEFT_PASS = 64  # bounds the vision tower's activation memory


def left_tower_batch(prompts: Sequence[PreparedPrompt], cfg: Any) -> PackedBatch:
    """A PackedBatch with the prefixes (and tiles) of `prompts` and no text: the left tower's input."""
    prefix_lens = [p.prefix_len for p in prompts]
    prefix_ids = torch.cat([p.prefix_ids for p in prompts])
    tiles = torch.cat([p.tiles for p in prompts])
    image_index = (prefix_ids == cfg.image_token_id).nonzero().squeeze(1)
    if image_index.numel() != tiles.shape[0] * cfg.image_tokens_per_tile:
        raise ValueError(
            f"prompts hold {image_index.numel()} image placeholders but {tiles.shape[0]} tiles of "
            f"{cfg.image_tokens_per_tile} tokens"
        )
    cu_prefix = torch.tensor([0, *torch.tensor(prefix_lens).cumsum(0).tolist()], dtype=torch.int32)
    empty = torch.zeros(0, dtype=torch.long)
    return PackedBatch(
        prefix_ids=prefix_ids,
        text_ids=empty,
        labels=empty,
        cu_prefix=cu_prefix,
        cu_text=torch.zeros(len(prompts) + 1, dtype=torch.int32),
        prefix_positions=torch.cat([torch.arange(n) for n in prefix_lens]),
        text_positions=empty,
        pixel_values=tiles,
        tiles_per_doc=torch.tensor([p.tiles.shape[0] for p in prompts]),
        image_token_index=image_index,
        doc_row=torch.arange(len(prompts)),
        max_prefix_len=max(prefix_lens),
        max_text_len=0,
        num_rows=len(prompts),
        row_capacity=0,
        num_supervised=0,
    )


def chunks_by_tiles(items: list[tuple[Any, list[int]]], prompts: Sequence[PreparedPrompt]) -> list[list[Any]]:
    """Group left-tower work so that one pass encodes at most MAX_TILES_PER_LEFT_PASS tiles (or one prompt)."""
    groups: list[list[Any]] = []
    tiles = 0
    for item in items:
        count = prompts[item[1][0]].tiles.shape[0]
        if not groups or tiles + count > MAX_TILES_PER_LEFT_PASS:
            groups.append([])
            tiles = 0
        groups[-1].append(item)
        tiles += count
    return groups
