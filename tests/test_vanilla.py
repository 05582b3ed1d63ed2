"""The single-tower ("vanilla") architecture: transformers' Llama math over the whole sequence, nanoVLM
checkpoints as the whole model (also when training starts from one), cached generation, and recipes that
mirror the dual-tower recipes (same data and budget)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from model_helpers import random_batch
from test_generation import greedy, make_prompt, teacher_forced_logits
from test_hub import assert_same_state, nanovlm_modules, original_modules, tiny_model, write_original
from test_train_utils import MAIN, ROOT, fast_tokenizer_dir, one_thread, read_metrics, small_run_args  # noqa: F401
from transformers import LlamaConfig, LlamaForCausalLM

from dualtower.adapters.common import CheckpointError
from dualtower.config import ModelSection, load_job_config
from dualtower.generation import Generator
from dualtower.model import DualTowerVLM
from dualtower.model.config import LMConfig, ModelConfig, VisionConfig, flavor
from dualtower.training import build_model

CONFIGS = ROOT / "train" / "configs"
# vanilla recipe -> the dual-tower recipe it must mirror (same data, budget, schedule and learning rates)
MIRRORS = {"vanilla_debug": "debug", "vanilla_135m": "cauldron_135m", "vanilla_360m": "cauldron_360m"}
# transformers' Llama names -> ours, inside one decoder layer
HF_LAYER = {
    "input_layernorm": "norm1",
    "self_attn.q_proj": "attn.q_proj",
    "self_attn.k_proj": "attn.k_proj",
    "self_attn.v_proj": "attn.v_proj",
    "self_attn.o_proj": "attn.out_proj",
    "post_attention_layernorm": "norm2",
    "mlp.gate_proj": "mlp.gate_proj",
    "mlp.up_proj": "mlp.up_proj",
    "mlp.down_proj": "mlp.down_proj",
}


def tiny_vanilla(base_vocab_size: int = 200) -> DualTowerVLM:
    cfg = flavor("vanilla-debug")
    cfg.vision = VisionConfig(image_size=32, patch_size=8, hidden_dim=16, inter_dim=32, n_heads=2, n_blocks=1)
    cfg.lm = LMConfig(hidden_dim=48, inter_dim=64, n_heads=6, n_kv_heads=2, n_blocks=2, base_vocab_size=base_vocab_size)
    model = DualTowerVLM.from_config(cfg)
    with torch.no_grad():  # norms off their ones init, so a wrong norm weight would show
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    return model.eval()


def hf_llama(model: DualTowerVLM) -> LlamaForCausalLM:
    """transformers' Llama (eager attention: a dense causal mask) holding the vanilla model's LM weights."""
    lm, cfg = model.left_decoder, model.cfg.lm
    hf = LlamaForCausalLM(LlamaConfig(
        hidden_size=cfg.hidden_dim, intermediate_size=cfg.inter_dim, num_hidden_layers=cfg.n_blocks,
        num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads, vocab_size=cfg.vocab_size,
        rope_theta=cfg.rope_theta, rms_norm_eps=cfg.rms_eps, max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=True, attn_implementation="eager",
    ))  # fmt: skip
    state = {
        "model.embed_tokens.weight": lm.token_embedding.weight,
        "model.norm.weight": lm.norm.weight,
        "lm_head.weight": lm.head.weight,
    }
    for i, block in enumerate(lm.blocks):
        for hf_name, ours in HF_LAYER.items():
            state[f"model.layers.{i}.{hf_name}.weight"] = block.get_submodule(ours).weight
    hf.load_state_dict({name: tensor.detach().clone() for name, tensor in state.items()}, strict=True)
    return hf.eval()


@pytest.mark.parametrize("layout", [[(2, 3, 9)], [(1, 2, 5), (0, 0, 4), (2, 0, 6)]], ids=["one-doc", "packed"])
def test_vanilla_forward_matches_transformers_llama(layout) -> None:
    """Per document: [prefix; text] embedded by transformers' Llama, image features in place of every
    `<|image|>` token, one causal pass; its text rows (hidden, logits, loss) equal our packed forward's."""
    torch.manual_seed(3)
    model = tiny_vanilla()
    hf = hf_llama(model)
    batch = random_batch(model, layout, torch.Generator().manual_seed(4))
    with torch.no_grad():
        ours = model(batch)
        ours_logits = model.logits(ours)
        ours_loss = model.loss_sum(batch)
        features = model.encode_images(batch.pixel_values).flatten(0, 1)
        cu_p, cu_t = batch.cu_prefix.tolist(), batch.cu_text.tolist()
        hidden, used = [], 0
        for doc in range(len(cu_t) - 1):
            ids = torch.cat([batch.prefix_ids[cu_p[doc] : cu_p[doc + 1]], batch.text_ids[cu_t[doc] : cu_t[doc + 1]]])
            embeds = hf.model.embed_tokens(ids).clone()
            image_rows = (ids == model.cfg.image_token_id).nonzero().flatten()
            embeds[image_rows] = features[used : used + image_rows.numel()]
            used += image_rows.numel()
            out = hf.model(inputs_embeds=embeds[None]).last_hidden_state[0]  # final norm applied
            hidden.append(out[cu_p[doc + 1] - cu_p[doc] :])
        reference = torch.cat(hidden)
        reference_logits = hf.lm_head(reference)
    assert used == features.shape[0]
    assert ours.dtype == torch.float32 and ours.shape == reference.shape
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours_logits, reference_logits, atol=1e-5, rtol=0)
    expected_loss = F.cross_entropy(reference_logits, batch.labels, reduction="sum")
    torch.testing.assert_close(ours_loss, expected_loss, atol=1e-4, rtol=1e-6)


