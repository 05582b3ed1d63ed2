"""A local MMStar-format parquet file built from the synthetic held-out split (for tests and demos offline).

Each row is one synthetic question (without its "Answer with one word." sentence) turned into a multiple-choice
question in MMStar's style ("<question>\\nOptions: A: x, B: y, C: z, D: w"), with distractors drawn from the
question type's answer space, options shuffled from a per-row seed, and MMStar-like categories:

| question type | category                | l2_category            |
|---------------|-------------------------|------------------------|
| shape         | coarse perception       | image scene and topic  |
| color         | coarse perception       | image style & quality  |
| count         | fine-grained perception | object counting        |
| position      | fine-grained perception | localization           |

The file carries the Hugging Face `datasets` feature metadata, so `datasets` (and lmms-eval tasks built on
it) decode `image` into PIL images, while `dualtower.eval.offline` reads the raw bytes with pyarrow.
"""

from __future__ import annotations

import io
import json
import random
import string
from pathlib import Path
from typing import Any

from PIL import Image

CATEGORIES: dict[str, tuple[str, str]] = {
    "shape": ("coarse perception", "image scene and topic"),
    "color": ("coarse perception", "image style & quality"),
    "count": ("fine-grained perception", "object counting"),
    "position": ("fine-grained perception", "localization"),
}
MAX_OPTIONS = 4
_HF_FEATURES = {
    "index": {"dtype": "int64", "_type": "Value"},
    "question": {"dtype": "string", "_type": "Value"},
    "image": {"_type": "Image"},
    "answer": {"dtype": "string", "_type": "Value"},
    "category": {"dtype": "string", "_type": "Value"},
    "l2_category": {"dtype": "string", "_type": "Value"},
    "meta_info": {
        "source": {"dtype": "string", "_type": "Value"},
        "split": {"dtype": "string", "_type": "Value"},
        "image_path": {"dtype": "string", "_type": "Value"},
    },
}


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def question_stem(question: str) -> str:
    """The synthetic question without its answer-format sentence ("Answer with one word."): in a
    multiple-choice row it would contradict the letter the prompt asks for."""
    return question.split(" Answer with ")[0]


def mmstar_rows(n: int, seed: int = 42, difficulty: str = "easy") -> list[dict[str, Any]]:
    """`n` MMStar-format rows (image as {bytes, path}) from the synthetic held-out split."""
    from dualtower.data.synthetic import answer_space, heldout_examples

    examples = heldout_examples(n, seed, question_types=tuple(CATEGORIES), difficulty=difficulty)
    rows = []
    for index, example in enumerate(examples):
        qtype, answer = example["question_type"], example["answer"]
        rng = random.Random(f"dualtower-mmstar:{seed}:{index}")
        distractors = [a for a in answer_space(qtype, difficulty) if a != answer]
        options = [answer, *rng.sample(distractors, min(MAX_OPTIONS - 1, len(distractors)))]
        rng.shuffle(options)
        letters = string.ascii_uppercase[: len(options)]
        listed = ", ".join(f"{letter}: {option}" for letter, option in zip(letters, options, strict=True))
        category, l2_category = CATEGORIES[qtype]
        rows.append(
            {
                "index": index,
                "question": f"{question_stem(example['question'])}\nOptions: {listed}",
                "image": {"bytes": png_bytes(example["images"][0]), "path": None},
                "answer": letters[options.index(answer)],
                "category": category,
                "l2_category": l2_category,
                "meta_info": {"source": "dualtower-synthetic", "split": "heldout", "image_path": f"{index}.png"},
            }
        )
    return rows


def build_mmstar_parquet(path: str | Path, n: int, seed: int = 42, difficulty: str = "easy") -> Path:
    """Write `n` synthetic MMStar-format rows to `path` (a parquet file) and return the path."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as error:
        raise ImportError("writing parquet needs pyarrow: pip install 'dualtower[data]' (or pyarrow)") from error
    text = pa.string()
    schema = pa.schema(
        [
            ("index", pa.int64()),
            ("question", text),
            ("image", pa.struct([("bytes", pa.binary()), ("path", text)])),
            ("answer", text),
            ("category", text),
            ("l2_category", text),
            ("meta_info", pa.struct([("source", text), ("split", text), ("image_path", text)])),
        ],
        metadata={b"huggingface": json.dumps({"info": {"features": _HF_FEATURES}}).encode()},
    )
    table = pa.Table.from_pylist(mmstar_rows(n, seed, difficulty), schema=schema)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path
