"""`python -m dualtower.data.stats`: what the data pipeline makes of a source.

Prints length and tile distributions, packing efficiency, samples/s and dropped samples by reason, and as its
last line the same numbers as one JSON object.

    python -m dualtower.data.stats --source synthetic --num-samples 1000 --max-tokens 4096 --max-tiles 64

Row budgets, buffer, workers and seed default to DataConfig's (the `[data]` defaults of a training job).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections import Counter
from typing import Any

import numpy as np
import torch

from dualtower.batch import PackedBatch
from dualtower.cli_errors import error_line
from dualtower.data.config import DataConfig
from dualtower.data.loader import build_loader
from dualtower.model.config import FLAVORS, flavor
from dualtower.tokenizer import load_tokenizer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    defaults = DataConfig()
    parser = argparse.ArgumentParser(prog="python -m dualtower.data.stats", description=__doc__.splitlines()[0])
    parser.add_argument("--source", default="synthetic", help="synthetic | cauldron | a parquet/arrow path")
    parser.add_argument("--split", default="train", choices=("train", "val", "heldout"))
    parser.add_argument("--num-samples", type=int, default=500, help="documents to read (at least)")
    parser.add_argument("--max-tokens", type=int, default=defaults.max_tokens_per_row, help="token budget per row")
    parser.add_argument("--max-tiles", type=int, default=defaults.max_tiles_per_row, help="tile budget per row")
    parser.add_argument("--rows-per-batch", type=int, default=defaults.rows_per_batch)
    parser.add_argument("--shuffle-buffer", type=int, default=defaults.shuffle_buffer)
    parser.add_argument("--num-workers", type=int, default=defaults.num_workers)
    parser.add_argument("--no-pack", action="store_true", help="one document per row")
    parser.add_argument("--flavor", default="135m", choices=sorted(FLAVORS), help="image/tile sizes to use")
    parser.add_argument("--tokenizer", default=None, help="tokenizer id, directory or .gguf (default: flavor's)")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    args = parser.parse_args(argv)
    if args.num_samples < 1:  # the first batch would be read and reported anyway
        parser.error(f"--num-samples must be >= 1, got {args.num_samples}")
    return args


def collect(loader: Any, num_samples: int) -> tuple[dict[str, list[int]], float]:
    """Per-document and per-row lengths from the loader's batches until `num_samples` documents came out."""
    seen: dict[str, list[int]] = {"tokens": [], "prefix": [], "text": [], "tiles": [], "row_tiles": [], "row_docs": []}
    start = time.perf_counter()
    for batch in loader:
        _record(batch, seen)
        if len(seen["tokens"]) >= num_samples:
            break
    return seen, time.perf_counter() - start


def _record(batch: PackedBatch, seen: dict[str, list[int]]) -> None:
    prefix = batch.cu_prefix.diff().tolist()
    text = batch.cu_text.diff().tolist()
    tiles = batch.tiles_per_doc.tolist()
    seen["prefix"] += prefix
    seen["text"] += text
    seen["tokens"] += [p + t for p, t in zip(prefix, text, strict=True)]
    seen["tiles"] += tiles
    rows = batch.doc_row.tolist()
    for row in range(batch.num_rows):
        seen["row_tiles"].append(sum(t for t, r in zip(tiles, rows, strict=True) if r == row))
        seen["row_docs"].append(rows.count(row))


def distribution(values: list[int]) -> dict[str, float]:
    if not values:
        return {}
    array = np.asarray(values, dtype=np.float64)
    quantiles = np.percentile(array, [0, 10, 50, 90, 99, 100])
    names = ("min", "p10", "p50", "p90", "p99", "max")
    return {"mean": round(float(array.mean()), 2), **{n: float(q) for n, q in zip(names, quantiles, strict=True)}}


def report(args: argparse.Namespace, seen: dict[str, list[int]], seconds: float, stats: Any) -> dict[str, Any]:
    samples = len(seen["tokens"])
    return {
        "source": args.source,
        "split": args.split,
        "flavor": args.flavor,
        "packed": not args.no_pack,
        "max_tokens_per_row": args.max_tokens,
        "max_tiles_per_row": args.max_tiles,
        "samples": samples,
        "seconds": round(seconds, 3),
        "samples_per_s": round(samples / seconds, 3) if seconds else 0.0,
        "packing_efficiency": round(stats.packing_efficiency, 5),
        "tiles_per_row": round(stats.tiles_per_row, 3),
        "docs_per_row": distribution(seen["row_docs"]).get("mean", 0.0),
        "tokens_per_doc": distribution(seen["tokens"]),
        "prefix_tokens_per_doc": distribution(seen["prefix"]),
        "text_tokens_per_doc": distribution(seen["text"]),
        "tiles_per_doc": dict(sorted(Counter(seen["tiles"]).items())),
        "read": stats.read,
        # Read but in no batch yet: the packing buffer when the count stopped (read = samples + dropped + this).
        "buffered": stats.read - stats.samples - stats.num_dropped,
        "dropped": dict(stats.dropped),
        "events": dict(stats.events),
    }


def render(summary: dict[str, Any]) -> str:
    def fmt(dist: dict[str, float]) -> str:
        return "  ".join(f"{k} {v:g}" for k, v in dist.items())

    mode = "packed" if summary["packed"] else "unpacked"
    return "\n".join([
        f"source {summary['source']} ({summary['split']}), flavor {summary['flavor']}, {mode} rows of "
        f"{summary['max_tokens_per_row']} tokens / {summary['max_tiles_per_row']} tiles",
        f"documents       {summary['samples']} in {summary['seconds']:.1f} s "
        f"= {summary['samples_per_s']:.2f} samples/s",
        f"tokens/doc      {fmt(summary['tokens_per_doc'])}",
        f"  prefix        {fmt(summary['prefix_tokens_per_doc'])}",
        f"  text          {fmt(summary['text_tokens_per_doc'])}",
        f"tiles/doc       {summary['tiles_per_doc']}",
        f"rows            {summary['docs_per_row']:.2f} docs/row, {summary['tiles_per_row']:.2f} tiles/row",
        f"packing         {100 * summary['packing_efficiency']:.2f} % (non-pad tokens / row capacity)",
        f"read            {summary['read']} raw samples ({summary['buffered']} still in the packing buffer)",
        f"dropped         {summary['dropped'] or 'none'}",
        f"conversions     {summary['events'] or 'none'}",
    ])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return summarize(args)
    except Exception as error:  # a CLI reports a failure in one line (exit status 1)
        raise SystemExit(error_line(error)) from error


def summarize(args: argparse.Namespace) -> dict[str, Any]:
    """Read a source as the loader would and print (and return) what the pipeline made of it."""
    model_cfg = flavor(args.flavor)
    tokenizer = load_tokenizer(tokenizer_id=args.tokenizer or model_cfg.tokenizer_id)
    cfg = DataConfig(
        source=args.source,
        max_tokens_per_row=args.max_tokens,
        max_tiles_per_row=args.max_tiles,
        rows_per_batch=args.rows_per_batch,
        shuffle_buffer=args.shuffle_buffer,
        num_workers=args.num_workers,
        pack=not args.no_pack,
        seed=args.seed,
    )
    if args.num_workers == 0:
        torch.set_num_threads(1)  # small per-image ops; extra threads only contend
    loader = build_loader(cfg, model_cfg, tokenizer, split=args.split)
    seen, seconds = collect(loader, args.num_samples)
    summary = report(args, seen, seconds, loader.stats)
    print(render(summary))
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