def test_vanilla_has_one_lm_and_trains_every_parameter() -> None:
    model = DualTowerVLM.from_flavor("vanilla-135m", device="meta")
    dual = DualTowerVLM.from_flavor("135m", device="meta")
    assert model.right_decoder is None and model.text_decoder is model.left_decoder
    right = sum(p.numel() for p in dual.right_decoder.parameters())
    # nanoVLM-230M: the original's left tower (reference_spec section 10)
    assert model.num_parameters() == dual.num_parameters() - right == 228_063_936
    assert model.unused_parameters() == []


def test_cached_generation_equals_teacher_forced_recomputation() -> None:
    torch.manual_seed(0)
    model = tiny_vanilla(base_vocab_size=1000).requires_grad_(False)  # make_prompt draws ids below 900
    with torch.no_grad():  # a random tied head mostly echoes the input; an untied one gives varied tokens
        model.text_decoder.head.weight = torch.nn.Parameter(torch.randn_like(model.text_decoder.head.weight))
    prompts = [make_prompt(model, tiles, extra, text, seed=i) for i, (tiles, extra, text) in
               enumerate([(1, 0, 5), (2, 1, 7), (0, 0, 4)])]  # fmt: skip
    results = Generator(model, eos_token_ids=()).generate_prepared(prompts, greedy(5), return_logits=True)
    expected = teacher_forced_logits(model, prompts, [r.token_ids for r in results])
    for result, reference in zip(results, expected, strict=True):
        torch.testing.assert_close(result.logits, reference, atol=1e-4, rtol=0)
        assert result.token_ids == reference.argmax(-1).tolist()
    assert len({tuple(r.token_ids) for r in results}) == len(prompts)  # the test model is not degenerate


# -- nanoVLM and original checkpoints -----------------------------------------------------------------------


