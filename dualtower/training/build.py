"""Builders for the model and the held-out evaluation set, each from its own config section."""

from __future__ import annotations

import logging

import torch

from dualtower.model import DualTowerVLM, flavor

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def build_model(model_section, seed: int, device: torch.device) -> DualTowerVLM:
    """[model] -> a DualTowerVLM on `device`: from a checkpoint, from pretrained backbones, or a random init.

    Every rank seeds identically, so FSDP shards the same initial weights everywhere.
    """
    torch.manual_seed(seed)
    if model_section.checkpoint:
        # A nanoVLM checkpoint is a single tower: a vanilla-* flavor loads it as the whole model (otherwise it
        # becomes the left tower of a dual-tower model). Our checkpoints carry their architecture themselves.
        vanilla = flavor(model_section.flavor).architecture == "vanilla"
        model = DualTowerVLM.from_pretrained(model_section.checkpoint, architecture="vanilla" if vanilla else None)
    elif model_section.vision_backbone or model_section.lm_backbone:
        from dualtower.adapters import from_backbones

        model = from_backbones(
            flavor(model_section.flavor),
            model_section.vision_backbone or None,
            model_section.lm_backbone or None,
            seed=seed,
        )
    else:
        model = DualTowerVLM.from_flavor(model_section.flavor)
    if model_section.tokenizer_id:
        model.cfg.tokenizer_id = model_section.tokenizer_id
    if model_section.image_mean:
        model.cfg.image.mean = tuple(model_section.image_mean)
    if model_section.image_std:
        model.cfg.image.std = tuple(model_section.image_std)
    return model.to(device=device, dtype=DTYPES[model_section.dtype])


def build_heldout(data_cfg, eval_section) -> list[dict]:
    """Held-out synthetic questions for `eval/accuracy` (empty for other sources)."""
    if data_cfg.source != "synthetic" or eval_section.accuracy_samples == 0:
        return []
    from dualtower.data.synthetic import heldout_examples

    synthetic = data_cfg.synthetic
    return heldout_examples(
        eval_section.accuracy_samples,
        seed=eval_section.accuracy_seed,
        question_types=tuple(synthetic.question_types),
        difficulty=synthetic.difficulty,
    )
