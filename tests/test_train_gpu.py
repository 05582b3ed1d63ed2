"""The CUDA path of the trainer: bf16 autocast, fused AdamW with on-device step skipping, per-block compile."""

from __future__ import annotations

import math

import pytest
import torch
from test_train_utils import build_trainer, default_job, make_batches

from dualtower.model import DualTowerVLM

pytestmark = pytest.mark.gpu

LAYOUT = [(1, 2, 9), (0, 0, 5), (2, 1, 7)]


def debug_model() -> DualTowerVLM:
    """The debug flavor (head dims the GPU kernels support, unlike the CPU tests' tiny model)."""
    torch.manual_seed(0)
    return DualTowerVLM.from_flavor("debug")


def _cuda_job(**parallel):
    cfg = default_job()
    cfg.training.device = "cuda"
    for key, value in parallel.items():
        setattr(cfg.parallel, key, value)
    return cfg


def _cuda_trainer(tmp_path, cfg, batches):
    from dualtower.parallel import DistEnv

    model = debug_model().cuda()
    trainer = build_trainer(model, batches, tmp_path, cfg, env=DistEnv(0, 1, 0, torch.device("cuda"), None))
    return model, trainer


COMPILED = {"compile": True, "activation_checkpointing": True}


@pytest.mark.parametrize("parallel", [{}, COMPILED], ids=["eager", "compiled"])
def test_cuda_steps_learn(tmp_path, parallel) -> None:
    batches = make_batches(debug_model(), [LAYOUT] * 2, seed=0)
    _, trainer = _cuda_trainer(tmp_path, _cuda_job(**parallel), batches)
    assert trainer.fused and trainer.parts.plan.autocast_dtype == torch.bfloat16
    losses = []
    for _ in range(8):
        trainer.train_step([batches[0]])
        losses.append(float(trainer.parts.model.loss_sum(batches[0].to("cuda"))) / batches[0].num_supervised)
    assert losses[-1] < losses[0] and all(math.isfinite(x) for x in losses)


def test_fused_adamw_skips_nonfinite_steps_on_device(tmp_path) -> None:
    batches = make_batches(debug_model(), [LAYOUT], seed=1)
    model, trainer = _cuda_trainer(tmp_path, _cuda_job(), batches)
    real = model.loss_sum
    model.loss_sum = lambda batch: real(batch) * math.nan
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer.train_step([batches[0]])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert int(trainer.skipped_total) == 1 and int(trainer.nonfinite_streak) == 1
