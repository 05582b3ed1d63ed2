"""`--profile` / [profile]: torch profiler chrome traces of a few chosen optimizer steps."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

logger = logging.getLogger(__name__)


class StepProfiler:
    """Takes the [profile] section; writes `<run_dir>/<folder>/step_XXXXXX_rankR.json` per chosen step."""

    def __init__(self, profile_cfg, run_dir: Path, rank: int, device: torch.device):
        self.enabled = profile_cfg.enabled
        self.steps = set(profile_cfg.steps)
        self.folder = run_dir / profile_cfg.folder
        self.rank = rank
        self.activities = [ProfilerActivity.CPU]
        if device.type == "cuda":
            self.activities.append(ProfilerActivity.CUDA)

    @contextlib.contextmanager
    def step(self, step: int) -> Iterator[None]:
        """Wrap optimizer step `step` (1-based); traces it if it is one of the chosen steps."""
        if not (self.enabled and step in self.steps):
            yield
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        with profile(activities=self.activities, record_shapes=True) as prof:
            yield
        path = self.folder / f"step_{step:06d}_rank{self.rank}.json"
        prof.export_chrome_trace(str(path))
        logger.info("profiler trace written: %s", path)
