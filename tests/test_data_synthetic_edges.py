"""The synthetic source's edge cases: the smallest, most elongated images of each difficulty."""

from __future__ import annotations

import dataclasses
import hashlib
import random

import pytest
from test_data_synthetic import components, foreground

from dualtower.data.synthetic import LEVELS, SyntheticSource, _layout, render


@pytest.mark.parametrize(("difficulty", "width", "height", "count"), [
    ("hard", 64, 21, 6),  # 64 px long side at 3:1: a 4 x 3 grid of 16 x 7 px cells
    ("hard", 64, 21, 4),
    ("hard", 64, 32, 5),
    ("medium", 96, 48, 4),
])
def test_shapes_of_a_count_never_touch(difficulty, width, height, count):
    """Touching shapes form one blob, so the count answer would be false of the pixels."""
    for k in range(60):
        objects, _ = _layout(random.Random(k), LEVELS[difficulty], width, height, count)
        scene = {"width": width, "height": height, "background": (255, 255, 255), "shape": "square",
                 "color": "black", "objects": objects}
        assert len(components(foreground(render(scene), (255, 255, 255)))) == count, (k, objects)


def test_splits_are_disjoint_even_when_scenes_repeat():
    """With a scene space small enough that scenes repeat within a split, none crosses into another split.

    (With the real levels scenes practically never repeat, so a disjointness check there has no power.)
    """
    tiny = dataclasses.replace(LEVELS["easy"], long_sides=(16,), aspects=((1, 1),), shapes=("square",),
                               max_count=1, single_size=(0.5, 0.5))
    seen = {}
    for split in ("train", "val", "heldout"):
        source = SyntheticSource(0, split, 300, ("color",))
        source.level = tiny
        seen[split] = [hashlib.sha1(source[i]["images"][0].tobytes()).hexdigest() for i in range(300)]
    assert len(set(seen["train"])) < 200  # scenes repeat: a split by index alone would share many of them
    train, val, heldout = (set(v) for v in seen.values())
    assert not train & val and not train & heldout and not val & heldout
