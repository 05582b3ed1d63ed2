"""Print benchmark results as one markdown table: time, ratio to the baseline, throughput, MFU, memory.

    python scripts/summarize_benchmarks.py RESULTS [RESULTS ...]

RESULTS: a pytest-benchmark JSON file (--benchmark-json) or the JSONL file that benchmarks/conftest.py appends to
when DUALTOWER_BENCH_LOG is set (one line per finished benchmark; it survives a run cut short). A benchmark found
in several files is listed once (the first file that holds it wins).

The "vs baseline" column: on a fast-path entry, its recorded `ratio` against its primary baseline, timed in the
same test; on a baseline entry, how many times faster the fast-path entry of the same group was (both medians
from the same run); on a fast-path entry without a same-run baseline, its tokens/s over the recorded
reference_throughput.md anchor. Keys are those of benchmarks/_common.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

COLUMNS = (
    "benchmark", "median ms", "vs baseline", "tokens/s", "ms/token", "TFLOP/s", "GB/s", "MFU", "peak GiB",
    "rel err",  # the tuned kernel against the reference (kernel benchmarks on CUDA)
)


@dataclass
class Entry:
    name: str
    fullname: str
    group: str
    median_s: float
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Results:
    entries: list[Entry] = field(default_factory=list)
    headers: list[str] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)  # files or lines left out (a stage killed mid-write)


def _from_json(data: dict[str, Any], results: Results) -> None:
    machine = data.get("machine_info", {})
    cpu = machine.get("cpu", {}).get("brand_raw", "?")
    header = f"node: {machine.get('node', '?')}  cpu: {cpu}  date: {str(data.get('datetime', '?'))[:10]}"
    if header not in results.headers:  # one line per machine and day, however many files
        results.headers.append(header)
    for bench in data.get("benchmarks", []):
        results.entries.append(Entry(bench["name"], bench.get("fullname", bench["name"]), bench.get("group") or "",
                                     bench["stats"]["median"], bench.get("extra_info", {})))


def _record(line: str) -> Entry | None:
    """One DUALTOWER_BENCH_LOG line, or None when it is not one (cut mid-write, or a line of another format)."""
    try:
        record = json.loads(line)
        return Entry(record["name"], record.get("fullname", record["name"]), record.get("group") or "",
                     record["median_s"], record.get("extra_info", {}))
    except (ValueError, TypeError, KeyError):
        return None


def _from_jsonl(path: Path, text: str, results: Results) -> None:
    lines = [(number, line) for number, line in enumerate(text.splitlines(), 1) if line.strip()]
    records = [(number, _record(line)) for number, line in lines]
    if lines and not any(entry for _, entry in records):  # e.g. a --benchmark-json file cut mid-write
        results.unreadable.append(f"{path}: no readable results")
        return
    for number, entry in records:
        if entry is None:
            results.unreadable.append(f"{path}:{number}: not a result line")
        else:
            results.entries.append(entry)


def load(paths: list[Path]) -> Results:
    results = Results()
    for path in paths:
        text = path.read_text()
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            _from_jsonl(path, text, results)  # several JSON documents, one per line
            continue
        if isinstance(data, dict) and "benchmarks" in data:
            _from_json(data, results)
        else:
            _from_jsonl(path, text, results)  # a JSONL file with a single line
    seen: set[str] = set()
    unique = []
    for entry in results.entries:
        if entry.fullname not in seen:
            seen.add(entry.fullname)
            unique.append(entry)
    results.entries = unique
    return results


def _number(value: Any, digits: int = 3) -> str:
    if value is None or isinstance(value, bool) or not isinstance(value, int | float):
        return ""
    short = f"{value:.{digits}g}"
    if abs(float(short)) >= 1000:  # also what rounds up to 1000 (999.7), which "g" would print as 1e+03
        return f"{value:,.0f}"
    return short


def _versus(entry: Entry, fast_by_group: dict[str, Entry]) -> str:
    extra = entry.extra
    if extra.get("role") == "fast" and isinstance(extra.get("ratio"), int | float):
        return f"{extra['ratio']:.2f}x vs {extra.get('baseline', 'baseline')}"
    anchor, tokens = extra.get("anchor_tokens_per_s"), extra.get("tokens_per_s")
    if extra.get("role") == "fast" and isinstance(anchor, int | float) and isinstance(tokens, int | float):
        return f"{tokens / anchor:.2f}x the anchor"  # no same-run baseline: reference_throughput.md's figure
    fast = fast_by_group.get(entry.group)
    if extra.get("role") == "baseline" and fast is not None and fast.median_s > 0:
        return f"{fast.extra.get('provider', 'fast')} {entry.median_s / fast.median_s:.2f}x faster"
    return ""


def _row(entry: Entry, fast_by_group: dict[str, Entry]) -> list[str]:
    extra = entry.extra
    mfu = extra.get("mfu")
    cells = [
        entry.name,
        f"{entry.median_s * 1e3:.3f}",
        _versus(entry, fast_by_group),
        _number(extra.get("tokens_per_s")),
        _number(extra.get("ms_per_token")),
        _number(extra.get("tflops")),
        _number(extra.get("gb_s")),
        f"{100 * mfu:.1f}%" if isinstance(mfu, int | float) else "",
        _number(extra.get("peak_mem_gib")),
        _number(extra.get("rel_err_vs_reference"), 2),
    ]
    return [cell.replace("|", "/") for cell in cells]


def summarize(results: Results) -> str:
    devices = sorted({str(e.extra["device"]) for e in results.entries if e.extra.get("device")})
    lines = [*results.headers, f"devices: {', '.join(devices) or '?'}", ""]
    if not results.entries:
        return "\n".join([*lines, "no benchmark results"])
    fast_by_group = {e.group: e for e in results.entries if e.extra.get("role") == "fast" and e.group}
    lines.append("| " + " | ".join(COLUMNS) + " |")
    lines.append("|" + "---|" * len(COLUMNS))
    lines += ["| " + " | ".join(_row(entry, fast_by_group)) + " |" for entry in results.entries]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python scripts/summarize_benchmarks.py",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 2)[2],  # what RESULTS may be and how the ratios are read
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("results", nargs="+", type=Path, metavar="RESULTS",
                        help="a pytest-benchmark JSON file (--benchmark-json) or a DUALTOWER_BENCH_LOG JSONL file")
    args = parser.parse_args(argv)
    missing = [str(p) for p in args.results if not p.is_file()]
    if missing:
        parser.print_usage(sys.stderr)
        print(f"error: not found: {', '.join(missing)}", file=sys.stderr)
        return 2
    results = load(args.results)
    for note in results.unreadable:
        print(f"warning: left out {note}", file=sys.stderr)
    print(summarize(results))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
