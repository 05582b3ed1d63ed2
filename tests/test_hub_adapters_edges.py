"""Edges of checkpoint I/O, the GGUF reader and the tokenizer checks: architecture and right-decoder arguments
that do not apply, the safetensors metadata, a weights file next to its config, GGUF versions, alignment and
vocabulary fields, pad = eos, and the switch that turns the tokenizer cache off."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors import safe_open
from test_hub import nanovlm_modules, original_modules, tiny_model, write_original

from dualtower import tokenizer as tokmod
from dualtower.adapters.gguf_file import ArrayInfo, read_gguf
from dualtower.adapters.gguf_llama import lm_config_from_gguf
from dualtower.hub import CheckpointError, _checkpoint_dtype, load_pretrained
from dualtower.model.config import extra_tokens
from dualtower.tokenizer import TokenizerError, verify_tokenizer

# -- our format and the original's -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("ours")
    tiny_model().save_pretrained(directory)
    return directory


def test_a_checkpoint_is_not_loaded_as_another_architecture(saved: Path) -> None:
    with pytest.raises(CheckpointError, match="is a dual_tower model, not vanilla"):
        load_pretrained(saved, architecture="vanilla")


def test_a_right_decoder_source_is_refused_where_it_does_not_apply(saved: Path, tmp_path: Path) -> None:
    """Only a nanoVLM checkpoint lacks a right tower; elsewhere the argument would be silently ignored."""
    with pytest.raises(CheckpointError, match="only applies to nanoVLM checkpoints"):
        load_pretrained(saved, right_decoder_source=saved)
    model = tiny_model()
    write_original(original_modules(model), model.cfg, tmp_path)
    with pytest.raises(CheckpointError, match="only applies to nanoVLM checkpoints loaded as dual_tower"):
        load_pretrained(tmp_path, right_decoder_source=saved)


def test_a_right_decoder_with_other_hyperparameters_is_refused(tmp_path: Path) -> None:
    """Same tensor shapes, another RoPE base: loading it would silently give a different right tower."""
    from transformers import LlamaConfig, LlamaForCausalLM

    model = tiny_model()
    write_original(nanovlm_modules(model), model.cfg, tmp_path / "nanovlm")
    lm = model.cfg.lm
    LlamaForCausalLM(LlamaConfig(
        hidden_size=lm.hidden_dim, intermediate_size=lm.inter_dim, num_hidden_layers=lm.n_blocks,
        num_attention_heads=lm.n_heads, num_key_value_heads=lm.n_kv_heads, vocab_size=lm.base_vocab_size,
        rope_theta=lm.rope_theta / 10, rms_norm_eps=lm.rms_eps, max_position_embeddings=lm.max_position_embeddings,
        tie_word_embeddings=True,
    )).save_pretrained(tmp_path / "smollm")  # fmt: skip
    with pytest.raises(CheckpointError, match="different shape than the left"):
        load_pretrained(tmp_path / "nanovlm", right_decoder_source=tmp_path / "smollm")


def test_weights_are_saved_as_pytorch_safetensors_and_load_from_the_file_alone(saved: Path) -> None:
    """transformers and other readers look for format=pt in the metadata; the config is found next to the file."""
    with safe_open(saved / "model.safetensors", framework="pt") as handle:
        assert handle.metadata() == {"format": "pt"}
    from_file = load_pretrained(saved / "model.safetensors")
    from_dir = load_pretrained(saved)
    assert from_file.cfg == from_dir.cfg
    assert torch.equal(from_file.projector.proj.weight, from_dir.projector.proj.weight)


def test_a_checkpoint_without_floating_point_tensors_defaults_to_float32() -> None:
    assert _checkpoint_dtype({"steps": torch.tensor([3])}) == torch.float32
    mixed = {"a": torch.zeros(10, dtype=torch.bfloat16), "b": torch.zeros(3), "c": torch.zeros(20, dtype=torch.int64)}
    assert _checkpoint_dtype(mixed) == torch.bfloat16


# -- GGUF ---------------------------------------------------------------------------------------------------


def write_gguf(path: Path, alignment: int | None = None) -> dict[str, np.ndarray]:
    """A small F32 GGUF file (v3); returns its tensors."""
    gguf = pytest.importorskip("gguf")
    rng = np.random.default_rng(0)
    tensors = {"a.weight": rng.standard_normal((3, 5)).astype(np.float32), "b.weight": np.arange(7, dtype=np.float32)}
    writer = gguf.GGUFWriter(str(path), "llama")
    if alignment is not None:
        writer.add_custom_alignment(alignment)
    for name, value in tensors.items():
        writer.add_tensor(name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return tensors


def read_f32(path: Path) -> dict[str, np.ndarray]:
    _, infos = read_gguf(path)
    return {info.name: info.data.view(np.float32).reshape(info.shape) for info in infos}


def test_gguf_tensors_start_at_the_files_own_alignment(tmp_path: Path) -> None:
    expected = write_gguf(tmp_path / "aligned.gguf", alignment=1024)
    assert read_gguf(tmp_path / "aligned.gguf")[0]["general.alignment"] == 1024
    found = read_f32(tmp_path / "aligned.gguf")
    assert found.keys() == expected.keys()
    for name, value in expected.items():
        np.testing.assert_array_equal(found[name], value)


def test_gguf_version_2_files_are_read_and_version_1_files_refused(tmp_path: Path) -> None:
    """v2 and v3 share the layout (v3 only allows big-endian files); v1 had 32-bit counts."""
    path = tmp_path / "v2.gguf"
    expected = write_gguf(path)
    data = bytearray(path.read_bytes())
    data[4:8] = struct.pack("<I", 2)
    path.write_bytes(bytes(data))
    np.testing.assert_array_equal(read_f32(path)["a.weight"], expected["a.weight"])
    data[4:8] = struct.pack("<I", 1)
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="GGUF version 1 is not supported"):
        read_gguf(path)


def llama_metadata(**changes: object) -> dict[str, object]:
    fields = {
        "general.architecture": "llama", "llama.embedding_length": 64, "llama.attention.head_count": 4,
        "llama.attention.head_count_kv": 2, "llama.feed_forward_length": 96, "llama.block_count": 2,
        "llama.attention.layer_norm_rms_epsilon": 1e-6, "llama.rope.freq_base": 10000.0,
        "llama.context_length": 256, "tokenizer.ggml.tokens": ArrayInfo(value_type=8, length=300),
    }  # fmt: skip
    return {**fields, **changes}


def test_the_gguf_vocabulary_size_field_wins_over_the_token_list() -> None:
    """llama.vocab_size, when present, is the embedding's row count (the token list can be shorter)."""
    assert lm_config_from_gguf(llama_metadata()).base_vocab_size == 300
    assert lm_config_from_gguf(llama_metadata(**{"llama.vocab_size": 320})).base_vocab_size == 320
    assert lm_config_from_gguf(llama_metadata()).n_kv_heads == 2


