"""The static KV cache and the two right-tower passes that fill it: varlen prefill and one-token decode.

Shape legend:
    L   LM layers
    B   cache rows (requests, plus idle padding rows when the batch is bucketed)
    Hq / Hkv   query / key-value heads, D head dim
    S   cache capacity (positions per row)
    Np / Nt    prefix / prompt-text tokens of all requests, concatenated
    V   vocabulary

Row b of layer l holds, at positions 0 .. lengths[b] - 1: [prefix K/V from the left tower | prompt text K/V
from the right tower | K/V of the generated tokens]. Keys carry RoPE at their own position, which is also
their index in the row, so a new token's position is the row's current length.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dualtower import ops
from dualtower.model.language import LanguageModel


class StaticKVCache:
    """One (L, B, Hkv, S, D) key and one value buffer, allocated once (stable addresses for CUDA graphs).

    `keys[l]` / `values[l]` are layer l's (B, Hkv, S, D) views, what the decode step reads and writes; the prefill
    writes the prefix K/V of every layer at once through `all_keys` / `all_values`.
    """

    def __init__(self, decoder: LanguageModel, rows: int, capacity: int, dtype: torch.dtype, device: torch.device):
        cfg = decoder.cfg
        shape = (cfg.n_blocks, rows, cfg.n_kv_heads, capacity, cfg.head_dim)
        # Zeros, not empty: masked-out slots are still multiplied by a zero weight, and garbage could be NaN.
        self.all_keys = torch.zeros(shape, dtype=dtype, device=device)
        self.all_values = torch.zeros(shape, dtype=dtype, device=device)
        self.keys, self.values = list(self.all_keys.unbind(0)), list(self.all_values.unbind(0))
        self.rows, self.capacity, self.dtype, self.device = rows, capacity, dtype, device

    def matches(self, rows: int, capacity: int, dtype: torch.dtype, device: torch.device) -> bool:
        return (self.rows, self.capacity, self.dtype, self.device) == (rows, capacity, dtype, device)


def scatter_rows(cache: Tensor, rows: Tensor, positions: Tensor, values: Tensor) -> None:
    """cache (B, Hkv, S, D)[rows[i], :, positions[i]] = values[i] for values (N, Hkv, D).

    Cast to the cache's dtype: under the caller's autocast the blocks of an fp32 model produce bf16 K/V, and an
    indexed write does not convert."""
    cache[rows, :, positions] = values.to(cache.dtype)


def scatter_layers(cache: Tensor, rows: Tensor, positions: Tensor, values: Tensor) -> None:
    """Every layer in one write: cache (L, B, Hkv, S, D)[:, rows[i], :, positions[i]] = values[:, i], values
    (L, N, Hkv, D); cast to the cache's dtype as in scatter_rows."""
    cache.permute(1, 3, 0, 2, 4)[rows, positions] = values.transpose(0, 1).to(cache.dtype)


@dataclass
class PrefillLayout:
    """Where every prompt token goes: built on the host from the prompt lengths, then moved once."""

    text_ids: Tensor  # (Nt,) int64
    text_positions: Tensor  # (Nt,) P_r .. P_r + T_r - 1 per request
    text_rows: Tensor  # (Nt,) cache row of each text token
    prefix_positions: Tensor  # (Np,) 0 .. P_r - 1
    prefix_rows: Tensor  # (Np,)
    cu_text: Tensor  # (R + 1,) int32
    cu_prefix: Tensor  # (R + 1,) int32
    max_text_len: int
    max_prefix_len: int

    @classmethod
    def build(cls, text_ids: list[Tensor], prefix_lens: list[int], device: torch.device) -> PrefillLayout:
        text_lens = [t.numel() for t in text_ids]
        requests = torch.arange(len(text_lens))
        text_rows = requests.repeat_interleave(torch.tensor(text_lens))
        prefix_rows = requests.repeat_interleave(torch.tensor(prefix_lens, dtype=torch.long))
        text_positions = torch.cat([torch.arange(t) + p for t, p in zip(text_lens, prefix_lens, strict=True)])
        prefix_positions = torch.cat([torch.arange(p) for p in prefix_lens])
        cu_text = torch.tensor([0, *itertools.accumulate(text_lens)], dtype=torch.int32)
        cu_prefix = torch.tensor([0, *itertools.accumulate(prefix_lens)], dtype=torch.int32)
        tensors = {
            "text_ids": torch.cat(text_ids),
            "text_positions": text_positions,
            "text_rows": text_rows,
            "prefix_positions": prefix_positions,
            "prefix_rows": prefix_rows,
            "cu_text": cu_text,
            "cu_prefix": cu_prefix,
        }
        moved = {name: tensor.to(device) for name, tensor in tensors.items()}
        return cls(**moved, max_text_len=max(text_lens), max_prefix_len=max(prefix_lens))


