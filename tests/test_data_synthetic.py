"""The synthetic source: deterministic, disjoint splits, and answers that are true of the rendered pixels."""

from __future__ import annotations

import hashlib
from collections import Counter, deque

import numpy as np
import pytest

from dualtower.data.synthetic import COLORS, QUESTIONS, SyntheticSource, answer_space, heldout_examples

ALL_TYPES = ("color", "shape", "count", "position", "compare")
QUESTION_TYPE = {phrasing: qtype for qtype, phrasings in QUESTIONS.items() for phrasing in phrasings}


def fingerprint(sample) -> str:
    digest = hashlib.sha1()
    for image in sample["images"]:
        digest.update(image.tobytes())
    return digest.hexdigest()


def foreground(image, background) -> np.ndarray:
    return (np.asarray(image).astype(int) - np.asarray(background)).__abs__().sum(axis=2) > 60


def components(mask: np.ndarray) -> list[list[tuple[int, int]]]:
    """8-connected foreground components (breadth-first search)."""
    seen, found = np.zeros_like(mask), []
    for start in zip(*np.nonzero(mask), strict=True):
        if seen[start]:
            continue
        queue, pixels = deque([start]), []
        seen[start] = True
        while queue:
            y, x = queue.popleft()
            pixels.append((y, x))
            for ny, nx in ((y + dy, x + dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        found.append(pixels)
    return found


def test_samples_are_deterministic_and_seeded():
    a, b = SyntheticSource(7, "train", 50), SyntheticSource(7, "train", 50)
    assert all(fingerprint(a[i]) == fingerprint(b[i]) and a[i]["texts"] == b[i]["texts"] for i in range(0, 50, 7))
    other = SyntheticSource(8, "train", 50)
    assert sum(fingerprint(a[i]) != fingerprint(other[i]) for i in range(20)) >= 18


def test_splits_are_disjoint():
    seen = {split: {fingerprint(s) for s in SyntheticSource(1, split, 300, ALL_TYPES)} for split in
            ("train", "val", "heldout")}
    assert not seen["train"] & seen["val"] and not seen["train"] & seen["heldout"] and not seen["val"] & seen["heldout"]


@pytest.mark.parametrize("difficulty", ["easy", "medium", "hard"])
def test_answers_are_true_of_the_pixels(difficulty):
    source = SyntheticSource(3, "train", 30, ALL_TYPES, difficulty)
    checked = Counter()
    for index in range(30):
        sample = source[index]
        masks = [foreground(image, image.getpixel((0, 0))) for image in sample["images"]]
        for turn in sample["texts"]:
            qtype, answer = QUESTION_TYPE[turn["user"]], turn["assistant"]
            checked[qtype] += 1
            assert answer in answer_space(qtype, difficulty)
            if qtype == "color":
                pixels = np.asarray(sample["images"][0])[masks[0]]
                assert tuple(np.median(pixels, axis=0).astype(int)) == COLORS[answer]
            elif qtype == "count":
                assert len(components(masks[0])) == int(answer)
            elif qtype == "position":
                ys, xs = np.nonzero(masks[0])
                cy, cx = ys.mean() / masks[0].shape[0], xs.mean() / masks[0].shape[1]
                expected = {"left": cx < 0.35, "right": cx > 0.65, "top": cy < 0.35, "bottom": cy > 0.65}
                assert expected[answer], (answer, cx, cy)
            elif qtype == "compare":
                counts = [len(components(mask)) for mask in masks]
                assert answer == ("first" if counts[0] > counts[1] else "second")
    assert set(checked) == set(ALL_TYPES)


def test_shapes_fill_their_boxes_as_expected():
    """circle ~ pi/4 of its bounding box, square ~ 1, triangle ~ 1/2, star ~ 0.35: the shape answer is visible."""
    source = SyntheticSource(5, "train", 240, ("position", "shape"), "hard", max_turns=2)
    ratios: dict[str, list[float]] = {}
    for index in range(240):
        sample = source[index]
        answers = {QUESTION_TYPE[turn["user"]]: turn["assistant"] for turn in sample["texts"]}
        if set(answers) != {"position", "shape"}:
            continue  # a position question means exactly one shape; its mask is the whole foreground
        mask = foreground(sample["images"][0], sample["images"][0].getpixel((0, 0)))
        ys, xs = np.nonzero(mask)
        box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
        if box >= 100:
            ratios.setdefault(answers["shape"], []).append(mask.sum() / box)
    bands = {"circle": (0.72, 0.85), "square": (0.92, 1.0), "triangle": (0.42, 0.62), "star": (0.25, 0.45)}
    assert set(ratios) == set(bands)
    for shape, values in ratios.items():
        low, high = bands[shape]
        assert low <= float(np.median(values)) <= high, (shape, np.median(values))


def test_question_types_are_balanced_and_answers_cover_the_space():
    source = SyntheticSource(2, "train", 600, ("color", "count", "position"))
    firsts = Counter()
    for index in range(600):
        turn = source[index]["texts"][0]
        qtype = ("color", "count", "position")[index % 3]
        firsts[qtype, turn["assistant"]] += 1
    for qtype in ("color", "count", "position"):
        answers = {a for (t, a) in firsts if t == qtype}
        assert answers == set(answer_space(qtype)), qtype


def test_turns_and_sizes_vary():
    source = SyntheticSource(4, "train", 200)
    turns = Counter(len(source[i]["texts"]) for i in range(200))
    sizes = {source[i]["images"][0].size for i in range(200)}
    assert set(turns) == {1, 2, 3, 4} and len(sizes) >= 10
    ratios = {round(w / h, 2) for w, h in sizes}
    assert {0.5, 1.0, 2.0} <= ratios


def test_heldout_examples():
    examples = heldout_examples(12, seed=9, question_types=("color", "compare"))
    assert [e["question_type"] for e in examples[:4]] == ["color", "compare", "color", "compare"]
    for example in examples:
        assert set(example) == {"images", "question", "answer", "question_type"}
        assert example["answer"] in answer_space(example["question_type"])
        assert len(example["images"]) == (2 if example["question_type"] == "compare" else 1)
    assert heldout_examples(12, seed=9, question_types=("color", "compare"))[3]["answer"] == examples[3]["answer"]


@pytest.mark.parametrize("difficulty", ["easy", "hard"])
def test_heldout_answers_take_turns_within_each_type(difficulty: str) -> None:
    """Always giving one answer per type scores chance: 1 / len(answers) of each type, to within one question."""
    types = ("color", "shape", "count", "position", "compare")
    examples = heldout_examples(67, seed=3, question_types=types, difficulty=difficulty)
    for qtype in types:
        answers = [e["answer"] for e in examples if e["question_type"] == qtype]
        space = answer_space(qtype, difficulty)
        assert answers == [space[k % len(space)] for k in range(len(answers))], qtype
    assert [e["question_type"] for e in examples[:6]] == [*types, "color"]


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown split"):
        SyntheticSource(0, "test")
    with pytest.raises(ValueError, match="question types"):
        SyntheticSource(0, "train", question_types=("colour",))
    with pytest.raises(IndexError):
        SyntheticSource(0, "train", 3)[3]


def test_from_config_takes_every_option_of_the_section():
    from dualtower.data.config import SyntheticConfig

    cfg = SyntheticConfig(num_train=30, num_val=5, num_heldout=4, question_types=("shape", "count"),
                          difficulty="hard", max_turns=1)
    source = SyntheticSource.from_config(cfg, seed=3, split="val")
    assert (len(source), source.question_types, source.difficulty, source.split, source.seed) == (
        5, ("shape", "count"), "hard", "val", 3)
    assert {len(source[i]["texts"]) for i in range(5)} == {1}  # max_turns = 1: one question per sample
    assert len(SyntheticSource.from_config(cfg, 3, "heldout")) == 4
