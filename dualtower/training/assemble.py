"""Assemble a Trainer: freezing, parallelism, optimizer, schedule and the run's helpers, in the order that
matters (freezing before parallelize so FSDP and compile see the final requires_grad; the optimizer after
parallelize so it holds the sharded parameters)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from dualtower.parallel import DistEnv, parallelize
from dualtower.training.checkpoint import Checkpointer
from dualtower.training.evaluate import Evaluator
from dualtower.training.metrics import MetricsLogger
from dualtower.training.optim import apply_freezing, build_optimizer
from dualtower.training.profiling import StepProfiler
from dualtower.training.schedule import build_scheduler
from dualtower.training.trainer import Trainer, TrainerParts


def build_trainer(
    cfg: Any,
    model: nn.Module,
    env: DistEnv,
    run_dir: Path,
    train_loader: Any,
    evaluator: Evaluator | None = None,
    tokenizer: Any = None,
) -> Trainer:
    """A Trainer over `model` from a JobConfig; `evaluator` defaults to one without validation data."""
    apply_freezing(model, cfg.optim)
    plan = parallelize(model, cfg.parallel, env)
    optimizer = build_optimizer(model, cfg.optim)
    parts = TrainerParts(
        model=model,
        model_cfg=model.cfg,
        plan=plan,
        env=env,
        train_loader=train_loader,
        optimizer=optimizer,
        scheduler=build_scheduler(optimizer, cfg.schedule, cfg.training.steps),
        checkpointer=Checkpointer(cfg.checkpoint, run_dir, env),
        metrics=MetricsLogger(cfg.metrics, run_dir, env.is_main, cfg.training.steps, cfg.to_dict()),
        evaluator=evaluator or Evaluator(cfg.eval, None, None, env),
        profiler=StepProfiler(cfg.profile, run_dir, env.rank, env.device),
        run_dir=run_dir,
        tokenizer=tokenizer,
    )
    return Trainer(cfg.training, parts)
