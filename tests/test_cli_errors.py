"""The command-line tools report common mistakes in one line (no traceback) with a non-zero exit status."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEBUG_RECIPE = str(ROOT / "train" / "configs" / "debug.toml")


def _one_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.startswith("error:") or "Traceback" in line]
    assert len(lines) == 1 and "Traceback" not in text, text
    return lines[0]


@pytest.fixture(scope="module")
def train_main():
    spec = importlib.util.spec_from_file_location("train_main", ROOT / "train" / "main.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.mark.parametrize(
    ("override", "status", "message"),
    [
        ("--training.device=cuda", 2, "CUDA is not available"),  # this machine has no GPU (CI neither)
        ("--model.checkpoint=/nonexistent/checkpoint", 3, "does not exist"),
        ("--model.lm_backbone=/nonexistent/lm.gguf", 3, "does not exist"),
    ],
)
def test_train_mistakes_found_at_run_time_are_one_line(train_main, capsys, tmp_path, override, status, message):
    argv = ["--config", DEBUG_RECIPE, f"--job.run_dir={tmp_path}", override]
    assert train_main(argv) == status
    assert message in _one_line(capsys.readouterr().err)


def test_evaluate_reports_a_missing_file_or_checkpoint_in_one_line(capsys, tmp_path):
    from dualtower.evaluate import main

    assert main(["--model", str(tmp_path / "none"), "--offline-parquet", str(tmp_path / "missing.parquet")]) == 1
    assert "missing.parquet does not exist" in _one_line(capsys.readouterr().err)
    parquet = tmp_path / "mmstar.parquet"
    parquet.write_bytes(b"")
    assert main(["--model", str(tmp_path / "none"), "--offline-parquet", str(parquet)]) == 1
    assert "none" in _one_line(capsys.readouterr().err)


def test_data_stats_reports_a_missing_source_in_one_line(tmp_path):
    from dualtower.data.stats import main

    with pytest.raises(SystemExit, match=r"^error: .*nope\.parquet"):
        main(["--source", str(tmp_path / "nope.parquet"), "--num-samples", "4"])


@pytest.mark.parametrize("rank", ["x", "3"])
def test_a_bad_launch_environment_is_one_line(train_main, capsys, monkeypatch, rank):
    """The rank is read for the log format before anything else: a bad one must not be a traceback there."""
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert train_main(["--config", DEBUG_RECIPE]) == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith("error: ") and "RANK" in line, line


@pytest.mark.parametrize("below", ["", "sub"])
def test_a_run_dir_that_cannot_be_a_folder_is_one_line(train_main, capsys, tmp_path, below):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    run_dir = blocker / below if below else blocker
    assert train_main(["--config", DEBUG_RECIPE, f"--job.run_dir={run_dir}"]) == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith(f"error: job.run_dir = '{run_dir}'"), line
