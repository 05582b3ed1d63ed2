"""Caption and VQA metrics: CIDEr-D (as pycocoevalcap's `Cider`) and the VQA accuracy, with their normalizers.

CIDEr-D, per image i with candidate c and references r_1..r_m (all tokenized with `ptb_tokenize`):
- n-gram counts for n = 1..4; document frequency df(g) = number of images whose references contain g;
- tf-idf vectors: count(g) * (log(#images) - log(max(1, df(g)))), one vector per n;
- per reference and n: sum_g min(c_g, r_g) * r_g / (|c| |r|), times exp(-(len_c - len_r)^2 / (2 * 6^2));
- score_i = 10 * mean over n of (sum over references) / m; the corpus score is the mean of score_i.
Like pycocoevalcap, the "length" in the Gaussian penalty counts bigrams (len - 1 for a non-empty caption),
so differences of lengths are the usual word-count differences except for one-word captions.

`ptb_tokenize` approximates the COCO toolkit's PTBTokenizer (Stanford CoreNLP, lowercased, punctuation
tokens removed) in pure Python: punctuation is split off and dropped, clitics are split ("don't" ->
"do n't", "dog's" -> "dog 's"), hyphenated and slashed words and decimal numbers stay whole.

VQA accuracy (the VQA challenge's evaluation): the prediction and every human answer are normalized
(punctuation, number words -> digits, articles dropped, contractions restored), then
acc = mean over the leave-one-out subsets of the human answers of min(1, #matches in the subset / 3).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence

# -- tokenization (PTB approximation) ---------------------------------------------------------------------

# What the COCO toolkit drops after tokenizing: PTB quotes/brackets and sentence punctuation.
_DROPPED_TOKENS = frozenset(
    ["''", "'", "``", "`", "-lrb-", "-rrb-", "-lcb-", "-rcb-", ".", "?", "!", ",", ":", "-", "--", "...", ";"]
)
_BRACKETS_AND_QUOTES = frozenset('"()[]{}')  # PTB rewrites these to the dropped -lrb- / `` forms
_CLITIC = re.compile(r"(?i)(\w)(n't|'s|'re|'ve|'ll|'d|'m)\b")
_PTB_TOKEN = re.compile(
    r"""\d+(?:[.,]\d+)+            # numbers with a decimal point or thousands separators
      | n't | '(?:s|re|ve|ll|d|m)\b  # clitics split off by _CLITIC
      | \w+(?:[-/&'.]\w+)*           # words, hyphenated / slashed words, u.s.-style abbreviations
      | \.\.\. | -- | \S             # ellipsis, dash, any other single character
    """,
    re.VERBOSE,
)


def ptb_tokenize(text: str) -> list[str]:
    """Lowercased PTB-style tokens without punctuation (see module docstring)."""
    text = _CLITIC.sub(r"\1 \2", text.lower().replace("\n", " "))
    return [t for t in _PTB_TOKEN.findall(text) if t not in _DROPPED_TOKENS and t not in _BRACKETS_AND_QUOTES]


# -- CIDEr-D ----------------------------------------------------------------------------------------------

CIDER_N = 4
CIDER_SIGMA = 6.0


def _ngrams(tokens: Sequence[str], n_max: int = CIDER_N) -> Counter[tuple[str, ...]]:
    counts: Counter[tuple[str, ...]] = Counter()
    for n in range(1, n_max + 1):
        counts.update(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
    return counts


class _TfIdf:
    """One caption as per-n tf-idf vectors, their norms and its (bigram) length."""

    def __init__(self, counts: Counter[tuple[str, ...]], doc_freq: Counter[tuple[str, ...]], log_images: float):
        self.vectors: list[dict[tuple[str, ...], float]] = [{} for _ in range(CIDER_N)]
        squares = [0.0] * CIDER_N
        self.length = 0
        for gram, count in counts.items():
            n = len(gram) - 1
            weight = count * (log_images - math.log(max(1.0, doc_freq[gram])))
            self.vectors[n][gram] = weight
            squares[n] += weight * weight
            if n == 1:  # pycocoevalcap counts bigrams as the caption length
                self.length += count
        self.norms = [math.sqrt(s) for s in squares]


def _similarity(candidate: _TfIdf, reference: _TfIdf) -> list[float]:
    penalty = math.exp(-((candidate.length - reference.length) ** 2) / (2 * CIDER_SIGMA**2))
    values = []
    for n in range(CIDER_N):
        ref_vec = reference.vectors[n]
        # Clipped dot product: a candidate n-gram counts at most as much as in the reference.
        dot = sum(min(w, ref_vec.get(g, 0.0)) * ref_vec.get(g, 0.0) for g, w in candidate.vectors[n].items())
        if candidate.norms[n] != 0 and reference.norms[n] != 0:
            dot /= candidate.norms[n] * reference.norms[n]
        values.append(dot * penalty)
    return values


def cider_d(
    predictions: Mapping[str, str], references: Mapping[str, Sequence[str]], tokenize: bool = True
) -> tuple[float, dict[str, float]]:
    """(corpus CIDEr-D, per-id scores). `predictions[id]` is one caption, `references[id]` its references.

    With tokenize=False the captions are split on whitespace only (pycocoevalcap's input convention when
    the caller ran the PTB tokenizer already).
    """
    ids = list(predictions)
    missing = [i for i in ids if not references.get(i)]
    if missing:
        raise ValueError(f"no references for {len(missing)} prediction id(s), e.g. {missing[:3]}")
    if not ids:
        raise ValueError("no predictions to score")
    split = ptb_tokenize if tokenize else str.split
    cand_counts = {i: _ngrams(split(predictions[i])) for i in ids}
    ref_counts = {i: [_ngrams(split(r)) for r in references[i]] for i in ids}
    doc_freq: Counter[tuple[str, ...]] = Counter()
    for refs in ref_counts.values():
        doc_freq.update({gram for counts in refs for gram in counts})
    log_images = math.log(float(len(ids)))
    scores = {}
    for i in ids:
        candidate = _TfIdf(cand_counts[i], doc_freq, log_images)
        total = [0.0] * CIDER_N
        for counts in ref_counts[i]:
            sims = _similarity(candidate, _TfIdf(counts, doc_freq, log_images))
            total = [a + b for a, b in zip(total, sims, strict=True)]
        scores[i] = 10.0 * (sum(total) / CIDER_N) / len(ref_counts[i])
    return sum(scores.values()) / len(scores), scores


# -- VQA accuracy -----------------------------------------------------------------------------------------

_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
_ARTICLES = frozenset({"a", "an", "the"})
# Contractions written with their apostrophe; the VQA normalizer maps the apostrophe-less spelling back.
_CONTRACTION_LIST = (
    "ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't "
    "he'd he'd've he'll he's how'd how'll how's i'd i'd've i'll i'm i've isn't it'd it'd've it'll it's let's "
    "ma'am mightn't mightn't've might've mustn't must've needn't not've o'clock oughtn't shan't she'd "
    "she'd've she'll she's should've shouldn't shouldn't've somebody'd somebody'd've somebody'll somebody's "
    "someone'd someone'd've someone'll someone's something'd something'd've something'll that's there'd "
    "there'd've there're there's they'd they'd've they'll they're they've 'twas wasn't we'd we'd've we'll "
    "we're we've weren't what'll what're what's what've when's where'd where's where've who'd who'd've "
    "who'll who's who've why'll why're why's won't would've wouldn't wouldn't've y'all y'all'll y'all'd've "
    "you'd you'd've you'll you're you've"
)
_CONTRACTIONS_WITH_APOSTROPHE = tuple(_CONTRACTION_LIST.split())
# Spellings that are ordinary words stay as they are ("well" is not "we'll").
_REAL_WORDS = frozenset({"its", "well", "were", "hell", "shell", "ill", "id", "shed", "wed", "lets", "whore"})


def _contraction_spellings() -> dict[str, str]:
    """Every spelling with some apostrophes dropped ("dont", "couldnt've", "couldn'tve") -> the full form."""
    table = {}
    for full in _CONTRACTIONS_WITH_APOSTROPHE:
        parts = full.split("'")
        for mask in range(2 ** (len(parts) - 1) - 1):  # the all-apostrophes spelling is already canonical
            spelled = parts[0]
            for k, part in enumerate(parts[1:]):
                spelled += ("'" if mask >> k & 1 else "") + part
            if spelled not in _REAL_WORDS:
                table[spelled] = full
    return table


_CONTRACTIONS = _contraction_spellings()
_VQA_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?",
              "!")  # fmt: skip
_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")
_PERIOD_NOT_DECIMAL = re.compile(r"\.(?!\d)")  # the official pattern only looks ahead: "5." -> "5"


def _vqa_punctuation(text: str) -> str:
    out = text
    for p in _VQA_PUNCT:
        # Punctuation next to a space (or any "1,000"-style number in the text) vanishes; inside a word it
        # becomes a space ("black/white" -> "black white").
        if f"{p} " in text or f" {p}" in text or _DIGIT_COMMA_DIGIT.search(text):
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_NOT_DECIMAL.sub("", out)


def normalize_vqa_answer(answer: str) -> str:
    """The VQA challenge's answer normalization (punctuation, number words, articles, contractions)."""
    text = answer.replace("\n", " ").replace("\t", " ").strip()
    words = []
    for word in _vqa_punctuation(text).lower().split():
        word = _NUMBER_WORDS.get(word, word)
        if word not in _ARTICLES:
            words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words)


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """min(1, matches / 3) averaged over the len(answers) leave-one-out subsets (10 choose 9 for VQAv2)."""
    if not answers:
        raise ValueError("vqa_accuracy needs at least one human answer")
    pred = normalize_vqa_answer(prediction)
    gts = [normalize_vqa_answer(a) for a in answers]
    total_matches = sum(g == pred for g in gts)
    per_subset = [min(1.0, (total_matches - (g == pred)) / 3.0) for g in gts]
    return sum(per_subset) / len(per_subset)


def mean_vqa_accuracy(predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> float:
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions but {len(answers)} answer lists")
    if not predictions:
        raise ValueError("no predictions to score")
    return sum(vqa_accuracy(p, a) for p, a in zip(predictions, answers, strict=True)) / len(predictions)