# -- tokenizer ------------------------------------------------------------------------------------------------


def test_verify_rejects_a_pad_token_other_than_eos() -> None:
    ids = list(range(49152, 49152 + len(extra_tokens())))
    tokenizer = SimpleNamespace(
        convert_tokens_to_ids=lambda tokens: ids, eos_token="<|im_end|>", eos_token_id=2, pad_token_id=2
    )
    verify_tokenizer(tokenizer)  # the expected tokenizer passes
    tokenizer.pad_token_id = 0
    with pytest.raises(TokenizerError, match="pad = eos"):
        verify_tokenizer(tokenizer)


@pytest.mark.parametrize("switch", ["off", "OFF", "0", "none", "false"])
def test_the_converted_tokenizer_cache_can_be_switched_off(
    switch: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gguf_file = tmp_path / "tokenizer.gguf"
    gguf_file.write_bytes(b"GGUF")
    monkeypatch.setenv("DUALTOWER_CACHE", switch)
    assert tokmod._gguf_cache_dir(gguf_file) is None
    monkeypatch.setenv("DUALTOWER_CACHE", str(tmp_path / "cache"))
    assert tokmod._gguf_cache_dir(gguf_file).parent == tmp_path / "cache" / "tokenizers"


def test_a_saved_checkpoints_config_names_the_format(saved: Path) -> None:
    data = json.loads((saved / "config.json").read_text())
    assert (data["format"], data["format_version"]) == ("dualtower", 1)
