"""Per-block torch.compile: the blocks repeat, so one compiled graph serves them all.

`Module.compile()` compiles in place, so parameter names (and checkpoints) do not gain `_orig_mod.`.
This is the only module that touches dynamo/inductor settings.
"""

from __future__ import annotations

import torch
from torch import nn

from dualtower.parallel.ac import transformer_block_lists


def apply_compile(model: nn.Module, fullgraph: bool = True) -> None:
    # Packed batches change their token count every step: let shapes go dynamic instead of recompiling.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 32)
    for blocks in transformer_block_lists(model):
        for block in blocks:
            block.compile(fullgraph=fullgraph)
