"""The benchmark baseline (benchmarks/original_step.py, the original algorithm's train step) computes the same
loss and gradients as DualTowerVLM.loss_sum on the same data, so its timings are a fair comparison."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from test_train_utils import one_thread, tiny_model  # noqa: F401

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from original_step import original_loss, synthetic_rows

pytestmark = pytest.mark.usefixtures("one_thread")


def test_original_step_matches_dualtower_loss_and_gradients() -> None:
    model = tiny_model().double()
    original, packed = synthetic_rows(model, rows=2, tiles=2, text_len=7, seed=0)
    original.images = original.images.double()
    packed.pixel_values = packed.pixel_values.double()
    ours = model.loss_sum(packed) / packed.num_supervised
    ours.backward()
    ours_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    theirs = original_loss(model, original)
    theirs.backward()
    torch.testing.assert_close(ours, theirs.to(ours.dtype), rtol=1e-10, atol=1e-10)
    for name, grad in ours_grads.items():
        torch.testing.assert_close(grad, model.get_parameter(name).grad, rtol=1e-8, atol=1e-10, msg=name)
