"""Checkpoints: atomic saves, keep-K, exact resume after SIGKILL, and in-process round trips."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time

import pytest
import torch
from test_train_utils import (
    MAIN,
    ListLoader,
    build_trainer,
    checkpointed_job,
    fast_tokenizer_dir,
    make_batches,
    one_thread,  # noqa: F401 (fixture)
    read_metrics,
    small_run_args,
    subprocess_env,
    tiny_model,
    train_losses,
)

from dualtower.training import NonFiniteLossError
from dualtower.training.checkpoint import reshard_loader_state

pytestmark = pytest.mark.usefixtures("one_thread")

LAYOUT = [(1, 2, 6), (0, 0, 4)]


def test_in_process_resume_is_exact_and_keeps_last_k(tmp_path) -> None:
    batches = make_batches(tiny_model(), [LAYOUT] * 6, seed=5)
    full = build_trainer(tiny_model(), batches, tmp_path / "full", checkpointed_job(6, 3))
    full.train()
    reference = full.model.state_dict()
    assert [p.name for p in full.parts.checkpointer.checkpoints()] == ["step_00000006"]  # keep = 1

    # The same run, stopped after the checkpoint of step 3 (the loop of Trainer.train, cut short).
    first = build_trainer(tiny_model(), batches, tmp_path / "split", checkpointed_job(6, 3))
    stream = first._batch_stream()
    for _ in range(3):
        first.train_step([next(stream)])
        first.step += 1
        first.parts.scheduler.step()
        first.parts.metrics.log({"step": first.step, "loss": 0.0})
    first.save()
    # A crash in the middle of a later save leaves only a temporary directory behind: it is never resumed from.
    (tmp_path / "split" / "checkpoints" / ".tmp_step_00000005").mkdir()
    second = build_trainer(tiny_model(seed=99), batches, tmp_path / "split", checkpointed_job(6, 3))
    assert second.parts.checkpointer.resume_path().name == "step_00000003"
    second.train()
    assert second.step == 6 and isinstance(second.parts.train_loader, ListLoader)
    for name, tensor in second.model.state_dict().items():
        torch.testing.assert_close(tensor, reference[name], rtol=0, atol=0, msg=name)
    split, whole = train_losses(tmp_path / "split"), train_losses(tmp_path / "full")
    assert [split[s] for s in (4, 5, 6)] == [whole[s] for s in (4, 5, 6)]


def test_sigkill_mid_run_resumes_to_the_same_losses(tmp_path) -> None:
    tokenizer = fast_tokenizer_dir(tmp_path)
    steps, extra = 12, ("--checkpoint.every=4", "--checkpoint.keep=2")
    env = subprocess_env()
    reference = tmp_path / "reference"
    done = subprocess.run(
        [sys.executable, str(MAIN), *small_run_args(reference, tokenizer, steps, *extra)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]

    killed = tmp_path / "killed"
    args = [sys.executable, str(MAIN), *small_run_args(killed, tokenizer, steps, *extra)]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if max(train_losses(killed), default=0) >= 5:  # past the checkpoint of step 4
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    interrupted_at = max(train_losses(killed))
    assert interrupted_at < steps, "the run finished before it could be killed"
    resumed = subprocess.run(args, capture_output=True, text=True, timeout=600, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr
    expected, got = train_losses(reference), train_losses(killed)
    assert sorted(got) == list(range(1, steps + 1))
    for step in range(1, steps + 1):
        assert got[step] == pytest.approx(expected[step], rel=1e-6), step
    # One timeline: what the killed run logged after the checkpoint it resumed from (step 4 or 8) was moved aside.
    assert [r["step"] for r in read_metrics(killed) if "loss" in r] == list(range(1, steps + 1))
    aside = (killed / "metrics.superseded.jsonl").read_text().splitlines()
    assert aside and all(json.loads(line)["step"] > 4 for line in aside[:-1])  # the last may be cut by the kill


def test_resuming_from_an_older_checkpoint_moves_the_abandoned_timeline_aside(tmp_path, caplog) -> None:
    batches = make_batches(tiny_model(), [LAYOUT] * 6, seed=5)
    build_trainer(tiny_model(), batches, tmp_path, checkpointed_job(6, 2, keep=3)).train()
    folder = tmp_path / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["step_00000002", "step_00000004", "step_00000006"]
    (folder / ".tmp_step_00000008").mkdir()  # debris of crashed saves
    (folder / ".old_step_00000006").mkdir()

    # Back to step 2 (say, to escape a loss spike), then on to step 5 keeping one checkpoint.
    job = checkpointed_job(5, 2, keep=1)
    job.checkpoint.resume = str(folder / "step_00000002")
    with caplog.at_level("WARNING", logger="dualtower.training.checkpoint"):
        build_trainer(tiny_model(), batches, tmp_path, job).train()
    assert sorted(p.name for p in folder.iterdir()) == ["step_00000005", "superseded"]
    assert sorted(p.name for p in (folder / "superseded").iterdir()) == ["step_00000004", "step_00000006"]
    assert any("superseded" in r.getMessage() and "step_00000006" in r.getMessage() for r in caplog.records)
    job.checkpoint.resume = "auto"
    assert build_trainer(tiny_model(), batches, tmp_path, job).parts.checkpointer.resume_path().name == "step_00000005"


def _loader_state(rank: int, world_size: int, workers: int, delivered: int) -> dict:
    """A dualtower.data.loader state (version 1); worker w's pipeline state names its global shard."""
    shards = {str(w): {"shard": rank * workers + w} for w in range(workers)}
    return {"version": 1, "split": "train", "seed": 0, "world_size": world_size, "rank": rank,
            "num_logical_workers": workers, "pack": True, "delivered": delivered, "finished": False,
            "workers": shards}


