"""Round trips of every flavor's config through save_pretrained / from_pretrained, sharded index files given
directly, GGUF head and RoPE edges, and push_to_hub with the Hub unreachable (offline mode: no network)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from test_hf_parity import GGUF_LAYER_NAMES, TINY_LLAMA, llamacpp_permute, tiny_llama
from test_hub import FakeTokenizer, assert_same_state, text_hidden

from dualtower.adapters import CheckpointError, llama_state_dict, lm_config_from_gguf, lm_config_from_hf
from dualtower.adapters.gguf_llama import load_gguf_llama
from dualtower.hub import load_pretrained, push_to_hub
from dualtower.model import DualTowerVLM
from dualtower.model.config import FLAVORS, ConfigError, LMConfig, flavor

# -- every flavor, tiny -------------------------------------------------------------------------------------


def tiny_flavor(name: str) -> DualTowerVLM:
    """The flavor's config (architecture, image settings, hub and tokenizer ids) at a tiny size."""
    cfg = flavor(name)
    cfg.vision = dataclasses.replace(
        cfg.vision, image_size=16 * cfg.image.pixel_shuffle_factor, patch_size=4, hidden_dim=16, inter_dim=32,
        n_heads=2, n_blocks=2,
    )  # fmt: skip
    cfg.lm = dataclasses.replace(cfg.lm, hidden_dim=32, inter_dim=64, n_heads=4, n_kv_heads=2, n_blocks=2,
                                 base_vocab_size=200)  # fmt: skip
    model = DualTowerVLM.from_config(cfg.validate())
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    return model.eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(FLAVORS))
def test_every_flavor_round_trips_bit_exactly_with_its_tokenizer(tmp_path: Path, name: str, dtype) -> None:
    model = tiny_flavor(name).to(dtype)
    model.save_pretrained(tmp_path, tokenizer=FakeTokenizer())
    assert (tmp_path / "tokenizer.json").is_file()
    loaded = DualTowerVLM.from_pretrained(tmp_path)
    assert loaded.cfg == model.cfg and loaded.cfg.architecture == FLAVORS[name].architecture
    assert_same_state(loaded, model)
    assert loaded.text_decoder.head.weight is loaded.text_decoder.token_embedding.weight
    assert torch.equal(text_hidden(loaded), text_hidden(model))


# -- sharded checkpoints ----------------------------------------------------------------------------------


def test_a_shard_index_file_given_as_the_source_loads_its_shards(tmp_path: Path) -> None:
    """Like a weights file, an index file may be named directly; its config.json sits beside it."""
    model = tiny_flavor("debug")
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    (tmp_path / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, keys in shards.items():
        save_file({key: tensors[key] for key in keys}, tmp_path / shard, metadata={"format": "pt"})
    weight_map = {key: shard for shard, keys in shards.items() for key in keys}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert_same_state(load_pretrained(tmp_path / "model.safetensors.index.json"), model)
    assert_same_state(load_pretrained(tmp_path), model)


# -- GGUF -----------------------------------------------------------------------------------------------------


def write_f32_gguf(path: Path, model: torch.nn.Module, output_head: np.ndarray | None = None) -> None:
    """`model` (an HF Llama) as an all-F32 llama GGUF in llama.cpp's rotary row order, optionally with output."""
    gguf = pytest.importorskip("gguf")
    cfg, state = model.config, {name: t.numpy() for name, t in model.state_dict().items()}
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(TINY_LLAMA["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_tensor("token_embd.weight", state["model.embed_tokens.weight"])
    if output_head is not None:
        writer.add_tensor("output.weight", output_head)
    writer.add_tensor("output_norm.weight", state["model.norm.weight"])
    for i in range(cfg.num_hidden_layers):
        for hf_name, gguf_name in GGUF_LAYER_NAMES.items():
            weight = state[f"model.layers.{i}.{hf_name}.weight"]
            heads = {"attn_q": cfg.num_attention_heads, "attn_k": cfg.num_key_value_heads}.get(gguf_name)
            stored = weight if heads is None else llamacpp_permute(weight, heads)
            writer.add_tensor(f"blk.{i}.{gguf_name}.weight", stored)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_f32_gguf_equals_the_safetensors_weights_exactly(tmp_path: Path) -> None:
    hf = tiny_llama()
    write_f32_gguf(tmp_path / "tiny.gguf", hf)
    hf_cfg = lm_config_from_hf(hf.config.to_dict())
    expected = llama_state_dict(hf.state_dict(), hf_cfg)
    cfg, state = load_gguf_llama(tmp_path / "tiny.gguf")
    assert cfg == hf_cfg and state.keys() == expected.keys()
    for name, tensor in expected.items():
        assert state[name].dtype == torch.float32 and torch.equal(state[name], tensor), name


def test_a_gguf_output_head_equal_to_the_embedding_is_the_tied_head(tmp_path: Path) -> None:
    """A converter that copies a tied lm_head writes output.weight; equal values are still a tied head."""
    hf = tiny_llama()
    embedding = hf.state_dict()["model.embed_tokens.weight"].numpy()
    write_f32_gguf(tmp_path / "tied.gguf", hf, output_head=embedding.copy())
    write_f32_gguf(tmp_path / "plain.gguf", hf)
    _, with_copy = load_gguf_llama(tmp_path / "tied.gguf")
    _, plain = load_gguf_llama(tmp_path / "plain.gguf")
    assert torch.equal(with_copy["token_embedding.weight"], plain["token_embedding.weight"])
    write_f32_gguf(tmp_path / "untied.gguf", hf, output_head=embedding + 1)
    with pytest.raises(CheckpointError, match="untied head"):
        load_gguf_llama(tmp_path / "untied.gguf")


def test_gguf_rope_scaling_is_refused_not_silently_dropped() -> None:
    """The HF adapter refuses non-default RoPE; a GGUF file's scaling fields must not be ignored either."""
    base = {
        "general.architecture": "llama", "llama.embedding_length": 64, "llama.attention.head_count": 4,
        "llama.feed_forward_length": 96, "llama.block_count": 2, "llama.attention.layer_norm_rms_epsilon": 1e-6,
        "llama.rope.freq_base": 10000.0, "llama.context_length": 256, "llama.vocab_size": 300,
    }  # fmt: skip
    assert lm_config_from_gguf(base) == lm_config_from_gguf({**base, "llama.rope.scaling.type": "none"})
    assert isinstance(lm_config_from_gguf(base), LMConfig)
    for scaling in ({"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0},
                    {"llama.rope.scaling.type": "yarn", "llama.rope.scaling.factor": 2.0}):  # fmt: skip
        with pytest.raises(ConfigError, match="RoPE scaling"):
            lm_config_from_gguf({**base, **scaling})


# -- the Hub, unreachable -------------------------------------------------------------------------------------


def test_push_to_hub_offline_is_a_checkpoint_error_naming_the_repo(monkeypatch: pytest.MonkeyPatch) -> None:
    """huggingface_hub's offline mode refuses every request, so this cannot reach the network."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(CheckpointError, match=r"me/tiny.*offline"):
        push_to_hub(tiny_flavor("debug"), "me/tiny", tokenizer=FakeTokenizer())
