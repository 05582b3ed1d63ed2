"""The original DualTowerVLM training step, reimplemented faithfully as the baseline for bench_train.py.

What the reference code does (reference_spec sections 2 and 5; reference_throughput.md), on the weights of a
`DualTowerVLM` (same parameter layout):
- padded (B, T) rows and one batch-wide split `last_img_idx`; fp32 weights under bf16 autocast;
- left tower: ViT over every tile, pixel shuffle materialized then the projector matmul, boolean-mask scatter
  of the image features, the FULL left LM over the prefix (including the last block's MLP and the final norm,
  whose outputs are discarded), SDPA with a dense additive mask;
- right tower over the FULL sequence (prefix rows too), RoPE cos/sin in fp32 (q and k promoted to fp32),
  K/V of the prefix overwritten by the left tower's, GQA by `repeat_interleave`, and a dense (T x T) float mask
  rebuilt in every layer;
- head over all B x T positions (full logits), cross-entropy mean over supervised tokens, backward,
  `clip_grad_norm_(1.0)`, `torch.optim.AdamW` (default implementation), `zero_grad`.
The left tower's padding mask is folded into one explicit causal mask (the original passes `is_causal=True`
together with an additive mask, which some SDPA backends reject); with the benchmark's unpadded rows it is the
same computation. Left out: the original loop's per-step `.item()` syncs (loss, token count, three gradient
norms). The baseline is therefore a little faster than the original, and the speed-up over it understated.

Shape legend: B rows, T tokens per row, Ti prefix tokens (last_img_idx + 1), H / Hkv heads, D head dim, V vocab.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from dualtower.batch import IGNORE_INDEX, PackedBatch
from dualtower.model import DualTowerVLM
from dualtower_kernels.projector import pixel_shuffle


@dataclass
class OriginalBatch:
    input_ids: Tensor  # (B, T)
    attention_mask: Tensor  # (B, T) 1 = real token
    targets: Tensor  # (B, T) pre-shifted labels, -100 = ignored
    images: Tensor  # (B * tiles, 3, S, S)
    last_img_idx: int


def _rms(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def _rope(position_ids: Tensor, inv_freq: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """fp32 cos/sin (B, T, D); the right tower multiplies them by the padding mask."""
    freqs = position_ids.float()[..., None] * inv_freq[None, None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    cos, sin = emb.cos(), emb.sin()
    if mask is not None:
        cos, sin = cos * mask[..., None], sin * mask[..., None]
    return cos, sin


def _block(block, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, eps: float, left_kv=None, past=None):
    """One Llama block as the original runs it; returns (x, (k, v)) with k, v (B, Hkv, T, D) before GQA expansion.

    `past` (generation): the (k, v) cache of the earlier positions, grown with torch.cat as the original does."""
    batch, length, width = x.shape
    attn = block.attn
    h = _rms(x, block.norm1.weight, eps)
    q = F.linear(h, attn.q_proj.weight).view(batch, length, attn.n_heads, attn.head_dim).transpose(1, 2)
    k = F.linear(h, attn.k_proj.weight).view(batch, length, attn.n_kv_heads, attn.head_dim).transpose(1, 2)
    v = F.linear(h, attn.v_proj.weight).view(batch, length, attn.n_kv_heads, attn.head_dim).transpose(1, 2)
    cos_, sin_ = cos[:, None], sin[:, None]
    q = q * cos_ + _rotate_half(q) * sin_  # fp32 from here on: cos/sin are fp32
    k = k * cos_ + _rotate_half(k) * sin_
    if left_kv is not None:
        k_left, v_left = left_kv
        n = k_left.shape[2]
        k = torch.cat([k_left, k[:, :, n:]], dim=2)
        v = torch.cat([v_left, v[:, :, n:]], dim=2)
    if past is not None:
        k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
    group = attn.n_heads // attn.n_kv_heads
    y = F.scaled_dot_product_attention(
        q, k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1), attn_mask=mask, is_causal=False
    )
    x = x + F.linear(y.transpose(1, 2).reshape(batch, length, width), attn.out_proj.weight)
    h = _rms(x, block.norm2.weight, eps)
    mlp = block.mlp
    x = x + F.linear(F.silu(F.linear(h, mlp.gate_proj.weight)) * F.linear(h, mlp.up_proj.weight), mlp.down_proj.weight)
    return x, (k, v)


def _padding_mask(attention_mask: Tensor, dtype: torch.dtype) -> Tensor:  # (B, 1, 1, T) additive
    return (1.0 - attention_mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


def _left_tower(model: DualTowerVLM, batch: OriginalBatch) -> list[tuple[Tensor, Tensor]]:
    lm, cfg = model.left_decoder, model.cfg
    n_img = batch.last_img_idx + 1
    ids, mask = batch.input_ids[:, :n_img], batch.attention_mask[:, :n_img]
    features = model.vision_encoder(batch.images)
    features = pixel_shuffle(features, cfg.image.pixel_shuffle_factor) @ model.projector.proj.weight.t()
    x = lm.token_embedding(ids)
    is_image = ids == cfg.image_token_id
    x = x.clone()
    x[is_image] = features.reshape(-1, features.shape[-1]).to(x.dtype)  # boolean-mask scatter (host sync)
    positions = torch.arange(n_img, device=ids.device).expand(ids.shape[0], -1)
    cos, sin = _rope(positions, lm.rotary.inv_freq, None)
    causal = torch.ones(n_img, n_img, dtype=torch.bool, device=ids.device).tril()
    # fp32 masks in real runs (the residual stream is fp32 under autocast); fp64 when the model is fp64.
    dense = torch.zeros(n_img, n_img, device=ids.device, dtype=x.dtype).masked_fill(~causal, -math.inf)
    attn_mask = dense[None, None] + _padding_mask(mask, x.dtype)
    kvs = []
    for block in lm.blocks:
        x, kv = _block(block, x, cos, sin, attn_mask, lm.cfg.rms_eps)
        kvs.append(kv)
    _rms(x, lm.norm.weight, lm.cfg.rms_eps)  # computed and discarded, as in the original
    return kvs


def _right_mask(length: int, n_img: int, attention_mask: Tensor, dtype: torch.dtype) -> Tensor:
    """The original's dense mask: prefix rows see the prefix, text rows see the prefix + causal text."""
    allowed = torch.ones(length, length, dtype=torch.bool, device=attention_mask.device).tril()
    allowed[:, :n_img] = True
    allowed[:n_img, n_img:] = False
    dense = torch.zeros(length, length, device=attention_mask.device, dtype=dtype).masked_fill(~allowed, -math.inf)
    padding = torch.zeros(attention_mask.shape, device=attention_mask.device, dtype=dtype)
    padding = padding.masked_fill(attention_mask == 0, -math.inf)
    return dense[None, None] + padding[:, None, None, :]


