"""Pretrained backbones for a fresh DualTowerVLM: SigLIP vision weights and SmolLM2 weights (HF safetensors or
GGUF) in both text towers; the projector stays randomly initialised. Configs are derived from the backbones'
own config files and returned as new objects."""

from __future__ import annotations

import copy
import dataclasses
import logging
from pathlib import Path

import torch
from torch import Tensor

from dualtower.adapters.common import load_into
from dualtower.adapters.gguf_llama import load_gguf_llama
from dualtower.adapters.llama import load_llama
from dualtower.adapters.siglip import load_siglip_vision
from dualtower.model.config import LMConfig, ModelConfig
from dualtower.model.dual_tower import DualTowerVLM
from dualtower.model.language import LanguageModel

logger = logging.getLogger(__name__)


def load_lm_weights(
    source: str | Path, base: LMConfig | None = None, seed: int = 0
) -> tuple[LMConfig, dict[str, Tensor]]:
    """A SmolLM2/Llama source: a `.gguf` file, or an HF directory / Hub repo id with safetensors."""
    if str(source).endswith(".gguf"):
        return load_gguf_llama(source, base, seed)
    return load_llama(source, base, seed)


def load_language_model(source: str | Path, base: LMConfig | None = None, seed: int = 0) -> LanguageModel:
    """A standalone LanguageModel with pretrained weights (the extra token rows drawn with `seed`)."""
    cfg, state = load_lm_weights(source, base, seed)
    model = LanguageModel(cfg)
    load_into(model, state, f"LM weights from {source}")
    return model


def from_backbones(
    cfg: ModelConfig,
    vision_source: str | Path | None = None,
    lm_source: str | Path | None = None,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> DualTowerVLM:
    """Build `cfg` with its vision and LM dimensions replaced by the backbones' and their weights loaded.

    Without a source the tower keeps `cfg`'s dimensions and a random init. Both text towers get the same LM
    weights (the original initialises the right tower as a copy). `cfg` itself is never changed.
    """
    vision_state = lm_state = None
    vision_cfg, lm_cfg = cfg.vision, cfg.lm
    if vision_source is not None:
        vision_cfg, vision_state = load_siglip_vision(vision_source, cfg.vision)
    if lm_source is not None:
        lm_cfg, lm_state = load_lm_weights(lm_source, cfg.lm, seed)
    new_cfg = dataclasses.replace(copy.deepcopy(cfg), vision=vision_cfg, lm=lm_cfg)
    model = DualTowerVLM.from_config(new_cfg, device=device)
    if vision_state is not None:
        load_into(model.vision_encoder, vision_state, f"vision weights from {vision_source}")
    if lm_state is not None:
        load_into(model.left_decoder, lm_state, f"LM weights from {lm_source}")
        if model.right_decoder is not None:
            load_into(model.right_decoder, lm_state, f"LM weights from {lm_source}")
    return model
