"""Sampling with Hugging Face conventions on crafted logits: support, order of operations, seeds, statistics."""

from __future__ import annotations

import math

import pytest
import torch

from dualtower.generation.sampling import SamplingConfig, make_generator, sample, sampling_probs

PROBS = [0.5, 0.3, 0.15, 0.05]


def logits_of(probs: list[float], rows: int = 1) -> torch.Tensor:
    return torch.tensor([math.log(p) for p in probs]).repeat(rows, 1)


def support(logits: torch.Tensor, **config: float) -> set[int]:
    probs = sampling_probs(logits, SamplingConfig(do_sample=True, **config))
    return set(torch.nonzero(probs[0] > 0).flatten().tolist())


def test_greedy_is_argmax() -> None:
    logits = torch.randn(6, 1000)
    assert torch.equal(sample(logits, SamplingConfig(do_sample=False)), logits.argmax(-1))


def test_top_k_keeps_the_k_largest_and_ties() -> None:
    assert support(torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0]]), top_k=2, top_p=1.0, temperature=1.0) == {0, 1}
    assert support(torch.tensor([[5.0, 4.0, 4.0, 1.0]]), top_k=2, top_p=1.0, temperature=1.0) == {0, 1, 2}
    assert support(torch.tensor([[1.0, 2.0, 3.0]]), top_k=0, top_p=1.0, temperature=1.0) == {0, 1, 2}


@pytest.mark.parametrize(
    ("top_p", "expected"),
    [(0.45, {0}), (0.6, {0, 1}), (0.79, {0, 1}), (0.81, {0, 1, 2}), (0.97, {0, 1, 2, 3}), (1.0, {0, 1, 2, 3})],
)
def test_top_p_keeps_the_token_that_crosses_p(top_p: float, expected: set[int]) -> None:
    # Mass before each token: 0, 0.5, 0.8, 0.95. The original dropped the crossing token ({0} at p = 0.6).
    assert support(logits_of(PROBS), top_p=top_p, top_k=0, temperature=1.0) == expected


def test_temperature_is_applied_before_filtering() -> None:
    logits = logits_of(PROBS)
    # Filtering first (the original) would keep {0, 1} at p = 0.7 whatever the temperature.
    assert support(logits, top_p=0.7, top_k=0, temperature=1.0) == {0, 1}
    assert support(logits, top_p=0.7, top_k=0, temperature=0.25) == {0}  # sharper: 0.878 >= 0.7 on its own
    assert support(logits, top_p=0.7, top_k=0, temperature=4.0) == {0, 1, 2}  # flatter: 0.30, 0.27, 0.22


def test_top_k_then_top_p_renormalizes_over_the_top_k() -> None:
    # After top-k = 2 the probabilities are 0.625 / 0.375 (0.5 / 0.3 before renormalizing).
    assert support(logits_of(PROBS), top_k=2, top_p=0.55, temperature=1.0) == {0}
    assert support(logits_of(PROBS), top_k=2, top_p=0.65, temperature=1.0) == {0, 1}
    assert support(logits_of(PROBS), top_k=3, top_p=0.99, temperature=1.0) == {0, 1, 2}


def test_draws_stay_in_the_support_and_follow_the_distribution() -> None:
    logits = logits_of(PROBS, rows=20000)
    config = SamplingConfig(do_sample=True, temperature=1.0, top_k=3, top_p=1.0)
    tokens = sample(logits, config, make_generator(0, torch.device("cpu")))
    counts = torch.bincount(tokens, minlength=4).double() / tokens.numel()
    expected = sampling_probs(logits[:1], config)[0].double()
    assert counts[3] == 0
    # Binomial standard error at 20000 draws is <= 0.0036; 0.015 is four of them.
    assert torch.allclose(counts, expected, atol=0.015), (counts, expected)


