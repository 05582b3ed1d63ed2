"""Resuming with a changed config: the optimizer hyperparameters come from the config, the schedule position
from the checkpoint."""

from __future__ import annotations

import pytest
from test_train_utils import build_trainer, default_job, make_batches, one_thread, read_metrics, tiny_model  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


def _job(steps: int, lr_left: float, weight_decay: float, betas: tuple[float, float]):
    cfg = default_job()
    cfg.training.steps = steps
    cfg.schedule.kind = "constant"
    cfg.schedule.warmup_steps = 4  # step s (1-based) runs at s / 4 of the peak until step 4
    cfg.optim.lr_left = lr_left
    cfg.optim.weight_decay = weight_decay
    cfg.optim.betas = betas
    cfg.checkpoint.enabled = True
    cfg.checkpoint.every = 2
    return cfg


def test_changed_hyperparameters_take_effect_on_resume(tmp_path, caplog) -> None:
    batches = make_batches(tiny_model(), [[(1, 2, 5), (0, 0, 3)]] * 4, seed=1)
    build_trainer(tiny_model(), batches, tmp_path, _job(2, 1e-3, 0.01, (0.9, 0.999))).train()
    changed = _job(4, 1e-4, 0.05, (0.8, 0.95))
    changed.optim.implementation = "foreach"  # the checkpoint's (fused) kernel stays: skipping must follow it
    resumed = build_trainer(tiny_model(), batches, tmp_path, changed)
    with caplog.at_level("INFO", logger="dualtower.training.checkpoint"):
        resumed.train()
    lrs = {r["step"]: (r["lr/left"], r["lr/projector"]) for r in read_metrics(tmp_path) if "lr/left" in r}
    assert lrs[2] == pytest.approx((1e-3 / 2, 1e-3 / 2))
    # The new peak for the left tower, at the checkpoint's position in the warmup (3/4, not 1/4).
    assert lrs[3] == pytest.approx((1e-4 * 3 / 4, 1e-3 * 3 / 4))
    assert lrs[4] == pytest.approx((1e-4, 1e-3))
    groups = {g["name"]: g for g in resumed.optimizer.param_groups}
    assert groups["left"]["initial_lr"] == 1e-4 and groups["projector"]["initial_lr"] == 1e-3
    assert all(g["weight_decay"] == 0.05 and tuple(g["betas"]) == (0.8, 0.95) for g in groups.values())
    assert resumed.parts.scheduler.base_lrs == [g["initial_lr"] for g in resumed.optimizer.param_groups]
    assert resumed.parts.scheduler.last_epoch == 4
    assert resumed.fused and all(g["fused"] for g in groups.values())
    message = " ".join(r.getMessage() for r in caplog.records)
    assert "left.initial_lr 0.001 -> 0.0001" in message and "projector.initial_lr" not in message
    assert "left.weight_decay 0.01 -> 0.05" in message


@pytest.mark.parametrize(("frozen_at_save", "frozen_at_resume"), [(True, False), (False, True)])
def test_resuming_with_other_trainable_towers_is_a_clear_error(tmp_path, frozen_at_save, frozen_at_resume) -> None:
    """Freezing or unfreezing a tower changes the optimizer's parameter groups, which the checkpoint's optimizer
    state cannot be loaded into: the error must say so (not a DCP "missing key" or a group-size mismatch)."""
    from dualtower.adapters.common import CheckpointError

    batches = make_batches(tiny_model(), [[(1, 2, 5), (0, 0, 3)]] * 4, seed=1)
    job = _job(2, 1e-3, 0.01, (0.9, 0.999))
    job.optim.lr_vision = 0.0 if frozen_at_save else 1e-3
    build_trainer(tiny_model(), batches, tmp_path, job).train()
    job.training.steps = 4
    job.optim.lr_vision = 0.0 if frozen_at_resume else 1e-3
    with pytest.raises(CheckpointError, match=r"step_00000002.*parameter groups .*vision.*optim.lr_\*"):
        build_trainer(tiny_model(), batches, tmp_path, job).train()


def test_export_only_needs_the_model_not_the_optimizer_layout(tmp_path) -> None:
    """Exporting reads only the weights: a config that now freezes the vision tower still exports them."""
    from test_hub import assert_same_state

    from dualtower.model import DualTowerVLM

    batches = make_batches(tiny_model(), [[(1, 2, 5), (0, 0, 3)]] * 4, seed=1)
    job = _job(2, 1e-3, 0.01, (0.9, 0.999))
    trained = build_trainer(tiny_model(), batches, tmp_path, job)
    trained.train()
    job.optim.lr_vision = 0.0
    job.checkpoint.export_only = True
    exporter = build_trainer(tiny_model(), batches, tmp_path, job)
    assert exporter.train() == 2
    exported = DualTowerVLM.from_pretrained(tmp_path / job.checkpoint.export_folder)
    assert_same_state(exported, trained.model)
