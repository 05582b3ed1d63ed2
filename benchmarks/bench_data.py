"""Data benchmark: packing + collation against the plain unpacked path, in the same run (pytest-benchmark).

    python -m pytest benchmarks/bench_data.py [--benchmark-json out.json]

The timed work is the data side of a step: stream prepared documents through the packer (shuffle buffer 256,
4 rows per batch) and collate every batch into a PackedBatch. Baseline: 4 documents per batch in arrival
order, collated one per row (no packing). Cases:
- `debug`: synthetic documents of the debug flavor with their pixels (128-px tiles), rows of 1024 tokens / 64
  tiles: the CPU-sized end of things, pixel copies included;
- `135m-64tiles` / `135m-18tiles`: synthetic documents at the 135m sizes (2048-px long side, 65 tokens per
  tile) as layouts (no pixel tensors: packing logic and token collation at realistic lengths), rows of 4096
  tokens with a tile budget that does not bind (64) and the default one (18), which does;
- `loader`: the whole pipeline from raw synthetic samples (decode, resize, tokenize, pack, collate) at the
  debug flavor, in-process, against the same loader unpacked.

Data work runs on the host CPU on every machine; on the GPU machine these figures describe its CPU.
extra_info (see _common.py): samples_per_s, tokens_per_s, baseline_samples_per_s, ratio (unpacked time /
packed time for the same documents; < 1 means packing costs time), packing_efficiency (non-pad tokens / row
capacity; all rows, the final drain of the buffer included), packing_efficiency_steady (rows cut while the
buffer was full, as in training), baseline_padded_efficiency (tokens / (rows x longest document of its
batch): what a dense padded batch of the baseline carries), tiles_per_row.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import pytest
import torch
from _common import CUDA, median_s

from dualtower.data.collate import collate
from dualtower.data.config import DataConfig, SyntheticConfig
from dualtower.data.document import Document, document_from_sample
from dualtower.data.images import ImageProcessor
from dualtower.data.loader import build_loader
from dualtower.data.packing import Item, StreamPacker
from dualtower.data.synthetic import SyntheticSource
from dualtower.model.config import flavor
from dualtower.tokenizer import TokenizerError, load_tokenizer

NUM_DOCS, BUFFER, ROWS, ROUNDS = 384, 256, 4, 3
CASES = {  # name: (flavor, with pixels, max tokens per row, max tiles per row)
    "debug": ("debug", True, 1024, 64),
    "135m-64tiles": ("135m", False, 4096, 64),
    "135m-18tiles": ("135m", False, 4096, 18),
}
_documents: dict[tuple[str, bool], list[Document]] = {}


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    """DUALTOWER_TOKENIZER_DIR (a saved tokenizer) first: the GPU machine has no network and no GGUF fallback."""
    saved = os.environ.get("DUALTOWER_TOKENIZER_DIR")
    try:
        return load_tokenizer(tokenizer_id=saved) if saved else load_tokenizer()
    except TokenizerError as error:
        if not CUDA:  # the CPU machines always have one: a failure here is a bug, not a missing file
            raise
        pytest.skip(f"no tokenizer on this machine ({error}); see scripts/gpu_check.sh --prepare")


@pytest.fixture(autouse=True)
def _one_thread() -> Any:
    """Per-document ops are small; the loader's workers run one thread each too. Restored afterwards, so the
    other benchmark files keep every core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def documents(flavor_name: str, with_pixels: bool, tokenizer: Any) -> list[Document]:
    key = (flavor_name, with_pixels)
    if key not in _documents:
        cfg, source = flavor(flavor_name), SyntheticSource(0, "train", NUM_DOCS)
        processor = ImageProcessor(cfg)
        _documents[key] = [
            document_from_sample(source[i], processor, tokenizer, cfg, with_pixels=with_pixels)
            for i in range(NUM_DOCS)
        ]
    return _documents[key]


def packed_pass(docs: list[Document], max_tokens: int, max_tiles: int, image_token_id: int) -> dict[str, float]:
    """All documents through the packer (the buffer drained at the end) and collated batch by batch."""
    packer: StreamPacker[Document] = StreamPacker(max_tokens, max_tiles, BUFFER, max_wait=64)
    steady: list[int] = []  # tokens of rows cut while the buffer was full (the streaming regime)
    tokens = rows = tiles = samples = 0

    def emit(batch_rows: list) -> None:
        nonlocal tokens, rows, tiles, samples
        batch_docs = [item.payload for row in batch_rows for item in row.items]
        row_ids = [r for r, row in enumerate(batch_rows) for _ in row.items]
        batch = collate(batch_docs, image_token_id, row_ids, max_tokens)
        tokens, rows, samples = tokens + batch.num_tokens, rows + len(batch_rows), samples + len(batch_docs)
        tiles += sum(row.tiles for row in batch_rows)

    for index, doc in enumerate(docs):
        packer.add(Item((0, index), doc.num_tokens, doc.num_tiles, doc))
        if packer.full:
            cut = packer.take_rows(ROWS)
            steady += [row.tokens for row in cut]
            emit(cut)
    while packer.buffer:
        emit(packer.take_rows(ROWS))
    return {"samples": samples, "efficiency": tokens / (rows * max_tokens), "tiles_per_row": tiles / rows,
            "tokens": tokens, "steady_efficiency": sum(steady) / (len(steady) * max_tokens)}


