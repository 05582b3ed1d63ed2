"""Two ranks (torchrun, gloo, FSDP2) against one: the same losses for the same global batch, also with
activation checkpointing and torch.compile, and checkpoints that resume on the other world size and continue
with the same losses.

One rank with 2 data workers and 2 micro-batches per step reads exactly the global batch that 2 ranks with
1 worker and 1 micro-batch each read (the loader shards by rank x worker), so their losses must agree.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from test_train_utils import MAIN, fast_tokenizer_dir, small_run_args, subprocess_env, train_losses

pytestmark = pytest.mark.dist
# Batches of 1 row: rank r (1 worker) reads shard r; one rank with 2 workers reads shards 0 and 1 in turn.
STEPS = 20
ONE_RANK = ("--data.num_workers=2", "--training.micro_batches=2")
TWO_RANKS = ("--data.num_workers=1", "--training.micro_batches=1")
# The GPU recipes' composition: activation checkpointing, then per-block torch.compile (inductor's CPU backend
# here), then FSDP2.
COMPILED = ("--parallel.activation_checkpointing=true", "--parallel.compile=true")


def _start(nproc: int, run_dir: Path, tokenizer: Path, *extra: str) -> subprocess.Popen:
    args = small_run_args(run_dir, tokenizer, STEPS, "--data.rows_per_batch=1", "--checkpoint.every=10", *extra)
    launcher = [sys.executable, str(MAIN)]
    if nproc > 1:
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        launcher = [*torchrun, str(MAIN)]
    return subprocess.Popen(
        [*launcher, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=subprocess_env()
    )


def _finish(proc: subprocess.Popen) -> str:
    _, stderr = proc.communicate(timeout=900)
    assert proc.returncode == 0, stderr[-4000:]
    return stderr


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("dist")
    tokenizer = fast_tokenizer_dir(base)
    # Both at once: each process is single-threaded, so together they use the machine's cores better.
    launched = [
        _start(1, base / "one", tokenizer, *ONE_RANK),
        _start(2, base / "two", tokenizer, *TWO_RANKS),
        _start(2, base / "two_compiled", tokenizer, *TWO_RANKS, *COMPILED),
    ]
    for proc in launched:
        _finish(proc)
    runs = {name: base / name for name in ("one", "two", "two_compiled")}
    return runs | {"tokenizer": tokenizer, "base": base}


def test_two_ranks_reproduce_one_rank_losses(runs) -> None:
    one, two = train_losses(runs["one"]), train_losses(runs["two"])
    assert sorted(one) == sorted(two) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert two[step] == pytest.approx(one[step], abs=1e-4), step
    assert one[STEPS] < one[1] - 1.0  # it trained


def test_checkpointed_compiled_fsdp_ranks_reproduce_eager_losses(runs) -> None:
    one, compiled = train_losses(runs["one"]), train_losses(runs["two_compiled"])
    assert sorted(compiled) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert compiled[step] == pytest.approx(one[step], abs=1e-4), step


@pytest.mark.slow  # two more launches: over the default suite's time budget on a 2-core machine
@pytest.mark.parametrize(("source", "nproc", "layout"), [("two", 1, ONE_RANK), ("one", 2, TWO_RANKS)])
def test_checkpoint_resumes_on_another_world_size(runs, source: str, nproc: int, layout: tuple[str, ...]) -> None:
    checkpoint = runs[source] / "checkpoints" / "step_00000010"
    run_dir = runs["base"] / f"resume_{source}_on_{nproc}"
    stderr = _finish(_start(nproc, run_dir, runs["tokenizer"], *layout, f"--checkpoint.resume={checkpoint}"))
    assert "resumed from" in stderr and "cannot re-shard" not in stderr
    resumed, reference = train_losses(run_dir), train_losses(runs[source])
    assert sorted(resumed) == list(range(11, STEPS + 1))
    for step in resumed:
        assert resumed[step] == pytest.approx(reference[step], abs=1e-4), step


def test_fsdp_ranks_without_images_still_gather_the_vision_tower(tmp_path: Path) -> None:
    """One rank's micro-batch has no image (data.allow_text_only): both ranks must still run the sharded
    vision tower, and the reduced gradients must equal one unsharded model's over both micro-batches."""
    worker = Path(__file__).with_name("fsdp_text_only_worker.py")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    env = subprocess_env() | {"PYTHONPATH": str(worker.parent)}
    done = subprocess.run([*torchrun, str(worker)], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
