"""SmolLM2 / Llama weights (HF safetensors, single file or sharded) -> our LanguageModel.

HF layout: `model.embed_tokens`, `model.layers.{i}.{input_layernorm, self_attn.{q,k,v,o}_proj,
post_attention_layernorm, mlp.{gate,up,down}_proj}`, `model.norm`, and `lm_head` (absent or a copy when tied).
Our LM ties its head to the embedding, which has `extra_token_amount` (66) more rows than the base vocabulary:
the base rows are copied, the new rows drawn from normal(0, 0.02) with a seeded generator.

Shape legend: V base vocabulary, E extra tokens, C width.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dualtower.adapters.common import CheckpointError, check_keys, find_config, read_safetensors, resolve_source
from dualtower.model.config import ConfigError, LMConfig

logger = logging.getLogger(__name__)

NEW_ROW_STD = 0.02
_LAYER_MAP = {
    "input_layernorm": "norm1",
    "self_attn.q_proj": "attn.q_proj",
    "self_attn.k_proj": "attn.k_proj",
    "self_attn.v_proj": "attn.v_proj",
    "self_attn.o_proj": "attn.out_proj",
    "post_attention_layernorm": "norm2",
    "mlp.gate_proj": "mlp.gate_proj",
    "mlp.up_proj": "mlp.up_proj",
    "mlp.down_proj": "mlp.down_proj",
}


def _rope_theta(hf_config: dict[str, Any]) -> float:
    """transformers 5 nests RoPE settings in `rope_parameters`; older configs keep `rope_theta` at the top."""
    rope = hf_config.get("rope_parameters") or {}
    scaling = hf_config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
    if rope_type != "default":
        raise ConfigError(f"only default RoPE is supported, the checkpoint uses {rope_type!r}")
    theta = rope.get("rope_theta", hf_config.get("rope_theta"))
    if theta is None or float(theta) <= 0:
        raise ConfigError(f"the LM config needs a positive rope_theta, got {theta!r}")
    return float(theta)


def lm_config_from_hf(hf_config: dict[str, Any], base: LMConfig | None = None, hub_id: str | None = None) -> LMConfig:
    """Our LMConfig from an HF Llama config.json (a new object; `base` supplies the rest, untouched)."""
    if hf_config.get("model_type", "llama") != "llama":
        raise ConfigError(f"expected a Llama config, got model_type {hf_config.get('model_type')!r}")
    if hf_config.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"the LM must use SiLU, the checkpoint uses {hf_config['hidden_act']!r}")
    if hf_config.get("attention_bias") or hf_config.get("mlp_bias"):
        raise ConfigError("LM checkpoints with attention or MLP biases are not supported")
    if not hf_config.get("tie_word_embeddings", True):
        raise ConfigError(
            "our LM ties its head to the embedding; untied checkpoints (tie_word_embeddings=false) "
            "cannot be represented"
        )
    hidden, heads = hf_config["hidden_size"], hf_config["num_attention_heads"]
    head_dim = hf_config.get("head_dim")
    if head_dim is not None and head_dim != hidden // heads:
        raise ConfigError(f"head_dim {head_dim} != hidden_size / num_attention_heads = {hidden // heads}")
    cfg = dataclasses.replace(
        base or LMConfig(),
        hidden_dim=hidden,
        inter_dim=hf_config["intermediate_size"],
        n_heads=heads,
        n_kv_heads=hf_config.get("num_key_value_heads") or heads,
        n_blocks=hf_config["num_hidden_layers"],
        rms_eps=float(hf_config["rms_norm_eps"]),
        rope_theta=_rope_theta(hf_config),
        max_position_embeddings=hf_config["max_position_embeddings"],
        base_vocab_size=hf_config["vocab_size"],
        **({"hub_id": hub_id} if hub_id else {}),
    )
    cfg.validate()
    return cfg


def extend_embedding(base_rows: Tensor, cfg: LMConfig, seed: int = 0) -> Tensor:
    """(V, C) -> (V + E, C): base rows copied, the E new rows normal(0, 0.02) from a generator seeded `seed`."""
    if base_rows.shape != (cfg.base_vocab_size, cfg.hidden_dim):
        raise CheckpointError(
            f"embedding has shape {tuple(base_rows.shape)}, expected ({cfg.base_vocab_size}, {cfg.hidden_dim})"
        )
    generator = torch.Generator().manual_seed(seed)
    new_rows = torch.randn(cfg.extra_token_amount, cfg.hidden_dim, generator=generator) * NEW_ROW_STD
    return torch.cat([base_rows, new_rows.to(base_rows.dtype)], dim=0)


def _expected_hf_keys(cfg: LMConfig) -> set[str]:
    keys = {"model.embed_tokens.weight", "model.norm.weight"}
    for i in range(cfg.n_blocks):
        keys.update(f"model.layers.{i}.{part}.weight" for part in _LAYER_MAP)
    return keys


def llama_state_dict(hf_tensors: dict[str, Tensor], cfg: LMConfig, seed: int = 0) -> dict[str, Tensor]:
    """HF Llama tensors -> LanguageModel state dict (head tied: stored once, as token_embedding)."""
    src = dict(hf_tensors)
    head = src.pop("lm_head.weight", None)
    if head is not None and not torch.equal(head, src.get("model.embed_tokens.weight", head)):
        raise CheckpointError("lm_head.weight differs from model.embed_tokens.weight although the config ties them")
    check_keys(_expected_hf_keys(cfg), src, "Llama checkpoint")
    out = {
        "token_embedding.weight": extend_embedding(src["model.embed_tokens.weight"], cfg, seed),
        "norm.weight": src["model.norm.weight"],
    }
    for i in range(cfg.n_blocks):
        for hf_name, our_name in _LAYER_MAP.items():
            out[f"blocks.{i}.{our_name}.weight"] = src[f"model.layers.{i}.{hf_name}.weight"]
    return out


def load_llama(source: str | Path, base: LMConfig | None = None, seed: int = 0) -> tuple[LMConfig, dict[str, Tensor]]:
    """(LMConfig, LanguageModel state dict) from a local SmolLM2/Llama directory or a Hub repo id."""
    path = resolve_source(source)
    if path.is_file():
        raise CheckpointError(f"a Llama source must be a directory with config.json, got the file {path}")
    hub_id = None if Path(str(source)).expanduser().exists() else str(source)
    cfg = lm_config_from_hf(find_config(path), base, hub_id=hub_id)
    state = llama_state_dict(read_safetensors(path), cfg, seed)
    logger.info("loaded Llama weights from %s (%d blocks, width %d)", source, cfg.n_blocks, cfg.hidden_dim)
    return cfg, state
