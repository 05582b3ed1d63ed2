"""Evaluation: the runner looks the tokenizer up in the checkpoint's own directory first (DESIGN.md
section 6) whether the checkpoint is given as a directory, as its weights file, or as a Hub repo id (the
downloaded snapshot); MMStar letter extraction and aggregation equal lmms-eval's own functions."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_eval_runner import make_checkpoint

from dualtower import tokenizer as tokmod
from dualtower.eval import mmstar
from dualtower.eval.offline import score_predictions
from dualtower.eval.runner import EvalModel


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("debug_checkpoint"))


@pytest.fixture
def tokenizer_dirs(monkeypatch: pytest.MonkeyPatch) -> list:
    """The checkpoint_dir every load_tokenizer call receives (the real tokenizer is still returned)."""
    seen: list = []
    real = tokmod.load_tokenizer

    def recording(checkpoint_dir=None, tokenizer_id=tokmod.DEFAULT_TOKENIZER_ID):
        seen.append(None if checkpoint_dir is None else Path(checkpoint_dir).resolve())
        return real(checkpoint_dir, tokenizer_id)

    monkeypatch.setattr(tokmod, "load_tokenizer", recording)
    return seen


@pytest.mark.parametrize("given", ["directory", "weights_file"])
def test_the_tokenizer_comes_from_the_checkpoint_directory(checkpoint: Path, tokenizer_dirs: list, given: str):
    source = checkpoint if given == "directory" else checkpoint / "model.safetensors"
    EvalModel.from_pretrained(source, device="cpu")
    assert tokenizer_dirs == [checkpoint.resolve()]


def test_the_tokenizer_of_a_hub_checkpoint_comes_from_its_snapshot(
    checkpoint: Path, tokenizer_dirs: list, monkeypatch: pytest.MonkeyPatch
):
    import huggingface_hub

    downloads: list[str] = []

    def fake_snapshot_download(repo_id: str, **kwargs: object) -> str:
        downloads.append(repo_id)
        return str(checkpoint)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    EvalModel.from_pretrained("someone/dualtower-debug", device="cpu")
    assert tokenizer_dirs == [checkpoint.resolve()]
    assert downloads == ["someone/dualtower-debug"]  # resolved once, not once for weights and once more


# -- MMStar scoring against lmms-eval's own code -------------------------------------------------------------

_PIECES = [*"ABCDEabcde ().:,!?;'\"\n", "the answer is ", "The Answer Is ", "I choose ", "答案是", "option ",
           "Answer: "]


def test_letter_extraction_equals_lmms_evals_on_random_texts():
    """lmms-eval's mmstar `exact_match` extracts with `extract_mcq_answer(pred, choices=A-D)`: ours must give
    the same letter on every text (formats, ranks, ties, phrases, stripping), not only on hand-picked ones."""
    import random

    from lmms_eval.tasks._task_utils.mcq_extract import extract_mcq_answer

    rng = random.Random(0)
    texts = ["".join(rng.choice(_PIECES) for _ in range(rng.randint(0, 10))) for _ in range(20000)]
    differing = [t for t in texts if mmstar.extract_letter(t) != extract_mcq_answer(t, choices=["A", "B", "C", "D"])]
    assert differing == []


def test_scores_equal_lmms_evals_aggregation_per_category_and_overall():
    """lmms-eval aggregates a metric over the rows its process_results sent to it: each core category gets
    only its own rows, "average" gets all; each is the mean of per-l2-category means (unequal sizes here)."""
    import random

    from lmms_eval.tasks.mmstar.utils import mmstar_aggregate_results, mmstar_process_results

    rng = random.Random(1)
    docs, predictions = [], []
    for index in range(60):
        category = rng.choice(list(mmstar.CORE_CATEGORIES)[:3])
        l2 = rng.choice(mmstar.CORE_CATEGORIES[category][: rng.randint(1, 3)])
        docs.append({"index": index, "answer": rng.choice("ABCD"), "category": category, "l2_category": l2})
        predictions.append(rng.choice(["A", "(B)", "The answer is C.", "d", "no idea", "C. cat", ""]))
    per_metric: dict[str, list] = {}
    for doc, prediction in zip(docs, predictions, strict=True):
        for metric, value in mmstar_process_results(doc, [prediction]).items():
            per_metric.setdefault(metric, []).append(value)
    ours = mmstar.score_rows(score_predictions(docs, predictions))
    theirs = {metric: mmstar_aggregate_results(values) for metric, values in per_metric.items()}
    assert set(theirs) <= set(ours)
    for metric, value in theirs.items():
        assert ours[metric] == pytest.approx(value, abs=1e-12), metric


# -- the plugin's model_args ---------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [0, "-2"])
def test_a_plugin_batch_size_below_one_is_an_error_not_silently_one(value):
    """`python -m dualtower.evaluate --batch_size 0` and EvalModel(batch_size=0) refuse it; lmms-eval's own CLI
    path through the plugin must too, instead of running one request at a time."""
    from dualtower.eval.lmms_plugin import _batch_size

    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        _batch_size(value)
    assert _batch_size("8") == 8 and _batch_size("auto") == 32
