"""A checkpoint saved by the original DualTowerVLM code, answered by `python -m dualtower.generate`, prints the
greedy text of the original algorithm: every new token from a full recomputation with dense masks (the right
tower over the whole sequence with the prefix K/V replaced, tests/model_helpers.py), stopped at EOS and decoded
with skip_special_tokens as the original's callers do. The decode benchmark's baseline
(benchmarks/original_generate.py) gives the same tokens, and half-precision original checkpoints load."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from model_helpers import original_text_hidden
from PIL import Image
from test_hub import original_modules, write_original

from dualtower.batch import PackedBatch
from dualtower.generate import main
from dualtower.generation.requests import GenerationRequest, prepare_requests
from dualtower.model import DualTowerVLM
from dualtower.model.config import LMConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import original_generate as baseline
from bench_decode import make_prompt

EOS = 2
NEW_TOKENS = 12


def one_document_batch(prefix_ids: torch.Tensor, text_ids: torch.Tensor, tiles: torch.Tensor, image_id: int):
    n_prefix, n_text = prefix_ids.numel(), text_ids.numel()
    labels = torch.full((n_text,), -100, dtype=torch.long)
    return PackedBatch(
        prefix_ids=prefix_ids,
        text_ids=text_ids,
        labels=labels,
        cu_prefix=torch.tensor([0, n_prefix], dtype=torch.int32),
        cu_text=torch.tensor([0, n_text], dtype=torch.int32),
        prefix_positions=torch.arange(n_prefix),
        text_positions=torch.arange(n_prefix, n_prefix + n_text),
        pixel_values=tiles,
        tiles_per_doc=torch.tensor([tiles.shape[0]]),
        image_token_index=(prefix_ids == image_id).nonzero().flatten(),
        doc_row=torch.zeros(1, dtype=torch.long),
        max_prefix_len=n_prefix,
        max_text_len=n_text,
        num_rows=1,
        row_capacity=n_prefix + n_text,
        num_supervised=0,
    )


@torch.no_grad()
def original_greedy(model: DualTowerVLM, prompt, new_tokens: int) -> list[int]:
    text, generated = prompt.text_ids.clone(), []
    head = model.text_decoder.head.weight
    for _ in range(new_tokens):
        batch = one_document_batch(prompt.prefix_ids, text, prompt.tiles, model.cfg.image_token_id)
        token = int((original_text_hidden(model, batch)[-1] @ head.t()).argmax())
        generated.append(token)
        if token == EOS:
            break
        text = torch.cat([text, torch.tensor([token])])
    return generated


@pytest.fixture(scope="module")
def tokenizer():
    from dualtower.tokenizer import load_tokenizer

    return load_tokenizer()


def test_original_checkpoint_generates_the_original_greedy_text(tmp_path, capsys, tokenizer) -> None:
    torch.manual_seed(0)
    model = DualTowerVLM.from_flavor("debug").eval()
    with torch.no_grad():  # a random init answers with one repeated token; larger weights give varied text
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.2)
    checkpoint = write_original(original_modules(model), model.cfg, tmp_path / "original")
    image_path = tmp_path / "image.png"
    Image.new("RGB", (300, 140), (200, 30, 40)).save(image_path)
    question = "What color is the shape?"

    prompt = prepare_requests([GenerationRequest(images=[Image.open(image_path)], prompt=question)], tokenizer,
                              model.cfg)[0]  # fmt: skip
    expected_ids = original_greedy(model, prompt, NEW_TOKENS)
    assert len(set(expected_ids)) > 2, expected_ids  # the comparison must not be between two constant strings
    expected = tokenizer.decode(expected_ids, skip_special_tokens=True)

    argv = ["--checkpoint", checkpoint, "--image", image_path, "--prompt", question, "--device", "cpu",
            "--max_new_tokens", NEW_TOKENS, "--dtype", "float32"]  # fmt: skip
    assert main([str(a) for a in argv]) == 0
    assert capsys.readouterr().out.strip() == expected.strip()  # the CLI prints each answer stripped


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_original_checkpoint_loads(tmp_path, dtype) -> None:
    """The original saves its persistent inv_freq buffers in the model's dtype. In fp16 the lowest frequencies
    of SmolLM2's 64-wide heads at theta 1e5 (down to 1.4e-5) are subnormal, rounded to a fixed 6e-8 step: more
    than one unit of relative precision, yet the very frequencies the config describes."""
    from test_hub import assert_same_state, tiny_config

    cfg = tiny_config()
    cfg.lm = LMConfig(hidden_dim=128, inter_dim=64, n_heads=2, n_kv_heads=1, n_blocks=1, base_vocab_size=200)
    model = DualTowerVLM.from_config(cfg.validate()).eval()
    assert model.cfg.lm.head_dim == 64 and model.cfg.lm.rope_theta == 1e5  # SmolLM2's
    write_original(original_modules(model).to(dtype), model.cfg, tmp_path)  # casts `model` too
    loaded = DualTowerVLM.from_pretrained(tmp_path)
    assert_same_state(loaded, model)
    assert loaded.left_decoder.rotary.inv_freq.dtype == torch.float32


def test_benchmark_baseline_generates_the_original_greedy_tokens(monkeypatch) -> None:
    """benchmarks/original_generate.py (bench_decode's baseline) is the original's loop: every row's tokens equal
    the full recomputation's, and it runs one right-tower step per new token, the last one thrown away."""
    torch.manual_seed(0)
    model = DualTowerVLM.from_flavor("debug").eval().requires_grad_(False)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.2)
    prompts = [make_prompt(model, 2, 9, seed=seed) for seed in range(2)]
    steps = []
    decode_step = baseline._decode_step
    monkeypatch.setattr(baseline, "_decode_step", lambda *args: steps.append(1) or decode_step(*args))
    tokens, _, _ = baseline.original_generate(model, baseline.original_batch(prompts, torch.device("cpu")), 8)
    expected = [original_greedy(model, prompt, 8) for prompt in prompts]
    assert all(len(set(row)) > 2 and EOS not in row for row in expected), expected
    assert tokens.tolist() == expected
    assert len(steps) == 8
