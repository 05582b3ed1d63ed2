"""The training loop: token-normalized gradient accumulation, clipping, non-finite step skipping, periodic
logging, evaluation and checkpoints.

Loss normalization: an optimizer step covers `micro_batches` packed batches on each of `world_size` ranks.
Every micro-batch contributes loss_sum / N, where loss_sum is the (fp32) sum of its token losses and N the number
of supervised tokens of the whole step on all ranks (host counts, all-reduced once per step). Gradients are
summed across ranks (see dualtower.parallel.fsdp), so the update equals that of one batch holding all the data.

Host syncs: the trainer adds none per step on the fused-AdamW path (the default): a non-finite gradient norm makes
the fused kernel skip the update on the device (`found_inf`) and the skip counters (including the longest run of
skipped steps in the logging window) live on the device until the next logging step. The foreach path checks the
norm on the host every step. (The fused loss itself syncs once per micro-batch, to select the supervised rows.) A
step with a non-finite loss or gradient norm adds neither its loss nor its supervised tokens to the logged window
(a window where no step counts logs loss null). Whether the update is skipped is decided by the gradient norm
alone: it is the same number on every rank (the loss is a per-rank sum, and agreeing on it would cost a collective
per step), and a non-finite loss comes with non-finite gradients (its logits or hidden states are non-finite).

Logging steps: every metrics.log_every steps, the last step and each checkpoint's step (a resumed run starts a new
window there, so both timelines log the same records).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from dualtower.batch import PackedBatch
from dualtower.model import ModelConfig
from dualtower.parallel import DistEnv, ParallelPlan, set_gradient_sync
from dualtower.training.checkpoint import (
    Checkpointer,
    check_preprocessing,
    export_pretrained,
    full_model_copy,
    preprocessing_changes,
)
from dualtower.training.evaluate import Evaluator
from dualtower.training.flops import FlopCounter, peak_flops
from dualtower.training.metrics import MetricsLogger, peak_memory_gib
from dualtower.training.profiling import StepProfiler

logger = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient."""


@dataclass
class _Window:
    """What happened since the last logging step (device tensors stay on the device until then)."""

    loss_sums: list[Tensor] = field(default_factory=list)  # per step: the loss sum, 0 for a skipped step
    supervised: int = 0  # this rank's supervised tokens, non-finite steps included (host count)
    skipped_supervised: Tensor | None = None  # the part of `supervised` from non-finite steps (device)
    tokens: int = 0
    flops: float = 0.0
    row_capacity: int = 0
    start: float = field(default_factory=time.perf_counter)
    paused: float = 0.0  # seconds spent in evaluation, checkpoints and writing traces: not training time

    def add_batch(self, batch: PackedBatch, flops: float) -> None:
        self.supervised += batch.num_supervised
        self.tokens += batch.num_tokens
        self.flops += flops
        self.row_capacity += batch.num_rows * batch.row_capacity

    def add_step(self, step_loss: Tensor, supervised: int, applied: Tensor) -> None:
        """Count a finished optimizer step; `applied` (device bool) is False where its loss or norm is non-finite."""
        self.loss_sums.append(torch.where(applied, step_loss, 0.0))
        skipped = (~applied).double() * supervised
        self.skipped_supervised = skipped if self.skipped_supervised is None else self.skipped_supervised + skipped


@dataclass
class TrainerParts:
    """Everything the trainer drives, each built from its own config section."""

    model: nn.Module
    model_cfg: ModelConfig
    plan: ParallelPlan
    env: DistEnv
    train_loader: Any
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    checkpointer: Checkpointer
    metrics: MetricsLogger
    evaluator: Evaluator
    profiler: StepProfiler
    run_dir: Path
    tokenizer: Any = None


