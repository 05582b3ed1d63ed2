"""Weight adapters: config derivation (never mutating the caller's config), key maps, strictness, embedding
extension, sharded files, GGUF reading, the original's config.json, and building from backbones."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_hf_parity import TINY_LLAMA, TINY_VISION, llamacpp_permute, perturb, tiny_llama, write_tiny_gguf
from transformers import SiglipVisionConfig, SiglipVisionModel

from dualtower.adapters import (
    CheckpointError,
    config_from_original,
    extend_embedding,
    from_backbones,
    lm_config_from_hf,
    load_gguf_llama,
    load_llama,
    load_siglip_vision,
    vision_config_from_hf,
)
from dualtower.adapters.gguf_llama import permute_rotary_rows, unpermute_rotary_rows
from dualtower.model.config import ConfigError, LMConfig, VisionConfig, extra_tokens, flavor

# -- configs ------------------------------------------------------------------------------------------------


def test_vision_config_from_vision_and_full_siglip_configs() -> None:
    base = VisionConfig()
    before = copy.deepcopy(base)
    section = {"model_type": "siglip_vision_model", **TINY_VISION, "hidden_act": "gelu_pytorch_tanh"}
    derived = vision_config_from_hf(section, base, hub_id="me/tiny-siglip")
    assert derived == VisionConfig(image_size=32, patch_size=8, hidden_dim=32, inter_dim=64, n_heads=4, n_blocks=2,
                                   ln_eps=1e-6, hub_id="me/tiny-siglip")  # fmt: skip
    assert base == before and derived is not base
    full = {"model_type": "siglip", "text_config": {"hidden_size": 8}, "vision_config": section}
    assert vision_config_from_hf(full, base, hub_id="me/tiny-siglip") == derived
    # Fields a serialized config omits keep transformers' SigLIP defaults (224 px, patch 16, width 768).
    assert vision_config_from_hf({"model_type": "siglip", "vision_config": {}}).image_size == 224


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"model_type": "siglip2"}, "NaFlex"),
        ({"hidden_act": "gelu"}, "gelu_pytorch_tanh"),
        ({"model_type": "clip_vision_model"}, "not a SigLIP"),
    ],
)
def test_vision_config_rejects_other_models(change: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        vision_config_from_hf({"model_type": "siglip_vision_model", **TINY_VISION, **change})


def hf_llama_config(**changes: object) -> dict:
    """A transformers-5 style Llama config.json dict (RoPE settings in rope_parameters) of the tiny model."""
    data = {"model_type": "llama", "hidden_act": "silu", **TINY_LLAMA, "head_dim": 16}
    data["rope_parameters"] = {"rope_theta": data.pop("rope_theta"), "rope_type": "default"}
    return {**data, **changes}


def test_lm_config_from_hf_reads_both_rope_spellings_and_keeps_base() -> None:
    base = LMConfig()
    before = copy.deepcopy(base)
    derived = lm_config_from_hf(hf_llama_config(), base)
    expected = LMConfig(hidden_dim=64, inter_dim=96, n_heads=4, n_kv_heads=2, n_blocks=2, rms_eps=1e-6,
                        rope_theta=10000.0, max_position_embeddings=256, base_vocab_size=300)  # fmt: skip
    assert derived == expected and base == before
    old_style = hf_llama_config(rope_parameters=None, rope_theta=10000.0)  # transformers 4 / SmolLM2's own file
    assert lm_config_from_hf(old_style) == expected


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"head_dim": 32}, "head_dim"),
        ({"tie_word_embeddings": False}, "untied"),
        ({"rope_parameters": {"rope_theta": 1e4, "rope_type": "llama3"}}, "default RoPE"),
        ({"rope_parameters": {"rope_type": "default"}}, "rope_theta"),
        ({"attention_bias": True}, "biases"),
        ({"model_type": "mistral"}, "Llama"),
    ],
)
def test_lm_config_validation(change: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        lm_config_from_hf(hf_llama_config(**change))


def test_extend_embedding_copies_base_rows_and_draws_new_rows_from_seed() -> None:
    cfg = LMConfig(hidden_dim=64, n_heads=4, n_kv_heads=2, base_vocab_size=300)
    base_rows = torch.randn(300, 64)
    extended = extend_embedding(base_rows, cfg, seed=3)
    assert extended.shape == (366, 64)
    assert torch.equal(extended[:300], base_rows)
    new_rows = extended[300:]
    assert torch.equal(new_rows, torch.randn(66, 64, generator=torch.Generator().manual_seed(3)) * 0.02)
    assert not torch.equal(new_rows, extend_embedding(base_rows, cfg, seed=4)[300:])
    assert abs(new_rows.std().item() - 0.02) < 0.002 and abs(new_rows.mean().item()) < 0.002
    with pytest.raises(CheckpointError, match="embedding has shape"):
        extend_embedding(base_rows[:299], cfg)


# -- safetensors key maps -----------------------------------------------------------------------------------


def test_sharded_llama_checkpoint_equals_single_file(tmp_path: Path) -> None:
    model = tiny_llama()
    model.save_pretrained(tmp_path / "single")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    cfg_single, single = load_llama(tmp_path / "single")
    cfg_sharded, sharded = load_llama(tmp_path / "sharded")
    assert cfg_single == cfg_sharded and single.keys() == sharded.keys()
    assert all(torch.equal(single[name], sharded[name]) for name in single)
    hf_state = model.state_dict()
    assert torch.equal(single["blocks.1.attn.out_proj.weight"], hf_state["model.layers.1.self_attn.o_proj.weight"])
    assert torch.equal(single["blocks.0.norm2.weight"], hf_state["model.layers.0.post_attention_layernorm.weight"])
    assert "head.weight" not in single  # tied: stored once, as the embedding


def test_llama_adapter_is_strict(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    tiny_llama().save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    tensors["model.layers.1.mlp.extra.weight"] = torch.zeros(1)
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError) as error:
        load_llama(tmp_path)
    assert "model.layers.1.mlp.up_proj.weight" in str(error.value)
    assert "model.layers.1.mlp.extra.weight" in str(error.value)


def test_siglip_adapter_fuses_qkv_and_is_strict(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    hf = SiglipVisionModel(SiglipVisionConfig(**TINY_VISION))
    perturb(hf)
    hf.save_pretrained(tmp_path)
    _, state = load_siglip_vision(tmp_path)
    hf_state = hf.state_dict()
    qkv = [hf_state[f"encoder.layers.1.self_attn.{p}_proj.weight"] for p in "qkv"]
    assert torch.equal(state["blocks.1.attn.qkv_proj.weight"], torch.cat(qkv))
    assert state["patch_embedding.position_embedding"].shape == (1, 16, 32)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["encoder.layers.0.layer_norm2.bias"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"encoder\.layers\.0\.layer_norm2\.bias"):
        load_siglip_vision(tmp_path)


def test_missing_sources_fail_clearly(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_llama(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_gguf_llama(tmp_path / "nowhere.gguf")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"missing config\.json"):
        load_siglip_vision(tmp_path / "empty")


def test_llama_lm_head_that_differs_from_the_embedding_is_rejected(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    tiny_llama().save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    assert "lm_head.weight" not in tensors
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, tmp_path / "model.safetensors")
    _, state = load_llama(tmp_path)  # an equal copy is fine
    assert torch.equal(state["token_embedding.weight"][:300], tensors["model.embed_tokens.weight"])
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"] + 1
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"lm_head\.weight differs from model\.embed_tokens\.weight"):
        load_llama(tmp_path)


# -- GGUF ---------------------------------------------------------------------------------------------------


def test_unpermute_inverts_llamacpp_rotary_permutation() -> None:
    weight = np.arange(4 * 16 * 3, dtype=np.float32).reshape(64, 3)
    stored = llamacpp_permute(weight, n_heads=4)
    assert not np.array_equal(stored, weight)
    assert np.array_equal(unpermute_rotary_rows(torch.from_numpy(stored), 4).numpy(), weight)
    assert np.array_equal(permute_rotary_rows(torch.from_numpy(weight), 4).numpy(), stored)


def test_tiny_gguf_weights(tmp_path: Path) -> None:
    pytest.importorskip("gguf")
    model = tiny_llama()
    write_tiny_gguf(model, tmp_path / "tiny.gguf")
    cfg, state = load_gguf_llama(tmp_path / "tiny.gguf")
    assert cfg == lm_config_from_hf(hf_llama_config())
    hf_state = model.state_dict()
    # F32 tensors are exact; Q8_0 matrices are within one quantization step (scale = max|row block| / 127).
    assert torch.equal(state["norm.weight"], hf_state["model.norm.weight"])
    assert torch.equal(state["blocks.1.norm1.weight"], hf_state["model.layers.1.input_layernorm.weight"])
    for ours, hf_name in [("attn.q_proj", "self_attn.q_proj"), ("attn.k_proj", "self_attn.k_proj")]:
        reference = hf_state[f"model.layers.0.{hf_name}.weight"]
        step = reference.abs().max() / 127
        assert (state[f"blocks.0.{ours}.weight"] - reference).abs().max() <= step


# -- the original's config.json -----------------------------------------------------------------------------


def reference_p_ocr_config() -> dict:
    """What the original's save_pretrained writes for P-OCR after loading the 135M backbones (spec 1.1)."""
    tokens = dict(zip(["image_token", "global_image_token"] + [f"r{r}c{c}" for r in range(1, 9) for c in range(1, 9)],
                      extra_tokens(), strict=True))  # fmt: skip
    return {
        "vit_hidden_dim": 768, "vit_inter_dim": 3072, "vit_patch_size": 16, "vit_img_size": 512, "vit_n_heads": 12,
        "vit_dropout": 0.0, "vit_n_blocks": 12, "vit_ln_eps": 1e-6, "vit_cls_flag": False,
        "vit_model_type": "google/siglip2-base-patch16-512", "lm_hidden_dim": 576, "lm_inter_dim": 1536,
        "lm_rms_eps": 1e-5, "lm_re_base": 100000, "lm_max_position_embeddings": 8192, "lm_base_vocab_size": 49152,
        "extra_token_amount": 66, "lm_vocab_size": 49218, "lm_n_heads": 9, "lm_n_kv_heads": 3, "lm_dropout": 0.0,
        "lm_n_blocks": 30, "lm_attn_scaling": 1.0, "lm_max_length": 256, "lm_use_tokens": False,
        "lm_tie_weights": True, "lm_model_type": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "lm_tokenizer": "HuggingFaceTB/SmolLM2-360M-Instruct", "lm_chat_template": "...",
        "mp_pixel_shuffle_factor": 4, "mp_image_token_length": 64, "max_img_size": 512,
        "resize_to_max_side_len": False, "vlm_extra_tokens": tokens, "vlm_load_backbone_weights": True,
        "vlm_checkpoint_path": "lusxvr/nanoVLM-230M-8k", "hf_repo_name": "nanoVLM",
    }  # fmt: skip


