"""Where a traced step's time went: `python -m dualtower.trace_breakdown TRACE.json[.gz] [--top 12]`.

Prints markdown tables:
- on a GPU trace: device time of the kernels (and copies), by phase and by category, the step span and how busy
  the GPU was inside it (idle gaps mean launch-bound or host-synchronizing code);
- on a CPU-only trace: the exclusive time of the operators, by the same phases and categories.
Phases come from the profiler's own annotations: backward = under `autograd::engine::evaluate_function`,
optimizer = under `Optimizer.step` / `Optimizer.zero_grad`, forward = everything else (the forward pass, the
loss, gradient clipping, batch copies). Categories come from kernel / operator names (CATEGORIES below), except
that whatever runs inside one of our custom ops (`dualtower::...`, or its backward's autograd node) counts under
that op's category: the chunked loss's GEMMs and exps are cross-entropy time, not generic matmul / elementwise
time. It reads any chrome trace of torch's profiler: training steps (`train/main.py --profile`) and generation
(`python -m dualtower.generate --profile DIR`). Given a directory (a run's profile/ folder), it breaks down each
trace in it (*.json, *.json.gz), one after the other.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# First match wins: communication kernels contain "reduce", optimizer kernels contain "adam" before "mul".
# A label may come back: the first rule that matches a name decides.
CATEGORIES = (
    ("communication", r"nccl|all_?reduce|reduce_?scatter|all_?gather"),
    ("attention", r"prefix_attn|decode_split|decode_combine|flash|fmha|attention|attn|sdpa"),
    ("cross-entropy", r"_ce_rows|cross_entropy|log_softmax|nll_loss|logsumexp"),
    ("projector", r"_project_|pixel_shuffle"),
    ("optimizer", r"adam|multi_tensor|foreach|optimizer"),
    # Inductor names a kernel after the aten ops it fuses, and under autocast nearly every fusion holds a
    # `_to_copy` (triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_0 is an RMSNorm): a lone copy is memory, a
    # GEMM template is matmul, any other fusion is elementwise / norm work whatever copy or index op it holds.
    ("memory", r"^(triton_poi|cpp)_fused_(_to_copy|clone|copy|cat|constant_pad_nd|zeros|fill)_\d+$"),
    ("matmul", r"^triton_tem_fused_\w*mm_"),
    ("fused elementwise / norms", r"^(triton_(poi|red|per)|cpp)_fused_"),
    ("matmul", r"gemm|nvjet|xmma|cutlass|cublas|matmul|aten::mm\b|aten::bmm|aten::addmm|aten::linear|conv"),
    ("memory", r"memcpy|memset|copy|aten::cat\b|index|gather|scatter|fill|zero|aten::empty|contiguous"),
    ("fused elementwise / norms", r"triton_|rms|norm|silu|gelu|rotary|rope|elementwise|vectorized|reduce|mul|add"),
)
PHASES = ("forward", "backward", "optimizer")
_DEVICE_CATS = ("kernel", "gpu_memcpy", "gpu_memset")
_HOST_CATS = ("cpu_op", "user_annotation")


def category(name: str) -> str:
    for label, pattern in CATEGORIES:
        if re.search(pattern, name, re.IGNORECASE):
            return label
    return "other"


@dataclass
class Breakdown:
    """Milliseconds per phase, per category and per kernel / operator name (device time on GPU traces)."""

    device: bool  # GPU kernels (True) or CPU operators' exclusive time (False)
    total_ms: float = 0.0
    span_ms: float = 0.0  # first start to last end of the counted events
    busy_ms: float = 0.0  # union of the counted intervals (GPU traces)
    phases: dict[str, float] = field(default_factory=lambda: collections.defaultdict(float))
    categories: dict[str, float] = field(default_factory=lambda: collections.defaultdict(float))
    names: dict[str, list[float]] = field(default_factory=lambda: collections.defaultdict(lambda: [0, 0.0]))

    def add(self, name: str, phase: str, ms: float, owner: str | None = None) -> None:
        """owner: the category of the custom op this ran inside, which takes precedence over the name's."""
        self.total_ms += ms
        self.phases[phase] += ms
        self.categories[owner or category(name)] += ms
        self.names[name][0] += 1
        self.names[name][1] += ms


