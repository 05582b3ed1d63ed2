"""MMStar: the lmms-eval prompt, answer-letter extraction and the score (mean of per-`l2_category` means).

Two extraction rules, both as in lmms-eval's `mmstar` task:
- "lmms-eval" (default; lmms-eval >= 0.7): ranked candidates. After stripping whitespace and the characters
  , . ! ? ; : ' " (one after another, from both ends), each choice letter is looked for as "(X)", "X.",
  "X:", "X)", "X " (last occurrence each), after an answer phrase ("the answer is", "i choose", ...; first
  occurrence of the letter after the phrase), as the whole start ("X" not followed by a letter) and as the
  whole end. The best format wins (start > end > phrase > parentheses > period > colon > right paren >
  space), ties go to the later position; a bare letter anywhere is the fallback when nothing else matched.
- "first-letter" (MMStar's own rule, used by lmms-eval <= 0.6): lowercased prediction; correct if its
  first character is the answer, or it starts with "(" / "option " / "the answer is " followed by the answer.
  Gibberish that happens to start with A-D scores with this rule (reference_spec 9.14).

The score of a set of rows is the mean over its l2 categories of the per-l2-category accuracy; it is reported
for every core category (over that category's rows) and as "average" (over all rows).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

CORE_CATEGORIES: dict[str, tuple[str, ...]] = {
    "coarse perception": ("image scene and topic", "image style & quality", "image emotion"),
    "fine-grained perception": ("object counting", "recognition", "localization"),
    "instance reasoning": (
        "single-instance reasoning",
        "cross-instance attribute reasoning",
        "cross-instance relation reasoning",
    ),
    "logical reasoning": ("code & sequence reasoning", "diagram reasoning", "common reasoning"),
    "science & technology": (
        "biology & chemistry & physics",
        "electronics & energy & mechanical eng.",
        "geography & earth science & agriculture",
    ),
    "math": ("geometry", "numeric commonsense and calculation", "statistical reasoning"),
}
POST_PROMPT = "\nAnswer with the option's letter from the given choices directly"
_YES_NO_SUFFIX = " Please answer yes or no."
CHOICES = ("A", "B", "C", "D")
RULES = ("lmms-eval", "first-letter")

_ANSWER_PHRASES = (
    "the answer is", "answer is", "the correct answer is", "correct answer is", "the best answer is",
    "best answer is", "the correct option is", "correct option is", "the best option is", "best option is",
    "the choice is", "choice is", "the correct choice is", "correct choice is", "i choose", "i select", "i pick",
    "my answer is", "my choice is", "옵션", "정답은", "답은", "답:", "答案是", "答案为", "选", "答えは",
)  # fmt: skip
# Format -> rank (higher wins).
_RANK = {"start": 10, "end": 9, "phrase": 7, "parentheses": 6, "period": 5, "colon": 4, "right_paren": 3,
         "space": 2, "fallback": 0}  # fmt: skip
_SUFFIX_FORMATS = (("parentheses", "({})"), ("period", "{}."), ("colon", "{}:"), ("right_paren", "{})"),
                   ("space", "{} "))  # fmt: skip


def doc_to_text(question: str, pre_prompt: str = "", post_prompt: str = POST_PROMPT) -> str:
    """lmms-eval's MMStar context: the question with the task's pre/post prompt."""
    text = question.strip()
    if pre_prompt:
        text = pre_prompt + text.replace(_YES_NO_SUFFIX, "")
    if post_prompt:
        text = text.replace(_YES_NO_SUFFIX, "") + post_prompt
    return text


def extract_letter(prediction: str, rule: str = "lmms-eval", choices: Sequence[str] = CHOICES) -> str:
    """The answer letter read from a prediction, "" when none is found (upper case)."""
    if rule == "lmms-eval":
        return _ranked_letter(prediction, choices)
    if rule == "first-letter":
        return _first_letter(prediction, choices)
    raise ValueError(f"unknown MMStar extraction rule {rule!r}; choose one of {RULES}")


def _ranked_letter(prediction: str, choices: Sequence[str]) -> str:
    text = prediction.strip()
    if not text:
        return ""
    for char in ",.!?;:'\"":
        text = text.strip(char)
    padded = f" {text} "
    core = padded.strip()
    candidates: list[tuple[int, int, str]] = []  # (rank, position, letter)
    for name, pattern in _SUFFIX_FORMATS:
        for letter in choices:
            position = padded.rfind(pattern.format(letter))
            if position >= 0:
                candidates.append((_RANK[name], position, letter))
    lowered = padded.lower()
    for phrase in _ANSWER_PHRASES:
        start = lowered.find(phrase)
        if start >= 0:
            for letter in choices:
                position = padded.find(letter, start + len(phrase))
                if position >= 0:
                    candidates.append((_RANK["phrase"], position, letter))
    for letter in choices:
        if core.startswith(letter) and (len(core) == 1 or not core[1].isalpha()):
            candidates.append((_RANK["start"], 0, letter))
        if core.endswith(letter) and (len(core) == 1 or not core[-2].isalpha()):
            candidates.append((_RANK["end"], len(padded) - 1, letter))
    if not candidates:
        candidates = [(_RANK["fallback"], padded.rfind(x), x) for x in choices if x in padded]
    if not candidates:
        return ""
    # max() keeps the first of equal keys, as a stable descending sort does.
    return max(candidates, key=lambda c: (c[0], c[1]))[2]


def _first_letter(prediction: str, choices: Sequence[str]) -> str:
    text = prediction.lower().strip().replace("\n", " ")
    letters = {c.lower(): c for c in choices}
    for lead in ("", "(", "option ", "the answer is "):
        # The leads are exclusive: a text starting with a choice letter cannot start with "(" or "option ".
        if text.startswith(lead) and text[len(lead) : len(lead) + 1] in letters:
            return letters[text[len(lead)]]
    return ""


def score_rows(rows: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Aggregate rows with `score` (0/1), `category` and `l2_category` into MMStar's metrics.

    Returns {"average": ..., <each core category present>: ..., "l2_category": {name: accuracy},
    "counts": {l2 name: rows}}; a core category's score uses only its own rows, as lmms-eval's metrics do.
    A row without a category (null in the parquet) counts in "average" only and one without an l2 category
    forms the group None, as in lmms-eval, where such a row's category is no metric of the task.
    """
    rows = list(rows)
    if not rows:
        raise ValueError("no rows to score")
    results: dict[str, Any] = {"average": _mean_of_l2_means(rows)}
    for core in sorted({row["category"] for row in rows if row["category"] is not None}):
        results[core] = _mean_of_l2_means([row for row in rows if row["category"] == core])
    # key=str: a None l2 category must sort beside the names instead of failing the comparison.
    by_l2 = sorted(_scores_by_l2(rows).items(), key=lambda item: str(item[0]))
    results["l2_category"] = {name: sum(v) / len(v) for name, v in by_l2}
    results["counts"] = {name: len(v) for name, v in by_l2}
    return results


def _scores_by_l2(rows: Sequence[Mapping[str, Any]]) -> dict[str, list[float]]:
    by_l2: dict[str, list[float]] = defaultdict(list)
    for row in rows:
        by_l2[row["l2_category"]].append(float(row["score"]))
    return by_l2


def _mean_of_l2_means(rows: Sequence[Mapping[str, Any]]) -> float:
    means = [sum(v) / len(v) for v in _scores_by_l2(rows).values()]
    return sum(means) / len(means)
