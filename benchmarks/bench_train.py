"""Train-step throughput: dualtower's Trainer.train_step against the original algorithm's step, same run.

Shape (reference_throughput.md): B = 4 rows x 2048 tokens, each row 5 tiles (5 x [tag + 64 image tokens] =
325 prefix tokens) + 1723 supervised text tokens; random weights; AdamW; gradient clipping at 1.0.
Providers:
    original   benchmarks/original_step.py: fp32 weights + bf16 autocast, dense masks, right tower over the full
               sequence, full logits (eager, or the whole loss under torch.compile)
    dualtower  Trainer.train_step: varlen kernels, right tower over text only, fused linear cross-entropy,
               bf16 autocast, fused AdamW (eager, or per-block torch.compile)
Cases: `debug` on the CPU (a small shape), and on CUDA the two targets: `135m` with the original's default
freezing (projector + left LM train) in eager mode (target: >= 3x the original's tokens/s) and `360m` with
everything trainable, both compiled (target: >= 2x the original's compiled tokens/s).

extra_info: tokens_per_s (B x T / median step time, the original's definition), mfu (model FLOPs of the step
as counted by dualtower.training.flops, the same numerator for both providers), peak_mem_gib and, for
dualtower, speedup over the original provider measured earlier in the same session.

    pytest benchmarks/bench_train.py --benchmark-only
"""

from __future__ import annotations

import gc
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from original_step import original_loss, original_train_step, synthetic_rows

from dualtower.config import JobConfig
from dualtower.model import DualTowerVLM
from dualtower.parallel import DistEnv, parallelize
from dualtower.training import (
    Checkpointer,
    Evaluator,
    FlopCounter,
    MetricsLogger,
    StepProfiler,
    Trainer,
    TrainerParts,
    apply_freezing,
    build_optimizer,
    build_scheduler,
    peak_flops,
)


@dataclass(frozen=True)
class Case:
    name: str
    flavor: str
    device: str
    rows: int
    tiles: int
    text_len: int
    trainable: str  # "default" (projector + left LM) or "all"
    compile: bool
    rounds: int


CASES = [
    Case("debug-cpu", "debug", "cpu", rows=2, tiles=2, text_len=96, trainable="all", compile=False, rounds=3),
    Case("135m-default-eager", "135m", "cuda", 4, 5, 1723, trainable="default", compile=False, rounds=8),
    Case("360m-all-compiled", "360m", "cuda", 4, 5, 1723, trainable="all", compile=True, rounds=8),
]
RESULTS: dict[str, float] = {}  # case name -> the original provider's median step time


def _job(case: Case) -> JobConfig:
    cfg = JobConfig()
    cfg.optim.lr_projector, cfg.optim.lr_left = 5e-3, 1e-5
    cfg.optim.lr_vision = cfg.optim.lr_right = 1e-5 if case.trainable == "all" else 0.0
    cfg.parallel.compile = case.compile
    cfg.training.steps = 1000
    cfg.metrics.progress = "none"
    return cfg


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _dualtower_step(case: Case, model: DualTowerVLM, batch, device: torch.device, run_dir: Path):
    cfg = _job(case)
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=device, mesh=None)
    apply_freezing(model, cfg.optim)
    plan = parallelize(model, cfg.parallel, env)
    optimizer = build_optimizer(model, cfg.optim, device)
    parts = TrainerParts(
        model=model,
        model_cfg=model.cfg,
        plan=plan,
        env=env,
        train_loader=None,
        optimizer=optimizer,
        scheduler=build_scheduler(optimizer, cfg.schedule, cfg.training.steps),
        checkpointer=Checkpointer(cfg.checkpoint, run_dir, env),
        metrics=MetricsLogger(cfg.metrics, run_dir, False, cfg.training.steps, {}),
        evaluator=Evaluator(cfg.eval, None, None, env),
        profiler=StepProfiler(cfg.profile, run_dir, 0, device),
        run_dir=run_dir,
    )
    trainer = Trainer(cfg.training, parts)
    host_batch = batch.pin_memory() if device.type == "cuda" else batch

    def step() -> None:
        trainer.train_step([host_batch])
        _sync(device)

    return step


def _original_step(case: Case, model: DualTowerVLM, batch, device: torch.device):
    cfg = _job(case)
    model.requires_grad_(False)
    lrs = {
        "vision": cfg.optim.lr_vision,
        "projector": cfg.optim.lr_projector,
        "left": cfg.optim.lr_left,
        "right": cfg.optim.lr_right,
    }
    towers = {
        "vision": model.vision_encoder,
        "projector": model.projector,
        "left": model.left_decoder,
        "right": model.right_decoder,
    }
    groups = []
    for name, tower in towers.items():
        if lrs[name] > 0:  # the original freezes by LR and keeps the last-layer parameters it never uses
            tower.requires_grad_(True)
            groups.append({"params": list(tower.parameters()), "lr": lrs[name]})
    optimizer = torch.optim.AdamW(groups)
    autocast = torch.bfloat16 if device.type == "cuda" else None
    loss_fn = torch.compile(original_loss) if case.compile else original_loss
    fields = ("input_ids", "attention_mask", "targets", "images")
    host = {f: getattr(batch, f).pin_memory() if device.type == "cuda" else getattr(batch, f) for f in fields}

    def step() -> None:
        for field_name, tensor in host.items():
            setattr(batch, field_name, tensor.to(device, non_blocking=True))
        original_train_step(model, optimizer, batch, autocast, loss_fn)
        _sync(device)

    return step


def _run(benchmark, case: Case, provider: str, tmp_path: Path) -> None:
    if case.device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    device = torch.device(case.device)
    torch.manual_seed(0)
    model = DualTowerVLM.from_flavor(case.flavor, device=device)
    original, packed = synthetic_rows(model, case.rows, case.tiles, case.text_len)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if provider == "dualtower":
        step = _dualtower_step(case, model, packed, device, tmp_path)
    else:
        step = _original_step(case, model, original, device)
    benchmark.pedantic(step, rounds=case.rounds, iterations=1, warmup_rounds=3 if device.type == "cuda" else 1)
    median = benchmark.stats.stats.median
    tokens = original.input_ids.numel()
    flops = FlopCounter(model).batch_flops(packed)
    peak = peak_flops(device)
    info = benchmark.extra_info
    info.update(
        case=case.name,
        provider=provider,
        tokens_per_step=tokens,
        tokens_per_s=tokens / median,
        model_tflops_per_step=flops / 1e12,
        mfu=flops / median / peak if peak else None,
    )
    info["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    if provider == "original":
        RESULTS[case.name] = median
    elif case.name in RESULTS:
        info["speedup_vs_original"] = RESULTS[case.name] / median
    del model, step
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


@pytest.mark.parametrize("provider", ["original", "dualtower"])  # the baseline first: the speedup needs it
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_train_step(benchmark, case: Case, provider: str, tmp_path: Path) -> None:
    _run(benchmark, case, provider, tmp_path)
