"""Torch profiler traces of one generate call: `python -m dualtower.generate ... --profile DIR`.

The trace covers the left tower (vision + left LM, for prefixes missing from the prefix cache), the right-tower
prefill and the first `decode_steps` decode steps; then the profiler stops and the call finishes untraced. The
phases carry labels (`generate/left_tower`, `generate/decode_step_N`; the prefill is what lies between them),
given through the Generator's `phase_hook` for the duration of the trace. When the generator compiles
or captures CUDA graphs, an untraced warm-up of the same batch runs first (and the prefix cache is emptied
after it), so the trace shows steady-state steps rather than compilation. A CUDA-graph decode step appears as
one graph launch plus its kernels; `--no_cuda_graph` attributes the kernels to PyTorch operators instead.

Writes DIR/<name>.json (chrome trace: https://ui.perfetto.dev) and DIR/<name>.txt (the profiler's op table).
`python -m dualtower.trace_breakdown DIR/<name>.json` prints its breakdown by category.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch.profiler import ProfilerActivity, profile, record_function

logger = logging.getLogger(__name__)

T = TypeVar("T")


class GenerationProfiler:
    """Profiles one generate call of a Generator: its left tower, prefill and first `decode_steps` steps."""

    def __init__(self, folder: Path, decode_steps: int = 8, name: str = "generate"):
        if decode_steps < 1:
            raise ValueError("decode_steps must be >= 1")
        self.path = Path(folder) / f"{name}.json"
        self.decode_steps = decode_steps

    def run(self, generator: Any, call: Callable[[], T], warm_up: Callable[[], object] | None = None) -> T:
        """`call()` (a generate call of `generator`) under the profiler; returns its result.

        `warm_up` (default: `call`) runs first, untraced, when the generator compiles or uses CUDA graphs."""
        if getattr(generator, "compile", False) or getattr(generator, "cuda_graph", False):
            (warm_up or call)()
            if generator.prefix_cache is not None:
                generator.prefix_cache.clear()  # the traced call should run the left tower again
        device = generator.device
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        prof = profile(activities=activities, record_shapes=True)
        prof.start()
        stopped = False

        def stop() -> None:
            nonlocal stopped
            if not stopped:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                prof.stop()
                stopped = True

        previous_hook = generator.phase_hook
        generator.phase_hook = _phase_labels(self.decode_steps, stop)
        try:
            result = call()
        finally:
            generator.phase_hook = previous_hook
            stop()
        self._write(prof, device)
        return result

    def _write(self, prof: profile, device: torch.device) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(self.path))
        sort_by = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
        self.path.with_suffix(".txt").write_text(prof.key_averages().table(sort_by=sort_by, row_limit=40))
        logger.info("generation profile written: %s", self.path)


def _phase_labels(decode_steps: int, stop: Callable[[], None]) -> Callable[[str], contextlib.AbstractContextManager]:
    """A Generator phase hook: label the left tower and the first `decode_steps` decode steps, then stop."""
    steps = 0

    def hook(phase: str) -> contextlib.AbstractContextManager:
        nonlocal steps
        if phase != "decode_step":
            return record_function(f"generate/{phase}")
        steps += 1
        if steps > decode_steps:
            stop()
            return contextlib.nullcontext()
        return record_function(f"generate/decode_step_{steps}")

    return hook
