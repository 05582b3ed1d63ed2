"""Invariants of the adapters and the job config that a mutation audit found unguarded: which sources count as
local paths, how long key lists are cut, transformers' SigLIP defaults, the original's token order and image
fallbacks, GGUF RoPE factors and numeric metadata arrays, and the boundaries of the job-config checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from test_adapters import hf_llama_config, reference_p_ocr_config
from test_adapters_roundtrip import write_f32_gguf
from test_hf_parity import TINY_VISION, perturb, tiny_llama
from transformers import SiglipConfig, SiglipModel, SiglipVisionConfig

from dualtower.adapters import (
    CheckpointError,
    config_from_original,
    lm_config_from_hf,
    load_gguf_llama,
    load_siglip_vision,
    vision_config_from_hf,
)
from dualtower.adapters.backbones import load_language_model, load_lm_weights
from dualtower.adapters.common import check_keys, looks_like_local_path, resolve_source
from dualtower.adapters.gguf_file import ArrayInfo, read_gguf
from dualtower.adapters.gguf_llama import lm_config_from_gguf
from dualtower.adapters.siglip import _HF_DEFAULTS, siglip_state_dict
from dualtower.config import load_job_config
from dualtower.model.config import ConfigError
from dualtower.typed_fields import parse_cli_text

# -- sources and key lists ------------------------------------------------------------------------------------


def test_a_relative_path_with_two_folders_is_local_and_never_downloaded(tmp_path: Path) -> None:
    """"owner/name" is the only shape of a Hub id: "runs/exp/export" must not be sent to the Hub (where it would
    fail later, slowly, and with a message about downloading instead of a missing folder)."""
    assert not looks_like_local_path("HuggingFaceTB/SmolLM2-135M")
    assert looks_like_local_path("runs/exp/export")
    assert looks_like_local_path("a/b/c/d")
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_source(str(tmp_path.relative_to(tmp_path.anchor)) + "/missing/export")


def test_a_key_list_past_the_limit_says_how_many_more_there_are() -> None:
    """20 names are listed; the 21st is counted, not silently dropped (and 20 keys need no "more")."""
    keys = [f"k{i:02d}" for i in range(21)]
    with pytest.raises(CheckpointError) as error:
        check_keys(keys, [], "ckpt")
    text = str(error.value)
    assert "missing keys (21)" in text and "k19" in text and "k20" not in text
    assert text.endswith("... and 1 more")
    with pytest.raises(CheckpointError) as error:
        check_keys(keys[:20], [], "ckpt")
    assert "k19" in str(error.value) and "more" not in str(error.value)


# -- SigLIP defaults ------------------------------------------------------------------------------------------


def test_siglip_fields_a_config_omits_take_transformers_defaults() -> None:
    """transformers omits fields equal to its defaults when it serializes a config; ours must be the same
    values, or an omitted layer_norm_eps (say) would load a model with another epsilon."""
    reference = SiglipVisionConfig()
    for name, value in _HF_DEFAULTS.items():
        assert getattr(reference, name) == value, name
    derived = vision_config_from_hf({"model_type": "siglip", "vision_config": {}})
    assert (derived.image_size, derived.patch_size, derived.hidden_dim, derived.inter_dim) == (
        reference.image_size, reference.patch_size, reference.hidden_size, reference.intermediate_size)  # fmt: skip
    assert (derived.n_heads, derived.n_blocks, derived.ln_eps) == (
        reference.num_attention_heads, reference.num_hidden_layers, reference.layer_norm_eps)  # fmt: skip


def test_a_full_siglip_checkpoint_loads_its_vision_tower_only(tmp_path: Path) -> None:
    """A SiglipModel (text + vision towers, logit scale) is what most SigLIP repos hold: its text tower must be
    dropped, not reported as unexpected keys, and the vision weights must be the vision tower's own."""
    config = SiglipConfig(
        text_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                     "vocab_size": 50, "max_position_embeddings": 8},
        vision_config=TINY_VISION,
    )  # fmt: skip
    full = SiglipModel(config)
    perturb(full)
    full.save_pretrained(tmp_path / "full")
    cfg, state = load_siglip_vision(tmp_path / "full")
    assert cfg == vision_config_from_hf({"model_type": "siglip_vision_model", **TINY_VISION})
    # The tower's own tensors, unprefixed (the spelling a SiglipVisionModel saved by transformers 5 uses).
    expected = siglip_state_dict(full.vision_model.state_dict(), cfg)
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[name], expected[name]) for name in state)


