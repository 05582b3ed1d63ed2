"""Run metrics: `metrics.jsonl` (one JSON object per logged step), a console progress line on stderr and
optional Weights & Biases, all written by rank 0.

Training records (every `log_every` steps, at the last step and at each checkpoint's step) carry `step`,
`loss`, `lr`, `grad_norm`, `tokens_per_s`, `mfu`, `peak_mem_gib`, `packing_efficiency` (plus `lr/<tower>`,
`skipped_steps`); evaluation records carry `eval/...` keys; at each checkpoint and at the end, a record of the
train data's counters over all ranks: `data/read`, `data/samples`, `data/dropped`, `data/tiles_per_row`, per reason
`data/dropped/<reason>`, `data/converted/<kind>` (truncated, repaired, ...).
`mfu` is null where the device's peak is unknown (CPUs; see dualtower.training.flops). `packing_efficiency`
(non-pad tokens / row capacity) is null when `data.pack` is off: nothing is padded then, rows have no capacity.

A resumed run repeats the steps after its checkpoint: `rewind` first moves their records (and a line cut by a
kill) from `metrics.jsonl` to `metrics.superseded.jsonl`, so the file stays one timeline and nothing is lost.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

from dualtower.data.counters import LoaderStats
from dualtower.model.config import ConfigError

logger = logging.getLogger(__name__)

TRAIN_KEYS = ("step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "peak_mem_gib", "packing_efficiency")


def peak_memory_gib(device: torch.device) -> float:
    """Peak allocated CUDA memory since the previous call (the counter is reset, so an evaluation's peak shows
    only in its own window), or the process's peak resident memory on CPU (which cannot be reset)."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**30
        torch.cuda.reset_peak_memory_stats(device)
        return peak
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsLogger:
    """Takes the [metrics] section; only rank 0 writes anything."""

    def __init__(self, metrics_cfg, run_dir: Path, is_main: bool, total_steps: int, config_dict: dict[str, Any]):
        self.cfg = metrics_cfg
        self.is_main = is_main
        self.total_steps = total_steps
        self.start = time.perf_counter()
        self._wandb = None
        self._file = None
        if not is_main:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / "metrics.jsonl"
        self._file = self.path.open("a", buffering=1)
        if metrics_cfg.wandb and metrics_cfg.wandb_mode != "disabled":
            self._wandb = _start_wandb(metrics_cfg, run_dir, config_dict)

    def log(self, record: dict[str, Any]) -> None:
        if not self.is_main:
            return
        clean = {key: _finite_or_none(value) for key, value in record.items()}
        self._file.write(json.dumps(clean) + "\n")
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in clean.items() if k != "step" and v is not None}, step=clean["step"])
        if self.cfg.progress != "none":
            self._console(clean)

    def log_data_counts(self, step: int, shares: list[dict[str, Any]]) -> None:
        """One record of the train loader's counters, from each rank's `LoaderStats.to_dict()`."""
        total = LoaderStats()
        for share in shares:
            total.merge(LoaderStats.from_dict(share))
        self.log({
            "step": step,
            "data/read": total.read,
            "data/samples": total.samples,
            "data/dropped": total.num_dropped,
            "data/tiles_per_row": total.tiles_per_row,  # of the batches made so far (some may be buffered)
            **{f"data/dropped/{reason}": count for reason, count in sorted(total.dropped.items())},
            **{f"data/converted/{kind}": count for kind, count in sorted(total.events.items())},
        })

    def rewind(self, step: int) -> None:
        """Before a run resumed at `step` logs again: move the records of later steps, and any line that is not
        a complete record, to metrics.superseded.jsonl (appended). Rank 0 only."""
        if self._file is None:
            return
        self._file.close()
        kept, superseded = [], []
        for line in self.path.read_text().splitlines(keepends=True):
            (kept if _logged_by_step(line, step) else superseded).append(line if line.endswith("\n") else line + "\n")
        if superseded:
            with (self.path.parent / "metrics.superseded.jsonl").open("a") as aside:
                aside.writelines(superseded)
            tmp = self.path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(kept))
            os.replace(tmp, self.path)  # a kill now leaves the old file or the new one, never half of it
            logger.info("resume at step %d: %d records of later steps moved to %s", step, len(superseded),
                        "metrics.superseded.jsonl")
        self._file = self.path.open("a", buffering=1)

    def _console(self, record: dict[str, Any]) -> None:
        step = record["step"]
        if "loss" not in record:  # an evaluation or data-counter record: one line of its own figures
            kind = next((key.split("/")[0] for key in record if "/" in key), "record")
            figures = "  ".join(f"{k} {_fmt(v)}" for k, v in record.items() if k != "step")
            sys.stderr.write(f"\n{kind} step {step}: {figures}\n")
            return
        figures = "  ".join(f"{k} {_fmt(record.get(k))}" for k in TRAIN_KEYS[1:])
        elapsed = time.perf_counter() - self.start
        if self.cfg.progress == "bar":
            done = int(30 * step / max(self.total_steps, 1))
            bar = "#" * done + "." * (30 - done)
            end = "\r" if sys.stderr.isatty() else "\n"
            sys.stderr.write(f"[{bar}] {step}/{self.total_steps} {figures}  {elapsed:.0f}s{end}")
        else:
            sys.stderr.write(f"step {step}/{self.total_steps} {figures}  {elapsed:.0f}s\n")
        sys.stderr.flush()

    def close(self) -> None:
        if self._file is not None:
            if self.cfg.progress == "bar" and sys.stderr.isatty():
                sys.stderr.write("\n")
            self._file.close()
            self._file = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def _logged_by_step(line: str, step: int) -> bool:
    """Whether `line` is a complete record of a step <= `step`."""
    if not line.endswith("\n"):
        return False  # cut by a kill mid-write
    try:
        return json.loads(line)["step"] <= step
    except (ValueError, KeyError, TypeError):
        return False


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _start_wandb(metrics_cfg, run_dir: Path, config_dict: dict[str, Any]):
    try:
        import wandb
    except ImportError as exc:
        # A setting this environment cannot honour: one line from train/main.py, not a traceback.
        raise ConfigError("metrics.wandb = true needs wandb: pip install 'dualtower[wandb]'") from exc
    return wandb.init(
        project=metrics_cfg.wandb_project,
        entity=metrics_cfg.wandb_entity or None,
        name=metrics_cfg.run_name or run_dir.name,
        mode=metrics_cfg.wandb_mode,
        dir=str(run_dir),
        config=config_dict,
    )
