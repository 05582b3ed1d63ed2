"""Edges of the generation engine against independent slow twins: ragged greedy stops, the vanilla architecture,
cache reuse across batch sizes and dtypes, position limits, and the sampled distribution."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from test_generation import make_prompt, teacher_forced_logits, varied_debug_model

from dualtower.generation import Generator, SamplingConfig, csrc_sampler
from dualtower.generation import engine as engine_module
from dualtower.generation.sampling import make_generator, sample
from dualtower.model import DualTowerVLM

RAGGED = [(1, 0, 5), (0, 0, 3), (2, 1, 7), (0, 0, 1)]


@pytest.fixture(scope="module", params=["dual_tower", "vanilla"])
def model(request) -> DualTowerVLM:
    return varied_debug_model("debug" if request.param == "dual_tower" else "vanilla-debug")


@pytest.fixture(scope="module")
def prompts(model):
    return [make_prompt(model, *shape, seed=10 + i) for i, shape in enumerate(RAGGED)]


def greedy_twin(model, prompt, steps: int, eos: set[int]) -> list[int]:
    """Greedy by full recomputation at every step: argmax of the last teacher-forced logits."""
    out: list[int] = []
    for _ in range(steps):
        logits = teacher_forced_logits(model, [prompt], [[*out, 0]])[0]
        out.append(int(logits[-1].argmax()))
        if out[-1] in eos:
            break
    return out


def test_ragged_greedy_with_eos_equals_full_recomputation_at_every_step(model, prompts) -> None:
    free = Generator(model, eos_token_ids=()).generate_prepared(prompts, SamplingConfig(max_new_tokens=6))
    # EOS: row 0's first token (row 0 ends at step 1) and a token new in some row at step 3 or 4 (mid-sequence).
    first = free[0].token_ids[0]
    mid = next(
        ids[i]
        for ids in (r.token_ids for r in free[1:])
        for i in (2, 3)
        if first not in ids[: i + 1] and ids[i] not in ids[:i]
    )
    eos = {first, mid}
    for sync_every in (1, 3):
        engine = Generator(model, eos_token_ids=tuple(eos), sync_every=sync_every)
        results = engine.generate_prepared(prompts, SamplingConfig(max_new_tokens=6))
        for prompt, result in zip(prompts, results, strict=True):
            expected = greedy_twin(model, prompt, 6, eos)
            assert result.token_ids == expected, sync_every
            assert result.finish_reason == ("eos" if expected[-1] in eos else "length")
    lengths = sorted(len(r.token_ids) for r in results)
    assert lengths[0] == 1 and lengths[-1] == 6 and any(1 < n < 6 for n in lengths), lengths  # ragged stops


@pytest.mark.parametrize("order", ["big_first", "small_first"])
def test_one_engine_across_batch_sizes_and_dtypes_equals_fresh_engines(model, prompts, order: str) -> None:
    local = copy.deepcopy(model)
    engine = Generator(local, eos_token_ids=())
    calls = [prompts, prompts[1:3], prompts[:1]]
    if order == "small_first":
        calls = calls[::-1]
    for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float32):
        local.to(dtype)
        assert engine.dtype == dtype and engine.device.type == "cpu"
        for batch in calls:
            ours = engine.generate_prepared(batch, SamplingConfig(max_new_tokens=4), return_logits=True)
            fresh = Generator(local, eos_token_ids=(), prefix_cache_bytes=0).generate_prepared(
                batch, SamplingConfig(max_new_tokens=4), return_logits=True
            )
            for a, b in zip(ours, fresh, strict=True):
                assert a.token_ids == b.token_ids, dtype
                torch.testing.assert_close(a.logits, b.logits, atol=0, rtol=0)


@pytest.mark.parametrize("delta", [-1, 0, 1])
def test_prompt_plus_max_new_tokens_at_the_position_limit(model, prompts, monkeypatch, delta: int) -> None:
    prompt = prompts[2]
    length = prompt.input_ids.numel()
    limit = length + 5 + delta
    monkeypatch.setattr(model.cfg.lm, "max_position_embeddings", limit)
    engine = Generator(model, eos_token_ids=())
    if delta < 0:
        with pytest.raises(ValueError, match="exceed"):
            engine.generate_prepared([prompt], SamplingConfig(max_new_tokens=5))
        return
    result = engine.generate_prepared([prompt], SamplingConfig(max_new_tokens=5))[0]
    assert len(result.token_ids) == 5
    assert engine._cache.capacity <= limit


def sampling_twin(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Explicit softmax / sort / cumsum in float64, one row at a time (HF order: temperature, top-k, top-p)."""
    out = []
    for row in logits.double():
        scores = row / temperature
        if 0 < top_k < scores.numel():
            kth = sorted(scores.tolist(), reverse=True)[top_k - 1]
            scores = torch.where(scores >= kth, scores, torch.tensor(-math.inf, dtype=scores.dtype))
        probs = scores.softmax(-1)
        if top_p < 1:
            keep = torch.zeros_like(probs, dtype=torch.bool)
            for i in range(probs.numel()):
                keep[i] = probs[probs > probs[i]].sum() < top_p
            keep[probs.argmax()] = True
            probs = torch.where(keep, probs, 0.0)
            probs = probs / probs.sum()
        out.append(probs)
    return torch.stack(out)


