"""The benchmark tooling: the summary table, incremental results from benchmarks/conftest.py, gpu_check.sh."""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _summarizer():
    spec = importlib.util.spec_from_file_location("summarize_benchmarks", ROOT / "scripts" / "summarize_benchmarks.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_the_benchmarks_wrong_result_check_admits_rounding_and_catches_errors() -> None:
    spec = importlib.util.spec_from_file_location("bench_common", ROOT / "benchmarks" / "_common.py")
    common = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(common)
    torch.manual_seed(0)
    out, grad = torch.randn(4096, 64), torch.randn(300, 7)
    assert common.relative_error((out, None, grad), (out.clone(), None, grad.clone())) == 0.0
    rounded = (out.bfloat16(), grad.bfloat16())  # a bf16 kernel against an fp32 reference: rounding only
    assert 0 < common.relative_error(rounded, (out, grad)) < common.WRONG_RESULT / 5
    wrong = grad.clone()
    wrong[17] = 0.0  # one row the kernel forgot
    assert common.relative_error((out, wrong), (out, grad)) > common.WRONG_RESULT
    empty = torch.empty(0, 3, 64)  # the left tower's prefix K/V gradients: nothing to compare
    assert common.relative_error((out, empty), (out, empty.clone())) == 0.0
    assert common.relative_error((wrong, empty), (grad, empty.clone())) > common.WRONG_RESULT


def _bench(name: str, group: str, median: float, **extra) -> dict:
    return {"name": name, "fullname": f"bench_x.py::{name}", "group": group, "stats": {"median": median},
            "extra_info": extra}


def test_summary_table_ratios_throughput_and_deduplication(tmp_path: Path) -> None:
    summarize = _summarizer()
    report = {
        "machine_info": {"node": "box", "cpu": {"brand_raw": "EPYC"}},
        "datetime": "2026-11-27",
        "benchmarks": [
            _bench("test_step[original]", "train 360m", 0.30, role="baseline", provider="original", mfu=0.17,
                   tokens_per_s=27_306.7, device="H100"),
            _bench("test_step[dualtower]", "train 360m", 0.10, role="fast", provider="dualtower", ratio=3.0,
                   baseline="original", mfu=0.51, tokens_per_s=81_920.0, peak_mem_gib=20.5, device="H100"),
        ],
    }
    (tmp_path / "run.json").write_text(json.dumps(report))
    lines = [  # one repeats a JSON entry (kept once), one only finished in the log
        {"name": "test_step[dualtower]", "fullname": "bench_x.py::test_step[dualtower]", "group": "train 360m",
         "median_s": 9.9, "extra_info": {}},
        {"name": "test_decode[1]", "fullname": "bench_y.py::test_decode[1]", "group": "decode", "median_s": 0.2,
         "extra_info": {"role": "fast", "ratio": 12.5, "baseline": "original_generate", "ms_per_token": 2.5,
                        "rel_err_vs_reference": 0.00312}},
    ]
    (tmp_path / "run.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    table = summarize.summarize(summarize.load([tmp_path / "run.json", tmp_path / "run.jsonl"]))
    rows = {line.split(" | ")[0].strip("| "): line for line in table.splitlines() if line.startswith("| test_")}
    assert list(rows) == ["test_step[original]", "test_step[dualtower]", "test_decode[1]"]
    assert "dualtower 3.00x faster" in rows["test_step[original]"] and "17.0%" in rows["test_step[original]"]
    assert "3.00x vs original" in rows["test_step[dualtower]"] and "81,920" in rows["test_step[dualtower]"]
    assert "| 100.000 |" in rows["test_step[dualtower]"]  # the JSON's median, not the log's duplicate
    assert "12.50x vs original_generate" in rows["test_decode[1]"] and "| 2.5 |" in rows["test_decode[1]"]
    assert rows["test_decode[1]"].endswith("| 0.0031 |") and rows["test_step[dualtower]"].endswith("| 20.5 |  |")
    assert "devices: H100" in table
    assert summarize.main([str(tmp_path / "missing.json")]) == 2


def test_summarizer_help_explains_its_arguments(capsys) -> None:
    summarize = _summarizer()
    with pytest.raises(SystemExit) as done:
        summarize.main(["--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: python scripts/summarize_benchmarks.py") and "DUALTOWER_BENCH_LOG" in out
    assert summarize.main(["missing.json"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == "error: not found: missing.json"


def _run_bench_file(tmp_path: Path, source: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `source` as a bench file beside copies of benchmarks/conftest.py and _common.py."""
    for name in ("conftest.py", "_common.py"):
        shutil.copy(ROOT / "benchmarks" / name, tmp_path / name)
    (tmp_path / "bench_file.py").write_text(source)
    command = [sys.executable, "-m", "pytest", str(tmp_path / "bench_file.py"), "-q", "-p", "no:cacheprovider",
               "-o", "python_files=bench_*.py", "--rootdir", str(tmp_path), "-c", os.devnull, *args]
    return subprocess.run(command, cwd=tmp_path, env={**os.environ, **(env or {})}, capture_output=True,
                          text=True, timeout=120)


def test_benchmark_log_keeps_each_finished_benchmark(tmp_path: Path) -> None:
    """benchmarks/conftest.py appends a JSON line per benchmark as it ends (what a timed-out run keeps)."""
    log = tmp_path / "results.jsonl"
    done = _run_bench_file(
        tmp_path,
        "def test_tiny(benchmark):\n"
        "    benchmark.group = 'tiny'\n"
        "    benchmark.pedantic(sum, args=(range(100),), rounds=3)\n"
        "    benchmark.extra_info.update(role='fast', ratio=2.0, baseline='slow', tokens_per_s=5.0)\n",
        env={"DUALTOWER_BENCH_LOG": str(log)},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    (record,) = [json.loads(line) for line in log.read_text().splitlines()]
    assert record["name"] == "test_tiny" and record["group"] == "tiny" and record["rounds"] == 3
    assert record["extra_info"]["ratio"] == 2.0 and record["median_s"] > 0
    summarize = _summarizer()
    assert "2.00x vs slow" in summarize.summarize(summarize.load([log]))


def test_a_run_cut_short_still_writes_the_finished_benchmarks_json(tmp_path: Path) -> None:
    """gpu_check stops a stage with SIGINT at its time limit. The benchmark it interrupts has no rounds, and
    pytest-benchmark's JSON writer fails on such an entry, which would lose the whole stage's JSON."""
    output, log = tmp_path / "stage.json", tmp_path / "results.jsonl"
    done = _run_bench_file(
        tmp_path,
        "def test_finished(benchmark):\n"
        "    benchmark.pedantic(sum, args=(range(100),), rounds=2)\n"
        "\n"
        "def interrupted():\n"
        "    raise KeyboardInterrupt  # what the stage's SIGINT raises in the first round\n"
        "\n"
        "def test_interrupted(benchmark):\n"
        "    benchmark.pedantic(interrupted, rounds=2)\n",
        f"--benchmark-json={output}",
        env={"DUALTOWER_BENCH_LOG": str(log)},  # the per-benchmark log must not ask the empty one for its median
    )
    assert done.returncode == 2, done.stdout + done.stderr  # pytest's "interrupted"
    assert "Error" not in done.stdout + done.stderr  # min() / median() of no timings
    names = [bench["name"] for bench in json.loads(output.read_text())["benchmarks"]]
    assert names == ["test_finished"]
    assert [json.loads(line)["name"] for line in log.read_text().splitlines()] == ["test_finished"]


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash")
def test_gpu_check_plan_and_refusal_without_cuda(tmp_path: Path) -> None:
    script = str(ROOT / "scripts" / "gpu_check.sh")
    plan = subprocess.run(["bash", script, "--dry-run"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert plan.returncode == 0, plan.stderr
    stages = [line.split()[0] for line in plan.stdout.splitlines()]
    assert stages == ["install", "gpu_tests", "train", "train_compiled", "decode", "kernels", "other_benchmarks",
                      "profile_360m", "compiled"]
    assert "--no-deps" in plan.stdout and "-m gpu" in plan.stdout
    chosen = {**os.environ, "GPU_CHECK_STAGES": "train_compiled,kernels"}
    subset = subprocess.run(["bash", script, "--dry-run"], cwd=ROOT, env=chosen, capture_output=True, text=True,
                            timeout=60)
    assert [line.split()[0] for line in subset.stdout.splitlines()] == ["install", "train_compiled", "kernels"]
    if torch.cuda.is_available():
        return
    out = tmp_path / "out"
    refused = subprocess.run(["bash", script, str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 3
    assert "no CUDA device" in refused.stderr
    assert not out.exists()  # nothing ran, nothing was written


def test_gpu_check_plan_prints_commands_that_can_be_pasted() -> None:
    """--dry-run's commands, run by hand for one stage, must select what the stage does: its quoting kept."""
    plan = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert plan.returncode == 0, plan.stderr
    commands = {line.split()[0]: shlex.split(line.split(" s  ", 1)[1]) for line in plan.stdout.splitlines()}
    train = commands["train_compiled"]
    assert train[-8:-4] == ["-m", "compiled and not slow", "-k", "not cpu"]
    assert "--profile.steps=[6]" in commands["profile_360m"]
