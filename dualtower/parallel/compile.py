"""Per-block torch.compile: the blocks repeat, so one compiled graph serves them all.

`Module.compile()` compiles in place, so parameter names (and checkpoints) do not gain `_orig_mod.`.
This is the only module that touches dynamo/inductor settings.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx.experimental._config as fx_config
from torch import nn

from dualtower.parallel.ac import transformer_block_lists


def apply_compile(model: nn.Module, fullgraph: bool = True, backend: Any = "inductor") -> None:
    # Packed batches change their token and document counts every step. dynamic=True compiles those sizes as
    # symbols from the first call; the default (static first, then dynamic one dimension at a time as each is
    # seen to change) recompiled the debug LM block 6 times in its first 30 steps. Widths stay static: they meet
    # the parameters' static shapes. The LM block still compiles twice, once per tower: the left tower calls it
    # with empty prefix K/V that need no gradient, the right tower with prefix K/V that do.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)
    # Without this, "duck sizing" gives sizes that happen to be equal at the first call one symbol: a first batch
    # whose document count + 1 equals the K/V head count, or whose token count equals the head dim, then has that
    # count specialized to the static width, and the next batch recompiles.
    fx_config.use_duck_shape = False
    for blocks in transformer_block_lists(model):
        for block in blocks:
            block.compile(fullgraph=fullgraph, dynamic=True, backend=backend)
