"""SmolLM2 / Llama from a GGUF file (llama.cpp format), dequantized to fp32 with the `gguf` package.

GGUF names: `token_embd`, `blk.{i}.{attn_norm, attn_q, attn_k, attn_v, attn_output, ffn_norm, ffn_gate,
ffn_up, ffn_down}`, `output_norm`, and `output` (absent, or a copy of `token_embd`, when the head is tied).
Hyperparameters live in `llama.*` metadata fields; RoPE scaling is refused, as in the safetensors adapter.

llama.cpp's converter reorders the rows of attn_q / attn_k inside every head for its interleaved-pair RoPE:
a head's rows [x_0 .. x_{D/2-1} | y_0 .. y_{D/2-1}] (HF rotate-half halves) are stored as pairs
[x_0, y_0, x_1, y_1, ...]. Undoing it: view the rows as (heads, D/2, 2) and swap the last two axes.

Shape legend: H heads (kv heads for attn_k), D head dim, C width.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from dualtower.adapters.common import CheckpointError, check_keys
from dualtower.adapters.gguf_file import TensorInfo, read_gguf
from dualtower.adapters.llama import extend_embedding
from dualtower.model.config import ConfigError, LMConfig

logger = logging.getLogger(__name__)

_LAYER_MAP = {
    "attn_norm": "norm1",
    "attn_q": "attn.q_proj",
    "attn_k": "attn.k_proj",
    "attn_v": "attn.v_proj",
    "attn_output": "attn.out_proj",
    "ffn_norm": "norm2",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def _require_gguf() -> Any:
    try:
        import gguf
    except ImportError as error:  # optional extra
        raise ImportError("reading GGUF files needs the `gguf` package: pip install 'dualtower[gguf]'") from error
    return gguf


def unpermute_rotary_rows(weight: Tensor, n_heads: int) -> Tensor:
    """Undo llama.cpp's per-head pair interleaving of q/k projection rows: (H*D, C) -> (H*D, C)."""
    rows, cols = weight.shape
    half = rows // n_heads // 2
    return weight.reshape(n_heads, half, 2, cols).transpose(1, 2).reshape(rows, cols)


def permute_rotary_rows(weight: Tensor, n_heads: int) -> Tensor:
    """llama.cpp's layout from the HF one (the inverse of unpermute_rotary_rows); used to write GGUF files."""
    rows, cols = weight.shape
    half = rows // n_heads // 2
    return weight.reshape(n_heads, 2, half, cols).transpose(1, 2).reshape(rows, cols)


def _field(metadata: dict[str, Any], name: str, default: Any = None) -> Any:
    value = metadata.get(name, default)
    if value is None:
        raise CheckpointError(f"GGUF file lacks the metadata field {name}")
    return value


def _float32_value(value: float) -> float:
    """GGUF stores floats as float32 (1e-5 reads as 9.9999997e-06); keep the value it was written from."""
    return float(f"{value:.7g}")


def _check_default_rope(metadata: dict[str, Any]) -> None:
    """Refuse RoPE scaling (linear, yarn, ...): loading it as plain RoPE would give a different model."""
    scaling = metadata.get("llama.rope.scaling.type", "none")
    factor = float(metadata.get("llama.rope.scaling.factor", 1.0))
    if scaling != "none" or factor not in (0.0, 1.0):
        raise ConfigError(f"only default RoPE is supported, the GGUF file uses RoPE scaling {scaling!r} x{factor}")