def test_a_llama_config_without_the_tie_flag_loads_when_the_weights_are_tied() -> None:
    """The module's contract: lm_head is absent or a copy when tied, and a differing lm_head is refused by the
    weights check; a config.json that omits tie_word_embeddings is therefore read as tied, not refused."""
    data = {k: v for k, v in hf_llama_config().items() if k != "tie_word_embeddings"}
    assert lm_config_from_hf(data) == lm_config_from_hf(hf_llama_config())


# -- the original's config.json -----------------------------------------------------------------------------


def test_the_original_extra_tokens_in_another_order_are_refused() -> None:
    """Token ids follow the order of vlm_extra_tokens: the same 66 strings in another order map r1c1 to another
    id than the checkpoint was trained with."""
    data = reference_p_ocr_config()
    tokens = data["vlm_extra_tokens"]
    keys = list(tokens)
    swapped = dict(zip(keys, [tokens[keys[1]], tokens[keys[0]], *[tokens[k] for k in keys[2:]]], strict=True))
    with pytest.raises(ConfigError, match="order"):
        config_from_original({**data, "vlm_extra_tokens": swapped})


def test_an_original_config_without_image_size_fields_is_single_tile() -> None:
    """A config.json from before image splitting lacks max_img_size / resize_to_max_side_len: such a model saw
    one tile of vit_img_size, not our 2048-pixel default cap."""
    data = {k: v for k, v in reference_p_ocr_config().items() if k not in ("max_img_size", "resize_to_max_side_len")}
    cfg = config_from_original(data)
    assert cfg.image.max_img_size == data["vit_img_size"] == 512
    assert cfg.image.resize_to_max_side_len is False


# -- GGUF ---------------------------------------------------------------------------------------------------

_GGUF_BASE = {
    "general.architecture": "llama", "llama.embedding_length": 64, "llama.attention.head_count": 4,
    "llama.feed_forward_length": 96, "llama.block_count": 2, "llama.attention.layer_norm_rms_epsilon": 1e-6,
    "llama.rope.freq_base": 10000.0, "llama.context_length": 256, "llama.vocab_size": 300,
}  # fmt: skip


@pytest.mark.parametrize("factor", [4.0, 0.5])
def test_a_gguf_rope_scaling_factor_without_a_type_is_refused(factor: float) -> None:
    """A scaling factor other than 1 (or llama.cpp's 0 = unset) changes the positions even without a type."""
    with pytest.raises(ConfigError, match="RoPE scaling"):
        lm_config_from_gguf({**_GGUF_BASE, "llama.rope.scaling.factor": factor})
    for neutral in (0.0, 1.0):
        assert lm_config_from_gguf({**_GGUF_BASE, "llama.rope.scaling.factor": neutral}).rope_theta == 10000.0


def test_gguf_numeric_arrays_are_skipped_by_their_size_in_bytes(tmp_path: Path) -> None:
    """Tokenizer scores (float32) and token types (int32) come before the llama fields in real files: skipping
    them by a wrong byte count would misread every field and tensor after them."""
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "arrays.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_token_scores([0.5, -1.25, 3.0, 7.0, -2.0])
    writer.add_token_types([1, 2, 3, 1, 6])
    writer.add_token_list(["a", "bb", "ccc"])
    writer.add_block_count(3)
    writer.add_rope_freq_base(12345.0)
    weight = np.random.default_rng(0).standard_normal((3, 5)).astype(np.float32)
    writer.add_tensor("w.weight", weight)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    metadata, tensors = read_gguf(path)
    assert metadata["tokenizer.ggml.scores"] == ArrayInfo(value_type=6, length=5)
    assert metadata["tokenizer.ggml.token_type"] == ArrayInfo(value_type=5, length=5)
    assert metadata["tokenizer.ggml.tokens"] == ArrayInfo(value_type=8, length=3)
    assert metadata["llama.block_count"] == 3 and metadata["llama.rope.freq_base"] == 12345.0
    assert [t.name for t in tensors] == ["w.weight"]
    np.testing.assert_array_equal(tensors[0].data.view(np.float32).reshape(3, 5), weight)


