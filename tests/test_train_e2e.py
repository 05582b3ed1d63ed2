"""train/main.py end to end on the CPU: a short debug run whose loss falls, with metrics, evaluation,
checkpoints, export and profiler traces."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from test_train_utils import DEBUG_TOML, MAIN, fast_tokenizer_dir, read_metrics, small_run_args, subprocess_env

from dualtower.training.metrics import TRAIN_KEYS


def test_short_debug_run(tmp_path) -> None:
    run_dir = tmp_path / "run"
    args = small_run_args(
        run_dir,
        fast_tokenizer_dir(tmp_path),
        12,
        "--checkpoint.every=6",
        "--checkpoint.export_final=true",
        "--eval.at_end=true",
        "--eval.val_batches=2",
        "--eval.accuracy_samples=4",
        "--eval.max_new_tokens=2",
        "--profile",
        "--profile.steps=2,3",
    )
    result = subprocess.run(
        [sys.executable, str(MAIN), *args], capture_output=True, text=True, timeout=600, env=subprocess_env()
    )
    assert result.returncode == 0, result.stderr[-3000:]
    records = read_metrics(run_dir)
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, 13))
    for record in train:
        assert set(TRAIN_KEYS) <= record.keys()
        assert record["mfu"] is None  # no known peak on a CPU
        assert record["tokens_per_s"] > 0 and record["peak_mem_gib"] > 0 and 0 < record["packing_efficiency"] <= 1
    losses = [r["loss"] for r in train]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.5, losses
    evals = [r for r in records if "eval/loss" in r]
    assert len(evals) == 1 and evals[0]["step"] == 12
    assert 0.0 <= evals[0]["eval/accuracy"] <= 1.0 and evals[0]["eval/accuracy_samples"] == 4
    # Console progress carries the same figures.
    assert "step 12/12 loss" in result.stderr and "tokens_per_s" in result.stderr
    # Checkpoints every 6 steps, the final export in the save_pretrained format, and the config used.
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_00000006", "step_00000012"]
    assert (run_dir / "export" / "config.json").is_file() and (run_dir / "export" / "model.safetensors").is_file()
    assert json.loads((run_dir / "config.json").read_text())["training"]["steps"] == 12
    # --profile: one chrome trace per chosen step, valid JSON.
    traces = sorted((run_dir / "profile").glob("*.json"))
    assert [t.name for t in traces] == ["step_000002_rank0.json", "step_000003_rank0.json"]
    for trace in traces:
        events = json.loads(trace.read_text())["traceEvents"]
        assert any(e.get("name", "").startswith("aten::") for e in events)
    # Export on request: the step-6 checkpoint in the save_pretrained format, without training.
    checkpoint = run_dir / "checkpoints" / "step_00000006"
    extra = [f"--checkpoint.resume={checkpoint}", "--checkpoint.export_only=true", "--checkpoint.export_folder=export6"]
    exported = subprocess.run(
        [sys.executable, str(MAIN), *args, *extra], capture_output=True, text=True, timeout=600, env=subprocess_env()
    )
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert len(read_metrics(run_dir)) == len(records)  # nothing trained
    first = (run_dir / "export6" / "model.safetensors").read_bytes()
    assert first != (run_dir / "export" / "model.safetensors").read_bytes()


@pytest.mark.slow
def test_debug_recipe_learns_the_synthetic_task(tmp_path) -> None:
    """The full debug recipe: the loss falls 5x and >= 90% of held-out questions are answered (chance: 28%).
    Its wall time is measured and reported (README), not asserted."""
    run_dir = tmp_path / "debug"
    args = ["--config", str(DEBUG_TOML), f"--job.run_dir={run_dir}"]
    result = subprocess.run([sys.executable, str(MAIN), *args], capture_output=True, text=True, timeout=3600)
    assert result.returncode == 0, result.stderr[-3000:]
    records = read_metrics(run_dir)
    losses = [r["loss"] for r in records if "loss" in r]
    final = [r for r in records if "eval/accuracy" in r][-1]
    assert losses[-1] < losses[0] / 5
    assert final["eval/accuracy"] >= 0.9, final