def load_trace(path: Path) -> list[dict[str, Any]]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as handle:
        data = json.load(handle)
    return data["traceEvents"] if isinstance(data, dict) else data


@dataclass
class _Frame:
    """One open host event while walking a thread's nesting."""

    event: dict[str, Any]
    phase: str
    owner: str | None  # category of the innermost enclosing dualtower:: op
    exclusive_us: float


def _host_frames(events: list[dict[str, Any]]) -> tuple[dict[int, _Frame], list[_Frame]]:
    """Per thread, walk nested host events: (External id -> its frame, every frame); an operator's frame carries
    its exclusive time (its duration less that of the operators nested in it)."""
    by_thread: dict[Any, list[dict]] = collections.defaultdict(list)
    for event in events:
        if event.get("cat") in _HOST_CATS and event.get("ph") == "X":
            by_thread[(event.get("pid"), event.get("tid"))].append(event)
    frame_of_id: dict[int, _Frame] = {}
    frames: list[_Frame] = []
    for thread_events in by_thread.values():
        thread_events.sort(key=lambda e: (e["ts"], -e.get("dur", 0)))
        stack: list[_Frame] = []
        for event in thread_events:
            while stack and event["ts"] >= stack[-1].event["ts"] + stack[-1].event.get("dur", 0):
                frames.append(stack.pop())
            frame = _Frame(event, *_context(event["name"], stack[-1] if stack else None), event.get("dur", 0))
            # Exclusive time is operators' time: an annotation inside an operator stays that operator's time.
            if event.get("cat") == "cpu_op":
                enclosing = next((f for f in reversed(stack) if f.event.get("cat") == "cpu_op"), None)
                if enclosing is not None:
                    enclosing.exclusive_us -= frame.exclusive_us
            stack.append(frame)
            external = event.get("args", {}).get("External id")
            if external is not None:
                frame_of_id[external] = frame
        frames += stack
    return frame_of_id, frames


def _context(name: str, parent: _Frame | None) -> tuple[str, str | None]:
    """(phase, owner category) of an event named `name` nested directly in `parent`."""
    phase, owner = (parent.phase, parent.owner) if parent else ("forward", None)
    if name.startswith("autograd::engine::evaluate_function"):
        phase = "backward"
    elif name.startswith("Optimizer."):
        phase = "optimizer"
    if _is_custom_op(name) and category(name) != "other":
        owner = category(name)
    return phase, owner


def _is_custom_op(name: str) -> bool:
    """One of our ops, or the autograd node of its backward (`GeneratedBackwardFor_dualtower_<op>_...Backward`,
    also inside the `autograd::engine::evaluate_function: ...` event that runs it)."""
    return name.startswith("dualtower::") or "GeneratedBackwardFor_dualtower_" in name


def _busy_ms(intervals: list[tuple[float, float]]) -> float:
    busy, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop > end:
            busy += stop - max(start, end)
            end = stop
    return busy / 1e3


def breakdown(events: list[dict[str, Any]]) -> Breakdown:
    frame_of_id, frames = _host_frames(events)
    kernels = [e for e in events if e.get("cat") in _DEVICE_CATS and e.get("ph") == "X"]
    if kernels:
        result = Breakdown(device=True)
        for kernel in kernels:
            launcher = frame_of_id.get(kernel.get("args", {}).get("External id"))
            phase, owner = (launcher.phase, launcher.owner) if launcher else ("forward", None)
            result.add(kernel["name"], phase, kernel.get("dur", 0) / 1e3, owner)
        intervals = [(k["ts"], k["ts"] + k.get("dur", 0)) for k in kernels]
    else:
        result = Breakdown(device=False)
        ops = [frame for frame in frames if frame.event.get("cat") == "cpu_op"]
        for frame in ops:
            result.add(frame.event["name"], frame.phase, frame.exclusive_us / 1e3, frame.owner)
        intervals = [(f.event["ts"], f.event["ts"] + f.event.get("dur", 0)) for f in ops]
    if intervals:
        result.span_ms = (max(stop for _, stop in intervals) - min(start for start, _ in intervals)) / 1e3
        result.busy_ms = _busy_ms(intervals)
    return result


