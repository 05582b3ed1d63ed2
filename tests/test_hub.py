"""Checkpoint I/O: our format round-trips bit-exactly; the original DualTowerVLM and nanoVLM formats load;
strict key checks; clear errors; Hub download and upload (faked: no network here); flavor sizes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from model_helpers import random_batch
from safetensors import safe_open
from safetensors.torch import load_file, save_file, save_model
from test_adapters import reference_p_ocr_config
from torch import nn

from dualtower.hub import FORMAT_VERSION, CheckpointError, load_pretrained, parse_dtype, push_to_hub
from dualtower.model import DualTowerVLM
from dualtower.model.config import LMConfig, ModelConfig, VisionConfig, flavor

# -- helpers ------------------------------------------------------------------------------------------------


def tiny_config(architecture: str = "dual_tower") -> ModelConfig:
    cfg = flavor("debug")
    cfg.architecture = architecture
    cfg.vision = VisionConfig(image_size=32, patch_size=8, hidden_dim=16, inter_dim=32, n_heads=2, n_blocks=2)
    cfg.lm = LMConfig(hidden_dim=32, inter_dim=64, n_heads=4, n_kv_heads=2, n_blocks=2, base_vocab_size=200)
    return cfg.validate()


def tiny_model(architecture: str = "dual_tower") -> DualTowerVLM:
    model = DualTowerVLM.from_config(tiny_config(architecture))
    with torch.no_grad():  # norms off their ones/zeros init, so swapped keys would show
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    return model.eval()


@torch.no_grad()
def text_hidden(model: DualTowerVLM) -> torch.Tensor:
    batch = random_batch(model, [(1, 3, 5), (0, 0, 4), (2, 1, 6)], torch.Generator().manual_seed(7))
    return model(batch)


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert sa[name].dtype == sb[name].dtype and torch.equal(sa[name], sb[name]), name


def original_lm(decoder: nn.Module) -> nn.Module:
    """The original LanguageModel's module names over our decoder's modules, with its persistent inv_freq."""
    lm = nn.Module()
    lm.token_embedding = decoder.token_embedding
    lm.rotary_embd = nn.Module()
    lm.rotary_embd.register_buffer("inv_freq", decoder.rotary.inv_freq.clone())
    lm.blocks = decoder.blocks
    lm.norm = decoder.norm
    lm.head = decoder.head
    return lm


def original_modules(model: DualTowerVLM) -> nn.Module:
    """A module tree named as the original DualTowerVLM (left_tower.{vision_encoder, decoder, MP}, right_tower)."""
    root, left = nn.Module(), nn.Module()
    left.vision_encoder, left.decoder, left.MP = model.vision_encoder, original_lm(model.left_decoder), model.projector
    root.left_tower, root.right_tower = left, original_lm(model.right_decoder)
    return root


def nanovlm_modules(model: DualTowerVLM) -> nn.Module:
    root = nn.Module()
    root.vision_encoder, root.decoder, root.MP = model.vision_encoder, original_lm(model.left_decoder), model.projector
    return root


def original_config(cfg: ModelConfig) -> dict:
    """The original's config.json (every VLMConfig field, effective values) describing `cfg`."""
    data = reference_p_ocr_config()
    vision, lm = cfg.vision, cfg.lm
    data.update(
        vit_hidden_dim=vision.hidden_dim, vit_inter_dim=vision.inter_dim, vit_patch_size=vision.patch_size,
        vit_img_size=vision.image_size, vit_n_heads=vision.n_heads, vit_n_blocks=vision.n_blocks,
        vit_ln_eps=vision.ln_eps, lm_hidden_dim=lm.hidden_dim, lm_inter_dim=lm.inter_dim, lm_rms_eps=lm.rms_eps,
        lm_re_base=int(lm.rope_theta), lm_max_position_embeddings=lm.max_position_embeddings,
        lm_base_vocab_size=lm.base_vocab_size, lm_vocab_size=lm.vocab_size, lm_n_heads=lm.n_heads,
        lm_n_kv_heads=lm.n_kv_heads, lm_n_blocks=lm.n_blocks, mp_pixel_shuffle_factor=cfg.image.pixel_shuffle_factor,
        mp_image_token_length=cfg.image_tokens_per_tile, max_img_size=cfg.image.max_img_size,
        resize_to_max_side_len=cfg.image.resize_to_max_side_len, lm_tokenizer=cfg.tokenizer_id,
    )  # fmt: skip
    return data


