"""The benchmark baseline (benchmarks/original_step.py, the original algorithm's train step) computes the same
loss and gradients as DualTowerVLM.loss_sum on the same data, and does all of the original's work (full left LM,
right tower and head over every position), so its timings are a fair comparison."""

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
    # Parameters ours never reaches (the left LM's last-layer query/output/MLP, its final norm) get nothing from
    # the original either (zero at most: prefix rows through the right tower only meet ignored targets).
    for name, param in model.named_parameters():
        if name not in ours_grads:
            assert param.grad is None or not param.grad.any(), name


def original_matmul_flops(cfg, rows: int, tiles: int, text_len: int) -> int:
    """Matmul/conv FLOPs of the original's forward: ViT over every tile, the projector, the FULL left LM over the
    prefix (every block's attention and MLP), the right LM over every position and the head over B x T."""
    vision, lm = cfg.vision, cfg.lm
    n_tiles, patches = rows * tiles, vision.patches_per_side**2
    prefix = tiles * (1 + cfg.image_tokens_per_tile)
    vit = 2 * n_tiles * patches * 3 * vision.patch_size**2 * vision.hidden_dim  # conv patchify
    width = vision.hidden_dim
    vit += 2 * n_tiles * patches * vision.n_blocks * (4 * width**2 + 2 * width * vision.inter_dim)
    projector = 2 * n_tiles * patches * vision.hidden_dim * lm.hidden_dim
    per_token = 2 * lm.n_blocks * (
        lm.hidden_dim * (2 * lm.n_heads + 2 * lm.n_kv_heads) * lm.head_dim + 3 * lm.hidden_dim * lm.inter_dim
    )
    length = prefix + text_len
    head = 2 * rows * length * lm.hidden_dim * lm.vocab_size
    return vit + projector + per_token * rows * (prefix + length) + head


def test_original_step_does_the_original_work() -> None:
    """The baseline must not get cheaper than the original: no tower, layer or position skipped."""
    from torch.utils.flop_counter import FlopCounterMode

    model = tiny_model()
    original, _ = synthetic_rows(model, rows=2, tiles=2, text_len=7, seed=0)
    with FlopCounterMode(display=False) as counter:
        original_loss(model, original)
    counts = counter.get_flop_counts()["Global"]
    matmuls = sum(flops for op, flops in counts.items() if "attention" not in str(op))
    assert matmuls == original_matmul_flops(model.cfg, rows=2, tiles=2, text_len=7)
