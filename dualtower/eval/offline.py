"""Offline MMStar-format evaluation of local parquet files, without lmms-eval.

Columns: `index`, `question` (lettered options inside), `image` (encoded bytes, an HF `{bytes, path}` struct,
or a list of either), `answer` (a letter), `category`, `l2_category`. Prompts are built as lmms-eval's
`mmstar` task and the original wrapper build them (post prompt, then the benchmark formatting table), the
model generates, the letter is extracted with lmms-eval's rule and the score is MMStar's mean of
per-l2-category means (dualtower.eval.mmstar). A row whose image cannot be decoded is not generated for: it
scores 0 (the score stays over every row, comparable with full runs), its sample record carries the `error`,
and the results count it as `unreadable_images`. A row without a question, an answer or any image (nulls in
the parquet) is handled the same way and counted as `invalid_rows`.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from dualtower.data.images import ImageLoadError, load_image
from dualtower.eval import mmstar
from dualtower.eval.prompts import format_prompt
from dualtower.eval.runner import EvalModel, EvalPrompt, sampling_from_gen_kwargs

logger = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("index", "question", "image", "answer", "category", "l2_category")
# lmms-eval's defaults for a generate_until task without generation_kwargs.
MMSTAR_GEN_KWARGS: dict[str, Any] = {"until": ["\n\n"], "do_sample": False}


def read_parquet_rows(path: str | Path, limit: float | None = None) -> list[dict[str, Any]]:
    """Rows of an MMStar-format parquet file (all columns kept); `limit` as lmms-eval's --limit."""
    try:
        import pyarrow.parquet as pq
    except ImportError as error:
        raise ImportError("reading parquet needs pyarrow: pip install 'dualtower[data]' (or pyarrow)") from error
    table = pq.read_table(path)
    missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if missing:
        raise ValueError(f"{path}: missing MMStar column(s) {missing}; found {table.column_names}")
    rows = table.to_pylist()
    return rows[: _limit_count(limit, len(rows))]


def _limit_count(limit: float | None, total: int) -> int:
    """None / -1: all; 0 < limit < 1: that fraction (rounded up); otherwise a count."""
    if limit is None or limit < 0:
        return total
    if limit < 1:
        return min(total, math.ceil(limit * total))
    return min(total, int(limit))


def row_images(row: Mapping[str, Any]) -> list[Any]:
    image = row["image"]
    return list(image) if isinstance(image, (list, tuple)) else [image]


def row_prompt(row: Mapping[str, Any], task: str = "mmstar") -> EvalPrompt:
    formatted = format_prompt(mmstar.doc_to_text(str(row["question"])), task)
    return EvalPrompt(lambda: row_images(row), formatted.user_text, formatted.assistant_prefix)