def prefill(decoder: LanguageModel, cache: StaticKVCache, layout: PrefillLayout, prefix_kv: Tensor) -> Tensor:
    """Right tower over the prompt texts of all R requests at once (varlen); fills cache rows 0 .. R - 1.

    prefix_kv (L, 2, Np, Hkv, D): the left tower's K/V of every prefix token. Returns the fp32 logits of each
    request's last prompt token, (R, V).
    """
    # The prefix K/V of every layer go into the cache in two writes, not two per layer: the prefill runs eagerly
    # between compiled blocks, so each write is host time before the first token. The text K/V are written layer
    # by layer: holding every layer's until the end would cost L times their memory (GBs for big batches).
    scatter_layers(cache.all_keys, layout.prefix_rows, layout.prefix_positions, prefix_kv[:, 0])
    scatter_layers(cache.all_values, layout.prefix_rows, layout.prefix_positions, prefix_kv[:, 1])
    x = decoder.token_embedding(layout.text_ids)
    cos, sin = decoder.rotary(layout.text_positions)
    text_bounds = (layout.cu_text, layout.max_text_len)
    prefix_bounds = (layout.cu_prefix, layout.max_prefix_len)
    for layer, block in enumerate(decoder.blocks):
        x, k, v = block(x, cos, sin, *text_bounds, prefix_kv[layer, 0], prefix_kv[layer, 1], *prefix_bounds)
        scatter_rows(cache.keys[layer], layout.text_rows, layout.text_positions, k)
        scatter_rows(cache.values[layer], layout.text_rows, layout.text_positions, v)
    last = layout.cu_text[1:].long() - 1
    return decoder.head(decoder.norm(x[last])).float()


def block_decode(
    block: nn.Module,
    x: Tensor,
    cos: Tensor,
    sin: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    rows: Tensor,
    positions: Tensor,
    lengths: Tensor,
) -> Tensor:
    """One decoder block for one token per row: x (B, C) -> (B, C); writes this token's K/V into the caches.

    The unit torch.compile compiles: every layer has the same structure, so one compiled graph serves all.
    """
    h = block.norm1(x)
    q = block.attn.q(h, cos, sin)
    k, v = block.attn.kv(h, cos, sin)
    scatter_rows(k_cache, rows, positions, k)
    scatter_rows(v_cache, rows, positions, v)
    return block.finish(x, ops.decode_attention(q, k_cache, v_cache, lengths))


def decode_step(
    decoder: LanguageModel,
    tokens: Tensor,
    positions: Tensor,
    keys: list[Tensor],
    values: list[Tensor],
    block_fn: Callable[..., Tensor] = block_decode,
) -> Tensor:
    """One token per row: tokens (B,) at positions (B,) (= the rows' lengths) -> fp32 logits (B, V).

    Writes each layer's new K/V at `positions` and attends over positions 0 .. positions[b]. Static shapes
    and no host synchronization, so that the whole step can be captured in one CUDA graph.
    """
    rows = torch.arange(tokens.shape[0], device=tokens.device)
    lengths = positions + 1
    x = decoder.token_embedding(tokens)
    cos, sin = decoder.rotary(positions)
    for block, k_cache, v_cache in zip(decoder.blocks, keys, values, strict=True):
        x = block_fn(block, x, cos, sin, k_cache, v_cache, rows, positions, lengths)
    return decoder.head(decoder.norm(x)).float()


class GraphedDecodeStep:
    """`step` captured into one CUDA graph for one cache; a replay copies in two (B,) tensors and runs it all.

    A step is hundreds of small kernels; replaying them as one graph removes their launch cost. Two eager
    warm-up steps run first (capture records kernels without running them, so compilation, autotuning and
    first-use allocations must happen before). They write the K/V of the given tokens at the given
    positions, exactly what the first replay writes again, so capturing changes no result.
    """

    def __init__(
        self,
        step: Callable[..., Tensor],
        decoder: LanguageModel,
        cache: StaticKVCache,
        tokens: Tensor,
        positions: Tensor,
    ):
        self.cache = cache
        self.tokens, self.positions = tokens.clone(), positions.clone()

        def run() -> Tensor:
            return step(decoder, self.tokens, self.positions, cache.keys, cache.values)

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                run()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = run()

    def __call__(self, tokens: Tensor, positions: Tensor) -> Tensor:
        """Returns the graph's static logits buffer: read it before the next call."""
        self.tokens.copy_(tokens)
        self.positions.copy_(positions)
        self.graph.replay()
        return self.logits
