"""MMStar letter extraction, scoring, prompt formatting and generation-kwargs handling (no model)."""

from __future__ import annotations

import pytest

from dualtower.eval import mmstar
from dualtower.eval.offline import _limit_count, score_predictions
from dualtower.eval.prompts import format_prompt
from dualtower.eval.runner import (
    cut_at_stop,
    flatten_visuals,
    gen_kwargs_key,
    parse_gen_kwargs,
    sampling_from_gen_kwargs,
)


@pytest.mark.parametrize(
    ("prediction", "ranked", "first_letter"),
    [
        ("A", "A", "A"),
        ("b.", "", "B"),  # the ranked rule only knows upper-case letters
        ("B.", "B", "B"),
        ("(C) a cat", "C", "C"),
        ("The answer is D", "D", "D"),
        ("The answer is (A).", "A", ""),  # first-letter needs the letter right after "the answer is "
        ("option b", "", "B"),
        ("Answer: B", "B", "A"),  # first-letter reads the "a" of "Answer"
        ("apple", "", "A"),  # gibberish starting with a-d scores with the first-letter rule
        ("Bob", "B", "B"),  # ranked: not a standalone start, so the fallback finds the bare B
        ("I think it is B, not A", "A", ""),  # ranked: the standalone end letter outranks "B "
        ("C: 3 shapes", "C", "C"),
        ("D) left", "D", "D"),
        ("", "", ""),
        ("   ", "", ""),
        ("xyz", "", ""),
        ("E", "", ""),  # not one of MMStar's A-D
        ("'A'", "A", ""),  # quotes are stripped by the ranked rule
        # Equal ranks: the later position wins (lmms-eval sorts by (rank, position), descending).
        ("(A) or (B)", "B", "A"),  # two "parentheses" candidates
        ("I choose A or B, maybe", "B", ""),  # two "phrase" candidates (the "A " / "B" space ranks lower)
        # lmms-eval's phrase rule takes each letter's first occurrence after the phrase, inside words too: the
        # D of "BAD" is the latest phrase candidate and outranks "(C)". Kept as lmms-eval scores it.
        ("I pick (C), not BAD", "D", ""),
    ],
)
def test_letter_extraction_rules(prediction, ranked, first_letter):
    assert mmstar.extract_letter(prediction, "lmms-eval") == ranked
    assert mmstar.extract_letter(prediction, "first-letter") == first_letter


def test_unknown_rule_is_an_error():
    with pytest.raises(ValueError, match="first-letter"):
        mmstar.extract_letter("A", "regex")


def test_score_is_mean_of_l2_category_means():
    rows = [
        {"category": "X", "l2_category": "a", "score": 1},
        {"category": "X", "l2_category": "a", "score": 0},
        {"category": "X", "l2_category": "b", "score": 1},
        {"category": "Y", "l2_category": "c", "score": 0},
        {"category": "Y", "l2_category": "c", "score": 0},
        {"category": "Y", "l2_category": "c", "score": 1},
        {"category": "Y", "l2_category": "c", "score": 1},
    ]
    results = mmstar.score_rows(rows)
    assert results["X"] == pytest.approx((0.5 + 1.0) / 2)
    assert results["Y"] == pytest.approx(0.5)
    assert results["average"] == pytest.approx((0.5 + 1.0 + 0.5) / 3)  # not the row mean 4/7
    assert results["l2_category"] == {"a": 0.5, "b": 1.0, "c": 0.5}
    assert results["counts"] == {"a": 2, "b": 1, "c": 4}
    with pytest.raises(ValueError):
        mmstar.score_rows([])


def test_score_predictions_strips_and_extracts():
    rows = [
        {"index": 0, "answer": "A", "category": "X", "l2_category": "a"},
        {"index": 1, "answer": " b ", "category": "X", "l2_category": "a"},
        {"index": 2, "answer": "A", "category": "Y", "l2_category": "c"},
        {"index": 3, "answer": "D", "category": "Y", "l2_category": "c"},
    ]
    predictions = ["  A\n", "The answer is B.", "apple", "(D)"]
    samples = score_predictions(rows, predictions)
    assert [s["extracted"] for s in samples] == ["A", "B", "", "D"]
    assert [s["score"] for s in samples] == [1.0, 1.0, 0.0, 1.0]
    assert samples[0]["prediction"] == "A"
    legacy = score_predictions(rows, predictions, rule="first-letter")
    assert [s["score"] for s in legacy] == [1.0, 1.0, 1.0, 1.0]  # "apple" counts as A with the legacy rule
    with pytest.raises(ValueError):
        score_predictions(rows, predictions[:2])


def test_mmstar_prompt_follows_lmms_eval_and_the_original_table():
    question = "Which shape is shown?\nOptions: A: circle, B: square, C: star, D: cross"
    context = mmstar.doc_to_text(question)
    assert context == question + "\nAnswer with the option's letter from the given choices directly"
    formatted = format_prompt(context, "mmstar")
    assert formatted.user_text == (
        "Which shape is shown?\nChoices: A: circle, B: square, C: star, D: cross\nAnswer with the letter directly"
    )
    assert formatted.assistant_prefix == "Answer:"
    assert mmstar.doc_to_text(" Is it red? Please answer yes or no.") == (
        "Is it red?\nAnswer with the option's letter from the given choices directly"
    )