@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p"),
    [(1.0, 0, 1.0), (0.7, 3, 1.0), (1.3, 0, 0.8), (0.5, 4, 0.9), (2.0, 6, 1e-6), (1.0, 100, 0.999)],
)
def test_draws_follow_the_explicit_twin_distribution(temperature: float, top_k: int, top_p: float) -> None:
    generator = torch.Generator().manual_seed(5)
    base = torch.randn(2, 8, generator=generator) * 1.2
    base[1, 3] = base[1, 5] = base[1].max() + 0.1  # a tie at the top
    draws = 40000
    logits = base.repeat_interleave(draws, dim=0)
    config = SamplingConfig(do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p)
    tokens = sample(logits, config, make_generator(11, torch.device("cpu"))).view(2, draws)
    expected = sampling_twin(base, temperature, top_k, top_p)
    for row in range(2):
        counts = torch.bincount(tokens[row], minlength=8).double()
        zero = expected[row] == 0
        assert counts[zero].sum() == 0, (row, counts, expected[row])
        e = expected[row][~zero] * draws
        chi2 = float(((counts[~zero] - e) ** 2 / e).sum())
        dof = int((~zero).sum()) - 1
        # 99.99th percentile of chi-square with <= 7 dof is < 30.
        assert dof == 0 or chi2 < 30, (row, chi2, counts, e)


def test_a_prefix_cached_under_autocast_is_not_served_to_a_call_without_it(model, prompts) -> None:
    """Under the caller's bf16 autocast the left tower computes bf16 K/V; a later fp32 call (and the reverse)
    must get what an uncached engine computes, not the other precision's cached entry."""
    config = SamplingConfig(max_new_tokens=3)
    engine = Generator(model, eos_token_ids=())
    uncached = lambda: Generator(model, eos_token_ids=(), prefix_cache_bytes=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        engine.generate_prepared(prompts, config)
    plain = engine.generate_prepared(prompts, config, return_logits=True)
    expected = uncached().generate_prepared(prompts, config, return_logits=True)
    for ours, theirs in zip(plain, expected, strict=True):
        torch.testing.assert_close(ours.logits, theirs.logits, atol=0, rtol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = engine.generate_prepared(prompts, config, return_logits=True)
        expected = uncached().generate_prepared(prompts, config, return_logits=True)
    for ours, theirs in zip(mixed, expected, strict=True):
        torch.testing.assert_close(ours.logits, theirs.logits, atol=0, rtol=0)


def test_an_engine_made_on_cuda_follows_its_model_to_the_cpu(model, prompts, monkeypatch) -> None:
    """`device` is read from the model at every use; the CUDA graph and the fused sampler chosen at construction
    must not be used once the model lives on the CPU. Construction on CUDA is simulated."""
    def cuda_only(logits, config, generator=None):
        assert logits.is_cuda, "the fused sampler ran on CPU tensors"
        return logits.argmax(-1)

    monkeypatch.setattr(csrc_sampler, "sampler_for", lambda device: cuda_only)
    with monkeypatch.context() as patch:
        patch.setattr(engine_module.Generator, "device", property(lambda self: torch.device("cuda")))
        engine = Generator(model, eos_token_ids=(), compile=False, sampler="csrc")
    assert engine.cuda_graph and engine.device.type == "cpu"
    config = SamplingConfig(max_new_tokens=3)
    moved = engine.generate_prepared(prompts, config, return_logits=True)
    plain = Generator(model, eos_token_ids=()).generate_prepared(prompts, config, return_logits=True)
    for ours, theirs in zip(moved, plain, strict=True):
        assert ours.token_ids == theirs.token_ids
        torch.testing.assert_close(ours.logits, theirs.logits, atol=0, rtol=0)


@pytest.mark.parametrize("sync_every", [0, -3])
def test_a_sync_interval_below_one_is_refused(model, sync_every: int) -> None:
    with pytest.raises(ValueError, match="sync_every must be >= 1"):
        Generator(model, eos_token_ids=(), sync_every=sync_every)
