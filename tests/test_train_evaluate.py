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


def test_answer_accuracy_is_exact_match_after_normalization() -> None:
    from dualtower.training.evaluate import answer_accuracy, normalize_answer

    assert normalize_answer("  Top-Left,\n circle! ") == "topleft circle"
    assert normalize_answer("Rouge é!") == "rouge é"  # unicode letters are kept
    # Case, punctuation and spacing do not matter; extra words, a wrong answer or an empty prediction do.
    predictions = ["Red.", " 3 ", "red circle", "blue", "", "Circle"]
    answers = ["red", "3", "red", "red", "red", "circle"]
    assert answer_accuracy(predictions, answers) == pytest.approx(3 / 6)
    assert answer_accuracy([], []) == 0.0
    with pytest.raises(ValueError):
        answer_accuracy(["red"], ["red", "blue"])


def test_accuracy_scores_the_first_samples_on_rank_zero(monkeypatch: pytest.MonkeyPatch) -> None:
    from dualtower.training import evaluate

    heldout = [{"images": [], "question": f"q{i}", "answer": answer} for i, answer in enumerate("abcde")]
    asked = []

    def fake_answers(model, tokenizer, examples, max_new_tokens, batch_size=16):
        asked.extend(ex["question"] for ex in examples)
        assert not model.training and max_new_tokens == 3
        return ["A", "x", "c."]

    monkeypatch.setattr(evaluate, "greedy_answers", fake_answers)
    evaluator = Evaluator(EvalSection(accuracy_samples=3, max_new_tokens=3), None, None, single_env(), heldout)
    record = evaluator.accuracy(torch.nn.Linear(1, 1))
    assert asked == ["q0", "q1", "q2"]
    assert record == {"eval/accuracy": pytest.approx(2 / 3), "eval/accuracy_samples": 3}
    assert Evaluator(EvalSection(), None, None, single_env()).accuracy(None) == {}  # not the synthetic source


def test_validation_without_batches_logs_nothing_and_a_short_loader_is_used_whole() -> None:
    model = tiny_model().double()
    batches = make_batches(model, LAYOUTS[:2], seed=7)
    assert Evaluator(EvalSection(), None, None, single_env()).validation_loss(model, nullcontext) == {}
    record = Evaluator(EvalSection(val_batches=8), ListLoader(batches), None, single_env()).validation_loss(
        model, nullcontext
    )
    assert record["eval/tokens"] == sum(b.num_supervised for b in batches)
