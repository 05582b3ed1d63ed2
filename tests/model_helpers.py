"""Builders for small PackedBatches and a naive dense-mask implementation of the original algorithm."""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from dualtower.batch import IGNORE_INDEX, PackedBatch
from dualtower.model import DualTowerVLM


def random_batch(model: DualTowerVLM, docs: list[tuple[int, int, int]], generator: torch.Generator) -> PackedBatch:
    """docs: (tiles, extra prefix tokens, text tokens) per document; tiles = 0 means an empty prefix."""
    cfg = model.cfg
    per_tile = cfg.image_tokens_per_tile
    prefix_ids, text_ids, labels, prefix_pos, text_pos, image_index, tiles = [], [], [], [], [], [], []
    cu_prefix, cu_text, offset = [0], [0], 0
    for n_tiles, n_extra, n_text in docs:
        prefix: list[int] = []
        if n_tiles:
            prefix = torch.randint(3, 150, (n_extra,), generator=generator).tolist()
            for _ in range(n_tiles):
                prefix.append(cfg.global_image_token_id)
                image_index.extend(offset + len(prefix) + i for i in range(per_tile))
                prefix.extend([cfg.image_token_id] * per_tile)
            tiles.append(torch.rand(n_tiles, 3, cfg.tile_size, cfg.tile_size, generator=generator))
        text = torch.randint(3, 150, (n_text,), generator=generator)
        target = torch.randint(3, 150, (n_text,), generator=generator)
        target[torch.rand(n_text, generator=generator) < 0.3] = IGNORE_INDEX
        prefix_ids.extend(prefix)
        prefix_pos.append(torch.arange(len(prefix)))
        text_pos.append(torch.arange(n_text) + len(prefix))
        text_ids.append(text)
        labels.append(target)
        offset += len(prefix)
        cu_prefix.append(offset)
        cu_text.append(cu_text[-1] + n_text)
    labels_t = torch.cat(labels)
    size = cfg.tile_size
    return PackedBatch(
        prefix_ids=torch.tensor(prefix_ids, dtype=torch.long),
        text_ids=torch.cat(text_ids),
        labels=labels_t,
        cu_prefix=torch.tensor(cu_prefix, dtype=torch.int32),
        cu_text=torch.tensor(cu_text, dtype=torch.int32),
        prefix_positions=torch.cat(prefix_pos),
        text_positions=torch.cat(text_pos),
        pixel_values=torch.cat(tiles) if tiles else torch.zeros(0, 3, size, size),
        tiles_per_doc=torch.tensor([d[0] for d in docs]),
        image_token_index=torch.tensor(image_index, dtype=torch.long),
        doc_row=torch.zeros(len(docs), dtype=torch.long),
        max_prefix_len=max(b - a for a, b in itertools.pairwise(cu_prefix)),
        max_text_len=max(d[2] for d in docs),
        num_rows=1,
        row_capacity=0,
        num_supervised=int((labels_t != IGNORE_INDEX).sum()),
    )


# -- the oracle: the original algorithm, one document at a time, dense masks, explicit math -------------------


def _rms(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _rope(x: Tensor, positions: Tensor, theta: float) -> Tensor:  # x (H, L, D)
    dim = x.shape[-1]
    # fp32 frequencies as in transformers' Llama (and the original); the rotation itself in x's dtype.
    inv_freq = (1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)).double()
    angles = positions.double()[:, None] * inv_freq[None]
    cos, sin = torch.cat([angles, angles], -1).cos().to(x.dtype), torch.cat([angles, angles], -1).sin().to(x.dtype)
    rotated = torch.cat([-x[..., dim // 2 :], x[..., : dim // 2]], -1)
    return x * cos + rotated * sin


def _layer_norm(x: Tensor, norm, eps: float) -> Tensor:
    centered = x - x.mean(-1, keepdim=True)
    return centered * torch.rsqrt(centered.pow(2).mean(-1, keepdim=True) + eps) * norm.weight + norm.bias


def _gelu_tanh(x: Tensor) -> Tensor:
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x.pow(3))))


def _vit(vit, pixels: Tensor, cfg) -> Tensor:
    """SigLIP's vision tower written out: (N, 3, S, S) -> (N, patches, C). Patches row-major, no CLS."""
    p, width, heads = cfg.patch_size, cfg.hidden_dim, cfg.n_heads
    tiles = pixels.shape[0]
    patches = pixels.unfold(2, p, p).unfold(3, p, p)  # (N, 3, side, side, p, p)
    patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(tiles, -1, 3 * p * p)
    conv = vit.patch_embedding.conv
    x = patches @ conv.weight.reshape(width, -1).t() + conv.bias + vit.patch_embedding.position_embedding
    length, dim = x.shape[1], width // heads
    for block in vit.blocks:
        h = _layer_norm(x, block.ln1, cfg.ln_eps)
        qkv = h @ block.attn.qkv_proj.weight.t() + block.attn.qkv_proj.bias
        q, k, v = (t.reshape(tiles, length, heads, dim).transpose(1, 2) for t in qkv.split(width, -1))
        probs = (q @ k.transpose(-1, -2) / math.sqrt(dim)).softmax(-1)  # no mask: every patch sees every patch
        attn = (probs @ v).transpose(1, 2).reshape(tiles, length, width)
        x = x + attn @ block.attn.out_proj.weight.t() + block.attn.out_proj.bias
        h = _layer_norm(x, block.ln2, cfg.ln_eps)
        mlp = block.mlp
        x = x + _gelu_tanh(h @ mlp.fc1.weight.t() + mlp.fc1.bias) @ mlp.fc2.weight.t() + mlp.fc2.bias
    return _layer_norm(x, vit.layer_norm, cfg.ln_eps)


