"""The measuring tools: the figures the benchmarks report and how the summary and breakdown show them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from xml.etree import ElementTree

import pytest
from test_trace_tools import _script

from dualtower.trace_breakdown import category

ROOT = Path(__file__).resolve().parents[1]




def test_summary_numbers_just_under_a_thousand_read_as_numbers() -> None:
    summarize = _script("summarize_benchmarks", ROOT / "scripts" / "summarize_benchmarks.py")
    assert summarize._number(999.7) == "1,000"  # not "1e+03"
    assert summarize._number(999.4) == "999"
    assert summarize._number(-999.8) == "-1,000"
    assert summarize._number(0.9996, 3) == "1"
    assert summarize._number(12.5) == "12.5" and summarize._number(1234.4) == "1,234"


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        # inductor's kernels are named after the aten ops they fuse; under autocast most include _to_copy
        ("triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_0", "fused elementwise / norms"),
        ("triton_poi_fused__to_copy_mul_silu_3", "fused elementwise / norms"),
        ("triton_poi_fused_cat_index_mul_neg_slice_4", "fused elementwise / norms"),
        ("cpp_fused__to_copy_add_mean_mul_new_ones_pow_rsqrt_0", "fused elementwise / norms"),
        ("triton_per_fused__to_copy_convert_element_type_mean_1", "fused elementwise / norms"),
        ("triton_poi_fused__to_copy_0", "memory"),  # a lone cast is a copy
        ("triton_poi_fused_clone_2", "memory"),
        ("triton_tem_fused_mm_0", "matmul"),  # inductor's Triton GEMM templates (max-autotune)
        ("triton_tem_fused_addmm_1", "matmul"),
        ("triton_red_fused__log_softmax_nll_loss_5", "cross-entropy"),
        # the eager names keep their categories
        ("aten::convolution", "matmul"),
        ("aten::_to_copy", "memory"),
        ("void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>", "memory"),
        ("triton_per_fused_rms_norm", "fused elementwise / norms"),
    ],
)
def test_inductor_kernels_fall_in_the_category_of_their_work(name: str, expected: str) -> None:
    assert category(name) == expected


def test_linear_cross_entropy_flops_count_only_the_supervised_tokens(tmp_path: Path) -> None:
    """The fused loss (and flops.py's head) work on supervised rows only: its TFLOP/s must not count the others."""
    out = tmp_path / "lce.json"
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "benchmarks/bench_kernels.py", "-q", "-p", "no:cacheprovider",
         "-k", "test_linear_cross_entropy and reference and 135m and not compiled", f"--benchmark-json={out}"],
        cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    (bench,) = json.loads(out.read_text())["benchmarks"]
    info = bench["extra_info"]
    tokens, width, vocab = 24, 16, 100  # bench_kernels' CPU shape, every other token supervised
    flops = info["tflops"] * info["ms"] * 1e9
    assert flops == pytest.approx(3 * 2 * (tokens // 2) * width * vocab, rel=1e-9)


def test_summary_keeps_the_readable_results_when_a_file_was_cut_mid_write(tmp_path: Path, capsys) -> None:
    """gpu_check kills a stage 15 s after its SIGINT: a stage JSON or the log's last line can end mid-write."""
    summarize = _script("summarize_benchmarks", ROOT / "scripts" / "summarize_benchmarks.py")
    stage = tmp_path / "kernels.json"
    stage.write_text('{\n  "machine_info": {\n    "node": "gpu"\n  },\n  "benchmarks": [\n    {\n      "name": "te')
    finished = {"name": "test_a", "fullname": "b.py::test_a", "group": "g", "median_s": 0.002,
                "extra_info": {"role": "fast", "ratio": 1.5, "baseline": "eager"}}
    log = tmp_path / "results.jsonl"
    log.write_text(json.dumps(finished) + "\n" + '{"name": "test_b", "fullname": "b.py::te')
    assert summarize.main([str(stage), str(log)]) == 0
    captured = capsys.readouterr()
    assert "| test_a | 2.000 | 1.50x vs eager |" in captured.out
    assert "test_b" not in captured.out
    assert str(stage) in captured.err and str(log) in captured.err  # what was left out is said


def test_gpu_check_skips_the_profile_without_a_tokenizer_and_says_so(tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "GPU_CHECK_ALLOW_CPU": "1", "GPU_CHECK_INSTALL": "0", "GPU_CHECK_STAGES": "profile_360m",
           "GPU_CHECK_BUDGET_S": "60", "DUALTOWER_TOKENIZER_DIR": str(tmp_path / "no_tokenizer")}
    done = subprocess.run(["bash", "scripts/gpu_check.sh", str(out)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert not (out / "profile_360m.log").exists()  # "will be skipped" means it did not run
    assert "profile_360m: skipped (no tokenizer" in (out / "summary.md").read_text()


def _gpu_check_on_cpu(out: Path, stages: str, budget: int, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "GPU_CHECK_ALLOW_CPU": "1", "GPU_CHECK_INSTALL": "0", "GPU_CHECK_STAGES": stages,
           "GPU_CHECK_BUDGET_S": str(budget)}
    return subprocess.run(["bash", "scripts/gpu_check.sh", *args, str(out)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)


def test_gpu_check_summary_leaves_out_an_earlier_runs_stage_results(tmp_path: Path) -> None:
    """A second run into the same folder (the default gpu_check_out) must not report the first run's figures as
    its own: a stage that is skipped, not selected, or cut before pytest writes its JSON left the old file."""
    out = tmp_path / "out"
    out.mkdir()
    stale = {"machine_info": {"node": "old"}, "datetime": "2026-01-01",
             "benchmarks": [{"name": "test_stale", "fullname": "b.py::test_stale", "group": "g",
                             "stats": {"median": 0.5}, "extra_info": {"role": "fast", "ratio": 9.0}}]}
    for stage in ("train", "decode"):
        (out / f"{stage}.json").write_text(json.dumps(stale))
    done = _gpu_check_on_cpu(out, "train", 21)  # train: the budget is spent before it; decode: not selected
    assert done.returncode == 0, done.stdout + done.stderr
    summary = (out / "summary.md").read_text()
    assert "train: skipped" in summary
    assert "test_stale" not in summary and "no benchmark results" in summary


def test_gpu_check_refuses_an_unknown_stage_name(tmp_path: Path) -> None:
    """A misspelt GPU_CHECK_STAGES would select nothing and pass: on a GPU machine's short lease, a lost run."""
    for args in ((), ("--dry-run",)):
        done = _gpu_check_on_cpu(tmp_path / "out", "kernel,decode", 300, *args)
        assert done.returncode == 2, done.stdout + done.stderr
        assert "unknown stage 'kernel'" in done.stderr and "kernels" in done.stderr
        assert not (tmp_path / "out").exists()  # nothing ran


def test_gpu_check_exits_1_however_many_stages_fail(tmp_path: Path) -> None:
    """Two failed stages must not read as exit 2 (an unknown stage name: nothing ran) or three as 3 (no CUDA)."""
    shim = tmp_path / "bin"
    shim.mkdir()
    fake_python = shim / "python"  # every benchmark stage's pytest fails at once; anything else is the real one
    fake_python.write_text(f'#!/usr/bin/env bash\n[[ "$1 $2" == "-m pytest" ]] && {{ echo "stage broke"; exit 1; }}\n'
                           f'exec {sys.executable} "$@"\n')
    fake_python.chmod(0o755)
    env = {**os.environ, "PATH": f"{shim}{os.pathsep}{os.environ['PATH']}", "GPU_CHECK_ALLOW_CPU": "1",
           "GPU_CHECK_INSTALL": "0", "GPU_CHECK_STAGES": "decode,kernels", "GPU_CHECK_BUDGET_S": "300"}
    out = tmp_path / "out"
    done = subprocess.run(["bash", "scripts/gpu_check.sh", str(out)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "failed or timed-out stages: decode kernels" in (out / "summary.md").read_text()


def test_every_cpu_benchmark_runs(tmp_path: Path) -> None:
    """`pytest benchmarks/` is not the README's test command: each CPU case runs once here (untimed, compiled
    cases left out), so a broken benchmark fails CI instead of the next GPU session's short lease."""
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "benchmarks", "-q", "-p", "no:cacheprovider", "--benchmark-disable",
         "-m", "not compiled and not slow", f"--junitxml={tmp_path / 'bench.xml'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    suite = ElementTree.parse(tmp_path / "bench.xml").getroot().find("testsuite")
    ran = int(suite.get("tests")) - int(suite.get("skipped"))
    assert ran >= 30 and int(suite.get("failures")) == int(suite.get("errors")) == 0  # 32 on 2026-11-28


def _bench_extra_info(tmp_path: Path, files: list[str], keyword: str) -> dict[str, dict]:
    out = tmp_path / "out.json"
    done = subprocess.run(
        [sys.executable, "-m", "pytest", *files, "-q", "-p", "no:cacheprovider", "-k", keyword,
         f"--benchmark-json={out}"],
        cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    return {bench["name"]: bench["extra_info"] for bench in json.loads(out.read_text())["benchmarks"]}


@pytest.mark.slow  # 20 s of benchmark rounds on a 2-core CPU
def test_chunked_loss_benchmark_reports_tflops(tmp_path: Path) -> None:
    """README's extra_info table: TFLOP/s where the work has model FLOPs, as the other loss benchmark does."""
    info = _bench_extra_info(tmp_path, ["benchmarks/bench_kernels.py"], "linear_cross_entropy_chunked and chunked]")
    chunked = info["test_linear_cross_entropy_chunked[chunked]"]
    tokens, width, vocab = 1024, 128, 49218  # the CPU shape, one token in 8 supervised
    assert chunked["tflops"] * chunked["ms"] * 1e9 == pytest.approx(3 * 2 * (tokens // 8) * width * vocab)


@pytest.mark.slow  # a minute of loader passes on a 2-core CPU
def test_loader_benchmark_reports_tokens_per_s(tmp_path: Path) -> None:
    """README's extra_info table: tokens/s where the work has tokens (the packing cases have it too)."""
    loader = _bench_extra_info(tmp_path, ["benchmarks/bench_data.py"], "loader")["test_loader_end_to_end"]
    assert loader["tokens_per_s"] > loader["samples_per_s"] > 0
