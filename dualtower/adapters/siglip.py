"""SigLIP / SigLIP2 (fixed resolution, `model_type` "siglip") vision weights -> our VisionTransformer.

HF layout: `vision_model.embeddings.patch_embedding` (Conv2d), `...position_embedding.weight` (S, C),
`vision_model.encoder.layers.{i}.{layer_norm1, self_attn.{q,k,v,out}_proj, layer_norm2, mlp.fc1, mlp.fc2}`,
`vision_model.post_layernorm`; the MAP head (`vision_model.head.*`) and the text tower are not used.
A `SiglipVisionModel` saved by transformers 5 drops the `vision_model.` prefix; both spellings load.
Our attention fuses q, k, v into one `qkv_proj` (rows in q, k, v order).

Shape legend: S patches per tile, C width.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dualtower.adapters.common import CheckpointError, check_keys, find_config, read_safetensors, resolve_source
from dualtower.model.config import ConfigError, VisionConfig

logger = logging.getLogger(__name__)

VISION_PREFIX = "vision_model."
_VISION_ROOTS = ("embeddings.", "encoder.", "post_layernorm.")
_IGNORED_ROOTS = ("head.",)  # the MAP pooling head
# transformers' SiglipVisionConfig defaults: a serialized config may omit fields that keep them.
_HF_DEFAULTS = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "num_channels": 3,
    "image_size": 224,
    "patch_size": 16,
    "hidden_act": "gelu_pytorch_tanh",
    "layer_norm_eps": 1e-6,
}
_LAYER_MAP = {
    "layer_norm1": "ln1",
    "layer_norm2": "ln2",
    "self_attn.out_proj": "attn.out_proj",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}


def hf_vision_section(hf_config: dict[str, Any]) -> dict[str, Any]:
    """The vision part of an HF config.json: `vision_config` of a full SigLIP model, else the config itself."""
    model_type = hf_config.get("model_type", "siglip_vision_model")
    if model_type.startswith("siglip2"):
        raise ConfigError(
            "SigLIP2 NaFlex checkpoints (model_type 'siglip2') are not supported; use a fixed-resolution "
            "SigLIP2 checkpoint such as google/siglip2-base-patch16-512 (model_type 'siglip')"
        )
    if "vision_config" in hf_config:
        return hf_config["vision_config"] or {}
    if model_type != "siglip_vision_model":
        raise ConfigError(f"not a SigLIP vision config (model_type {model_type!r})")
    return hf_config


def vision_config_from_hf(
    hf_config: dict[str, Any], base: VisionConfig | None = None, hub_id: str | None = None
) -> VisionConfig:
    """Our VisionConfig from an HF SigLIP config.json (a new object; `base` supplies the rest, untouched)."""
    section = {**_HF_DEFAULTS, **hf_vision_section(hf_config)}
    if section["hidden_act"] != "gelu_pytorch_tanh":
        raise ConfigError(f"SigLIP hidden_act must be gelu_pytorch_tanh, got {section['hidden_act']!r}")
    if section["num_channels"] != 3:
        raise ConfigError(f"SigLIP num_channels must be 3, got {section['num_channels']}")
    cfg = dataclasses.replace(
        base or VisionConfig(),
        image_size=section["image_size"],
        patch_size=section["patch_size"],
        hidden_dim=section["hidden_size"],
        inter_dim=section["intermediate_size"],
        n_heads=section["num_attention_heads"],
        n_blocks=section["num_hidden_layers"],
        ln_eps=float(section["layer_norm_eps"]),
        **({"hub_id": hub_id} if hub_id else {}),
    )
    cfg.validate()
    return cfg


def _vision_tensors(hf_tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """HF vision-tower tensors with the `vision_model.` prefix removed; text tower and MAP head dropped."""
    prefixed = any(name.startswith(VISION_PREFIX) for name in hf_tensors)
    out = {}
    for name, tensor in hf_tensors.items():
        if prefixed:
            if not name.startswith(VISION_PREFIX):
                continue  # text tower, logit scale/bias
            name = name[len(VISION_PREFIX) :]
        if name.startswith(_IGNORED_ROOTS):
            continue
        out[name] = tensor
    if not out:
        raise CheckpointError("no SigLIP vision tensors found (expected keys under 'vision_model.' or 'encoder.')")
    return out


def siglip_state_dict(hf_tensors: dict[str, Tensor], cfg: VisionConfig) -> dict[str, Tensor]:
    """HF SigLIP tensors -> VisionTransformer state dict. Strict: every vision tensor is used exactly once."""
    src = _vision_tensors(hf_tensors)
    expected = _expected_hf_keys(cfg)
    check_keys(expected, src, "SigLIP vision checkpoint")
    out = {
        "patch_embedding.conv.weight": src["embeddings.patch_embedding.weight"],
        "patch_embedding.conv.bias": src["embeddings.patch_embedding.bias"],
        "patch_embedding.position_embedding": src["embeddings.position_embedding.weight"].unsqueeze(0),
        "layer_norm.weight": src["post_layernorm.weight"],
        "layer_norm.bias": src["post_layernorm.bias"],
    }
    for i in range(cfg.n_blocks):
        hf, ours = f"encoder.layers.{i}.", f"blocks.{i}."
        for hf_name, our_name in _LAYER_MAP.items():
            for kind in ("weight", "bias"):
                out[f"{ours}{our_name}.{kind}"] = src[f"{hf}{hf_name}.{kind}"]
        for kind in ("weight", "bias"):
            qkv = [src[f"{hf}self_attn.{p}_proj.{kind}"] for p in ("q", "k", "v")]
            out[f"{ours}attn.qkv_proj.{kind}"] = torch.cat(qkv, dim=0)
    return out


def _expected_hf_keys(cfg: VisionConfig) -> set[str]:
    keys = {
        "embeddings.patch_embedding.weight",
        "embeddings.patch_embedding.bias",
        "embeddings.position_embedding.weight",
        "post_layernorm.weight",
        "post_layernorm.bias",
    }
    layer_parts = [*_LAYER_MAP, "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]
    for i in range(cfg.n_blocks):
        keys.update(f"encoder.layers.{i}.{part}.{kind}" for part in layer_parts for kind in ("weight", "bias"))
    return keys


def load_siglip_vision(source: str | Path, base: VisionConfig | None = None) -> tuple[VisionConfig, dict[str, Tensor]]:
    """(VisionConfig, VisionTransformer state dict) from a local SigLIP directory or a Hub repo id."""
    path = resolve_source(source)
    if path.is_file():
        raise CheckpointError(f"a SigLIP source must be a directory with config.json, got the file {path}")
    hub_id = None if Path(str(source)).expanduser().exists() else str(source)
    cfg = vision_config_from_hf(find_config(path), base, hub_id=hub_id)
    state = siglip_state_dict(read_safetensors(path), cfg)
    logger.info("loaded SigLIP vision weights from %s (%d blocks, width %d)", source, cfg.n_blocks, cfg.hidden_dim)
    return cfg, state