def _pixel_shuffle(x: Tensor, factor: int) -> Tensor:
    """reference_spec.md 1.3: token h_out * (side / f) + w_out, feature (dh * f + dw) * C + c, taken from the
    patch at row h_out * f + dh, column w_out * f + dw."""
    side = math.isqrt(x.shape[1])
    out_side = side // factor
    h_out = torch.arange(out_side)[:, None]
    w_out = torch.arange(out_side)[None, :]
    groups = []
    for dh in range(factor):
        for dw in range(factor):
            patch = ((h_out * factor + dh) * side + (w_out * factor + dw)).flatten()  # indexed by h_out, w_out
            groups.append(x[:, patch])
    return torch.cat(groups, -1)


def image_features(model: DualTowerVLM, pixels: Tensor) -> Tensor:
    """(N, 3, S, S) -> (N * tokens per tile, C_lm): ViT, pixel shuffle and projector, none of the model's code."""
    vision = _vit(model.vision_encoder, pixels, model.cfg.vision)
    shuffled = _pixel_shuffle(vision, model.cfg.image.pixel_shuffle_factor)
    return (shuffled @ model.projector.proj.weight.t()).flatten(0, 1)


def _layer(block, x: Tensor, positions: Tensor, mask: Tensor, cfg, kv_override=None):
    """One decoder layer with a dense boolean mask (L, L); returns output and this layer's (k, v)."""
    length, heads, kv_heads, dim = x.shape[0], cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    h = _rms(x, block.norm1.weight, cfg.rms_eps)
    q = _rope((h @ block.attn.q_proj.weight.t()).view(length, heads, dim).transpose(0, 1), positions, cfg.rope_theta)
    k = _rope((h @ block.attn.k_proj.weight.t()).view(length, kv_heads, dim).transpose(0, 1), positions, cfg.rope_theta)
    v = (h @ block.attn.v_proj.weight.t()).view(length, kv_heads, dim).transpose(0, 1)
    if kv_override is not None:  # the original overwrites the prefix K/V with the left tower's
        k_left, v_left = kv_override
        n = k_left.shape[1]
        k = torch.cat([k_left, k[:, n:]], 1)
        v = torch.cat([v_left, v[:, n:]], 1)
    group = heads // kv_heads
    scores = q @ k.repeat_interleave(group, 0).transpose(1, 2) / math.sqrt(dim)
    probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    attn = (probs @ v.repeat_interleave(group, 0)).transpose(0, 1).reshape(length, heads * dim)
    x = x + attn @ block.attn.out_proj.weight.t()
    h = _rms(x, block.norm2.weight, cfg.rms_eps)
    mlp = block.mlp
    x = x + (F.silu(h @ mlp.gate_proj.weight.t()) * (h @ mlp.up_proj.weight.t())) @ mlp.down_proj.weight.t()
    return x, (k, v)


def original_text_hidden(model: DualTowerVLM, batch: PackedBatch) -> Tensor:
    """Final-normed right-tower hidden states at text positions, computed as the original code does.

    Written without the model's forward code (only its parameters): the vision tower, projector and LM math
    are spelled out here, so a test comparing the two can catch a mistake in any of them."""
    cfg = model.cfg.lm
    left, right = model.left_decoder, model.text_decoder
    features = image_features(model, batch.pixel_values) if batch.pixel_values.numel() else None
    cu_p, cu_t = batch.cu_prefix.tolist(), batch.cu_text.tolist()
    outputs, feature_offset = [], 0
    for doc in range(len(cu_t) - 1):
        prefix = batch.prefix_ids[cu_p[doc] : cu_p[doc + 1]]
        text = batch.text_ids[cu_t[doc] : cu_t[doc + 1]]
        n_prefix, n_text = prefix.numel(), text.numel()
        ids = torch.cat([prefix, text])
        length = n_prefix + n_text
        positions = torch.arange(length)
        # Left tower: causal over the prefix, image features in place of the placeholders.
        x = left.token_embedding(prefix)
        is_image = prefix == model.cfg.image_token_id
        n_image = int(is_image.sum())
        if n_image:
            x = x.clone()
            x[is_image] = features[feature_offset : feature_offset + n_image]
            feature_offset += n_image
        causal = torch.ones(n_prefix, n_prefix, dtype=torch.bool).tril()
        left_kv = []
        for block in left.blocks:
            x, kv = _layer(block, x, positions[:n_prefix], causal, cfg)
            left_kv.append(kv)
        # Right tower over the whole sequence: prefix rows see the prefix, text rows see prefix + causal text.
        mask = torch.ones(length, length, dtype=torch.bool).tril()
        mask[:, :n_prefix] = True
        mask[:n_prefix, n_prefix:] = False
        y = right.token_embedding(ids)
        for block, kv in zip(right.blocks, left_kv, strict=True):
            y, _ = _layer(block, y, positions, mask, cfg, kv_override=kv if n_prefix else None)
        outputs.append(_rms(y, right.norm.weight, cfg.rms_eps)[n_prefix:])
    return torch.cat(outputs)