def test_a_gguf_lm_source_is_read_as_gguf_by_the_backbone_loaders(tmp_path: Path) -> None:
    """--model.lm_backbone=x.gguf: the backbone loaders must pick the GGUF reader from the suffix."""
    path = tmp_path / "lm.gguf"
    write_f32_gguf(path, tiny_llama())
    expected_cfg, expected = load_gguf_llama(path, seed=2)
    cfg, state = load_lm_weights(path, seed=2)
    assert cfg == expected_cfg and state.keys() == expected.keys()
    assert all(torch.equal(state[name], expected[name]) for name in state)
    model = load_language_model(str(path), seed=2)
    assert torch.equal(model.token_embedding.weight, expected["token_embedding.weight"])


# -- job config boundaries ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        # warmup_ratio 1 would warm up for the whole run: the peak learning rate is never reached.
        (["--schedule.warmup_ratio=1"], "schedule.warmup_ratio"),
        # beta = 1 freezes Adam's moment estimates (and the bias correction divides by zero).
        (["--optim.betas=0.9,1.0"], "optim.betas"),
        (["--optim.betas=1,0.999"], "optim.betas"),
        # A zero std divides the pixels by zero.
        (["--model.image_std=0.5,0,0.5"], "model.image_std must be positive"),
        (["--eval.max_new_tokens=0"], "eval.max_new_tokens"),
        # One value would leave two channels unnormalized (or broadcast a grey mean to all three).
        (["--model.image_mean=0.5"], "model.image_mean needs 3 values"),
        (["--model.image_std=0.5,0.5"], "model.image_std needs 3 values"),
        # TOML's true is not the integer 1: `--training.steps=true` is a typo, not one step.
        (["--training.steps=true"], "expects an integer"),
        (["--checkpoint.keep=false"], "expects an integer"),
    ],
)
def test_job_config_boundaries_are_refused(args: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_job_config(args)


def test_job_config_values_just_inside_the_boundaries_are_accepted() -> None:
    cfg = load_job_config(["--schedule.warmup_ratio=0.99", "--optim.betas=0,0.999", "--eval.max_new_tokens=1"])
    assert (cfg.schedule.warmup_ratio, cfg.optim.betas, cfg.eval.max_new_tokens) == (0.99, (0.0, 0.999), 1)


def test_a_toml_boolean_is_not_taken_as_an_integer(tmp_path: Path) -> None:
    recipe = tmp_path / "bad.toml"
    recipe.write_text("[training]\nsteps = true\n")
    with pytest.raises(ConfigError, match=r"training\.steps expects an integer"):
        load_job_config(["--config", str(recipe)])


@pytest.mark.parametrize(
    ("text", "expected"),
    [("true", True), ("1", True), ("yes", True), ("on", True), ("ON", True),
     ("false", False), ("0", False), ("no", False), ("off", False), ("Off", False)],
)  # fmt: skip
def test_every_boolean_spelling_on_the_command_line_reads_as_meant(text: str, expected: bool) -> None:
    """`--parallel.compile=on` must switch compile on, not quietly off."""
    assert load_job_config([f"--parallel.compile={text}"]).parallel.compile is expected


def test_none_on_the_command_line_clears_an_optional_field_in_any_case() -> None:
    """`--key=None` (as Python prints it) and `--key=none` both mean no value for an optional field."""
    for text in ("none", "None", "NULL"):
        assert parse_cli_text(text, int | None, "k") is None
    assert parse_cli_text("3", int | None, "k") == 3
