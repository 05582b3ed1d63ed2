"""Activation checkpointing: each transformer block recomputes its forward during backward."""

from __future__ import annotations

from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper


def transformer_block_lists(model: nn.Module) -> list[nn.ModuleList]:
    """The repeated blocks of every tower (vision, left LM, right LM when present)."""
    lists = [model.vision_encoder.blocks, model.left_decoder.blocks]
    if model.right_decoder is not None:
        lists.append(model.right_decoder.blocks)
    return lists


def apply_ac(model: nn.Module) -> None:
    """Wrap every block in place. The wrapper's state-dict hooks keep parameter names unchanged, and attribute
    lookups (e.g. `kv_only`) fall through to the wrapped block."""
    for blocks in transformer_block_lists(model):
        for index, block in enumerate(blocks):
            blocks[index] = checkpoint_wrapper(block, preserve_rng_state=False)