def test_original_config_maps_onto_the_135m_flavor() -> None:
    data = reference_p_ocr_config()
    before = json.dumps(data)
    cfg = config_from_original(data)
    expected = flavor("135m")
    assert cfg.vision == expected.vision and cfg.lm == expected.lm
    assert cfg.image.max_img_size == 512 and cfg.image.resize_to_max_side_len is False
    assert cfg.tokenizer_id == "HuggingFaceTB/SmolLM2-360M-Instruct" and cfg.architecture == "dual_tower"
    assert json.dumps(data) == before
    assert config_from_original(data, architecture="vanilla").architecture == "vanilla"


def test_original_config_honours_optional_numeric_fields() -> None:
    """eps, RoPE base and positions of another backbone are read, not replaced by the 135M defaults."""
    data = {**reference_p_ocr_config(), "lm_rms_eps": 1e-6, "lm_re_base": 10000, "vit_ln_eps": 1e-5,
            "lm_max_position_embeddings": 2048}  # fmt: skip
    cfg = config_from_original(data)
    assert cfg.lm.rms_eps == 1e-6 and cfg.lm.rope_theta == 10000.0 and isinstance(cfg.lm.rope_theta, float)
    assert cfg.vision.ln_eps == 1e-5 and cfg.lm.max_position_embeddings == 2048
    defaults = flavor("135m")
    assert (defaults.lm.rms_eps, defaults.lm.rope_theta, defaults.vision.ln_eps) == (1e-5, 100000.0, 1e-6)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"vit_cls_flag": True}, "CLS"),
        ({"lm_attn_scaling": 0.5}, "lm_attn_scaling"),
        ({"lm_tie_weights": False}, "lm_tie_weights"),
        ({"momh_enabled": True}, "Mixture-of-Modality-Heads"),
        ({"lm_vocab_size": 49153}, "lm_vocab_size"),
        ({"mp_image_token_length": 16}, "mp_image_token_length"),
        ({"vit_hidden_dim": None}, "lacks the field"),
    ],
)
def test_original_config_rejects_what_we_cannot_represent(change: dict, message: str) -> None:
    data = {**reference_p_ocr_config(), **change}
    data = {key: value for key, value in data.items() if value is not None}
    with pytest.raises(ConfigError, match=message):
        config_from_original(data)


