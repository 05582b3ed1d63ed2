"""Checkpoint I/O: save, load (ours, the original DualTowerVLM's, nanoVLM's) and push to the Hugging Face Hub.

Our format is a directory with `config.json` (the ModelConfig as a dict plus a format marker),
`model.safetensors` (every tensor once: tied heads are stored as `token_embedding.weight`) and, optionally,
the tokenizer's files. Loading is strict: a missing or unexpected key is an error that lists them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from dualtower.adapters.common import (
    CONFIG_FILE,
    SAFETENSORS_FILE,
    CheckpointError,
    canonical_state_dict,
    load_into,
    read_json,
    read_safetensors,
    resolve_source,
    strip_compile_prefix,
)
from dualtower.adapters.original import (
    config_from_original,
    detect_layout,
    is_original_config,
    renaming,
    right_decoder_from_left,
    state_dict_from_original,
)
from dualtower.model.config import ModelConfig
from dualtower.model.dual_tower import DualTowerVLM

logger = logging.getLogger(__name__)

FORMAT_MARKER = "dualtower"
FORMAT_VERSION = 1
README_FILE = "README.md"

__all__ = ["CheckpointError", "load_pretrained", "push_to_hub", "save_pretrained"]


# -- save ---------------------------------------------------------------------------------------------------


def config_to_json(cfg: ModelConfig) -> str:
    return json.dumps({"format": FORMAT_MARKER, "format_version": FORMAT_VERSION, **cfg.to_dict()}, indent=2)


def save_pretrained(model: DualTowerVLM, directory: str | Path, tokenizer: Any = None) -> Path:
    """Write config.json + model.safetensors (+ the tokenizer's files); the same model gives the same bytes."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_FILE).write_text(config_to_json(model.cfg) + "\n")
    save_file(canonical_state_dict(model), directory / SAFETENSORS_FILE, metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save_pretrained(str(directory))
    logger.info("saved %s checkpoint to %s", model.cfg.architecture, directory)
    return directory


# -- load ---------------------------------------------------------------------------------------------------


def _locate(source: str | Path, config_path: str | Path | None) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """(config.json dict, tensors) from a directory, a weights file (+ config) or a Hub repo id."""
    path = resolve_source(source)
    if path.is_file():
        config_file = Path(config_path) if config_path is not None else path.parent / CONFIG_FILE
    else:
        config_file = Path(config_path) if config_path is not None else path / CONFIG_FILE
    return read_json(config_file), read_safetensors(path)


def _checkpoint_dtype(tensors: dict[str, Tensor]) -> torch.dtype:
    """The dtype most of the floating-point elements are stored in (what the model is loaded as by default)."""
    counts: dict[torch.dtype, int] = {}
    for tensor in tensors.values():
        if tensor.is_floating_point():
            counts[tensor.dtype] = counts.get(tensor.dtype, 0) + tensor.numel()
    return max(counts, key=counts.__getitem__) if counts else torch.float32


def _our_config(data: dict[str, Any], architecture: str | None) -> ModelConfig:
    version = data.get("format_version", FORMAT_VERSION)
    if version > FORMAT_VERSION:
        raise CheckpointError(f"checkpoint format_version {version} is newer than this library ({FORMAT_VERSION})")
    fields = {key: value for key, value in data.items() if key not in ("format", "format_version")}
    cfg = ModelConfig.from_dict(fields)
    if architecture is not None and architecture != cfg.architecture:
        raise CheckpointError(f"the checkpoint is a {cfg.architecture} model, not {architecture}")
    return cfg


def _from_original(
    data: dict[str, Any],
    tensors: dict[str, Tensor],
    architecture: str | None,
    right_decoder_source: str | Path | None,
) -> tuple[ModelConfig, dict[str, Tensor]]:
    """The original DualTowerVLM format, or a nanoVLM checkpoint placed in the left tower."""
    layout = detect_layout(tensors)
    if layout == "dual_tower" and architecture not in (None, "dual_tower"):
        raise CheckpointError(f"an original DualTowerVLM checkpoint cannot be loaded as {architecture}")
    cfg = config_from_original(data, architecture or "dual_tower")
    state = state_dict_from_original(tensors, cfg, layout)
    if layout == "nanovlm" and cfg.architecture == "dual_tower":
        if right_decoder_source is None:
            logger.info("nanoVLM checkpoint: the right tower starts as a copy of the left decoder")
            state.update(right_decoder_from_left(state))
        else:
            state.update(_right_decoder_weights(right_decoder_source, cfg))
    elif right_decoder_source is not None:
        raise CheckpointError("right_decoder_source only applies to nanoVLM checkpoints loaded as dual_tower")
    return cfg, state


def _right_decoder_weights(source: str | Path, cfg: ModelConfig) -> dict[str, Tensor]:
    from dualtower.adapters.backbones import load_lm_weights

    lm_cfg, lm_state = load_lm_weights(source, cfg.lm)
    if dataclasses.replace(lm_cfg, hub_id=cfg.lm.hub_id) != cfg.lm:
        raise CheckpointError(f"the right decoder from {source} has a different shape than the left: {lm_cfg}")
    return {f"right_decoder.{name}": tensor for name, tensor in lm_state.items()}


def parse_dtype(name: str) -> torch.dtype:
    """"bfloat16" / "bf16" / "float16" / "fp16" / "half" / "float32" / "fp32" / "float" -> the torch dtype."""
    aliases = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}
    resolved = getattr(torch, aliases.get(name, name), None)
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ValueError(f"unknown floating-point dtype {name!r}")
    return resolved


def load_pretrained(
    source: str | Path,
    *,
    config_path: str | Path | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | str | None = None,
    architecture: str | None = None,
    right_decoder_source: str | Path | None = None,
) -> DualTowerVLM:
    """Load a DualTowerVLM from our format, the original DualTowerVLM format or a nanoVLM checkpoint.

    source: a checkpoint directory, a weights file or shard index (config from `config_path` or the file's
        directory), or a Hub repo id. The format is detected from config.json and the weight names.
    dtype: None keeps the checkpoint's dtype; a torch dtype or its name ("bfloat16", "bf16") casts.
    architecture: for nanoVLM checkpoints, "dual_tower" (default: the checkpoint is the left tower, the right
        decoder a copy of its LM, or loaded from `right_decoder_source`, an LM source as accepted by
        adapters.load_lm_weights) or "vanilla" (the checkpoint is the whole model).
    """
    data, tensors = _locate(source, config_path)
    tensors = strip_compile_prefix(tensors)
    what = f"checkpoint {source}"
    if data.get("format") == FORMAT_MARKER:
        if right_decoder_source is not None:
            raise CheckpointError("right_decoder_source only applies to nanoVLM checkpoints")
        cfg, state = _our_config(data, architecture), tensors
    elif is_original_config(data):
        cfg, state = _from_original(data, tensors, architecture, right_decoder_source)
        # Key errors name our keys: say how they map back to the names in the file.
        what += f" (keys named as ours: {renaming(detect_layout(tensors))})"
    else:
        raise CheckpointError(f"unrecognised config.json in {source}: neither a dualtower nor a nanoVLM config")
    with torch.device(device):
        model = DualTowerVLM(cfg)
    if isinstance(dtype, str):
        dtype = parse_dtype(dtype)
    model.to(dtype or _checkpoint_dtype(state))
    load_into(model, state, what)
    logger.info("loaded %s model from %s", cfg.architecture, source)
    return model.eval()


# -- Hub ----------------------------------------------------------------------------------------------------


def model_card(model: DualTowerVLM, repo_id: str) -> str:
    cfg = model.cfg
    return f"""---
library_name: dualtower
license: mit
pipeline_tag: image-text-to-text
tags:
- vision-language
- multimodal
- dual-tower
---

# {repo_id.split("/")[-1]}

A DualTowerVLM ({cfg.architecture}) with {model.num_parameters():,} parameters: a SigLIP-style vision
encoder ({cfg.vision.hub_id}) and SmolLM2-style text towers ({cfg.lm.hub_id}); tokenizer {cfg.tokenizer_id}.

```python
from dualtower.model import DualTowerVLM

model = DualTowerVLM.from_pretrained("{repo_id}")
```
"""


def push_to_hub(
    model: DualTowerVLM,
    repo_id: str,
    private: bool = False,
    tokenizer: Any = None,
    commit_message: str = "Upload DualTowerVLM using push_to_hub",
    token: str | None = None,
) -> Any:
    """Create the repo if needed and upload config, weights, tokenizer files and a model card in one commit."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    with tempfile.TemporaryDirectory() as folder:
        save_pretrained(model, folder, tokenizer=tokenizer)
        (Path(folder) / README_FILE).write_text(model_card(model, repo_id))
        try:
            api.create_repo(repo_id, private=private, exist_ok=True)
            return api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message)
        except Exception as error:  # network, auth and Hub errors come from several libraries
            raise CheckpointError(f"pushing to the Hub repo {repo_id} failed: {error}") from error
