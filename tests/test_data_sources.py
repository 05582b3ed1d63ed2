"""Sources: seeded epoch orders, unreadable rows, The Cauldron's held-out rule and its interleave weights."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from data_helpers import sample

from dualtower.data import sources
from dualtower.data.sources import CauldronSource, IndexedSource, UnreadableSample, held_out


def test_every_epoch_is_its_own_seeded_permutation() -> None:
    source = IndexedSource(list(range(64)), seed=3, shuffle=True)
    orders = [source.shard_indices(epoch, 0, 1).copy() for epoch in (0, 1, 0)]
    assert sorted(orders[0].tolist()) == list(range(64))
    assert not np.array_equal(orders[0], orders[1])  # epochs reshuffle
    assert np.array_equal(orders[0], orders[2])  # and an epoch's order is a function of (seed, epoch)
    assert np.array_equal(IndexedSource(list(range(64)), seed=3, shuffle=True).shard_indices(1, 0, 1), orders[1])
    assert IndexedSource(list(range(5)), seed=3, shuffle=False).shard_indices(4, 1, 2).tolist() == [1, 3]


class _Flaky:
    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> int:
        if index == 2:
            raise OSError("bad row")
        return index * 10


def test_a_row_that_fails_to_read_becomes_an_unreadable_sample() -> None:
    source = IndexedSource(_Flaky(), seed=0, shuffle=False)
    read = dict(source.iterate(0, 0, 1))
    assert [read[p] for p in (0, 1, 3)] == [0, 10, 30]
    assert isinstance(read[2], UnreadableSample) and read[2].error == "OSError: bad row"


def test_held_out_depends_on_the_images_not_only_the_texts() -> None:
    rows = [sample([{"bytes": bytes([i, 7, 7]), "path": None}], ("same question?", "same")) for i in range(64)]
    verdicts = [held_out(row, 0.5) for row in rows]
    assert 0 < sum(verdicts) < len(rows)
    assert held_out(rows[0], 0.5) == held_out(
        sample([{"bytes": bytes([0, 7, 7]), "path": "x"}], ("same question?", "same")), 0.5
    )  # bytes win over the path
    assert not any(held_out(row, 0.0) for row in rows) and all(held_out(row, 1.0) for row in rows)


def test_training_interleaves_the_configs_in_proportion_to_their_sizes(monkeypatch: pytest.MonkeyPatch) -> None:
    sizes = {"alpha": 30, "empty": 0, "beta": 10}
    captured = {}

    def interleave(parts, probabilities=None, seed=None, stopping_strategy=None):
        captured.update(parts=len(parts), probabilities=probabilities, seed=seed, stopping=stopping_strategy)

    class Stream:  # what _stream asks of a streamed config
        features = None

        def shuffle(self, seed: int, buffer_size: int) -> Stream:
            return self

    def load(name: str) -> Stream:
        return Stream()

    fake_datasets = SimpleNamespace(interleave_datasets=interleave, Image=type("Image", (), {}))
    monkeypatch.setattr(sources, "_datasets", lambda: fake_datasets)  # (importing datasets takes seconds)
    CauldronSource("fake", tuple(sizes), "train", 5, 0.1, load, sizes.__getitem__)._stream()
    assert captured == {"parts": 2, "probabilities": [0.75, 0.25], "seed": 5, "stopping": "all_exhausted"}
