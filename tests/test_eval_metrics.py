"""CIDEr-D, the PTB tokenizer approximation and VQA accuracy against hand-computed values."""

from __future__ import annotations

import math

import pytest

from dualtower.eval.metrics import cider_d, mean_vqa_accuracy, normalize_vqa_answer, ptb_tokenize, vqa_accuracy


def test_ptb_tokenize_lowercases_splits_clitics_and_drops_punctuation():
    text = "A man's dog doesn't run -- \"fast\" (really), costing $3.50 for 1,000 black-and-white/grey cats..."
    assert ptb_tokenize(text) == [
        "a", "man", "'s", "dog", "does", "n't", "run", "fast", "really", "costing", "$", "3.50", "for", "1,000",
        "black-and-white/grey", "cats",
    ]  # fmt: skip
    assert ptb_tokenize("Two dogs.\nPlaying!") == ["two", "dogs", "playing"]
    assert ptb_tokenize("") == []


def test_cider_d_identical_single_bigram_captions_score_five():
    # Each n-gram occurs in one of two images: weight ln 2 each, cosine 1 for n = 1, 2 and 0 for n = 3, 4
    # (no such n-grams): 10 * mean(1, 1, 0, 0) = 5.
    score, per_image = cider_d({"1": "a b", "2": "c d"}, {"1": ["a b"], "2": ["c d"]}, tokenize=False)
    assert per_image == pytest.approx({"1": 5.0, "2": 5.0}, abs=1e-12)
    assert score == pytest.approx(5.0, abs=1e-12)


def test_cider_d_matches_hand_computation_with_idf_clipping_and_length_penalty():
    predictions = {"1": "the cat sat", "2": "a dog"}
    references = {"1": ["the cat sat", "a cat"], "2": ["the dog ran"]}
    # Two images: idf = ln 2 - ln df; "the" is in both images' references (idf 0), every other n-gram idf ln 2.
    # Image 1, reference "the cat sat": cosines (1, 1, 1, 0), equal bigram lengths (2) -> no penalty.
    # Image 1, reference "a cat": unigram cosine (ln2)^2 / (sqrt(2) ln2)^2 = 1/2, nothing else shared; bigram
    #   lengths 2 vs 1 -> penalty exp(-1 / (2 * 6^2)).
    # Image 2, "a dog" vs "the dog ran": only "dog" shared: unigram cosine 1/2, penalty exp(-1/72).
    penalty = math.exp(-1 / 72)
    image1 = 10 * ((1 + 0.5 * penalty) + 1 + 1 + 0) / 4 / 2
    image2 = 10 * (0.5 * penalty) / 4 / 1
    score, per_image = cider_d(predictions, references, tokenize=False)
    assert per_image["1"] == pytest.approx(image1, abs=1e-12)
    assert per_image["2"] == pytest.approx(image2, abs=1e-12)
    assert score == pytest.approx((image1 + image2) / 2, abs=1e-12)
    assert score == pytest.approx(2.7995691719474, abs=1e-9)  # pycocoevalcap 1.2 on the same input


def test_cider_d_tokenizes_like_ptb_by_default():
    raw = cider_d({"1": "The cat, sat.", "2": "A dog!"}, {"1": ["The cat sat", "a cat."], "2": ["the dog ran"]})
    clean = cider_d({"1": "the cat sat", "2": "a dog"}, {"1": ["the cat sat", "a cat"], "2": ["the dog ran"]})
    assert raw[0] == pytest.approx(clean[0], abs=1e-12)


def test_cider_d_rejects_missing_references():
    with pytest.raises(ValueError, match="no references"):
        cider_d({"1": "a cat"}, {"1": []})


@pytest.mark.parametrize(
    ("answer", "normalized"),
    [
        ("Two dogs.", "2 dogs"),
        ("The cat", "cat"),
        ("an apple", "apple"),
        ("yes!", "yes"),
        ("black/white", "black white"),  # punctuation inside a word becomes a space
        ("red, white", "red white"),  # next to a space it vanishes
        ("1,000", "1000"),
        ("3.5", "3.5"),
        ("dont", "don't"),
        ("isnt", "isn't"),
        ("well", "well"),  # an ordinary word is not a contraction
        ("  None\t", "0"),
    ],
)
def test_vqa_normalization(answer, normalized):
    assert normalize_vqa_answer(answer) == normalized


def test_vqa_accuracy_averages_leave_one_out_subsets():
    # 3 of 10 humans said "2": leaving out a matching one leaves 2 matches (2/3), else 3 (1): (3*2/3 + 7) / 10.
    answers = ["2"] * 3 + ["3"] * 7
    assert vqa_accuracy("Two", answers) == pytest.approx(0.9)
    # One match: 0 when it is left out, 1/3 otherwise -> 9 * (1/3) / 10.
    assert vqa_accuracy("2", ["2"] + ["3"] * 9) == pytest.approx(0.3)
    assert vqa_accuracy("3", answers) == pytest.approx(1.0)
    assert vqa_accuracy("4", answers) == 0.0
    assert mean_vqa_accuracy(["two", "4"], [answers, answers]) == pytest.approx(0.45)


def test_cider_d_clips_candidate_ngrams_repeated_more_often_than_in_the_reference():
    # idf is ln 2 for every n-gram (each occurs in one image's references, or in none: log(max(1, 0)) = 0).
    # Image 1, "cat cat cat" vs "a cat": candidate unigram vector (cat: 3 ln2), norm 3 ln2; reference (a, cat:
    #   ln2 each), norm sqrt(2) ln2. The clipped dot counts "cat" as min(3 ln2, ln2) * ln2, so the cosine is
    #   1 / (3 sqrt 2), not 1 / sqrt 2. No shared bigrams; bigram lengths 2 vs 1 -> penalty exp(-1/72).
    # Image 2, "a dog" vs "the dog": unigram cosine 1/2, equal lengths.
    score, per_image = cider_d({"1": "cat cat cat", "2": "a dog"}, {"1": ["a cat"], "2": ["the dog"]}, tokenize=False)
    image1 = 10 * (math.exp(-1 / 72) / (3 * math.sqrt(2))) / 4
    assert per_image["1"] == pytest.approx(image1, abs=1e-12)
    assert per_image["2"] == pytest.approx(1.25, abs=1e-12)
    assert score == pytest.approx((image1 + 1.25) / 2, abs=1e-12)
    # Repeating a word cannot beat saying it once (unigram cosine 1 / sqrt 2, the same length penalty).
    _, once = cider_d({"1": "cat", "2": "a dog"}, {"1": ["a cat"], "2": ["the dog"]}, tokenize=False)
    assert per_image["1"] < once["1"]