def original_loss(model: DualTowerVLM, batch: OriginalBatch) -> Tensor:
    """The original forward + loss (mean over supervised tokens)."""
    left_kv = _left_tower(model, batch)
    lm = model.text_decoder
    mask = batch.attention_mask
    positions = (mask.cumsum(dim=1) - 1).masked_fill(mask == 0, 0)
    cos, sin = _rope(positions, lm.rotary.inv_freq, mask)
    x = lm.token_embedding(batch.input_ids)
    length, n_img = batch.input_ids.shape[1], batch.last_img_idx + 1
    for block, kv in zip(lm.blocks, left_kv, strict=True):
        x, _ = _block(block, x, cos, sin, _right_mask(length, n_img, mask, x.dtype), lm.cfg.rms_eps, left_kv=kv)
    logits = F.linear(_rms(x, lm.norm.weight, lm.cfg.rms_eps), lm.head.weight)
    # The original upcasts its bf16 logits to fp32; fp64 parity tests keep fp64 (a .float() would round them).
    logits = logits if logits.dtype.itemsize >= 4 else logits.float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch.targets.reshape(-1), ignore_index=-100)


def original_train_step(
    model, optimizer, batch: OriginalBatch, autocast_dtype: torch.dtype | None, loss_fn=original_loss
) -> Tensor:
    """One optimizer step as the original's loop runs it (`loss_fn` may be a torch.compile'd original_loss)."""
    device_type = batch.input_ids.device.type
    context = torch.autocast(device_type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None)
    with context:
        loss = loss_fn(model, batch)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


# -- the benchmark shape in both layouts ----------------------------------------------------------------------


def synthetic_rows(model: DualTowerVLM, rows: int, tiles: int, text_len: int, seed: int = 0):
    """Rows of `tiles` tiles ([tag + image tokens] each) then `text_len` supervised text tokens: the same data as
    an OriginalBatch and as a PackedBatch (one document per row)."""
    cfg = model.cfg
    gen = torch.Generator().manual_seed(seed)
    per_tile = cfg.image_tokens_per_tile
    tile_ids = [cfg.global_image_token_id] + [cfg.image_token_id] * per_tile
    prefix = torch.tensor(tile_ids * tiles)
    n_img = prefix.numel()
    text = torch.randint(3, cfg.lm.base_vocab_size, (rows, text_len), generator=gen)
    targets = torch.randint(3, cfg.lm.base_vocab_size, (rows, text_len), generator=gen)
    images = torch.rand(rows * tiles, 3, cfg.tile_size, cfg.tile_size, generator=gen)
    input_ids = torch.cat([prefix.expand(rows, -1), text], dim=1)
    full_targets = torch.cat([torch.full((rows, n_img), IGNORE_INDEX), targets], dim=1)
    original = OriginalBatch(input_ids, torch.ones_like(input_ids), full_targets, images, n_img - 1)
    image_index = torch.cat([torch.nonzero(prefix == cfg.image_token_id).flatten() + r * n_img for r in range(rows)])
    packed = PackedBatch(
        prefix_ids=prefix.repeat(rows),
        text_ids=text.flatten(),
        labels=targets.flatten(),
        cu_prefix=torch.arange(rows + 1, dtype=torch.int32) * n_img,
        cu_text=torch.arange(rows + 1, dtype=torch.int32) * text_len,
        prefix_positions=torch.arange(n_img).repeat(rows),
        text_positions=(torch.arange(text_len) + n_img).repeat(rows),
        pixel_values=images,
        tiles_per_doc=torch.full((rows,), tiles),
        image_token_index=image_index,
        doc_row=torch.arange(rows),
        max_prefix_len=n_img,
        max_text_len=text_len,
        num_rows=rows,
        row_capacity=n_img + text_len,
        num_supervised=rows * text_len,
    )
    return original, packed
