"""bf16 / fp16 paths on the CPU: the model, the generation engine and mixed-precision training against fp64.

The yardstick for "only the precision bf16 implies" is transformers' own Llama / SigLIP run in the same dtype
on the same weights: ours may not be more than a small multiple of their error against the fp64 result.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from test_generation import RAGGED, greedy, make_prompt, teacher_forced_logits, varied_debug_model
from test_hf_parity import PARITY_VISION, packed_logits, perturb, tiny_llama
from transformers import SiglipVisionConfig, SiglipVisionModel

from dualtower.adapters import load_language_model, load_siglip_vision
from dualtower.adapters.common import load_into
from dualtower.generation import Generator
from dualtower.model import DualTowerVLM
from dualtower.model.vision import VisionTransformer

LOW = [torch.bfloat16, torch.float16]
# Ours against fp64 may be at most this multiple of transformers' error against fp64 (measured ratios: 0.9-1.1).
ERROR_RATIO = 2.0


def max_error(got: torch.Tensor, reference: torch.Tensor) -> float:
    return (got.double() - reference.double()).abs().max().item()


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_lm_in_low_precision_is_as_close_to_fp64_as_transformers_llama(tmp_path: Path, dtype: torch.dtype) -> None:
    """Positions up to 199: a RoPE table built in bf16 would be off by radians there, far beyond the ratio."""
    hf = tiny_llama()
    hf.save_pretrained(tmp_path)
    ours = load_language_model(tmp_path).eval()
    generator = torch.Generator().manual_seed(1)
    sequences = [torch.randint(0, 300, (n,), generator=generator) for n in (200, 7, 60)]
    with torch.no_grad():
        reference = torch.cat([hf.double()(s[None]).logits[0] for s in sequences])
        low_hf = copy.deepcopy(hf).to(dtype)
        hf_logits = torch.cat([low_hf(s[None]).logits[0] for s in sequences])
    low_ours = ours.to(dtype)
    assert low_ours.rotary.inv_freq.dtype == torch.float32
    ours_logits = packed_logits(low_ours, sequences)[:, :300]
    assert ours_logits.dtype == dtype
    hf_error = max_error(hf_logits, reference)
    assert 0 < max_error(ours_logits, reference) <= ERROR_RATIO * hf_error


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_vit_in_low_precision_is_as_close_to_fp64_as_transformers_siglip(tmp_path: Path, dtype: torch.dtype) -> None:
    hf = SiglipVisionModel(SiglipVisionConfig(**PARITY_VISION)).eval()
    perturb(hf)
    hf.save_pretrained(tmp_path)
    cfg, state = load_siglip_vision(tmp_path)
    ours = VisionTransformer(cfg).eval()
    load_into(ours, state, "test")
    pixels = torch.rand(3, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        reference = hf.double()(pixel_values=pixels).last_hidden_state
        hf_out = hf.to(dtype)(pixel_values=pixels.to(dtype)).last_hidden_state
        got = ours.to(dtype)(pixels.to(dtype))
    assert got.dtype == dtype
    assert 0 < max_error(got, reference) <= ERROR_RATIO * max_error(hf_out, reference)


@pytest.fixture(scope="module")
def model() -> DualTowerVLM:
    return varied_debug_model()


@pytest.fixture(scope="module")
def prompts(model: DualTowerVLM) -> list:
    return [make_prompt(model, *shape, seed=index) for index, shape in enumerate(RAGGED)]


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_low_precision_cached_decode_equals_teacher_forced_recomputation(model, prompts, dtype) -> None:
    """The engine's K/V cache, prefix K/V and logits in bf16 / fp16 against a full recomputation in that dtype:
    logits within two units in the last place of the largest logit (|logit| < 64 here), and every chosen token
    a maximum of the recomputed logits up to that (bf16 rounds near-ties into exact ties, broken either way)."""
    low = copy.deepcopy(model).to(dtype)
    results = Generator(low, eos_token_ids=()).generate_prepared(prompts, greedy(5), return_logits=True)
    expected = teacher_forced_logits(low, prompts, [r.token_ids for r in results])
    ulp = 64 * torch.finfo(dtype).eps
    for result, reference in zip(results, expected, strict=True):
        assert result.logits.dtype == torch.float32  # what the sampler gets
        chosen = reference.gather(1, torch.tensor(result.token_ids)[:, None]).squeeze(1)
        assert (chosen >= reference.amax(-1) - 2 * ulp).all()
        assert max_error(result.logits, reference) <= 2 * ulp


def test_a_generator_follows_its_model_to_another_dtype(model, prompts) -> None:
    """A Generator kept across `model.to(bfloat16)`: its K/V cache takes the new dtype and the prefix K/V it
    cached for the fp32 weights are not served (Module.to replaces the data without bumping the version)."""
    model = copy.deepcopy(model)
    engine = Generator(model, eos_token_ids=())
    engine.generate_prepared(prompts, greedy(3))
    model.to(torch.bfloat16)
    kept = engine.generate_prepared(prompts, greedy(3), return_logits=True)
    fresh = Generator(model, eos_token_ids=()).generate_prepared(prompts, greedy(3), return_logits=True)
    assert engine._cache.all_keys.dtype == torch.bfloat16
    for a, b in zip(kept, fresh, strict=True):
        assert a.token_ids == b.token_ids
        torch.testing.assert_close(a.logits, b.logits, atol=0, rtol=0)


def test_generation_under_bf16_autocast_matches_the_fp32_model_to_bf16_precision(model, prompts) -> None:
    """An fp32 model generating inside the caller's bf16 autocast (as training evaluates): the bf16 K/V the
    blocks produce go into the fp32 cache, and the logits stay within bf16 error of the fp32 ones."""
    expected = Generator(model, eos_token_ids=()).generate_prepared(prompts, greedy(1), return_logits=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = Generator(model, eos_token_ids=()).generate_prepared(prompts, greedy(4), return_logits=True)
    bf16_model = copy.deepcopy(model).to(torch.bfloat16)
    bf16 = Generator(bf16_model, eos_token_ids=()).generate_prepared(prompts, greedy(1), return_logits=True)
    for autocast_row, fp32_row, bf16_row in zip(got, expected, bf16, strict=True):
        assert len(autocast_row.token_ids) == 4
        # The first token's logits (the prefill): no further from fp32 than a whole-bf16 model's, plus an ulp.
        error = max_error(autocast_row.logits[0], fp32_row.logits[0])
        assert error <= max_error(bf16_row.logits[0], fp32_row.logits[0]) + 64 * torch.finfo(torch.bfloat16).eps


def test_prefix_kv_cached_under_autocast_are_stored_in_the_models_dtype_and_not_served_without_it(
    model, prompts
) -> None:
    """K/V made under bf16 autocast are stored as fp32 (the model's dtype), but a later call without autocast
    does not read them: a prefix-cache hit must return exactly the uncached output, and bf16-rounded K/V would
    not."""
    engine = Generator(model, eos_token_ids=())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        engine.generate_prepared(prompts, greedy(2))
    assert all(entry.dtype == torch.float32 for entry in engine.prefix_cache._entries.values())
    with_images = [prompt for prompt in prompts if prompt.prefix_len]
    cached = engine.generate_prepared(with_images, greedy(2), return_logits=True)
    assert engine.stats.prefix_cache_hits == 0 and engine.stats.vision_tower_runs > 0
    fresh = Generator(model, eos_token_ids=()).generate_prepared(with_images, greedy(2), return_logits=True)
    for a, b in zip(cached, fresh, strict=True):
        assert a.token_ids == b.token_ids and torch.equal(a.logits, b.logits)
