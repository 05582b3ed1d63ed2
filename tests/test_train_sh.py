"""train.sh: the original README's entry point over train/main.py. Recipe choice, one process per visible GPU
(a fake nvidia-smi stands in for the GPUs), passed-through overrides and variables, the log file and the exit
status (a stand-in interpreter echoes what it is given). Real training runs: test_train_e2e.py, test_vanilla.py."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from test_train_utils import ROOT, subprocess_env

TRAIN_SH = ROOT / "train.sh"


def fake_gpus(folder: Path, count: int) -> Path:
    """A bin/ folder whose nvidia-smi lists `count` GPUs (0: it fails, as on a machine without a driver)."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = "".join(f'echo "GPU {i}: NVIDIA H100 80GB HBM3 (UUID: GPU-{i})"\n' for i in range(count))
    script = folder / "nvidia-smi"
    script.write_text(f"#!/bin/sh\n{lines}" if count else "#!/bin/sh\nexit 9\n")
    script.chmod(0o755)
    return folder


def run_train_sh(
    args: list[str], bin_dir: Path, timeout: float = 30, cwd: Path = Path("/"), **env: str
) -> subprocess.CompletedProcess:
    environment = subprocess_env()
    for name in ("CUDA_VISIBLE_DEVICES", "RECIPE", "NPROC", "TORCHRUN_ARGS", "DRY_RUN", "HF_TOKEN", "HF_API_KEY"):
        environment.pop(name, None)
    environment.update({"PATH": f"{bin_dir}{os.pathsep}{environment['PATH']}", "PYTHON": sys.executable, **env})
    return subprocess.run(
        ["bash", str(TRAIN_SH), *args], capture_output=True, text=True, timeout=timeout, env=environment, cwd=cwd
    )


def dry_run(args: list[str], bin_dir: Path, cwd: Path = Path("/"), **env: str) -> list[str]:
    result = run_train_sh(args, bin_dir, cwd=cwd, DRY_RUN="1", **env)
    assert result.returncode == 0, result.stderr
    words = result.stdout.split()
    assert words[0] == sys.executable
    return words[1:]


@pytest.fixture
def no_gpu(tmp_path: Path) -> Path:
    return fake_gpus(tmp_path / "no_gpu", 0)


@pytest.fixture
def four_gpus(tmp_path: Path) -> Path:
    return fake_gpus(tmp_path / "four_gpus", 4)


def test_no_arguments_is_the_debug_recipe_in_one_plain_process(no_gpu: Path) -> None:
    assert dry_run([], no_gpu) == ["train/main.py", "--config", "train/configs/debug.toml"]


def test_recipe_by_argument_environment_or_path_and_overrides_pass_through(tmp_path: Path, no_gpu: Path) -> None:
    config = ["train/main.py", "--config"]
    assert dry_run(["vanilla_debug", "--training.steps=2"], no_gpu) == [
        *config, "train/configs/vanilla_debug.toml", "--training.steps=2",
    ]  # fmt: skip
    assert dry_run(["--training.steps=2"], no_gpu, RECIPE="cauldron_135m") == [
        *config, "train/configs/cauldron_135m.toml", "--training.steps=2",
    ]  # fmt: skip
    custom = ROOT / "train" / "configs" / "vanilla_360m.toml"
    assert dry_run([str(custom)], no_gpu) == [*config, str(custom)]
    (tmp_path / "mine.toml").write_text(custom.read_text())  # relative to the caller's directory
    assert dry_run(["mine.toml"], no_gpu, cwd=tmp_path) == [*config, str(tmp_path / "mine.toml")]
    result = run_train_sh(["no_such_recipe"], no_gpu)
    assert result.returncode == 2 and "recipe not found" in result.stderr and "vanilla_debug" in result.stderr


@pytest.mark.parametrize(
    ("visible", "processes"),
    [(None, 4), ("1,3", 2), ("2", 1), ("0,-1,3", 1), ("0,1,2,3,4,5", 4), ("", 0), ("-1", 0)],
)
def test_one_process_per_visible_gpu(four_gpus: Path, visible: str | None, processes: int) -> None:
    env = {} if visible is None else {"CUDA_VISIBLE_DEVICES": visible}
    words = dry_run(["cauldron_135m"], four_gpus, **env)
    if processes == 0:
        assert words[0] == "train/main.py"
    else:
        launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
        assert words[: len(launcher) + 1] == [*launcher, "train/main.py"]


def test_nproc_and_torchrun_args_override(no_gpu: Path) -> None:
    words = dry_run([], no_gpu, NPROC="2", TORCHRUN_ARGS="--nnodes 2 --node_rank 1")
    assert words[:8] == ["-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", "1", "--nproc_per_node", "2"]


def test_log_file_variables_and_exit_status(tmp_path: Path, no_gpu: Path) -> None:
    """A stand-in interpreter echoes what it receives: the log holds the output, HF_API_KEY fills HF_TOKEN,
    the trainer's exit status is train.sh's."""
    fake_python = tmp_path / "python"
    fake_python.write_text('#!/bin/sh\necho "args: $*"\necho "HF_TOKEN=$HF_TOKEN WANDB_MODE=$WANDB_MODE"\nexit 3\n')
    fake_python.chmod(0o755)
    logs = tmp_path / "logs"
    result = run_train_sh(
        ["--training.steps=5"], no_gpu, PYTHON=str(fake_python), LOG_DIR=str(logs), HF_API_KEY="hf_x",
        WANDB_MODE="offline",
    )  # fmt: skip
    assert result.returncode == 3
    assert "args: train/main.py --config train/configs/debug.toml --training.steps=5" in result.stdout
    (log,) = logs.iterdir()
    assert re.fullmatch(r"train_debug_\d{8}_\d{6}\.log", log.name)
    assert log.read_text() == result.stdout
    assert "HF_TOKEN=hf_x WANDB_MODE=offline" in log.read_text()
