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