def test_reshard_loader_state_splits_and_merges_the_shards() -> None:
    # 1 rank x 4 workers, 10 batches from each shard -> 2 ranks x 2 workers: 10 per shard, 20 per rank.
    saved = [_loader_state(0, 1, 4, 40)]
    for rank in (0, 1):
        state = reshard_loader_state(saved, rank, 2, _loader_state(rank, 2, 2, 0))
        assert state is not None and state["delivered"] == 20 and state["rank"] == rank
        assert state["workers"] == {"0": {"shard": 2 * rank}, "1": {"shard": 2 * rank + 1}}
    # 1 rank x 2 workers after 5 batches (3 from shard 0, 2 from shard 1) -> 2 ranks x 1 worker.
    saved = [_loader_state(0, 1, 2, 5)]
    counts = [reshard_loader_state(saved, rank, 2, _loader_state(rank, 2, 1, 0))["delivered"] for rank in (0, 1)]
    assert counts == [3, 2]
    # And back: 2 ranks x 2 workers -> 1 rank x 4 workers.
    state = reshard_loader_state([_loader_state(r, 2, 2, 14) for r in (0, 1)], 0, 1, _loader_state(0, 1, 4, 0))
    assert state["delivered"] == 28 and state["workers"] == {str(w): {"shard": w} for w in range(4)}


def test_reshard_loader_state_refuses_positions_that_do_not_carry_over() -> None:
    # 41 batches over 4 shards: shard 0 is one ahead, so rank 0's two shards disagree (rank 1's agree).
    saved = [_loader_state(0, 1, 4, 41)]
    assert reshard_loader_state(saved, 0, 2, _loader_state(0, 2, 2, 0)) is None
    assert reshard_loader_state(saved, 1, 2, _loader_state(1, 2, 2, 0))["delivered"] == 20
    # A different total number of shards, or another state version.
    assert reshard_loader_state([_loader_state(0, 1, 4, 40)], 0, 2, _loader_state(0, 2, 1, 0)) is None
    assert reshard_loader_state([{**_loader_state(0, 1, 2, 4), "version": 2}], 0, 2, _loader_state(0, 2, 1, 0)) is None
    # A worker ran out (a finite pass): its turn was skipped, so the count no longer says what each shard gave.
    ran_out = {**_loader_state(0, 1, 2, 5), "next_worker": 0}
    assert reshard_loader_state([ran_out], 0, 2, _loader_state(0, 2, 1, 0)) is None


def test_reshard_loader_state_starts_the_round_robin_at_the_first_worker() -> None:
    current = {**_loader_state(0, 1, 2, 0), "next_worker": 1}
    state = reshard_loader_state([{**_loader_state(r, 2, 1, 7), "next_worker": 0} for r in (0, 1)], 0, 1, current)
    assert state["delivered"] == 14 and state["next_worker"] == 0


def _poisoned(trainer, poisoned: set[int]):
    """Make the loss NaN at the given optimizer steps (1-based) of `trainer`."""
    real_loss = trainer.model.loss_sum
    trainer.model.loss_sum = lambda batch: real_loss(batch) * (math.nan if trainer.step + 1 in poisoned else 1.0)
    return trainer


def test_skipped_steps_and_the_nonfinite_streak_survive_a_resume(tmp_path) -> None:
    batches = make_batches(tiny_model(), [LAYOUT] * 6, seed=5)
    job = checkpointed_job(3, 3)
    job.training.max_nonfinite_in_row = 3
    _poisoned(build_trainer(tiny_model(), batches, tmp_path, job), {2, 3}).train()  # saved in a streak of 2
    job.training.steps = 6
    second = _poisoned(build_trainer(tiny_model(), batches, tmp_path, job), {4})
    assert second._resume() and second.step == 3
    assert (int(second.skipped_total), int(second.nonfinite_streak)) == (2, 2)
    # One more non-finite step makes 3 in a row across the checkpoint: the run stops.
    with pytest.raises(NonFiniteLossError, match=r"3 optimizer steps in a row .*steps 2-4"):
        second.train()
    assert int(second.skipped_total) == 3