def write_original(root: nn.Module, cfg: ModelConfig, directory: Path) -> Path:
    """What the original's save_pretrained does: json.dumps(asdict(cfg), indent=4) + safetensors save_model."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(original_config(cfg), indent=4))
    save_model(root, str(directory / "model.safetensors"))
    return directory


# -- our format ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("architecture", ["dual_tower", "vanilla"])
def test_round_trip_is_bit_exact(tmp_path: Path, architecture: str) -> None:
    model = tiny_model(architecture)
    model.save_pretrained(tmp_path)
    loaded = DualTowerVLM.from_pretrained(tmp_path)
    assert loaded.cfg == model.cfg
    assert_same_state(loaded, model)
    assert loaded.text_decoder.head.weight is loaded.text_decoder.token_embedding.weight
    assert loaded.num_parameters() == model.num_parameters()
    assert torch.equal(text_hidden(loaded), text_hidden(model))


def test_saved_files_are_deterministic_and_store_tied_weights_once(tmp_path: Path) -> None:
    model = tiny_model()
    model.save_pretrained(tmp_path / "a")
    model.save_pretrained(tmp_path / "b")
    for name in ("config.json", "model.safetensors"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert config["format"] == "dualtower"
    assert ModelConfig.from_dict({k: v for k, v in config.items() if not k.startswith("format")}) == model.cfg
    with safe_open(tmp_path / "a" / "model.safetensors", "pt") as handle:
        keys = set(handle.keys())
    assert "left_decoder.token_embedding.weight" in keys and "left_decoder.head.weight" not in keys
    assert "right_decoder.head.weight" not in keys
    assert not any("inv_freq" in key for key in keys)


def test_round_trip_keeps_bf16_and_casts_on_request(tmp_path: Path) -> None:
    model = tiny_model().to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    loaded = load_pretrained(tmp_path)
    assert_same_state(loaded, model)
    as_fp32 = load_pretrained(tmp_path, dtype="float32")
    assert as_fp32.projector.proj.weight.dtype == torch.float32
    assert torch.equal(as_fp32.projector.proj.weight, model.projector.proj.weight.float())


def test_weights_file_with_separate_config(tmp_path: Path) -> None:
    model = tiny_model()
    model.save_pretrained(tmp_path / "ckpt")
    weights = tmp_path / "elsewhere.safetensors"
    weights.write_bytes((tmp_path / "ckpt" / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match=r"missing config\.json"):
        load_pretrained(weights)
    assert_same_state(load_pretrained(weights, config_path=tmp_path / "ckpt" / "config.json"), model)


def test_missing_and_unexpected_keys_are_listed(tmp_path: Path) -> None:
    tiny_model().save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["right_decoder.blocks.1.mlp.down_proj.weight"]
    del tensors["vision_encoder.layer_norm.bias"]
    tensors["right_decoder.blocks.2.mlp.down_proj.weight"] = torch.zeros(2)
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError) as error:
        load_pretrained(tmp_path)
    message = str(error.value)
    assert "missing keys (2)" in message and "unexpected keys (1)" in message
    for key in ("right_decoder.blocks.1.mlp.down_proj.weight", "vision_encoder.layer_norm.bias",
                "right_decoder.blocks.2.mlp.down_proj.weight"):  # fmt: skip
        assert key in message


def test_wrong_shapes_are_listed(tmp_path: Path) -> None:
    tiny_model().save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["projector.proj.weight"] = torch.zeros(3, 3)
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"projector\.proj\.weight: checkpoint \(3, 3\)"):
        load_pretrained(tmp_path)


def test_missing_checkpoint_path_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="checkpoint path does not exist"):
        DualTowerVLM.from_pretrained(tmp_path / "no-such-run")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"missing config\.json"):
        DualTowerVLM.from_pretrained(tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(CheckpointError, match=r"no model\.safetensors"):
        DualTowerVLM.from_pretrained(tmp_path / "empty")


def test_unrecognised_config_is_rejected(tmp_path: Path) -> None:
    tiny_model().save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(CheckpointError, match=r"unrecognised config\.json"):
        load_pretrained(tmp_path)


def test_newer_format_version_is_rejected(tmp_path: Path) -> None:
    tiny_model().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["format_version"] == FORMAT_VERSION
    (tmp_path / "config.json").write_text(json.dumps({**config, "format_version": FORMAT_VERSION + 1}))
    with pytest.raises(CheckpointError, match=rf"format_version {FORMAT_VERSION + 1} is newer than this library"):
        load_pretrained(tmp_path)


def test_tied_names_that_differ_are_rejected(tmp_path: Path) -> None:
    """A checkpoint storing both names of a tied pair with different values is really untied: no silent pick."""
    tiny_model().save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["left_decoder.head.weight"] = tensors["left_decoder.token_embedding.weight"] + 1
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"left_decoder\.head\.weight are tied in the model but differ"):
        load_pretrained(tmp_path)


def test_default_dtype_is_the_checkpoints_most_common_dtype(tmp_path: Path) -> None:
    """A bf16 checkpoint with a few fp32 tensors (norms kept in fp32) loads as bf16, not fp32."""
    model = tiny_model().to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    for name in ("left_decoder.norm.weight", "right_decoder.norm.weight", "vision_encoder.layer_norm.bias"):
        tensors[name] = tensors[name].float()
    save_file(tensors, tmp_path / "model.safetensors")
    loaded = load_pretrained(tmp_path)
    assert {param.dtype for param in loaded.parameters()} == {torch.bfloat16}
    assert_same_state(loaded, model)  # the fp32 copies hold bf16 values: the cast back is exact


def test_names_from_a_compiled_model_load(tmp_path: Path) -> None:
    """torch.compile wrappers put `_orig_mod.` before the whole name (model) or inside it (compiled blocks)."""
    model = tiny_model()
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    renamed = {"_orig_mod." + name.replace(".blocks.0.", ".blocks.0._orig_mod."): t for name, t in tensors.items()}
    assert sum(".blocks.0._orig_mod." in name for name in renamed) > 3
    save_file(renamed, tmp_path / "model.safetensors")
    loaded = load_pretrained(tmp_path)
    assert_same_state(loaded, model)
    assert torch.equal(text_hidden(loaded), text_hidden(model))


# -- the original's formats ---------------------------------------------------------------------------------


def test_original_dual_tower_checkpoint_loads(tmp_path: Path) -> None:
    model = tiny_model()
    write_original(original_modules(model), model.cfg, tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as handle:
        keys = set(handle.keys())
    # save_model keeps the lexicographically smallest name of each tied pair, and the RoPE buffers.
    assert {"left_tower.decoder.head.weight", "right_tower.head.weight", "right_tower.rotary_embd.inv_freq"} <= keys
    assert "left_tower.decoder.token_embedding.weight" not in keys and "left_tower.MP.proj.weight" in keys
    loaded = DualTowerVLM.from_pretrained(tmp_path)
    assert loaded.cfg.architecture == "dual_tower" and loaded.cfg.vision == model.cfg.vision
    assert loaded.cfg.lm == model.cfg.lm and loaded.cfg.image == model.cfg.image
    assert_same_state(loaded, model)
    assert torch.equal(text_hidden(loaded), text_hidden(model))


def test_original_checkpoint_with_embedding_names_loads(tmp_path: Path) -> None:
    model = tiny_model()
    write_original(original_modules(model), model.cfg, tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    for tower in ("left_tower.decoder.", "right_tower."):
        tensors[tower + "token_embedding.weight"] = tensors.pop(tower + "head.weight")
    save_file(tensors, tmp_path / "model.safetensors")
    assert_same_state(load_pretrained(tmp_path), model)


def test_original_checkpoint_key_errors_say_how_names_map_to_the_file(tmp_path: Path) -> None:
    """The error lists keys by our names; a user searching the file needs the original prefixes too."""
    model = tiny_model()
    write_original(original_modules(model), model.cfg, tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["left_tower.decoder.extra.weight"] = torch.zeros(1)
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"unexpected keys \(1\): left_decoder\.extra\.weight") as error:
        load_pretrained(tmp_path)
    assert "left_tower.decoder.* -> left_decoder.*" in str(error.value)
    assert "right_tower.* -> right_decoder.*" in str(error.value)


def test_dtype_names_and_aliases() -> None:
    assert [parse_dtype(n) for n in ("bf16", "bfloat16", "fp16", "half", "fp32", "float")] == [
        torch.bfloat16, torch.bfloat16, torch.float16, torch.float16, torch.float32, torch.float32,
    ]  # fmt: skip
    for bad in ("int8", "bf17"):
        with pytest.raises(ValueError, match="unknown floating-point dtype"):
            parse_dtype(bad)


def test_push_to_hub_failure_names_the_repo(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    def unreachable(*args, **kwargs):
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", unreachable)
    with pytest.raises(CheckpointError, match=r"someone/tiny.*Name or service"):
        push_to_hub(tiny_model(), "someone/tiny")


def test_bf16_original_checkpoint_loads_with_fp32_rope(tmp_path: Path) -> None:
    """The original saves its persistent inv_freq buffers in the model's dtype: bf16-rounded frequencies."""
    model = tiny_model()
    write_original(original_modules(model).to(torch.bfloat16), model.cfg, tmp_path)  # casts `model` too
    loaded = load_pretrained(tmp_path)
    assert_same_state(loaded, model)
    assert loaded.left_decoder.rotary.inv_freq.dtype == torch.float32


