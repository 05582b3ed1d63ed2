"""Evaluate a DualTowerVLM checkpoint: lmms-eval tasks (MMStar by default) or an offline MMStar parquet.

    python -m dualtower.evaluate --model DIR_OR_REPO --tasks mmstar --batch_size 32 --process_with_media
    python -m dualtower.evaluate --model DIR --offline-parquet mmstar.parquet --output_path results/

The lmms-eval path needs the `eval` extra (pip install 'dualtower[eval]'); the offline path only needs
pyarrow. Both write a results JSON under --output_path and print a summary table.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

from dualtower.cli_errors import error_line

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "patrickamadeus/dualtower-cauldron"
DEFAULT_TASKS = "mmstar"
DEFAULT_SEED = "0,1234,1234,1234"  # lmms-eval's: python random, numpy, torch, few-shot sampling
RULES = ("lmms-eval", "first-letter")  # dualtower.eval.mmstar.RULES (not imported: keep --help fast)
MODEL_ARGS = ("dtype", "max_new_tokens", "tokenizer", "seed", "architecture")
LISTINGS = {  # lmms-eval's --tasks list variants -> TaskManager.list_all_tasks keyword arguments
    "list": {},
    "list_groups": {"list_subtasks": False, "list_tags": False},
    "list_tags": {"list_groups": False, "list_subtasks": False},
    "list_subtasks": {"list_groups": False, "list_tags": False},
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dualtower.evaluate", description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--model", default=DEFAULT_MODEL, help="checkpoint directory or Hub repo id")
    add("--tasks", default=DEFAULT_TASKS, help="lmms-eval task names (comma separated), or list / list_groups")
    add("--model_args", default="", help=f"key=value,... for the model: {', '.join(MODEL_ARGS)}")
    add("--batch_size", "-b", type=batch_size_arg, default=32, help="requests per generation batch")
    add("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when available)")
    add("--output_path", default=None, help="results directory (or a .json file for --offline-parquet)")
    add("--limit", type=float, default=None, help="samples per task: a count, or a fraction when < 1")
    add("--log_samples", action="store_true", help="also write every sample's prompt, output and score")
    add("--log_samples_suffix", default="model_outputs", help="suffix of lmms-eval's samples files")
    add("--gen_kwargs", default="", help="generation overrides, e.g. max_new_tokens=16,temperature=0")
    add("--verbosity", default="INFO", help="DEBUG, INFO, WARNING or ERROR (DEBUG re-raises task errors)")
    add("--seed", default=DEFAULT_SEED, help="one integer, or four comma-separated values (None skips one)")
    add("--process_with_media", action="store_true", help="load task datasets with their images (lmms-eval)")
    add("--include_path", default=None, help="extra folder of lmms-eval task yamls")
    add("--num_fewshot", type=int, default=None, help="few-shot examples per prompt (lmms-eval)")
    add("--predict_only", "-x", action="store_true", help="generate and log samples without scoring (lmms-eval)")
    add(
        "--offline-parquet",
        "--offline_parquet",
        dest="offline_parquet",
        default=None,
        metavar="PATH",
        help="score a local MMStar-format parquet file without lmms-eval",
    )
    add(
        "--mmstar-rule",
        "--mmstar_rule",
        dest="mmstar_rule",
        default="lmms-eval",
        choices=RULES,
        help="answer-letter extraction of the offline scorer",
    )
    return parser


def batch_size_arg(text: str) -> int:
    """An integer; lmms-eval's "auto" / "auto:N" fall back to 32 (no automatic batch size search here)."""
    if str(text).startswith("auto"):
        logging.getLogger(__name__).warning("--batch_size %s: automatic sizing is not supported; using 32", text)
        return 32
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"batch size must be >= 1, got {value}")
    return value


def parse_seeds(text: str) -> list[int | None]:
    """lmms-eval's --seed: one value for all four seeds, or four comma-separated values."""
    parts = [p.strip() for p in str(text).split(",")]
    values = [None if p == "None" else int(p) for p in parts]
    if len(values) == 1:
        return values * 4
    if len(values) != 4:
        raise ValueError(f"--seed takes 1 or 4 comma-separated values, got {text!r}")
    return values


def parse_model_args(text: str) -> dict[str, Any]:
    from dualtower.eval.runner import parse_gen_kwargs  # the same key=value syntax

    args = parse_gen_kwargs(text)
    unknown = sorted(set(args) - set(MODEL_ARGS))
    if unknown:
        raise ValueError(f"unknown --model_args {unknown}; known: {', '.join(MODEL_ARGS)}")
    return args


def build_runner(args: argparse.Namespace, seed: int | None) -> Any:
    from dualtower.eval.runner import EvalModel

    model_args = parse_model_args(args.model_args)
    return EvalModel.from_pretrained(
        args.model,
        device=args.device,
        dtype=model_args.get("dtype"),
        tokenizer_id=model_args.get("tokenizer"),
        architecture=model_args.get("architecture"),
        batch_size=args.batch_size,
        seed=model_args.get("seed", seed),
    )


def run_offline(args: argparse.Namespace) -> int:
    from dualtower.eval.offline import run_offline_mmstar
    from dualtower.eval.runner import parse_gen_kwargs

    seeds = parse_seeds(args.seed)
    _seed_everything(seeds)
    runner = build_runner(args, seeds[2])
    gen_kwargs = parse_gen_kwargs(args.gen_kwargs)
    max_new_tokens = parse_model_args(args.model_args).get("max_new_tokens")
    if max_new_tokens is not None:
        gen_kwargs.setdefault("max_new_tokens", max_new_tokens)
    output = args.output_path or "eval_results"
    config = {
        "model": args.model,
        "batch_size": runner.batch_size,
        "device": str(runner.device),
        "dtype": str(next(runner.model.parameters()).dtype),
        "seed": seeds,
    }
    document, path = run_offline_mmstar(
        runner,
        args.offline_parquet,
        output,
        args.limit,
        gen_kwargs,
        args.mmstar_rule,
        args.log_samples,
        config,
    )
    _print_offline(document, path)
    return 0