# -- pretrained backbones -----------------------------------------------------------------------------------


def test_from_backbones_loads_both_towers_and_keeps_the_config(tmp_path: Path) -> None:
    vision = SiglipVisionModel(SiglipVisionConfig(**TINY_VISION))
    perturb(vision)
    vision.save_pretrained(tmp_path / "siglip")
    lm = tiny_llama()
    lm.save_pretrained(tmp_path / "llama")
    base = flavor("debug")
    before = copy.deepcopy(base)
    model = from_backbones(base, tmp_path / "siglip", tmp_path / "llama", seed=5)
    assert base == before
    assert model.cfg.vision.hidden_dim == 32 and model.cfg.lm.hidden_dim == 64 and model.cfg.image == base.image
    assert model.projector.proj.weight.shape == (64, 32 * 4)
    embedding = lm.state_dict()["model.embed_tokens.weight"]
    for decoder in (model.left_decoder, model.right_decoder):
        assert torch.equal(decoder.token_embedding.weight[:300], embedding)
        assert decoder.head.weight is decoder.token_embedding.weight
    left, right = model.left_decoder.state_dict(), model.right_decoder.state_dict()
    assert all(torch.equal(left[name], right[name]) for name in left)
    assert torch.equal(model.vision_encoder.layer_norm.bias, vision.state_dict()["post_layernorm.bias"])