def test_a_seed_reproduces_the_tokens() -> None:
    logits = torch.randn(8, 500)
    config = SamplingConfig(do_sample=True, temperature=1.5, top_k=100, top_p=0.95)
    first = sample(logits, config, make_generator(7, torch.device("cpu")))
    again = sample(logits, config, make_generator(7, torch.device("cpu")))
    other = sample(logits, config, make_generator(8, torch.device("cpu")))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_zero_probability_tokens_are_never_drawn() -> None:
    logits = torch.full((4096, 50), float("-inf"))
    logits[:, 7] = 0.0
    tokens = sample(logits, SamplingConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0))
    assert torch.all(tokens == 7)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_new_tokens": 0},
        {"do_sample": True, "temperature": 0.0},
        {"do_sample": True, "top_p": 0.0},
        {"stop_strings": ("",)},
    ],
)
def test_invalid_configs_are_rejected(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        SamplingConfig(**kwargs)


@pytest.mark.parametrize(
    ("logits", "top_p", "expected"),
    [
        ([2.0, 1.0, 1.0, 1.0, -5.0], 0.6, {0, 1, 2, 3}),  # mass strictly above each tied token: 0.475 < 0.6
        ([2.0, 1.0, 1.0, 1.0, -5.0], 0.4, {0}),  # 0.475 >= 0.4: the whole tie group goes
        ([0.0, 0.0, 0.0, 0.0], 0.5, {0, 1, 2, 3}),  # nothing is strictly more likely than a uniform token
        ([3.0, 3.0, 0.0], 0.01, {0, 1}),  # tied maxima all survive a tiny p
        ([-5.0, 1.0, 2.0, 1.0, 1.0], 0.6, {1, 2, 3, 4}),  # the order of the vocabulary does not matter
    ],
)
def test_top_p_keeps_or_removes_tied_tokens_together(logits: list[float], top_p: float, expected: set[int]) -> None:
    assert support(torch.tensor([logits]), top_p=top_p, top_k=0, temperature=1.0) == expected


def test_top_p_follows_its_rule_on_tie_heavy_logits() -> None:
    """The docstring's rule, computed literally: kept iff the mass of the strictly more likely tokens is < p."""
    generator = torch.Generator().manual_seed(0)
    logits = (torch.randn(64, 40, generator=generator) * 1.5).round()  # few distinct values: many ties
    for top_p in (0.3, 0.5, 0.9):
        config = SamplingConfig(do_sample=True, temperature=1.0, top_k=0, top_p=top_p)
        probs = logits.softmax(dim=-1)
        more_likely = probs[:, None, :] > probs[:, :, None]  # [b, i, j]: token j strictly more likely than i
        expected = (probs[:, None, :] * more_likely).sum(dim=-1) < top_p
        assert torch.equal(sampling_probs(logits, config) > 0, expected), top_p


def test_top_k_keeps_each_rows_own_k_largest_on_tie_heavy_logits() -> None:
    """Every row has its own k-th largest value: kept iff a logit is >= it (ties with it survive)."""
    generator = torch.Generator().manual_seed(1)
    logits = (torch.randn(64, 40, generator=generator) * 1.5).round()  # few distinct values: many ties
    for top_k in (1, 3, 7):
        config = SamplingConfig(do_sample=True, temperature=1.0, top_k=top_k, top_p=1.0)
        expected = logits >= logits.topk(top_k, dim=-1).values[:, -1:]
        kept = sampling_probs(logits, config) > 0
        assert torch.equal(kept, expected), top_k
        assert (kept.sum(-1) >= top_k).all() and len(set(kept.sum(-1).tolist())) > 1  # ties widen some rows


def test_top_k_of_two_different_rows() -> None:
    # Row 0's 2nd largest (4) would also keep the 5 of row 1.
    logits = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 9.0, 8.0, 5.0]])
    kept = sampling_probs(logits, SamplingConfig(do_sample=True, temperature=1.0, top_k=2, top_p=1.0)) > 0
    assert [set(torch.nonzero(row).flatten().tolist()) for row in kept] == [{0, 1}, {2, 3}]


def test_top_p_drops_a_token_whose_more_likely_mass_equals_p_exactly() -> None:
    # In fp32 the sorted cumulative mass is exactly 0.5, 0.75, 1.0: token 1 has mass 0.5 before it, not < 0.5.
    logits = torch.tensor([[math.log(0.5), math.log(0.25), math.log(0.25)]])
    assert support(logits, top_p=0.5, top_k=0, temperature=1.0) == {0}
    assert support(logits, top_p=0.5000001, top_k=0, temperature=1.0) == {0, 1, 2}  # the tie group goes together


def test_a_single_stop_string_is_one_stop_string_not_its_characters() -> None:
    """transformers accepts `stop_strings="..."`; tuple("\\n\\nQ:") would stop at any newline, Q or colon."""
    assert SamplingConfig(stop_strings="\n\nQ:").stop_strings == ("\n\nQ:",)
    assert SamplingConfig(stop_strings=["a", "bc"]).stop_strings == ("a", "bc")
    with pytest.raises(ValueError, match="stop strings must be non-empty"):
        SamplingConfig(stop_strings="")