def evaluate_mmstar_rows(
    runner: EvalModel,
    rows: Sequence[Mapping[str, Any]],
    gen_kwargs: Mapping[str, Any] | None = None,
    rule: str = "lmms-eval",
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Generate an answer per row and score them: (results, per-sample records)."""
    if not rows:
        raise ValueError("no rows to evaluate")
    kwargs = {**MMSTAR_GEN_KWARGS, **(gen_kwargs or {})}
    sampling = sampling_from_gen_kwargs(kwargs, seed=runner.seed)
    invalid = invalid_rows(rows)
    unreadable = unreadable_rows(rows, skip=invalid)
    failed = {**invalid, **unreadable}
    readable = [i for i in range(len(rows)) if i not in failed]
    start = time.perf_counter()
    generated = runner.generate([row_prompt(rows[i]) for i in readable], sampling) if readable else []
    elapsed = time.perf_counter() - start
    predictions = [""] * len(rows)
    for i, text in zip(readable, generated, strict=True):
        predictions[i] = text
    samples = score_predictions(rows, predictions, rule)
    for i, message in failed.items():
        samples[i].update(score=0.0, error=message)
    results = mmstar.score_rows(samples)
    results["unreadable_images"] = len(unreadable)
    results["invalid_rows"] = len(invalid)
    results["timing"] = {"generate_s": elapsed, "samples_per_s": len(readable) / elapsed if elapsed else 0.0}
    return results, samples


def invalid_rows(rows: Sequence[Mapping[str, Any]]) -> dict[int, str]:
    """{position: error} of the rows that cannot be asked or scored (a null question or answer, no image):
    str(None) would otherwise ask the model "None" or expect the answer "NONE"."""
    invalid = {}
    for position, row in enumerate(rows):
        problems = [name for name in ("question", "answer") if not isinstance(row[name], str) or not row[name]]
        if row["image"] is None or row_images(row) == []:
            problems.append("image")
        if problems:
            invalid[position] = f"missing {', '.join(problems)}"
            logger.warning("MMStar row %s: %s; scored 0", row["index"], invalid[position])
    return invalid


def unreadable_rows(rows: Sequence[Mapping[str, Any]], skip: Mapping[int, str] | None = None) -> dict[int, str]:
    """{position: error} of the rows (other than those in `skip`) with an image that cannot be decoded, each
    logged once.

    Images are decoded here and again when generating: holding every decoded image would cost gigabytes,
    and one bad image must not stop a run after hours of generation.
    """
    unreadable = {}
    for position, row in enumerate(rows):
        if skip and position in skip:
            continue
        try:
            for image in row_images(row):
                load_image(image)
        except ImageLoadError as error:
            unreadable[position] = str(error)
            logger.warning("MMStar row %s: %s; scored 0", row["index"], error)
    return unreadable


def score_predictions(
    rows: Sequence[Mapping[str, Any]], predictions: Sequence[str], rule: str = "lmms-eval"
) -> list[dict[str, Any]]:
    """Per-sample records: the (stripped, as lmms-eval does) prediction, extracted letter and 0/1 score."""
    if len(rows) != len(predictions):
        raise ValueError(f"{len(rows)} rows but {len(predictions)} predictions")
    samples = []
    for row, prediction in zip(rows, predictions, strict=True):
        text = prediction.strip()
        letter = mmstar.extract_letter(text, rule)
        answer = str(row["answer"] or "").strip().upper()
        samples.append(
            {
                "index": row["index"],
                "category": row["category"],
                "l2_category": row["l2_category"],
                "answer": answer,
                "prediction": text,
                "extracted": letter,
                "score": float(bool(answer) and letter == answer),  # no answer: nothing can match it
            }
        )
    return samples


def write_results(
    output_path: str | Path, results: Mapping[str, Any], samples: Sequence[Mapping[str, Any]] | None
) -> Path:
    """Write the results JSON (and samples JSONL beside it). A path ending in .json is the file itself,
    anything else a directory that receives results_<timestamp>.json."""
    output_path = Path(output_path)
    if output_path.suffix == ".json":
        target = output_path
    else:
        target = output_path / f"results_{datetime.now().strftime('%Y%m%dT%H%M%S')}.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(results, indent=2, ensure_ascii=False, default=str) + "\n")
    if samples is not None:
        lines = (json.dumps(s, ensure_ascii=False, default=str) for s in samples)
        target.with_name(target.stem + "_samples.jsonl").write_text("\n".join(lines) + "\n")
    return target


def run_offline_mmstar(
    runner: EvalModel,
    parquet: str | Path,
    output_path: str | Path | None = None,
    limit: float | None = None,
    gen_kwargs: Mapping[str, Any] | None = None,
    rule: str = "lmms-eval",
    log_samples: bool = False,
    config: Mapping[str, Any] | None = None,
) -> tuple[dict[str, Any], Path | None]:
    """Read, generate, score and write: (results document, path of the results JSON or None)."""
    rows = read_parquet_rows(parquet, limit)
    logger.info("offline MMStar: %d rows from %s", len(rows), parquet)
    scores, samples = evaluate_mmstar_rows(runner, rows, gen_kwargs, rule)
    document = {
        "task": "mmstar",
        "source": str(parquet),
        "num_samples": len(rows),
        "unreadable_images": scores["unreadable_images"],
        "invalid_rows": scores["invalid_rows"],
        "extraction_rule": rule,
        "results": {k: v for k, v in scores.items() if k not in ("timing", "unreadable_images", "invalid_rows")},
        "timing": scores["timing"],
        "config": {"gen_kwargs": {**MMSTAR_GEN_KWARGS, **(gen_kwargs or {})}, "limit": limit, **(config or {})},
    }
    path = write_results(output_path, document, samples if log_samples else None) if output_path else None
    return document, path
