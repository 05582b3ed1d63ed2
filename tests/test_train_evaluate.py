"""The validation loss: token-weighted over the supervised tokens of a fixed set of validation batches."""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch
from test_train_utils import ListLoader, make_batches, one_thread, single_env, tiny_model  # noqa: F401

from dualtower.config import EvalSection
from dualtower.training.evaluate import Evaluator

pytestmark = pytest.mark.usefixtures("one_thread")

# Batches with very different supervised-token counts (and fewer supervised tokens than tokens).
LAYOUTS = [[(1, 2, 5), (0, 0, 3)], [(2, 1, 17), (1, 0, 9), (0, 0, 11)], [(0, 0, 30)], [(1, 0, 4)]]


def test_validation_loss_is_the_mean_over_supervised_tokens() -> None:
    model = tiny_model().double()
    batches = make_batches(model, LAYOUTS, seed=7)
    counts = [b.num_supervised for b in batches[:3]]
    assert len(set(counts)) == 3 and sum(counts) < sum(b.num_tokens for b in batches[:3])
    evaluator = Evaluator(EvalSection(val_batches=3), ListLoader(batches), None, single_env())
    with torch.no_grad():
        expected = sum(model.loss_sum(b).item() for b in batches[:3]) / sum(counts)  # the 4th is past val_batches
    record = evaluator.validation_loss(model, nullcontext)
    assert record["eval/tokens"] == sum(counts)
    assert record["eval/loss"] == pytest.approx(expected, rel=1e-9)
    assert evaluator.validation_loss(model, nullcontext) == record  # the same batches every time