def _print_offline(document: dict[str, Any], path: Path | None) -> None:
    results = document["results"]
    print(f"MMStar (offline, {document['num_samples']} samples, rule={document['extraction_rule']})")
    for name, value in results.items():
        if isinstance(value, float):
            print(f"  {name:<28} {value:.4f}")
    print(f"  {'samples/s':<28} {document['timing']['samples_per_s']:.2f}")
    if path is not None:
        print(f"results: {path}")


def import_lmms_eval() -> Any:
    try:
        from lmms_eval import evaluator
    except ImportError as error:
        raise SystemExit(f"lmms-eval is not installed ({error}): pip install 'dualtower[eval]'") from None
    return evaluator


def run_lmms_eval(args: argparse.Namespace) -> int:
    evaluator = import_lmms_eval()
    from lmms_eval.loggers import EvaluationTracker
    from lmms_eval.tasks import TaskManager

    from dualtower.eval.lmms_plugin import DualTowerLMMS

    task_manager = _task_manager(TaskManager, args)
    if args.tasks in LISTINGS:
        print(task_manager.list_all_tasks(**LISTINGS[args.tasks]))
        return 0
    requested = args.tasks.split(",")
    task_names = task_manager.match_tasks(requested)
    missing = [t for t in requested if t not in task_names and "*" not in t]
    if missing:
        raise SystemExit(f"unknown lmms-eval task(s): {', '.join(missing)} (try --tasks list)")
    if args.log_samples and not args.output_path:
        raise SystemExit("--log_samples needs --output_path")
    seeds = parse_seeds(args.seed)
    model_args = {"seed": seeds[2], **parse_model_args(args.model_args)}
    lmm = DualTowerLMMS(args.model, device=args.device, batch_size=args.batch_size, **model_args)
    tracker = EvaluationTracker(output_path=args.output_path)
    datetime_str = datetime.now().strftime("%Y%m%d_%H%M%S")
    results = evaluator.simple_evaluate(
        model=lmm,
        model_args=f"pretrained={args.model}",
        tasks=task_names,
        num_fewshot=args.num_fewshot,
        batch_size=lmm.batch_size,
        device=args.device,
        limit=args.limit,
        log_samples=args.log_samples,
        evaluation_tracker=tracker,
        gen_kwargs=args.gen_kwargs or None,
        task_manager=task_manager,
        verbosity=args.verbosity,
        predict_only=args.predict_only,
        random_seed=seeds[0],
        numpy_random_seed=seeds[1],
        torch_random_seed=seeds[2],
        fewshot_random_seed=seeds[3],
        cli_args=_cli_args(args),
        datetime_str=datetime_str,
    )
    if results is None:  # not the main process
        return 0
    samples = results.pop("samples", None)
    if args.output_path:
        tracker.save_results_aggregated(results=results, samples=samples, datetime_str=datetime_str)
        if args.log_samples and samples:
            for task_name in results.get("configs", {}):
                tracker.save_results_samples(task_name=task_name, samples=samples[task_name])
    print(results_table(results))
    return 0


def _task_manager(manager_class: Any, args: argparse.Namespace) -> Any:
    """lmms-eval's TaskManager; when --include_path holds every requested task, without indexing the ~2000
    built-in task files (which takes a minute on a small machine)."""
    if args.include_path and args.tasks not in LISTINGS:
        local = manager_class(args.verbosity, args.include_path, include_defaults=False, model_name="dualtower")
        if all(local.match_tasks([task]) for task in args.tasks.split(",")):
            return local
    return manager_class(args.verbosity, include_path=args.include_path, model_name="dualtower")


def results_table(results: dict[str, Any]) -> str:
    """Task / metric / value lines (lmms-eval's make_table needs pytablewriter, which we do not require)."""
    lines = [f"{'task':<28} {'metric':<32} value"]
    for task, metrics in results.get("results", {}).items():
        for key, value in metrics.items():
            metric = key.split(",")[0]
            if isinstance(value, (int, float)) and "_stderr" not in metric:
                lines.append(f"{task:<28} {metric:<32} {value:.4f}")
    return "\n".join(lines)


def _cli_args(args: argparse.Namespace) -> argparse.Namespace:
    """What lmms-eval reads from its own CLI namespace during evaluation (and records in the results)."""
    values = {k: v for k, v in vars(args).items() if k not in ("offline_parquet", "mmstar_rule")}
    values.setdefault("reasoning_tags", '[["<think>", "</think>"], ["<analysis>", "</analysis>"]]')
    values.setdefault("agentic_trace_mode", "basic")
    return argparse.Namespace(**values)


def _seed_everything(seeds: list[int | None]) -> None:
    import random

    import numpy as np
    import torch

    for seed, setter in zip(seeds[:3], (random.seed, np.random.seed, torch.manual_seed), strict=True):
        if seed is not None:
            setter(seed)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.verbosity.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        if args.offline_parquet:
            if not Path(args.offline_parquet).exists():
                raise FileNotFoundError(f"--offline-parquet {args.offline_parquet} does not exist")
            return run_offline(args)
        return run_lmms_eval(args)
    except KeyboardInterrupt:
        return 130
    except Exception as error:  # a CLI reports a failure in one line; --verbosity DEBUG keeps the traceback
        logger.debug("evaluation failed", exc_info=True)
        sys.stderr.write(error_line(error) + "\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
