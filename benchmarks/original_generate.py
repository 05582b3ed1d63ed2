"""The original DualTowerVLM `generate` (reference_spec 2.6), greedy, as the baseline for bench_decode.py.

Built from original_step.py's blocks, so it runs the same computation as the original:
- left tower: ViT over every tile, materialized pixel shuffle, the FULL left LM over the prefix (dense masks);
- prefill: the right tower over the WHOLE prompt (prefix rows too) with the dense (T x T) float mask rebuilt in
  every layer, cumsum positions, fp32 RoPE (q and k promoted to fp32), prefix K/V overwritten by the left
  tower's, GQA by repeat_interleave;
- decode: one token per step, K/V grown with torch.cat, an additive key-padding mask rebuilt every step, and
  `max_new_tokens` model steps (the last step's output is thrown away: the original's extra step).
On CUDA it runs under bf16 autocast with fp32 weights, as reference_throughput.md measured it; on CPU in fp32.

Shape legend: B rows, L prompt tokens, P prefix tokens, S cached tokens, V vocab.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from original_step import OriginalBatch, _block, _left_tower, _padding_mask, _right_mask, _rms, _rope
from torch import Tensor

from dualtower.batch import IGNORE_INDEX
from dualtower.generation import PreparedPrompt
from dualtower.model import DualTowerVLM


def original_batch(prompts: Sequence[PreparedPrompt], device: torch.device) -> OriginalBatch:
    """Prompts of one length with one split point (the original's single batch-wide last_img_idx)."""
    lengths = {p.input_ids.numel() for p in prompts}
    prefixes = {p.prefix_len for p in prompts}
    if len(lengths) != 1 or len(prefixes) != 1:
        raise ValueError("the original generate takes one prompt length and one split point per batch")
    input_ids = torch.stack([p.input_ids for p in prompts]).to(device)
    return OriginalBatch(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        targets=torch.full_like(input_ids, IGNORE_INDEX),
        images=torch.cat([p.tiles for p in prompts]).to(device),
        last_img_idx=prefixes.pop() - 1,
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _prefill(model: DualTowerVLM, batch: OriginalBatch) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
    """Last-position logits (B, V) and the per-layer (k, v) caches (B, Hkv, L, D)."""
    left_kv = _left_tower(model, batch)
    lm, mask = model.text_decoder, batch.attention_mask
    positions = (mask.cumsum(dim=1) - 1).masked_fill(mask == 0, 0)
    cos, sin = _rope(positions, lm.rotary.inv_freq, mask)
    x = lm.token_embedding(batch.input_ids)
    length, n_img = batch.input_ids.shape[1], batch.last_img_idx + 1
    caches = []
    for block, kv in zip(lm.blocks, left_kv, strict=True):
        dense = _right_mask(length, n_img, mask, x.dtype)  # rebuilt in every layer, as the original does
        x, cache = _block(block, x, cos, sin, dense, lm.cfg.rms_eps, left_kv=kv)
        caches.append(cache)
    return F.linear(_rms(x[:, -1], lm.norm.weight, lm.cfg.rms_eps), lm.head.weight), caches


def _decode_step(model: DualTowerVLM, token: Tensor, positions: Tensor, mask: Tensor, caches: list) -> Tensor:
    """One new token per row at `positions` (B,); grows every cache by one position; returns (B, V) logits."""
    lm = model.text_decoder
    cos, sin = _rope(positions[:, None], lm.rotary.inv_freq, None)
    x = lm.token_embedding(token)[:, None]
    padding = _padding_mask(mask, x.dtype)
    for index, block in enumerate(lm.blocks):
        x, caches[index] = _block(block, x, cos, sin, padding, lm.cfg.rms_eps, past=caches[index])
    return F.linear(_rms(x[:, -1], lm.norm.weight, lm.cfg.rms_eps), lm.head.weight)


@torch.inference_mode()
def original_generate(model: DualTowerVLM, batch: OriginalBatch, new_tokens: int) -> tuple[Tensor, float, float]:
    """Greedy tokens (B, new_tokens), seconds to the first token (TTFT), seconds of the decode loop."""
    device = batch.input_ids.device
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    _sync(device)
    start = time.perf_counter()
    with autocast:
        logits, caches = _prefill(model, batch)
        token = logits.argmax(-1)
        _sync(device)
        decode_start = time.perf_counter()
        mask = batch.attention_mask
        positions = mask.sum(1) - 1
        tokens = []
        for _ in range(new_tokens):  # the last iteration's forward is the original's extra step
            tokens.append(token)
            positions = positions + 1
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            token = _decode_step(model, token, positions, mask, caches).argmax(-1)
        _sync(device)
    end = time.perf_counter()
    return torch.stack(tokens, 1), decode_start - start, end - decode_start