def _table(title: str, rows: list[tuple[str, float]], total: float) -> list[str]:
    lines = [f"| {title} | ms | share |", "|---|---|---|"]
    lines += [f"| {name} | {ms:.2f} | {100 * ms / total:.1f}% |" for name, ms in rows if ms > 0]
    return lines


def format_breakdown(result: Breakdown, top: int = 12) -> str:
    kind = "GPU kernel time" if result.device else "CPU operator time (exclusive)"
    if result.total_ms <= 0:
        return "no timed events in this trace"
    lines = [f"{kind}: {result.total_ms:.2f} ms over a {result.span_ms:.2f} ms span"]
    if result.device:
        lines[0] += f"; GPU busy {result.busy_ms:.2f} ms ({100 * result.busy_ms / max(result.span_ms, 1e-9):.0f}%)"
    lines.append("")
    lines += _table("phase", [(p, result.phases.get(p, 0.0)) for p in PHASES], result.total_ms)
    lines.append("")
    by_category = sorted(result.categories.items(), key=lambda item: -item[1])
    lines += _table("category", by_category, result.total_ms)
    lines += ["", "| top kernels / ops | calls | ms | share |", "|---|---|---|---|"]
    heaviest = sorted(result.names.items(), key=lambda item: -item[1][1])[:top]
    for name, (calls, ms) in heaviest:
        short = name if len(name) <= 80 else name[:77] + "..."
        lines.append(f"| {short.replace('|', '/')} | {calls} | {ms:.2f} | {100 * ms / result.total_ms:.1f}% |")
    return "\n".join(lines)


class TraceError(Exception):
    """A CLI argument that names no readable trace (printed as one line)."""


def _traces(path: Path) -> list[Path]:
    """The traces named by a CLI argument: the file itself, or each trace in a directory."""
    if path.is_dir():
        traces = sorted(p for p in path.iterdir() if p.name.endswith((".json", ".json.gz")))
        if not traces:
            raise TraceError(f"no traces (*.json, *.json.gz) in {path}")
        return traces
    if not path.is_file():
        raise TraceError(f"trace not found: {path}")
    if path.suffix == ".txt":  # the profiler's op table written beside each trace
        raise TraceError(f"{path} is the profiler's text table; pass the trace beside it: {path.with_suffix('.json')}")
    return [path]


def _read(path: Path) -> list[dict[str, Any]]:
    try:
        return load_trace(path)
    except (OSError, ValueError, KeyError) as exc:  # bad gzip, bad JSON (a ValueError), no traceEvents
        raise TraceError(f"{path} is not a chrome trace of torch's profiler ({type(exc).__name__}: {exc})") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dualtower.trace_breakdown", description="Where a traced step's time went."
    )
    parser.add_argument(
        "trace", type=Path, help="a chrome trace written by --profile (.json or .json.gz), or a folder of them"
    )
    parser.add_argument("--top", type=int, default=12, help="kernels / operators listed")
    args = parser.parse_args(argv)
    try:
        reports = [(trace, breakdown(_read(trace))) for trace in _traces(args.trace)]
    except TraceError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    for index, (trace, result) in enumerate(reports):
        if len(reports) > 1:  # a folder: one titled breakdown per trace
            sys.stdout.write(("\n" if index else "") + f"## {trace.name}\n\n")
        sys.stdout.write(format_breakdown(result, args.top) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