def test_training_from_a_nanovlm_checkpoint_keeps_it_whole(tmp_path: Path) -> None:
    """[model] checkpoint = a nanoVLM (or the original's vanilla) checkpoint: a vanilla-* flavor trains it as
    the whole model; a dual-tower flavor makes it the left tower (right tower = a copy of its LM)."""
    source = tiny_model("vanilla")
    write_original(nanovlm_modules(source), source.cfg, tmp_path / "nanovlm")
    device = torch.device("cpu")
    vanilla = build_model(ModelSection(flavor="vanilla-debug", checkpoint=str(tmp_path / "nanovlm")), 0, device)
    assert vanilla.cfg.architecture == "vanilla" and vanilla.right_decoder is None
    assert_same_state(vanilla, source)
    dual = build_model(ModelSection(flavor="debug", checkpoint=str(tmp_path / "nanovlm")), 0, device)
    assert dual.cfg.architecture == "dual_tower"
    assert_same_state(dual.right_decoder, source.left_decoder)
    # Our own vanilla checkpoint keeps its architecture whatever the flavor; a dual-tower checkpoint is no
    # vanilla model.
    source.save_pretrained(tmp_path / "ours")
    assert build_model(ModelSection(flavor="debug", checkpoint=str(tmp_path / "ours")), 0, device).right_decoder is None
    write_original(original_modules(tiny_model()), source.cfg, tmp_path / "dual")
    with pytest.raises(CheckpointError, match="cannot be loaded as vanilla"):
        build_model(ModelSection(flavor="vanilla-debug", checkpoint=str(tmp_path / "dual")), 0, device)


# -- train/main.py -> export -> generate / evaluate ------------------------------------------------------------


