"""MMStar scoring on malformed rows: null fields in a local parquet are scored and counted, never a crash or a
silently invented prompt ("None")."""

from __future__ import annotations

import io
from types import SimpleNamespace

import pytest
from PIL import Image

from dualtower.eval import mmstar
from dualtower.eval.offline import evaluate_mmstar_rows, score_predictions


def _png() -> dict:
    encoded = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(encoded, format="PNG")
    return {"bytes": encoded.getvalue(), "path": None}


def test_rows_without_a_category_count_in_the_average_as_in_lmms_eval() -> None:
    from lmms_eval.tasks.mmstar.utils import mmstar_aggregate_results, mmstar_process_results

    docs = [
        {"index": 0, "answer": "A", "category": "math", "l2_category": "geometry"},
        {"index": 1, "answer": "B", "category": None, "l2_category": None},
        {"index": 2, "answer": "C", "category": "math", "l2_category": None},
    ]
    predictions = ["A", "B", "D"]
    per_metric: dict = {}
    for doc, prediction in zip(docs, predictions, strict=True):
        for metric, value in mmstar_process_results(doc, [prediction]).items():
            per_metric.setdefault(metric, []).append(value)
    # lmms-eval aggregates only the metrics of its task yaml: a None category adds to "average" alone.
    theirs = {m: mmstar_aggregate_results(v) for m, v in per_metric.items() if m is not None}
    ours = mmstar.score_rows(score_predictions(docs, predictions))
    assert ours["average"] == pytest.approx(theirs["average"]) == pytest.approx((1.0 + 0.5) / 2)
    assert ours["math"] == pytest.approx(theirs["math"])
    assert None not in ours
    assert sum(ours["counts"].values()) == 3


def test_rows_with_missing_fields_are_scored_0_counted_and_not_generated() -> None:
    good = _png()
    base = {"question": "Q?\nOptions: A: x, B: y", "image": good, "answer": "A", "category": "c", "l2_category": "l"}
    rows = [
        {**base, "index": 0},
        {**base, "index": 1, "question": None},
        {**base, "index": 2, "image": []},
        {**base, "index": 3, "answer": None},
        {**base, "index": 4},
    ]
    asked = []

    def generate(prompts, sampling):
        asked.extend(prompt.text for prompt in prompts)
        return ["A"] * len(prompts)

    results, samples = evaluate_mmstar_rows(SimpleNamespace(seed=0, generate=generate), rows)
    assert len(asked) == 2 and not any("None" in text for text in asked)
    assert [s["index"] for s in samples] == [0, 1, 2, 3, 4]  # no row is lost
    assert [s["score"] for s in samples] == [1.0, 0.0, 0.0, 0.0, 1.0]
    assert ["error" in s for s in samples] == [False, True, True, True, False]
    assert results["invalid_rows"] == 3 and results["unreadable_images"] == 0
    assert results["average"] == pytest.approx(2 / 5)


def test_a_parquet_with_null_fields_is_read_scored_and_written(tmp_path) -> None:
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from dualtower.eval.offline import run_offline_mmstar

    good = _png()
    columns = {
        "index": [0, 1, 2, 3],
        "question": ["Q?\nOptions: A: x, B: y", None, "Q?\nOptions: A: x, B: y", "Q?\nOptions: A: x, B: y"],
        "image": [good, good, None, good],
        "answer": ["A", "A", "A", "B"],
        "category": ["math", "math", "math", None],
        "l2_category": ["geometry", "geometry", "geometry", None],
    }
    parquet = tmp_path / "nulls.parquet"
    pq.write_table(pa.table(columns), parquet)
    runner = SimpleNamespace(seed=0, generate=lambda prompts, sampling: ["A"] * len(prompts))
    document, path = run_offline_mmstar(runner, parquet, tmp_path / "out.json", log_samples=True)
    assert document["num_samples"] == 4 and document["invalid_rows"] == 2
    written = json.loads(path.read_text())
    assert written["results"]["counts"] == {"geometry": 3, "null": 1}
    # geometry: 1 right of 3; the uncategorized row (answer B, said A): 0 -> average (1/3 + 0) / 2.
    assert written["results"]["average"] == pytest.approx(1 / 6)
    assert written["results"]["math"] == pytest.approx(1 / 3)
    samples = path.with_name("out_samples.jsonl").read_text().splitlines()
    assert [json.loads(s).get("error") for s in samples] == [None, "missing question", "missing image", None]
