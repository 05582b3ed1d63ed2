"""Boundaries of generation and evaluation scoring that the other tests leave open (found by a mutation audit):
top-p at p = 0, a prefix-cache entry of exactly the byte budget, passes of exactly the tile budget, MMStar letter
extraction around answer phrases and word-final letters, unanswered rows, the max_new_tokens cap at an exact fit,
and a continuation with no text token before it."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch

from dualtower.batch import IGNORE_INDEX
from dualtower.data.document import Document
from dualtower.eval import mmstar
from dualtower.eval.offline import score_predictions
from dualtower.eval.runner import MAX_TILES_PER_FORWARD, EvalModel, _by_tile_budget, _extend
from dualtower.generation import PreparedPrompt, SamplingConfig
from dualtower.generation.left_batch import MAX_TILES_PER_LEFT_PASS, chunks_by_tiles
from dualtower.generation.prefix_cache import PrefixCache
from dualtower.generation.sampling import top_p_filter

# -- sampling -------------------------------------------------------------------------------------------------


def test_top_p_of_zero_still_keeps_the_most_likely_tokens() -> None:
    # No mass is < 0, so the rule keeps nothing on its own: the most likely tokens (a whole tie group) must still
    # survive, as the module promises. Without the floor of one kept token, the gather at index -1 would pick the
    # least likely logit as threshold and keep the whole vocabulary.
    logits = torch.tensor([[0.5, 3.0, -1.0, 3.0, 2.0], [-2.0, -1.5, 4.0, 0.0, 1.0]])
    kept = torch.isfinite(top_p_filter(logits, 0.0))
    assert kept.tolist() == [[False, True, False, True, False], [False, False, True, False, False]]


# -- prefix cache -----------------------------------------------------------------------------------------------


def test_an_entry_of_exactly_the_byte_budget_is_cached_and_evicts_the_rest() -> None:
    # "Beyond max_bytes" is what is refused: an entry that fills the budget exactly fits (after evicting the others).
    small, full = torch.zeros(3), torch.zeros(7)  # 12 and 28 bytes
    cache = PrefixCache(max_bytes=28)
    cache.put(("small", ""), small)
    cache.put(("full", ""), full)
    assert list(cache._entries) == [("full", "")]
    assert cache.stats.bytes_used == 28 and cache.stats.evictions == 1
    assert cache.get(("full", "")) is full


# -- left-tower passes ------------------------------------------------------------------------------------------


def prompt_with_tiles(tiles: int) -> PreparedPrompt:
    """Only the tile count matters to the grouping: 1x1 tiles and a one-token prefix."""
    return PreparedPrompt(torch.tensor([5, 6]), torch.zeros(tiles, 3, 1, 1), 1)


def test_left_tower_passes_fill_the_tile_budget_exactly_before_starting_a_new_one() -> None:
    # Prompts of 40 + 24 tiles fill one pass (64, the budget: "at most"); the next 1-tile prompt starts a second.
    # A third group of an oversized prompt (70 tiles) stands alone, as the one-prompt exception allows.
    counts = [40, MAX_TILES_PER_LEFT_PASS - 40, 1, 70, 3]
    prompts = [prompt_with_tiles(n) for n in counts]
    items = [(f"key{i}", [i]) for i in range(len(prompts))]
    groups = chunks_by_tiles(items, prompts)
    assert [[item[1][0] for item in group] for group in groups] == [[0, 1], [2], [3], [4]]


# -- MMStar answer extraction -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prediction", "letter"),
    [
        ("(B) The Answer is unclear", "B"),  # the capital A of "Answer" is inside the phrase, not after it
        ("Surely C. The Answer is unclear", "C"),
        ("It is (D), THE ANSWER IS clear", "D"),
    ],
)
def test_an_answer_phrase_only_counts_letters_after_it(prediction: str, letter: str) -> None:
    # The phrase candidate (rank 7) is the first letter *after* the phrase. Searching from the phrase's own start
    # would read the "A" of "Answer" / "ANSWER" as a phrase candidate, which outranks "(B)", "C." and "(D)".
    assert mmstar.extract_letter(prediction, "lmms-eval") == letter


@pytest.mark.parametrize(("prediction", "letter"), [("(B) is GOOD", "B"), ("It is (C), not BAD", "C")])
def test_a_letter_ending_a_word_is_not_a_standalone_end_letter(prediction: str, letter: str) -> None:
    # The "end" candidate (rank 9) is a letter standing alone at the end; the D closing "GOOD" / "BAD" is part of a
    # word and must not outrank the "(B)" or "(C)" parentheses.
    assert mmstar.extract_letter(prediction, "lmms-eval") == letter


def test_a_row_without_an_answer_scores_0_even_when_no_letter_is_extracted() -> None:
    # A null / blank answer and a prediction without a letter both give "": equal strings, but nothing was
    # answered correctly. (evaluate_mmstar_rows overwrites such rows; score_predictions is public on its own.)
    rows = [{"index": i, "answer": answer, "category": "X", "l2_category": "x"} for i, answer in enumerate([None, " "])]
    samples = score_predictions(rows, ["no idea", "   "])
    assert [(s["extracted"], s["answer"], s["score"]) for s in samples] == [("", "", 0.0), ("", "", 0.0)]


# -- evaluation: the max_new_tokens cap ---------------------------------------------------------------------------


def test_max_new_tokens_that_exactly_fill_the_positions_are_not_capped(caplog: pytest.LogCaptureFixture) -> None:
    # A 6-token prompt in a 10-position model leaves room for 4 new tokens: asking for exactly 4 is within the
    # positions (no cap, no warning); 5 is capped to 4 with a warning. Only the config's limit is read.
    fake = SimpleNamespace(cfg=SimpleNamespace(lm=SimpleNamespace(max_position_embeddings=10)))
    prepared = [PreparedPrompt(torch.arange(3, 9), torch.zeros(0, 3, 1, 1), 0)]
    fits = SamplingConfig(max_new_tokens=4)
    with caplog.at_level(logging.WARNING, logger="dualtower.eval.runner"):
        assert EvalModel._within_positions(fake, prepared, fits) is fits  # type: ignore[arg-type]
    assert "capped" not in caplog.text
    with caplog.at_level(logging.WARNING, logger="dualtower.eval.runner"):
        capped = EvalModel._within_positions(fake, prepared, SamplingConfig(max_new_tokens=5))  # type: ignore[arg-type]
    assert capped.max_new_tokens == 4 and "max_new_tokens 5 capped to 4" in caplog.text


def test_log_likelihood_forwards_fill_the_tile_budget_exactly_before_starting_a_new_one() -> None:
    # As for the left-tower passes: documents of 50 + 14 tiles fill one forward (64, "at most"); the next starts a
    # new group, and a document over the budget forms a group of its own. Only `num_tiles` is read.
    counts = [50, MAX_TILES_PER_FORWARD - 50, 2, 65, 0]
    items = [(i, SimpleNamespace(num_tiles=n)) for i, n in enumerate(counts)]
    groups = _by_tile_budget(items, MAX_TILES_PER_FORWARD)  # type: ignore[arg-type]
    assert [[i for i, _ in group] for group in groups] == [[0, 1], [2], [3], [4]]


def test_a_continuation_right_after_the_prefix_is_refused() -> None:
    # The log-likelihood of the first continuation token is read from the hidden state of the token before it,
    # which must be a text token (the right tower's): right after a 3-token prefix there is none.
    prefix_only = Document(torch.tensor([4, 5, 6]), torch.full((3,), IGNORE_INDEX), torch.zeros(0, 3, 1, 1), 3)
    with pytest.raises(ValueError, match="at least one text token"):
        _extend(prefix_only, [], [7, 8])
    # One context (text) token in between is enough: its label is the first continuation token.
    extended = _extend(prefix_only, [9], [7, 8])
    assert extended.input_ids.tolist() == [4, 5, 6, 9, 7, 8]
    assert extended.labels.tolist() == [IGNORE_INDEX] * 3 + [7, 8, IGNORE_INDEX]