class Trainer:
    """Takes the [training] section and the parts built from the other sections."""

    def __init__(self, training_cfg, parts: TrainerParts):
        self.cfg = training_cfg
        self.parts = parts
        self.model, self.env, self.optimizer = parts.model, parts.env, parts.optimizer
        self.device = parts.env.device
        self.step = 0
        self.fused = bool(self.optimizer.defaults.get("fused"))
        self.flop_counter = FlopCounter(parts.model)
        self.peak = peak_flops(self.device)
        self.nonfinite_streak = torch.zeros((), dtype=torch.int64, device=self.device)
        # The longest streak seen since the last logging step, and the (1-based) step where it last grew.
        self.window_max_streak = torch.zeros((), dtype=torch.int64, device=self.device)
        self.window_streak_end = torch.zeros((), dtype=torch.int64, device=self.device)
        self.skipped_total = torch.zeros((), dtype=torch.int64, device=self.device)
        self.last_grad_norm = torch.zeros((), device=self.device)
        self.last_lrs: dict[str, float] = {}
        self.last_saved_step = -1

    def autocast(self) -> contextlib.AbstractContextManager:
        dtype = self.parts.plan.autocast_dtype
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    # -- the loop -------------------------------------------------------------------------------------------

    def train(self) -> int:
        """Run to training.steps optimizer steps (resuming if a checkpoint exists); returns the final step."""
        if self.parts.checkpointer.cfg.export_only:
            return self._export_only()
        self._resume()
        # The steps after the checkpoint (every step, without one) are logged again: earlier records of them go.
        self.parts.metrics.rewind(self.step)
        first_step = self.step
        batches = self._batch_stream()
        window = _Window()
        total = self.cfg.steps
        self.parts.profiler.warn_untraced(self.step + 1, total)
        while self.step < total:
            micro = [next(batches) for _ in range(self.cfg.micro_batches)]
            with self.parts.profiler.step(self.step + 1):
                self.train_step(micro, window)
            window.paused += self.parts.profiler.take_writing_seconds()
            self.step += 1
            self.parts.scheduler.step()
            checkpoint_due = self._checkpoint_due()
            # A checkpoint closes the window: a run resumed from it could not log the steps before it otherwise.
            if self.step % self.parts.metrics.cfg.log_every == 0 or self.step == total or checkpoint_due:
                self._log(window)
                window = _Window()
            pause = time.perf_counter()
            if self.parts.evaluator.due(self.step, total):
                self.evaluate()
            if checkpoint_due:
                self.save()
            window.paused += time.perf_counter() - pause
        if self.step > first_step and self.last_saved_step != self.step:  # a save logged them already
            self._log_data_counts()
        self._finish()
        return self.step

    def _batch_stream(self) -> Iterator[PackedBatch]:
        """The train loader, epoch after epoch."""
        empty_passes = 0
        while True:
            empty_passes += 1
            for batch in self.parts.train_loader:
                empty_passes = 0
                yield batch
            # One empty pass is a finite loader resumed at the very end of its pass: the next one starts over.
            if empty_passes == 2:
                raise RuntimeError("the training data produced no batches")

    def train_step(self, micro: list[PackedBatch], window: _Window | None = None) -> None:
        """One optimizer step over the micro-batches of this rank."""
        window = window if window is not None else _Window()
        local_supervised = sum(batch.num_supervised for batch in micro)
        total_supervised = self._global_count(local_supervised)
        step_loss = torch.zeros((), dtype=torch.float32, device=self.device)
        for index, batch in enumerate(micro):
            window.add_batch(batch, self.flop_counter.batch_flops(batch))
            set_gradient_sync(self.model, index == len(micro) - 1)
            batch = batch.to(self.device, non_blocking=True)
            with self.autocast():
                loss_sum = self.model.loss_sum(batch)
            (loss_sum / total_supervised).backward()
            step_loss += loss_sum.detach().float()
        self.last_grad_norm = self._clip_gradients()
        self.last_lrs = {group.get("name", str(i)): group["lr"] for i, group in enumerate(self.optimizer.param_groups)}
        self._optimizer_step(self.last_grad_norm)
        window.add_step(step_loss, local_supervised, torch.isfinite(self.last_grad_norm) & torch.isfinite(step_loss))
        self.optimizer.zero_grad(set_to_none=True)

    def _global_count(self, local: int) -> Tensor:
        count = torch.tensor(float(local), dtype=torch.float32)
        if self.device.type == "cuda":
            count = count.pin_memory()  # a pageable source could make the copy wait for the GPU
        count = count.to(self.device, non_blocking=True)
        if dist.is_initialized():
            dist.all_reduce(count)
        return count.clamp(min=1.0)  # a step without supervised tokens has zero loss, not 0/0

    def _clip_gradients(self) -> Tensor:
        params = [p for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in params], norm_type=2.0)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()  # sharded gradients: the norm over every rank's shard
        if self.cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grads_with_norm_(params, self.cfg.max_grad_norm, norm)
        return norm

    def _optimizer_step(self, grad_norm: Tensor) -> None:
        nonfinite = ~torch.isfinite(grad_norm)
        if self.fused:
            # The fused kernel skips the whole update (and undoes its step count) where found_inf is set.
            self.optimizer.found_inf = nonfinite.float()
            try:
                self.optimizer.step()
            finally:
                del self.optimizer.found_inf
        elif not bool(nonfinite):
            self.optimizer.step()
        self.nonfinite_streak = torch.where(nonfinite, self.nonfinite_streak + 1, 0)
        self.skipped_total += nonfinite
        # A streak may end before the next logging step: remember the longest one (on the device).
        grew = self.nonfinite_streak > self.window_max_streak
        self.window_max_streak = torch.maximum(self.window_max_streak, self.nonfinite_streak)
        self.window_streak_end = torch.where(grew, self.step + 1, self.window_streak_end)
        if not self.fused:
            self._check_nonfinite()

    def _check_nonfinite(self) -> None:
        """Stop when the longest streak of skipped steps since the last check reaches the limit; warn otherwise.

        The foreach path calls it after every optimizer step, the fused path at logging steps (one host sync).
        """
        longest, end = (int(v) for v in torch.stack([self.window_max_streak, self.window_streak_end]).tolist())
        self.window_max_streak.zero_()
        self.window_streak_end.zero_()
        if not longest:
            return
        steps = f"step {end}" if longest == 1 else f"steps {end - longest + 1}-{end}"
        if longest >= self.cfg.max_nonfinite_in_row:
            raise NonFiniteLossError(
                f"{longest} optimizer steps in a row had a non-finite loss or gradient ({steps}); "
                f"stopping (training.max_nonfinite_in_row = {self.cfg.max_nonfinite_in_row})"
            )
        logger.warning("non-finite loss/gradient: update skipped (%d in a row, %s)", longest, steps)

    # -- logging, evaluation, checkpoints -------------------------------------------------------------------

    def _log(self, window: _Window) -> None:
        loss_sum = torch.stack(window.loss_sums).double().sum()
        host = torch.tensor([window.supervised, window.tokens, window.flops, window.row_capacity], dtype=torch.float64)
        totals = torch.cat([loss_sum.reshape(1), host.to(self.device)])
        if window.skipped_supervised is not None:  # the tokens of skipped steps count neither in loss nor tokens
            totals[1] -= window.skipped_supervised
        peak_mem = torch.tensor([peak_memory_gib(self.device)], dtype=torch.float64, device=self.device)
        if dist.is_initialized():
            dist.all_reduce(totals)
            dist.all_reduce(peak_mem, op=dist.ReduceOp.MAX)  # the rank closest to running out
        loss, supervised, tokens, flops, capacity = totals.tolist()  # the host syncs of a logging step
        elapsed = max(time.perf_counter() - window.start - window.paused, 1e-9)
        if self.fused:
            self._check_nonfinite()
        record = {
            "step": self.step,
            "loss": loss / supervised if supervised else None,
            "lr": max(self.last_lrs.values()),
            "grad_norm": float(self.last_grad_norm),
            "tokens_per_s": tokens / elapsed,
            "mfu": flops / elapsed / (self.peak * self.env.world_size) if self.peak else None,
            "peak_mem_gib": peak_mem.item(),
            "packing_efficiency": tokens / capacity if capacity else None,
            "skipped_steps": int(self.skipped_total),
            "supervised_tokens": int(supervised),
            **{f"lr/{name}": lr for name, lr in self.last_lrs.items()},
        }
        self.parts.metrics.log(record)

    def evaluate(self) -> dict[str, Any]:
        record: dict[str, Any] = {"step": self.step}
        record.update(self.parts.evaluator.validation_loss(self.model, self.autocast))
        if self.parts.evaluator.heldout:
            copy = full_model_copy(self.model, self.parts.model_cfg, self.env)
            record.update(self.parts.evaluator.accuracy(copy.to(self.device) if copy is not None else None))
        if len(record) > 1:
            self.parts.metrics.log(record)
        return record

    def _checkpoint_due(self) -> bool:
        cfg = self.parts.checkpointer.cfg
        if not cfg.enabled:
            return False
        periodic = cfg.every > 0 and self.step % cfg.every == 0
        return periodic or (cfg.save_final and self.step == self.cfg.steps)

    def _train_state(self) -> dict[str, Any]:
        # The image preprocessing is recorded because an export of the checkpoint must carry the one it trained with.
        return {
            "skipped_total": int(self.skipped_total),
            "nonfinite_streak": int(self.nonfinite_streak),
            "image": dataclasses.asdict(self.parts.model_cfg.image),
        }

    def save(self) -> Path:
        parts = self.parts
        if self.fused:  # a fatal streak since the last logging step must stop the run before it is checkpointed
            self._check_nonfinite()
        path = parts.checkpointer.save(
            self.step, self.model, self.optimizer, parts.scheduler, parts.train_loader, self._train_state()
        )
        self.last_saved_step = self.step
        self._log_data_counts()
        return path

    def _log_data_counts(self) -> None:
        """The train loader's counters summed over ranks (samples read, in batches, dropped by reason, converted):
        skipped input shows in metrics.jsonl, not only in warnings. Collective; at checkpoints and the end."""
        stats = getattr(self.parts.train_loader, "stats", None)
        if stats is None:  # a plain iterable of batches
            return
        shares = [stats.to_dict()]
        if dist.is_initialized():
            shares = [None] * dist.get_world_size()
            dist.all_gather_object(shares, stats.to_dict())
        self.parts.metrics.log_data_counts(self.step, shares)

    def _resume(self) -> bool:
        """Restore the latest checkpoint (checkpoint.resume); whether there was one."""
        path = self.parts.checkpointer.resume_path()
        if path is None:
            return False
        parts = self.parts
        state = parts.checkpointer.load(path, self.model, self.optimizer, parts.scheduler, parts.train_loader)
        self.step = state["step"]
        self.last_saved_step = self.step
        # The param groups' "fused" flag comes from the checkpoint: the skipping logic must follow the kernel used.
        fused = bool(self.optimizer.param_groups[0].get("fused"))
        if fused != self.fused:
            logger.warning("resume: the checkpoint's AdamW implementation (fused=%s) is kept over the config's", fused)
            self.fused = fused
        changes = preprocessing_changes(state, self.parts.model_cfg)
        if changes:
            logger.warning("resume: the config changes the image preprocessing: %s", "; ".join(changes))
        self.skipped_total.fill_(state.get("skipped_total", 0))
        self.nonfinite_streak.fill_(state.get("nonfinite_streak", 0))
        return True

    def _export_only(self) -> int:
        path = self.parts.checkpointer.resume_path()
        if path is None:
            raise FileNotFoundError("checkpoint.export_only: no checkpoint to export (see checkpoint.resume)")
        state = self.parts.checkpointer.load_model(path, self.model)
        check_preprocessing(state, self.parts.model_cfg, path)
        self.step = state["step"]
        self.export()
        return self.step

    def export(self, dest: Path | None = None) -> Path:
        """Write the model in the save_pretrained format (collective under FSDP)."""
        dest = dest or self.parts.run_dir / self.parts.checkpointer.cfg.export_folder
        export_pretrained(self.model, self.parts.model_cfg, self.env, dest, tokenizer=self.parts.tokenizer)
        return dest

    def _finish(self) -> None:
        if self.parts.checkpointer.cfg.export_final:
            self.export()
