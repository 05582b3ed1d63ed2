"""Train DualTowerVLM.

    python train/main.py --config train/configs/debug.toml [--section.key=value ...] [--profile]
    torchrun --nproc_per_node N train/main.py --config train/configs/cauldron_135m.toml

Imports only the installed `dualtower` package (torchrun puts train/ on sys.path, not the repository).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from dualtower import ops
from dualtower.adapters.common import CheckpointError
from dualtower.cli_errors import error_line
from dualtower.config import JobConfig, load_job_config, usage
from dualtower.data.loader import build_loader
from dualtower.model.config import ConfigError
from dualtower.parallel import init_distributed, launch_ranks, teardown
from dualtower.tokenizer import TokenizerError, load_tokenizer
from dualtower.training import (
    Evaluator,
    NonFiniteLossError,
    build_heldout,
    build_model,
    build_trainer,
)


def run(cfg: JobConfig) -> None:
    env = init_distributed(cfg.training.device)
    try:
        run_dir = Path(cfg.job.run_dir)
        if env.is_main:
            _prepare_run_dir(cfg, run_dir)
        ops.set_backend(cfg.model.attention_backend)
        try:
            ops.check_backends(env.device)
        except (ValueError, RuntimeError) as exc:
            raise ConfigError(f"model.attention_backend = {cfg.model.attention_backend!r}: {exc}") from exc
        model = build_model(cfg.model, cfg.training.seed, env.device)
        tokenizer = load_tokenizer(checkpoint_dir=cfg.model.checkpoint or None, tokenizer_id=model.cfg.tokenizer_id)
        loaders = {
            split: build_loader(cfg.data, model.cfg, tokenizer, split=split, rank=env.rank, world_size=env.world_size)
            for split in ("train", "val")
        }
        evaluator = Evaluator(cfg.eval, loaders["val"], tokenizer, env, build_heldout(cfg.data, cfg.eval))
        trainer = build_trainer(cfg, model, env, run_dir, loaders["train"], evaluator, tokenizer)
        try:
            trainer.train()
        finally:
            trainer.parts.metrics.close()
    finally:
        teardown()


def _prepare_run_dir(cfg: JobConfig, run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not cfg.checkpoint.export_only:  # an export of the run must not replace the record of its training
            (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
    except OSError as exc:  # a file in the way, no permission: the setting is wrong, not the code
        raise ConfigError(f"job.run_dir = {cfg.job.run_dir!r}: {exc.strerror or exc}") from None


def main(argv: list[str] | None = None) -> int:
    try:
        ranks = launch_ranks()
    except ConfigError as exc:  # before logging is set up: a bad launch environment is one line too
        print(f"error: {exc}", file=sys.stderr)
        return 2
    rank = 0 if ranks is None else ranks[0]
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank{rank}] %(name)s: %(message)s",
        stream=sys.stderr,
    )
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        print(usage())
        return 0
    try:
        cfg = load_job_config(argv)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        run(cfg)
    except ConfigError as exc:  # what only shows once the run starts (the device, a backend)
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (NonFiniteLossError, FileNotFoundError, CheckpointError, TokenizerError) as exc:
        print(error_line(exc), file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
