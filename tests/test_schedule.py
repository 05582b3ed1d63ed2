"""The warmup + cosine schedule reproduces the original's get_lr numbers (reference_spec section 10)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from dualtower.config import ScheduleSection
from dualtower.training.schedule import build_scheduler, lr_multiplier, warmup_steps_for


def test_original_numbers() -> None:
    total = 50_000
    warmup = warmup_steps_for(total, -1, 0.03)
    assert warmup == 1500
    f = lambda s: lr_multiplier(s, total, warmup, 0.1)
    assert f(0) == pytest.approx(1 / 1500)
    assert f(1499) == pytest.approx(1.0)
    assert f(1500) == pytest.approx(1.0)
    assert f(25_750) == pytest.approx(0.55)
    assert f(50_000) == pytest.approx(0.1)
    assert f(60_000) == pytest.approx(0.1)
    # Monotone decay after warmup.
    values = [f(s) for s in range(1500, 50_001, 500)]
    assert all(a >= b for a, b in itertools.pairwise(values))


def test_constant_kind_and_explicit_warmup() -> None:
    assert warmup_steps_for(100, 7, 0.5) == 7
    assert lr_multiplier(3, 100, 7, 0.1, "constant") == pytest.approx(4 / 7)
    assert lr_multiplier(50, 100, 7, 0.1, "constant") == 1.0


def test_scheduler_scales_every_group_and_matches_formula() -> None:
    params = [torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))]
    optimizer = torch.optim.AdamW([{"params": params[:1], "lr": 5e-3}, {"params": params[1:], "lr": 1e-5}])
    scheduler = build_scheduler(optimizer, ScheduleSection(warmup_steps=10, min_lr_ratio=0.1), total_steps=100)
    seen = []
    for _ in range(101):
        seen.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    assert seen[0] == pytest.approx([5e-3 / 10, 1e-5 / 10])
    assert seen[9] == pytest.approx([5e-3, 1e-5])
    mid = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 45 / 90))
    assert seen[55] == pytest.approx([5e-3 * mid, 1e-5 * mid])
    assert seen[100] == pytest.approx([5e-4, 1e-6])


def test_zero_warmup_steps_means_no_warmup() -> None:
    assert warmup_steps_for(1000, 0, 0.03) == 0  # an explicit 0 is not "unset"
    assert warmup_steps_for(1000, -1, 0.03) == 30
    params = [torch.nn.Parameter(torch.zeros(1))]
    optimizer = torch.optim.AdamW(params, lr=2e-3)
    build_scheduler(optimizer, ScheduleSection(warmup_steps=0, warmup_ratio=0.03, min_lr_ratio=0.1), total_steps=1000)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(2e-3)  # step 0 already runs at the peak


def test_warmup_as_long_as_the_run_ends_at_the_floor() -> None:
    for step in range(13):  # total_steps == warmup_steps: no cosine part, no division by zero
        expected = (step + 1) / 10 if step < 10 else 0.1
        assert lr_multiplier(step, 10, 10, 0.1) == pytest.approx(expected), step
