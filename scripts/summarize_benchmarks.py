"""Print a pytest-benchmark JSON file as one markdown table: time, ratio to baseline, throughput, memory."""

from __future__ import annotations

import json
import sys
from pathlib import Path

COLUMNS = ("ratio", "tokens_per_s", "tflops", "gbps", "mfu", "ms_per_token", "peak_mem_gib")


def _format(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return "" if value is None else str(value)


def summarize(path: Path) -> str:
    data = json.loads(path.read_text())
    lines = [f"machine: {data.get('machine_info', {}).get('node', '?')}  date: {data.get('datetime', '?')}", ""]
    lines.append("| benchmark | median ms | " + " | ".join(COLUMNS) + " |")
    lines.append("|---" * (len(COLUMNS) + 2) + "|")
    for bench in data.get("benchmarks", []):
        extra = bench.get("extra_info", {})
        cells = [_format(extra.get(key)) for key in COLUMNS]
        lines.append(f"| {bench['name']} | {bench['stats']['median'] * 1e3:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) != 2 or not Path(sys.argv[1]).is_file():
        sys.exit("usage: python scripts/summarize_benchmarks.py BENCHMARK_JSON")
    print(summarize(Path(sys.argv[1])))
