"""Checkpoints of the original research code: DualTowerVLM (`left_tower.*`, `right_tower.*`) and nanoVLM
(`vision_encoder.*`, `decoder.*`, `MP.*`), both with a flat `VLMConfig` config.json (vit_*, lm_*, mp_*, ...).

Inside each tower our parameter names equal the original's, so the key map only renames tower prefixes.
The original's tied heads may be stored under `head.weight` or `token_embedding.weight` (safetensors keeps the
lexicographically smallest name), and its persistent RoPE `inv_freq` buffers are checked, then dropped.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch
from torch import Tensor

from dualtower.adapters.common import CheckpointError
from dualtower.model.config import ConfigError, ImageConfig, LMConfig, ModelConfig, VisionConfig, extra_tokens
from dualtower.model.language import inverse_frequencies

logger = logging.getLogger(__name__)

DUAL_TOWER_PREFIXES = {
    "left_tower.vision_encoder.": "vision_encoder.",
    "left_tower.MP.": "projector.",
    "left_tower.decoder.": "left_decoder.",
    "right_tower.": "right_decoder.",
}
NANOVLM_PREFIXES = {"vision_encoder.": "vision_encoder.", "MP.": "projector.", "decoder.": "left_decoder."}
INV_FREQ = "rotary_embd.inv_freq"

# Fields of the original VLMConfig without a vit_/lm_/mp_/vlm_ prefix; any other field is logged and ignored.
# (Prefixed fields that shape nothing here: dropouts, lm_max_length, lm_use_tokens, lm_chat_template, ...)
_OTHER_FIELDS = {"extra_token_amount", "max_img_size", "resize_to_max_side_len", "hf_repo_name"}
_REQUIRED_FIELDS = (
    "vit_hidden_dim", "vit_inter_dim", "vit_patch_size", "vit_img_size", "vit_n_heads", "vit_n_blocks",
    "lm_hidden_dim", "lm_inter_dim", "lm_n_heads", "lm_n_kv_heads", "lm_n_blocks",
    "lm_base_vocab_size", "extra_token_amount", "mp_pixel_shuffle_factor",
)  # fmt: skip


def is_original_config(data: dict[str, Any]) -> bool:
    return "vit_hidden_dim" in data and "lm_hidden_dim" in data


def _check_compatible(data: dict[str, Any]) -> None:
    """Reject settings the original supports and we do not, instead of loading a silently different model."""
    missing = [name for name in _REQUIRED_FIELDS if name not in data]
    if missing:
        raise ConfigError(f"original config.json lacks the field(s): {', '.join(missing)}")
    if data.get("vit_cls_flag", False):
        raise ConfigError("vit_cls_flag=True (a CLS token) is not supported")
    if float(data.get("lm_attn_scaling", 1.0)) != 1.0:
        raise ConfigError(f"lm_attn_scaling must be 1.0, got {data['lm_attn_scaling']}")
    if not data.get("lm_tie_weights", True):
        raise ConfigError("lm_tie_weights=False is not supported: our LM ties its head to the embedding")
    if data.get("momh_enabled", False):
        raise ConfigError("Mixture-of-Modality-Heads checkpoints (momh_enabled=True) are not supported")
    vocab = data.get("lm_vocab_size")
    if vocab is not None and vocab != data["lm_base_vocab_size"] + data["extra_token_amount"]:
        raise ConfigError(f"lm_vocab_size {vocab} != lm_base_vocab_size + extra_token_amount")
    tokens = data.get("vlm_extra_tokens")
    if tokens is not None and list(tokens.values()) != extra_tokens():
        raise ConfigError("vlm_extra_tokens differ from the 66 image/tile tokens (or their order) this model uses")


def config_from_original(data: dict[str, Any], architecture: str = "dual_tower") -> ModelConfig:
    """Our ModelConfig from an original (DualTowerVLM or nanoVLM) config.json dict; the dict is not changed."""
    _check_compatible(data)
    prefixes = ("vit_", "lm_", "mp_", "vlm_", "momh_")
    unknown = sorted(name for name in data if not name.startswith(prefixes) and name not in _OTHER_FIELDS)
    if unknown:
        logger.info("ignoring config fields the model does not use: %s", ", ".join(unknown))
    base = ModelConfig()
    vision = VisionConfig(
        image_size=data["vit_img_size"],
        patch_size=data["vit_patch_size"],
        hidden_dim=data["vit_hidden_dim"],
        inter_dim=data["vit_inter_dim"],
        n_heads=data["vit_n_heads"],
        n_blocks=data["vit_n_blocks"],
        ln_eps=float(data.get("vit_ln_eps", base.vision.ln_eps)),
        hub_id=data.get("vit_model_type", base.vision.hub_id),
    )
    lm = LMConfig(
        hidden_dim=data["lm_hidden_dim"],
        inter_dim=data["lm_inter_dim"],
        n_heads=data["lm_n_heads"],
        n_kv_heads=data["lm_n_kv_heads"],
        n_blocks=data["lm_n_blocks"],
        rms_eps=float(data.get("lm_rms_eps", base.lm.rms_eps)),
        rope_theta=float(data.get("lm_re_base", base.lm.rope_theta)),
        max_position_embeddings=data.get("lm_max_position_embeddings", base.lm.max_position_embeddings),
        base_vocab_size=data["lm_base_vocab_size"],
        extra_token_amount=data["extra_token_amount"],
        hub_id=data.get("lm_model_type", base.lm.hub_id),
    )
    image = dataclasses.replace(
        ImageConfig(),
        pixel_shuffle_factor=data["mp_pixel_shuffle_factor"],
        max_img_size=data.get("max_img_size", data["vit_img_size"]),
        resize_to_max_side_len=bool(data.get("resize_to_max_side_len", False)),
    )
    cfg = ModelConfig(
        architecture=architecture,
        vision=vision,
        lm=lm,
        image=image,
        tokenizer_id=data.get("lm_tokenizer", data.get("lm_model_type", base.tokenizer_id)),
    ).validate()
    tokens_per_tile = data.get("mp_image_token_length")
    if tokens_per_tile is not None and tokens_per_tile != cfg.image_tokens_per_tile:
        raise ConfigError(f"mp_image_token_length {tokens_per_tile} != {cfg.image_tokens_per_tile} tokens per tile")
    return cfg


def detect_layout(tensors: dict[str, Tensor]) -> str:
    """'dual_tower' (original DualTowerVLM keys) or 'nanovlm' (a single-tower nanoVLM)."""
    if any(name.startswith(("left_tower.", "right_tower.")) for name in tensors):
        return "dual_tower"
    if any(name.startswith(tuple(NANOVLM_PREFIXES)) for name in tensors):
        return "nanovlm"
    raise CheckpointError("weights have neither DualTowerVLM (left_tower.*) nor nanoVLM (decoder.*, MP.*) keys")


def _check_inv_freq(name: str, tensor: Tensor, lm: LMConfig) -> None:
    expected = inverse_frequencies(lm.head_dim, lm.rope_theta)
    # A checkpoint saved after model.to(bfloat16 / float16) stores the buffer rounded: allow one unit of its
    # precision, and one subnormal step (fp16 rounds frequencies below 6e-5 to a fixed 6e-8 grid).
    rtol, atol = 1e-5, 1e-8
    if tensor.is_floating_point():
        info = torch.finfo(tensor.dtype)
        rtol, atol = max(rtol, info.eps), max(atol, info.smallest_normal * info.eps)
    if tensor.shape != expected.shape or not torch.allclose(tensor.float(), expected, rtol=rtol, atol=atol):
        raise CheckpointError(f"{name} does not match rope_theta {lm.rope_theta} and head_dim {lm.head_dim}")


def renaming(layout: str) -> str:
    """How `state_dict_from_original` renames a layout's prefixes, for error messages."""
    prefixes = DUAL_TOWER_PREFIXES if layout == "dual_tower" else NANOVLM_PREFIXES
    return ", ".join(f"{old}* -> {new}*" for old, new in prefixes.items() if old != new)


def state_dict_from_original(tensors: dict[str, Tensor], cfg: ModelConfig, layout: str) -> dict[str, Tensor]:
    """Rename tower prefixes onto ours; inv_freq buffers are verified and dropped. Unknown keys pass through
    unchanged so that the strict load names them."""
    prefixes = DUAL_TOWER_PREFIXES if layout == "dual_tower" else NANOVLM_PREFIXES
    out = {}
    for name, tensor in tensors.items():
        if name.endswith(INV_FREQ):
            _check_inv_freq(name, tensor, cfg.lm)
            continue
        new_name = name
        for old, new in prefixes.items():
            if name.startswith(old):
                new_name = new + name[len(old) :]
                break
        out[new_name] = tensor
    return out


def right_decoder_from_left(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A right tower initialised from the left decoder's weights (what nanoVLM checkpoints lack)."""
    left = "left_decoder."
    return {"right_decoder." + name[len(left) :]: tensor for name, tensor in state.items() if name.startswith(left)}