def unpacked_pass(docs: list[Document], image_token_id: int) -> dict[str, float]:
    tokens = padded = 0
    for start in range(0, len(docs), ROWS):
        batch_docs = docs[start : start + ROWS]
        batch = collate(batch_docs, image_token_id)
        tokens += batch.num_tokens
        padded += len(batch_docs) * max(doc.num_tokens for doc in batch_docs)
    return {"samples": len(docs), "efficiency": tokens / padded, "tokens": tokens}


def best_seconds(run: Callable[[], Any], rounds: int = ROUNDS) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


@pytest.mark.parametrize("case", list(CASES))
def test_pack_and_collate(benchmark, tokenizer, case: str) -> None:
    flavor_name, with_pixels, max_tokens, max_tiles = CASES[case]
    docs = documents(flavor_name, with_pixels, tokenizer)
    image_token_id = flavor(flavor_name).image_token_id
    results = []
    benchmark.group = f"data {case}"
    benchmark.pedantic(lambda: results.append(packed_pass(docs, max_tokens, max_tiles, image_token_id)),
                       rounds=ROUNDS, iterations=1, warmup_rounds=1)
    if median_s(benchmark) is None:
        return
    seconds = benchmark.stats.stats.min
    baseline = unpacked_pass(docs, image_token_id)
    baseline_seconds = best_seconds(lambda: unpacked_pass(docs, image_token_id))
    packed = results[-1]
    assert packed["samples"] == baseline["samples"] == NUM_DOCS and packed["tokens"] == baseline["tokens"]
    benchmark.extra_info.update({
        "device": "cpu",  # packing runs on the host, whatever the accelerator
        "provider": "packed",
        "role": "fast",
        "baseline": "unpacked",
        "case": case,
        "documents": NUM_DOCS,
        "max_tokens_per_row": max_tokens,
        "max_tiles_per_row": max_tiles,
        "samples_per_s": NUM_DOCS / seconds,
        "tokens_per_s": packed["tokens"] / seconds,
        "baseline_samples_per_s": NUM_DOCS / baseline_seconds,
        "ratio": baseline_seconds / seconds,
        "packing_efficiency": packed["efficiency"],
        "packing_efficiency_steady": packed["steady_efficiency"],
        "baseline_padded_efficiency": baseline["efficiency"],
        "tiles_per_row": packed["tiles_per_row"],
    })


def test_loader_end_to_end(benchmark, tokenizer) -> None:
    """Raw samples -> PackedBatch through the whole pipeline, in-process, packed vs unpacked."""
    model_cfg = flavor("debug")
    base = DataConfig(max_tokens_per_row=1024, max_tiles_per_row=64, shuffle_buffer=128, num_workers=0,
                      synthetic=SyntheticConfig(num_train=4096))

    def throughput(pack: bool) -> tuple[float, float, Any]:
        """(samples/s, tokens/s, loader stats) in steady state: timed from the first batch (the packer's buffer
        is full by then) over 256 documents."""
        loader = build_loader(DataConfig(**{**base.__dict__, "pack": pack}), model_cfg, tokenizer)
        start, seen, tokens = None, 0, 0
        for batch in loader:
            if start is None:
                start = time.perf_counter()
                continue
            seen, tokens = seen + batch.num_docs, tokens + batch.num_tokens
            if seen >= 256:
                break
        seconds = time.perf_counter() - start
        return seen / seconds, tokens / seconds, loader.stats

    rates: list[tuple[float, float, Any]] = []
    benchmark.group = "data loader-debug"
    benchmark.pedantic(lambda: rates.append(throughput(True)), rounds=2, iterations=1)
    if median_s(benchmark) is None:
        return
    stats = rates[-1][2]
    baseline = statistics.median(throughput(False)[0] for _ in range(2))
    benchmark.extra_info.update({
        "device": "cpu",  # the loader runs on the host, whatever the accelerator
        "provider": "packed",
        "role": "fast",
        "baseline": "unpacked",
        "case": "loader-debug",
        "samples_per_s": statistics.median(rate[0] for rate in rates),  # the same statistic as the baseline's
        "tokens_per_s": statistics.median(rate[1] for rate in rates),
        "baseline_samples_per_s": baseline,
        "ratio": statistics.median(rate[0] for rate in rates) / baseline,
        "packing_efficiency": stats.packing_efficiency,
        "tiles_per_row": stats.tiles_per_row,
    })