def test_prompt_table_other_tasks():
    assert format_prompt("What is it?", "ocrbench").user_text == "What is it?\nGive a very brief answer."
    docvqa = format_prompt("What is the date?", "docvqa_val")
    assert docvqa.user_text.startswith("Give a short and terse answer")
    assert docvqa.user_text.endswith("Question: What is the date?") and docvqa.assistant_prefix == ""
    ai2d = format_prompt("Q?\nA. one\nB. two\nPlease select the correct answer from the options above.", "ai2d")
    assert ai2d.user_text == "Q?\nChoices:\nA. one\nB. two\nAnswer with the letter."
    mmmu = format_prompt(
        "Question: Q?\nA. x\nAnswer with the option's letter from the given choices directly.", "mmmu_val"
    )
    assert mmmu.user_text == " Q?\nChoices:\nA. x\nAnswer with the letter directly."
    assert format_prompt("unchanged", "some_task").user_text == "unchanged"
    assert format_prompt("unchanged", None).assistant_prefix == ""


def test_sampling_from_gen_kwargs():
    greedy = sampling_from_gen_kwargs({"until": ["\n\n"], "do_sample": False}, default_max_new_tokens=7)
    assert (greedy.do_sample, greedy.max_new_tokens, greedy.stop_strings) == (False, 7, ("\n\n",))
    sampled = sampling_from_gen_kwargs({"temperature": 0.7, "top_p": 0.9, "max_new_tokens": 12, "until": "X"}, seed=3)
    assert sampled.do_sample and sampled.temperature == 0.7 and sampled.top_p == 0.9 and sampled.seed == 3
    assert sampled.max_new_tokens == 12 and sampled.stop_strings == ("X",)
    assert not sampling_from_gen_kwargs({"temperature": 0.7, "do_sample": False}).do_sample
    assert not sampling_from_gen_kwargs({"temperature": 0, "do_sample": True}).do_sample  # temperature 0: greedy
    assert sampling_from_gen_kwargs({"do_sample": True}).temperature == 1.0
    assert sampling_from_gen_kwargs({"max_gen_toks": 5, "top_p": None, "top_k": None}).max_new_tokens == 5
    defaults = sampling_from_gen_kwargs({})
    assert (defaults.top_p, defaults.top_k, defaults.stop_strings) == (1.0, 50, ())
    # conbench asks for top_p 0 while sampling: HF then keeps only the most likely token.
    assert not sampling_from_gen_kwargs({"temperature": 0.2, "top_p": 0, "do_sample": True}).do_sample
    assert sampling_from_gen_kwargs({"until": ""}).stop_strings == ()
    with pytest.raises(ValueError, match="max_new_tokens"):  # not silently the default
        sampling_from_gen_kwargs({"max_new_tokens": 0})


def test_gen_kwargs_helpers():
    assert parse_gen_kwargs("max_new_tokens=16,temperature=0.5, do_sample=true,top_p=None,name=x") == {
        "max_new_tokens": 16, "temperature": 0.5, "do_sample": True, "top_p": None, "name": "x",
    }  # fmt: skip
    assert parse_gen_kwargs("") == {}
    with pytest.raises(ValueError):
        parse_gen_kwargs("oops")
    assert gen_kwargs_key({"a": 1, "until": ["x"]}) == gen_kwargs_key({"until": ["x"], "a": 1})
    assert gen_kwargs_key({"a": 1}) != gen_kwargs_key({"a": 2})
    assert cut_at_stop("abc\n\ndef<end>", ["<end>", "\n\n"]) == "abc"
    assert cut_at_stop("abc", ["x"]) == "abc"
    assert flatten_visuals([[1, 2], 3, None, [[4]]]) == [1, 2, 3, 4]
    assert flatten_visuals(None) == [] and flatten_visuals(5) == [5]


def test_limit_like_lmms_eval():
    assert _limit_count(None, 10) == 10
    assert _limit_count(-1, 10) == 10
    assert _limit_count(0.25, 10) == 3
    assert _limit_count(4, 10) == 4
    assert _limit_count(40, 10) == 10


def test_synthetic_mmstar_questions_ask_only_for_the_letter():
    """The synthetic phrasings' own "Answer with one word." / "Answer with a number." would contradict the
    multiple-choice instruction the prompt ends with."""
    from dualtower.eval.mmstar_synthetic import mmstar_rows

    rows = mmstar_rows(24)
    stems = [row["question"].split("\nOptions: ")[0] for row in rows]
    assert all("Answer with" not in stem for stem in stems), stems
    assert all(stem.rstrip().endswith("?") or stem.endswith(".") for stem in stems)
    assert any(stem.startswith("Look at the image") for stem in stems)  # the long phrasings are still used