def lm_config_from_gguf(metadata: dict[str, Any], base: LMConfig | None = None) -> LMConfig:
    """Our LMConfig from a GGUF file's `llama.*` metadata (a new object; `base` supplies the rest)."""
    arch = _field(metadata, "general.architecture")
    if arch != "llama":
        raise ConfigError(f"expected a llama GGUF file, got architecture {arch!r}")
    hidden = int(_field(metadata, "llama.embedding_length"))
    heads = int(_field(metadata, "llama.attention.head_count"))
    rope_dim = int(_field(metadata, "llama.rope.dimension_count", hidden // heads))
    if rope_dim != hidden // heads:
        raise ConfigError(f"partial rotary (rope dim {rope_dim}, head dim {hidden // heads}) is not supported")
    _check_default_rope(metadata)
    vocab = _field(metadata, "llama.vocab_size", 0) or _field(metadata, "tokenizer.ggml.tokens").length
    cfg = dataclasses.replace(
        base or LMConfig(),
        hidden_dim=hidden,
        inter_dim=int(_field(metadata, "llama.feed_forward_length")),
        n_heads=heads,
        n_kv_heads=int(_field(metadata, "llama.attention.head_count_kv", heads)),
        n_blocks=int(_field(metadata, "llama.block_count")),
        rms_eps=_float32_value(_field(metadata, "llama.attention.layer_norm_rms_epsilon")),
        rope_theta=_float32_value(_field(metadata, "llama.rope.freq_base")),
        max_position_embeddings=int(_field(metadata, "llama.context_length")),
        base_vocab_size=int(vocab),
    )
    cfg.validate()
    return cfg


def _dequantized(tensors: list[TensorInfo], gguf: Any) -> dict[str, Tensor]:
    """name -> fp32 tensor in the usual (out, in) layout."""
    out = {}
    for info in tensors:
        values = gguf.dequantize(info.data, gguf.GGMLQuantizationType(info.ggml_type)).reshape(info.shape)
        # Unquantized tensors come back as read-only views of the memory-mapped file: copy those only.
        out[info.name] = torch.from_numpy(np.require(values, dtype=np.float32, requirements=["C", "W"]))
    return out


def gguf_state_dict(tensors: dict[str, Tensor], cfg: LMConfig, seed: int = 0) -> dict[str, Tensor]:
    """Dequantized GGUF tensors -> LanguageModel state dict (head tied, stored as token_embedding)."""
    src = dict(tensors)
    head = src.pop("output.weight", None)
    # A converter copies a tied lm_head that the HF files store; only a head with other values is untied.
    if head is not None and not torch.equal(head, src.get("token_embd.weight", head)):
        raise CheckpointError("the GGUF file has a separate output.weight (untied head); our LM ties it")
    expected = {"token_embd.weight", "output_norm.weight"}
    expected.update(f"blk.{i}.{part}.weight" for i in range(cfg.n_blocks) for part in _LAYER_MAP)
    if "rope_freqs.weight" in src:  # llama.cpp's per-frequency RoPE scaling (Llama 3.1 style)
        raise CheckpointError("the GGUF file scales its RoPE frequencies (rope_freqs); only default RoPE is supported")
    check_keys(expected, src, "GGUF checkpoint")
    out = {
        "token_embedding.weight": extend_embedding(src["token_embd.weight"], cfg, seed),
        "norm.weight": src["output_norm.weight"],
    }
    for i in range(cfg.n_blocks):
        for gguf_name, our_name in _LAYER_MAP.items():
            weight = src[f"blk.{i}.{gguf_name}.weight"]
            if gguf_name == "attn_q":
                weight = unpermute_rotary_rows(weight, cfg.n_heads)
            elif gguf_name == "attn_k":
                weight = unpermute_rotary_rows(weight, cfg.n_kv_heads)
            out[f"blocks.{i}.{our_name}.weight"] = weight.contiguous()
    return out


def load_gguf_llama(
    path: str | Path, base: LMConfig | None = None, seed: int = 0
) -> tuple[LMConfig, dict[str, Tensor]]:
    """(LMConfig, LanguageModel state dict) from a local Llama-architecture GGUF file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"GGUF file does not exist: {path}")
    gguf = _require_gguf()
    metadata, tensors = read_gguf(path)
    cfg = lm_config_from_gguf(metadata, base)
    state = gguf_state_dict(_dequantized(tensors, gguf), cfg, seed)
    logger.info("loaded GGUF weights from %s (%d blocks, width %d)", path.name, cfg.n_blocks, cfg.hidden_dim)
    return cfg, state
