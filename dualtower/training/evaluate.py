"""Periodic evaluation during training: validation loss (every rank) and, for the synthetic source, held-out
answer accuracy by greedy generation (rank 0, on an unsharded copy of the model).

Records: `eval/loss` (token-weighted mean over the validation batches of all ranks), `eval/tokens`,
`eval/accuracy` (exact match after lowercasing, dropping punctuation and collapsing spaces, as the original's
accuracy metric) and `eval/accuracy_samples`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from dualtower.batch import PackedBatch
from dualtower.parallel import DistEnv

logger = logging.getLogger(__name__)


def normalize_answer(text: str) -> str:
    text = re.sub(r"[^\w\s]", "", text.lower())
    return " ".join(text.split())


def answer_accuracy(predictions: list[str], answers: list[str]) -> float:
    """Exact match after normalization; an empty prediction is never right."""
    pairs = zip(predictions, answers, strict=True)
    hits = sum(bool(p) and normalize_answer(p) == normalize_answer(a) for p, a in pairs)
    return hits / max(len(answers), 1)


def greedy_answers(
    model: nn.Module, tokenizer, examples: list[dict], max_new_tokens: int, batch_size: int = 16
) -> list[str]:
    """Answer each example's question about its images with greedy decoding."""
    from dualtower.generation import GenerationRequest, Generator, SamplingConfig

    generator = Generator(model, tokenizer)
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, do_sample=False)
    texts = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        requests = [GenerationRequest(images=ex["images"], prompt=ex["question"]) for ex in chunk]
        texts.extend(result.text for result in generator.generate(requests, sampling))
    return texts


def _all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor.tolist()


class Evaluator:
    """Takes the [eval] section. Validation batches are fetched once and reused, so every evaluation sees the
    same data and every rank runs the same number of forward passes (FSDP needs that)."""

    def __init__(self, eval_cfg, val_loader, tokenizer, env: DistEnv, heldout: list[dict] | None = None):
        self.cfg = eval_cfg
        self.val_loader = val_loader
        self.tokenizer = tokenizer
        self.env = env
        self.heldout = heldout or []
        self._val_batches: list[PackedBatch] | None = None

    def due(self, step: int, total_steps: int) -> bool:
        periodic = self.cfg.every > 0 and step % self.cfg.every == 0
        return periodic or (self.cfg.at_end and step == total_steps)

    def _batches(self) -> list[PackedBatch]:
        if self._val_batches is None:
            batches = []
            if self.val_loader is not None and self.cfg.val_batches > 0:
                for batch in self.val_loader:
                    batches.append(batch)
                    if len(batches) == self.cfg.val_batches:
                        break
            count = torch.tensor([len(batches)], device=self.env.device)
            if dist.is_initialized():
                dist.all_reduce(count, op=dist.ReduceOp.MIN)
            self._val_batches = batches[: int(count.item())]
        return self._val_batches

    @torch.no_grad()
    def validation_loss(self, model: nn.Module, autocast: Callable[[], AbstractContextManager]) -> dict[str, Any]:
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.env.device)
        supervised = 0
        for batch in self._batches():
            with autocast():
                loss_sum += model.loss_sum(batch.to(self.env.device)).double()
            supervised += batch.num_supervised
        total_loss, total_supervised = _all_reduce_sum([loss_sum.item(), float(supervised)], self.env.device)
        if total_supervised == 0:
            return {}
        return {"eval/loss": total_loss / total_supervised, "eval/tokens": int(total_supervised)}

    def accuracy(self, full_model: nn.Module | None) -> dict[str, Any]:
        """Rank 0 answers the held-out questions; call on every rank (the result is broadcast)."""
        if not self.heldout or self.cfg.accuracy_samples == 0:
            return {}
        value = torch.zeros(1, dtype=torch.float64, device=self.env.device)
        if self.env.is_main:
            examples = self.heldout[: self.cfg.accuracy_samples]
            predictions = greedy_answers(full_model.eval(), self.tokenizer, examples, self.cfg.max_new_tokens)
            for example, prediction in list(zip(examples, predictions, strict=True))[:3]:
                logger.info("Q: %s | expected %r | got %r", example["question"], example["answer"], prediction)
            value[0] = answer_accuracy(predictions, [ex["answer"] for ex in examples])
        if dist.is_initialized():
            dist.broadcast(value, src=0)
        samples = min(len(self.heldout), self.cfg.accuracy_samples)
        return {"eval/accuracy": value.item(), "eval/accuracy_samples": samples}