def test_original_checkpoint_with_wrong_inv_freq_is_rejected(tmp_path: Path) -> None:
    model = tiny_model()
    write_original(original_modules(model), model.cfg, tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["right_tower.rotary_embd.inv_freq"] *= 2
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"right_tower\.rotary_embd\.inv_freq"):
        load_pretrained(tmp_path)


def test_nanovlm_checkpoint_loads_into_the_left_tower(tmp_path: Path) -> None:
    model = tiny_model()
    write_original(nanovlm_modules(model), model.cfg, tmp_path)
    loaded = load_pretrained(tmp_path)
    assert loaded.cfg.architecture == "dual_tower"
    assert_same_state(loaded.vision_encoder, model.vision_encoder)
    assert_same_state(loaded.projector, model.projector)
    assert_same_state(loaded.left_decoder, model.left_decoder)
    assert_same_state(loaded.right_decoder, model.left_decoder)
    assert loaded.right_decoder.token_embedding.weight is not loaded.left_decoder.token_embedding.weight


def test_nanovlm_checkpoint_with_a_separate_right_decoder(tmp_path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    model = tiny_model()
    write_original(nanovlm_modules(model), model.cfg, tmp_path / "nanovlm")
    lm = model.cfg.lm
    hf = LlamaForCausalLM(LlamaConfig(
        hidden_size=lm.hidden_dim, intermediate_size=lm.inter_dim, num_hidden_layers=lm.n_blocks,
        num_attention_heads=lm.n_heads, num_key_value_heads=lm.n_kv_heads, vocab_size=lm.base_vocab_size,
        rope_theta=lm.rope_theta, rms_norm_eps=lm.rms_eps, max_position_embeddings=lm.max_position_embeddings,
        tie_word_embeddings=True,
    ))  # fmt: skip
    hf.save_pretrained(tmp_path / "smollm")
    loaded = load_pretrained(tmp_path / "nanovlm", right_decoder_source=tmp_path / "smollm")
    assert_same_state(loaded.left_decoder, model.left_decoder)
    hf_state = hf.state_dict()
    assert torch.equal(loaded.right_decoder.blocks[1].mlp.up_proj.weight, hf_state["model.layers.1.mlp.up_proj.weight"])
    assert torch.equal(loaded.right_decoder.token_embedding.weight[:200], hf_state["model.embed_tokens.weight"])


def test_nanovlm_checkpoint_as_vanilla_is_the_whole_model(tmp_path: Path) -> None:
    model = tiny_model("vanilla")
    write_original(nanovlm_modules(model), model.cfg, tmp_path)
    loaded = DualTowerVLM.from_pretrained(tmp_path, architecture="vanilla")
    assert loaded.right_decoder is None and loaded.cfg == model.cfg
    assert_same_state(loaded, model)
    assert torch.equal(text_hidden(loaded), text_hidden(model))
    with pytest.raises(CheckpointError, match="cannot be loaded as vanilla"):
        write_original(original_modules(tiny_model()), model.cfg, tmp_path / "dual")
        load_pretrained(tmp_path / "dual", architecture="vanilla")


# -- the Hub (faked) ----------------------------------------------------------------------------------------


def test_hub_repo_id_is_downloaded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    model = tiny_model()
    model.save_pretrained(tmp_path)
    calls = []

    def fake_snapshot_download(repo_id: str, **kwargs: object) -> str:
        calls.append(repo_id)
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    assert_same_state(DualTowerVLM.from_pretrained("someone/dualtower-tiny"), model)
    assert calls == ["someone/dualtower-tiny"]


def test_hub_download_failure_names_the_source(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    def offline(repo_id: str, **kwargs: object) -> str:
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(CheckpointError, match=r"'someone/missing' is not a local path.*no network"):
        load_pretrained("someone/missing")


class FakeTokenizer:
    def save_pretrained(self, directory: str) -> None:
        (Path(directory) / "tokenizer.json").write_text("{}")


def test_push_to_hub_uploads_one_folder(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    seen: dict = {}

    class FakeApi:
        def __init__(self, token: str | None = None) -> None:
            seen["token"] = token

        def create_repo(self, repo_id: str, private: bool, exist_ok: bool) -> None:
            seen["create"] = (repo_id, private, exist_ok)

        def upload_folder(self, repo_id: str, folder_path: str, commit_message: str) -> str:
            folder = Path(folder_path)
            seen["files"] = sorted(path.name for path in folder.iterdir())
            seen["card"] = (folder / "README.md").read_text()
            seen["loaded"] = load_pretrained(folder)
            return "commit-url"

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    model = tiny_model()
    assert model.push_to_hub("me/tiny", private=True, tokenizer=FakeTokenizer()) == "commit-url"
    assert seen["create"] == ("me/tiny", True, True)
    assert seen["files"] == ["README.md", "config.json", "model.safetensors", "tokenizer.json"]
    assert "library_name: dualtower" in seen["card"] and 'from_pretrained("me/tiny")' in seen["card"]
    assert_same_state(seen["loaded"], model)


# -- flavors ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "count"), [("135m", 362_616_960), ("360m", 821_998_464)])
def test_flavor_parameter_counts(name: str, count: int) -> None:
    assert DualTowerVLM.from_flavor(name, device="meta").num_parameters() == count
