"""A run stopped at awkward points (before its first checkpoint, between a checkpoint and the next logging
step, in the middle of the final export) resumes without losing or duplicating anything."""

from __future__ import annotations

import functools
import json

import pytest
import torch
from test_train_utils import (
    build_trainer,
    checkpointed_job,
    make_batches,
    one_thread,  # noqa: F401 (fixture)
    read_metrics,
    tiny_model,
)

from dualtower.model import DualTowerVLM

pytestmark = pytest.mark.usefixtures("one_thread")

LAYOUT = [(1, 2, 6), (0, 0, 4)]


class KilledError(Exception):
    """Stands in for a SIGKILL: the run stops where it is, nothing after runs."""


_job = functools.partial(checkpointed_job, keep=2)


def _kill_at(trainer, step: int):
    """Make `trainer` die while computing optimizer step `step` (1-based)."""
    real = trainer.train_step

    def train_step(micro, window=None):
        if trainer.step + 1 == step:
            raise KilledError(step)
        return real(micro, window)

    trainer.train_step = train_step
    return trainer


def _train_records(run_dir) -> list[dict]:
    return [r for r in read_metrics(run_dir) if "loss" in r]


def test_a_rerun_before_the_first_checkpoint_keeps_one_timeline(tmp_path) -> None:
    """KilledError before any checkpoint (here mid-way through writing a record), the rerun starts over at step 1:
    the killed run's records must not stay in metrics.jsonl next to the new ones."""
    batches = make_batches(tiny_model(), [LAYOUT] * 4, seed=3)
    with pytest.raises(KilledError):
        _kill_at(build_trainer(tiny_model(), batches, tmp_path, _job(4, 3)), 3).train()
    with (tmp_path / "metrics.jsonl").open("a") as handle:
        handle.write('{"step": 3, "lo')  # a record cut by the kill
    build_trainer(tiny_model(), batches, tmp_path, _job(4, 3)).train()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]  # every line is a whole record
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    aside = (tmp_path / "metrics.superseded.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in aside[:-1]] == [1, 2] and aside[-1] == '{"step": 3, "lo'


def test_a_logging_window_cut_by_a_kill_after_a_checkpoint_logs_the_same_losses(tmp_path) -> None:
    """log_every = 3 with checkpoints every 2 steps, killed in step 5: the uninterrupted run and the resumed one
    must log the same losses, and every trained step's loss must be in some record of the final timeline."""
    batches = make_batches(tiny_model(), [LAYOUT] * 12, seed=4)

    def job():
        cfg = _job(6, 2)
        cfg.metrics.log_every = 3
        cfg.training.micro_batches = 2
        return cfg

    build_trainer(tiny_model(), batches, tmp_path / "whole", job()).train()
    with pytest.raises(KilledError):
        _kill_at(build_trainer(tiny_model(), batches, tmp_path / "split", job()), 5).train()
    build_trainer(tiny_model(), batches, tmp_path / "split", job()).train()
    whole, split = _train_records(tmp_path / "whole"), _train_records(tmp_path / "split")
    assert [r["step"] for r in split] == [r["step"] for r in whole]
    for a, b in zip(split, whole, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6), a["step"]
        assert a["supervised_tokens"] == b["supervised_tokens"], a["step"]
    # Every supervised token of the 6 steps is counted once.
    per_step = sum(batch.num_supervised for batch in batches)
    assert sum(r["supervised_tokens"] for r in split) == per_step


def test_a_kill_during_the_final_export_leaves_no_half_export(tmp_path, monkeypatch) -> None:
    """KilledError while writing the final export, the run leaves no truncated file in the export folder (where
    from_pretrained would fail on it); the rerun resumes from the final checkpoint and writes a complete one."""
    from dualtower import hub

    batches = make_batches(tiny_model(), [LAYOUT] * 4, seed=6)
    job = _job(4, 2)
    job.checkpoint.export_final = True
    export = tmp_path / job.checkpoint.export_folder
    export.mkdir()
    (export / "stale.txt").write_text("from an older export")
    real_save_file = hub.save_file

    def killed_mid_write(tensors, path, metadata=None):
        path.write_bytes(b"\x00" * 16)  # a truncated safetensors file
        raise KilledError("export")

    monkeypatch.setattr(hub, "save_file", killed_mid_write)
    with pytest.raises(KilledError):
        build_trainer(tiny_model(), batches, tmp_path, job).train()
    assert sorted(p.name for p in export.iterdir() if p.is_file()) == ["stale.txt"]  # no half-written file
    monkeypatch.setattr(hub, "save_file", real_save_file)
    rerun = build_trainer(tiny_model(seed=7), batches, tmp_path, job)
    assert rerun.train() == 4 and rerun.parts.checkpointer.resume_path().name == "step_00000004"
    # The folder's other files stay; nothing of the killed export is left over.
    assert sorted(p.name for p in export.iterdir()) == ["config.json", "model.safetensors", "stale.txt"]
    exported = DualTowerVLM.from_pretrained(export)
    for name, tensor in exported.state_dict().items():
        torch.testing.assert_close(tensor, rerun.model.state_dict()[name], rtol=0, atol=0, msg=name)


def test_resuming_at_the_end_of_a_pass_of_a_finite_loader_starts_the_next_pass(tmp_path) -> None:
    """A checkpoint taken right after the last batch of a pass restores a loader with nothing left in that pass:
    that empty remainder is not "no training data", the next pass follows, as in the uninterrupted run."""
    batches = make_batches(tiny_model(), [LAYOUT] * 3, seed=8)
    whole = build_trainer(tiny_model(), batches, tmp_path / "whole", _job(5, 3))
    whole.train()
    with pytest.raises(KilledError):
        _kill_at(build_trainer(tiny_model(), batches, tmp_path / "split", _job(5, 3)), 4).train()
    resumed = build_trainer(tiny_model(), batches, tmp_path / "split", _job(5, 3))
    assert resumed.train() == 5
    for name, tensor in resumed.model.state_dict().items():
        torch.testing.assert_close(tensor, whole.model.state_dict()[name], rtol=0, atol=0, msg=name)


def test_a_loader_without_batches_is_still_an_error(tmp_path) -> None:
    with pytest.raises(RuntimeError, match="produced no batches"):
        build_trainer(tiny_model(), [], tmp_path, _job(2, 0)).train()
