"""`--profile` / [profile]: torch profiler traces of chosen optimizer steps.

Training writes `<run_dir>/<folder>/step_XXXXXX_rankR.json` (a chrome trace: open it in https://ui.perfetto.dev or
chrome://tracing) and `step_XXXXXX_rankR.txt` (the profiler's own table of the most expensive ops).
`python -m dualtower.trace_breakdown TRACE` prints where a traced step's time went.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def trace_to(path: Path, device: torch.device) -> Iterator[profile]:
    """Profile the block (CPU, and CUDA on a CUDA device) and write a chrome trace + an op table next to it."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    path.parent.mkdir(parents=True, exist_ok=True)
    with profile(activities=activities, record_shapes=True) as prof:
        yield prof
    prof.export_chrome_trace(str(path))
    sort_by = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    path.with_suffix(".txt").write_text(prof.key_averages().table(sort_by=sort_by, row_limit=40))
    logger.info("profiler trace written: %s", path)


class StepProfiler:
    """Takes the [profile] section; writes `<run_dir>/<folder>/step_XXXXXX_rankR.{json,txt}` per chosen step."""

    def __init__(self, profile_cfg, run_dir: Path, rank: int, device: torch.device):
        self.enabled = profile_cfg.enabled
        self.steps = set(profile_cfg.steps)
        self.folder = run_dir / profile_cfg.folder
        self.rank = rank
        self.device = device
        self.writing_s = 0.0  # seconds spent starting the profiler and writing traces since the last take

    @contextlib.contextmanager
    def step(self, step: int) -> Iterator[None]:
        """Wrap optimizer step `step` (1-based); traces it if it is one of the chosen steps."""
        if not (self.enabled and step in self.steps):
            yield
            return
        starting = time.perf_counter()
        with trace_to(self.folder / f"step_{step:06d}_rank{self.rank}.json", self.device):
            # Starting the profiler (seconds the first time) is profiling overhead too, not the step's time.
            self.writing_s += time.perf_counter() - starting
            yield
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)  # the step's kernels end inside the trace
            stepped = time.perf_counter()
        self.writing_s += time.perf_counter() - stepped

    def take_writing_seconds(self) -> float:
        """Seconds spent starting and stopping the profiler and writing traces since the last call: not training
        time."""
        seconds, self.writing_s = self.writing_s, 0.0
        return seconds

    def warn_untraced(self, first_step: int, last_step: int) -> None:
        """Warn (rank 0) about chosen steps outside first_step..last_step, the steps this run will train:
        a resumed run starts after its checkpoint, and steps beyond training.steps never come."""
        untraced = sorted(step for step in self.steps if not first_step <= step <= last_step)
        if not (self.enabled and untraced and self.rank == 0):
            return
        trains = f"trains steps {first_step}..{last_step}" if first_step <= last_step else "trains no steps"
        logger.warning("profile.steps %s will not be traced: this run %s", ", ".join(map(str, untraced)), trains)
