"""A built-in synthetic VQA dataset in The Cauldron's schema, for demos, tests and benchmarks without a network.

Every sample is rendered from a seed: solid shapes on a plain background, images of several sizes and aspect
ratios, and 1..`max_turns` (uniform) question/answer turns that cannot be answered without the image.
Answers are single words or digits. Sample `i` of a split is a pure function of (seed, split, i, options).

Question types (the first turn of sample i asks type `question_types[i % len(question_types)]`, so every type
is equally frequent; answers within a type are uniform, so chance = 1 / number of answers):

| type     | question (one of 3 phrasings)   | answers                                   | chance easy / medium / hard |
|----------|---------------------------------|-------------------------------------------|-----------------------------|
| color    | What color is the shape?        | red green blue yellow purple black        | 1/6 / 1/6 / 1/6             |
| shape    | What shape is shown?            | circle square triangle (+ star when hard) | 1/3 / 1/3 / 1/4             |
| count    | How many shapes are there?      | 1..3 / 1..4 / 1..6                        | 1/3 / 1/4 / 1/6             |
| position | Where is the shape?             | left right top bottom (one shape only)    | 1/4 / 1/4 / 1/4             |
| compare  | Which image has more shapes?    | first second (two images)                 | 1/2 / 1/2 / 1/2             |

All shapes of one image share shape and colour, so colour/shape questions have one answer, and no two touch
(a layout whose boxes come within 2 px is redrawn), so the count is that of the blobs in the pixels. Difficulty sets
image sizes, object sizes, the count range, the shapes and the background (white when easy, pale tints else).

Splits are disjoint by construction: each rendered scene has a fingerprint (every parameter that reaches the
pixels) that decides its split (80% train, 10% val, 10% heldout); a draw whose fingerprint belongs to another
split is redrawn. The same scene can therefore never appear in two splits, while every combination of
attributes appears in all of them.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageDraw

from dualtower.data.config import DIFFICULTIES, SPLITS, SYNTHETIC_QUESTION_TYPES, SyntheticConfig

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 60),
    "blue": (40, 70, 220),
    "yellow": (240, 210, 0),
    "purple": (140, 50, 180),
    "black": (20, 20, 20),
}
POSITIONS = ("left", "right", "top", "bottom")
_REGION_CENTERS = {"left": (0.25, 0.5), "right": (0.75, 0.5), "top": (0.5, 0.25), "bottom": (0.5, 0.75)}
QUESTIONS = {  # a few phrasings per type, of different lengths
    "color": (
        "What color is the shape?",
        "What is the color of the shape in the image?",
        "Look at the image. Which color does the shape have? Answer with one word.",
    ),
    "shape": (
        "What shape is shown?",
        "Which shape is drawn in the picture?",
        "Look at the image. What kind of shape do you see? Answer with one word.",
    ),
    "count": (
        "How many shapes are there?",
        "Count the shapes in the image.",
        "Look at the image carefully. How many shapes can you count? Answer with a number.",
    ),
    "position": (
        "Where is the shape?",
        "In which part of the image is the shape?",
        "Look at the image. Is the shape at the left, the right, the top or the bottom?",
    ),
    "compare": (
        "Which image has more shapes?",
        "Which of the two images shows more shapes?",
        "Compare the two images. Which one contains more shapes, the first or the second?",
    ),
}
_MIN_GAP = 2  # px between the boxes of two shapes, so that they never touch
_LAYOUT_TRIES = 1000
_SPLIT_BUCKETS = {"train": range(0, 8), "val": range(8, 9), "heldout": range(9, 10)}


@dataclass(frozen=True)
class _Level:
    long_sides: tuple[int, ...]
    aspects: tuple[tuple[int, int], ...]  # (width, height) ratios
    shapes: tuple[str, ...]
    max_count: int
    single_size: tuple[float, float]  # object size range, fraction of the short side (one object)
    cells: int  # several objects sit in distinct cells of a cells x cells grid (+1 along a long side)
    cell_fill: tuple[float, float]  # object size range, fraction of the cell (several objects)
    tinted_background: bool


LEVELS = {
    "easy": _Level((128, 192, 256), ((1, 1), (4, 3), (3, 4), (2, 1), (1, 2)), ("circle", "square", "triangle"),
                   3, (0.36, 0.44), 2, (0.65, 0.85), False),
    "medium": _Level((96, 128, 192, 256, 384), ((1, 1), (4, 3), (3, 4), (2, 1), (1, 2), (3, 2)),
                     ("circle", "square", "triangle"), 4, (0.24, 0.36), 3, (0.5, 0.75), True),
    "hard": _Level((64, 96, 128, 256, 384, 512), ((1, 1), (4, 3), (3, 4), (2, 1), (1, 2), (3, 2), (3, 1)),
                   ("circle", "square", "triangle", "star"), 6, (0.16, 0.32), 3, (0.35, 0.7), True),
}


def answer_space(question_type: str, difficulty: str = "easy") -> tuple[str, ...]:
    """Every possible answer of a question type (chance level = 1 / len)."""
    level = LEVELS[difficulty]
    spaces = {
        "color": tuple(COLORS),
        "shape": level.shapes,
        "count": tuple(str(k) for k in range(1, level.max_count + 1)),
        "position": POSITIONS,
        "compare": ("first", "second"),
    }
    return spaces[question_type]


class SyntheticSource:
    """Samples `{"images": [PIL.Image], "texts": [{"user", "assistant"}]}` of one split, random access."""

    def __init__(
        self,
        seed: int = 42,
        split: str = "train",
        num_samples: int | None = None,
        question_types: tuple[str, ...] | None = None,
        difficulty: str = "easy",
        max_turns: int = 4,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
        if difficulty not in DIFFICULTIES:
            raise ValueError(f"unknown difficulty {difficulty!r}; choose one of {DIFFICULTIES}")
        defaults = SyntheticConfig()
        self.question_types = tuple(question_types or defaults.question_types)
        unknown = set(self.question_types) - set(SYNTHETIC_QUESTION_TYPES)
        if unknown:
            raise ValueError(f"unknown question types {sorted(unknown)}; known: {SYNTHETIC_QUESTION_TYPES}")
        self.seed, self.split, self.difficulty, self.max_turns = seed, split, difficulty, max_turns
        self.num_samples = num_samples if num_samples is not None else defaults.num_samples(split)
        self.level = LEVELS[difficulty]

    @classmethod
    def from_config(cls, cfg: SyntheticConfig, seed: int, split: str) -> SyntheticSource:
        return cls(seed, split, cfg.num_samples(split), cfg.question_types, cfg.difficulty, cfg.max_turns)

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return (self[i] for i in range(self.num_samples))

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"sample {index} out of range for {self.num_samples} samples")
        primary = self.question_types[index % len(self.question_types)]
        for attempt in range(10_000):
            rng = random.Random(f"dualtower-synthetic:{self.seed}:{self.split}:{index}:{attempt}")
            scenes = [self._scene(rng, primary)]
            if primary == "compare":
                scenes.append(self._scene(rng, primary, avoid_count=scenes[0]["count"]))
            if _split_of(scenes) == self.split:
                return self._sample(rng, primary, scenes)
        raise RuntimeError("no scene found for this split")  # unreachable in practice: 1 in 10 draws suffices

    def _scene(self, rng: random.Random, primary: str, avoid_count: int | None = None) -> dict[str, Any]:
        level = self.level
        counts = list(range(1, level.max_count + 1))
        if primary == "position":
            counts = [1]
        elif avoid_count is not None:
            counts = [k for k in counts if k != avoid_count]
        long_side, (aw, ah) = rng.choice(level.long_sides), rng.choice(level.aspects)
        width, height = (long_side, max(16, round(long_side * ah / aw))) if aw >= ah else (
            max(16, round(long_side * aw / ah)), long_side)
        scene = {
            "width": width,
            "height": height,
            "shape": rng.choice(level.shapes),
            "color": rng.choice(tuple(COLORS)),
            "count": rng.choice(counts),
            "background": _background(rng, level.tinted_background),
        }
        scene["objects"], scene["position"] = _layout(rng, level, width, height, scene["count"])
        return scene

    def _sample(self, rng: random.Random, primary: str, scenes: list[dict[str, Any]]) -> dict[str, Any]:
        images = [render(scene) for scene in scenes]
        if primary == "compare":
            answer = "first" if scenes[0]["count"] > scenes[1]["count"] else "second"
            return {"images": images, "texts": [{"user": rng.choice(QUESTIONS["compare"]), "assistant": answer}]}
        scene = scenes[0]
        others = [t for t in self.question_types if t not in (primary, "compare")]
        if scene["position"] is None:
            others = [t for t in others if t != "position"]
        rng.shuffle(others)
        asked = [primary, *others][: rng.randint(1, self.max_turns)]
        texts = [{"user": rng.choice(QUESTIONS[t]), "assistant": _answer(t, scene)} for t in asked]
        return {"images": images, "texts": texts}


def _answer(question_type: str, scene: dict[str, Any]) -> str:
    return str(scene["count"]) if question_type == "count" else str(scene[question_type])


def _background(rng: random.Random, tinted: bool) -> tuple[int, int, int]:
    if not tinted:
        return (255, 255, 255)
    return tuple(rng.randint(225, 255) for _ in range(3))  # type: ignore[return-value]


def _layout(
    rng: random.Random, level: _Level, width: int, height: int, count: int
) -> tuple[list[tuple[int, int, int]], str | None]:
    """Objects as (center_x, center_y, size); one object sits in a named region, several in distinct cells."""
    short = min(width, height)
    if count == 1:
        position = rng.choice(POSITIONS)
        fx, fy = _REGION_CENTERS[position]
        size = round(short * rng.uniform(*level.single_size))
        jitter = 0.04
        cx = round(width * (fx + rng.uniform(-jitter, jitter)))
        cy = round(height * (fy + rng.uniform(-jitter, jitter)))
        return [(cx, cy, max(size, 6))], position
    for _ in range(_LAYOUT_TRIES):
        objects = _grid_objects(rng, level, width, height, count)
        if _separated(objects):
            return objects, None
    raise RuntimeError(f"no layout of {count} separated shapes fits a {width}x{height} image")


def _grid_objects(rng: random.Random, level: _Level, width: int, height: int, count: int) -> list[tuple[int, int, int]]:
    cols = level.cells + (width > height * 1.4)
    rows = level.cells + (height > width * 1.4)
    cell_w, cell_h = width / cols, height / rows
    cells = rng.sample(range(rows * cols), count)
    objects = []
    for cell in cells:
        r, c = divmod(cell, cols)
        size = round(min(cell_w, cell_h) * rng.uniform(*level.cell_fill))
        slack_x, slack_y = (cell_w - size) / 2, (cell_h - size) / 2
        cx = round((c + 0.5) * cell_w + rng.uniform(-slack_x, slack_x) * 0.8)
        cy = round((r + 0.5) * cell_h + rng.uniform(-slack_y, slack_y) * 0.8)
        objects.append((cx, cy, max(size, 4)))
    return objects


def _separated(objects: list[tuple[int, int, int]]) -> bool:
    """Whether every two bounding boxes are `_MIN_GAP` px apart along x or y.

    Rounded centres and the minimum size can bring shapes of neighbouring cells into contact; touching shapes
    read as one blob, so the count answer would no longer be true of the pixels. PIL fills
    [floor(lo), floor(hi)], so a gap of 2 leaves at least one background row or column between them.
    """
    for i, (x1, y1, s1) in enumerate(objects):
        for x2, y2, s2 in objects[i + 1:]:
            reach = (s1 + s2) / 2 + _MIN_GAP
            if abs(x1 - x2) < reach and abs(y1 - y2) < reach:
                return False
    return True


def render(scene: dict[str, Any]) -> Image.Image:
    image = Image.new("RGB", (scene["width"], scene["height"]), scene["background"])
    draw = ImageDraw.Draw(image)
    for cx, cy, size in scene["objects"]:
        _draw_shape(draw, scene["shape"], cx, cy, size, COLORS[scene["color"]])
    return image


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: int, cy: int, size: int, fill: tuple) -> None:
    half = size / 2
    box = (cx - half, cy - half, cx + half, cy + half)
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)], fill=fill)
    elif shape == "star":
        points = []
        for k in range(10):  # alternate outer and inner vertices, first one pointing up
            radius = half if k % 2 == 0 else half * 0.45
            angle = math.pi * k / 5 - math.pi / 2
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        draw.polygon(points, fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def _split_of(scenes: list[dict[str, Any]]) -> str:
    digest = hashlib.blake2b(repr(scenes).encode(), digest_size=8).digest()
    bucket = int.from_bytes(digest, "little") % 10
    return next(split for split, buckets in _SPLIT_BUCKETS.items() if bucket in buckets)


def heldout_examples(
    n: int,
    seed: int = 42,
    question_types: tuple[str, ...] | None = None,
    difficulty: str = "easy",
) -> list[dict[str, Any]]:
    """`n` held-out single-question examples: {"images", "question", "answer", "question_type"}.

    Question types take turns, and so do the answers within a type: the k-th question of a type has the answer
    `answer_space(type)[k % len]`. Drawn independently, a small set is lopsided (64 easy questions let a
    constant answer per type score 45%); balanced, that baseline is chance.
    """
    source = SyntheticSource(seed, "heldout", _HELDOUT_POOL, question_types, difficulty, max_turns=1)
    types = source.question_types
    # Per position of question_types: the next source index of that type, and drawn examples not yet used.
    cursors = list(range(len(types)))
    spares: list[dict[str, list[dict[str, Any]]]] = [defaultdict(list) for _ in types]
    examples = []
    for slot in range(n):
        position = slot % len(types)
        answers = answer_space(types[position], difficulty)
        wanted = answers[(slot // len(types)) % len(answers)]
        while not spares[position][wanted]:
            if cursors[position] >= _HELDOUT_POOL:
                raise RuntimeError(f"no held-out {types[position]} question answered {wanted!r}")
            example = _single_question(source, cursors[position], types[position])
            spares[position][example["answer"]].append(example)
            cursors[position] += len(types)
        examples.append(spares[position][wanted].pop(0))
    return examples


_HELDOUT_POOL = 1 << 30  # held-out indices to draw from: answers are uniform, so few are ever drawn


def _single_question(source: SyntheticSource, index: int, question_type: str) -> dict[str, Any]:
    sample = source[index]
    turn = sample["texts"][0]
    return {"images": sample["images"], "question": turn["user"], "answer": turn["assistant"],
            "question_type": question_type}
