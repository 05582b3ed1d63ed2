"""Weight adapters: key maps from other checkpoint formats onto DualTowerVLM.

- `siglip`: SigLIP / SigLIP2 (fixed resolution) vision safetensors -> VisionTransformer
- `llama`: SmolLM2 / Llama safetensors (single or sharded) -> LanguageModel, vocabulary extended by 66 rows
- `gguf_llama`: SmolLM2 / Llama GGUF files, dequantized (needs the optional `gguf` package)
- `original`: the original DualTowerVLM and nanoVLM checkpoints (config.json and keys)
- `backbones`: a fresh DualTowerVLM with pretrained vision and LM backbones

Every config function returns a new config object; the caller's config is never changed.
"""

from dualtower.adapters.backbones import from_backbones, load_language_model, load_lm_weights
from dualtower.adapters.common import CheckpointError
from dualtower.adapters.gguf_llama import lm_config_from_gguf, load_gguf_llama
from dualtower.adapters.llama import extend_embedding, llama_state_dict, lm_config_from_hf, load_llama
from dualtower.adapters.original import config_from_original, state_dict_from_original
from dualtower.adapters.siglip import load_siglip_vision, siglip_state_dict, vision_config_from_hf

__all__ = [
    "CheckpointError",
    "config_from_original",
    "extend_embedding",
    "from_backbones",
    "llama_state_dict",
    "lm_config_from_gguf",
    "lm_config_from_hf",
    "load_gguf_llama",
    "load_language_model",
    "load_llama",
    "load_lm_weights",
    "load_siglip_vision",
    "siglip_state_dict",
    "state_dict_from_original",
    "vision_config_from_hf",
]