def run_train_main(argv: list[str]) -> int:
    """train/main.py's main() in this process (a subprocess would spend most of a short run importing)."""
    spec = importlib.util.spec_from_file_location("dualtower_train_main", MAIN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(argv)


@pytest.mark.usefixtures("one_thread")
def test_vanilla_recipe_trains_exports_generates_and_evaluates(tmp_path: Path, capsys) -> None:
    """A few steps of vanilla_debug.toml; the exported single-tower checkpoint answers through
    `dualtower.generate` and is scored by `dualtower.evaluate --offline-parquet`."""
    from dualtower.data.synthetic import heldout_examples
    from dualtower.eval.mmstar_synthetic import build_mmstar_parquet
    from dualtower.evaluate import main as evaluate_main
    from dualtower.generate import main as generate_main

    run_dir = tmp_path / "run"
    args = small_run_args(run_dir, fast_tokenizer_dir(tmp_path), 4, "--checkpoint.export_final=true")
    args[1] = str(CONFIGS / "vanilla_debug.toml")
    assert run_train_main(args) == 0
    losses = [r["loss"] for r in read_metrics(run_dir) if "loss" in r]
    assert len(losses) == 4 and losses[-1] < losses[0] - 0.5, losses
    export = run_dir / "export"
    assert json.loads((export / "config.json").read_text())["architecture"] == "vanilla"
    capsys.readouterr()

    example = heldout_examples(1, seed=7)[0]
    example["images"][0].save(tmp_path / "sample.png")
    question = ["--image", str(tmp_path / "sample.png"), "--prompt", example["question"]]
    assert generate_main(["--checkpoint", str(export), *question, "--max_new_tokens", "3", "--device", "cpu"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1
    parquet = build_mmstar_parquet(tmp_path / "mmstar.parquet", 2)
    output = tmp_path / "mmstar.json"
    evaluate_args = ["--model", str(export), "--offline-parquet", str(parquet), "--output_path", str(output)]
    assert evaluate_main([*evaluate_args, "--device", "cpu", "--gen_kwargs", "max_new_tokens=2"]) == 0
    assert json.loads(output.read_text())["num_samples"] == 2


def test_nanovlm_checkpoint_as_dual_tower_computes_the_vanilla_model(tmp_path: Path) -> None:
    """Loaded without `architecture` (as the generation and evaluation CLIs do), a nanoVLM checkpoint becomes a
    dual tower whose right LM is a copy of its LM: the same outputs as the single tower, at twice the LM memory."""
    source = tiny_model("vanilla")
    write_original(nanovlm_modules(source), source.cfg, tmp_path)
    dual = DualTowerVLM.from_pretrained(tmp_path)
    vanilla = DualTowerVLM.from_pretrained(tmp_path, architecture="vanilla")
    assert dual.cfg.architecture == "dual_tower" and vanilla.cfg.architecture == "vanilla"
    batch = random_batch(vanilla, [(1, 3, 5), (0, 0, 4), (2, 1, 6)], torch.Generator().manual_seed(7))
    with torch.no_grad():
        torch.testing.assert_close(dual(batch), vanilla(batch), atol=1e-6, rtol=0)


def test_clis_keep_a_nanovlm_checkpoint_whole_on_request(tmp_path: Path) -> None:
    """`generate --architecture vanilla`, `evaluate --model_args architecture=vanilla` and the lmms-eval plugin's
    `architecture=vanilla` load a nanoVLM checkpoint as the single tower; without it, as a dual tower."""
    import shutil

    from dualtower.eval.lmms_plugin import _build_runner
    from dualtower.evaluate import build_parser, build_runner
    from dualtower.generate import build_parser as generate_parser
    from dualtower.generate import load_model

    source = tiny_model("vanilla")
    write_original(nanovlm_modules(source), source.cfg, tmp_path / "ckpt")
    for file in fast_tokenizer_dir(tmp_path).iterdir():
        shutil.copy(file, tmp_path / "ckpt")
    checkpoint, cpu = str(tmp_path / "ckpt"), torch.device("cpu")
    loaded = {
        "generate": load_model(generate_parser().parse_args(["--checkpoint", checkpoint]), cpu)[0],
        "generate vanilla": load_model(
            generate_parser().parse_args(["--checkpoint", checkpoint, "--architecture", "vanilla"]), cpu
        )[0],
        "evaluate vanilla": build_runner(
            build_parser().parse_args(["--model", checkpoint, "--device=cpu", "--model_args=architecture=vanilla"]),
            seed=0,
        ).model,
        "plugin vanilla": _build_runner(checkpoint, "cpu", None, None, 1, 0, "vanilla").model,
    }
    assert {name: model.cfg.architecture for name, model in loaded.items()} == {
        "generate": "dual_tower", "generate vanilla": "vanilla", "evaluate vanilla": "vanilla",
        "plugin vanilla": "vanilla",
    }
    assert_same_state(loaded["plugin vanilla"], source)


# -- recipes ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(MIRRORS))
def test_vanilla_recipes_mirror_the_dual_tower_recipes(name: str) -> None:
    vanilla = load_job_config(["--config", str(CONFIGS / f"{name}.toml")]).to_dict()
    dual = load_job_config(["--config", str(CONFIGS / f"{MIRRORS[name]}.toml")]).to_dict()
    assert flavor(vanilla["model"]["flavor"]).architecture == "vanilla"
    assert flavor(vanilla["model"]["flavor"]).lm == flavor(dual["model"]["flavor"]).lm
    assert vanilla["optim"]["lr_right"] == 0.0  # there is no right tower
    for config in (vanilla, dual):
        del config["job"], config["model"]["flavor"], config["optim"]["lr_right"]
    assert vanilla == dual


def test_vanilla_flavors_are_the_dual_flavors_without_a_right_tower() -> None:
    for name in ("debug", "135m", "360m"):
        vanilla, dual = flavor(f"vanilla-{name}"), flavor(name)
        assert vanilla == ModelConfig(**{**dual.__dict__, "architecture": "vanilla"})


@pytest.mark.slow
def test_vanilla_debug_recipe_learns_the_synthetic_task(tmp_path: Path) -> None:
    """The full vanilla debug recipe on a 2-core CPU: >= 90% held-out answer accuracy (as the dual tower)."""
    import subprocess
    import sys

    run_dir = tmp_path / "vanilla_debug"
    args = ["--config", str(CONFIGS / "vanilla_debug.toml"), f"--job.run_dir={run_dir}"]
    result = subprocess.run([sys.executable, str(MAIN), *args], capture_output=True, text=True, timeout=3600)
    assert result.returncode == 0, result.stderr[-3000:]
    records = read_metrics(run_dir)
    losses = [r["loss"] for r in records if "loss" in r]
    final = [r for r in records if "eval/accuracy" in r][-1]
    assert losses[-1] < losses[0] / 5
    assert final["eval/accuracy"] >= 0.9, final
