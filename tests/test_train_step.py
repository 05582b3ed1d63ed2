"""The optimizer step: token-normalized accumulation, freezing, non-finite skipping, FLOP counting."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from test_train_utils import build_trainer, default_job, make_batches, one_thread, read_metrics, tiny_model  # noqa: F401

from dualtower.batch import IGNORE_INDEX
from dualtower.training import FlopCounter, NonFiniteLossError

# Micro-batches with very different supervised-token counts.
pytestmark = pytest.mark.usefixtures("one_thread")

LAYOUT_A = [(1, 2, 5), (0, 0, 3)]
LAYOUT_B = [(2, 1, 17), (1, 0, 9), (0, 0, 11)]


def _grads_at_step(trainer, micro) -> dict[str, torch.Tensor]:
    captured = {}

    def hook(optimizer, args, kwargs):
        for name, param in trainer.model.named_parameters():
            if param.grad is not None:  # (names without the activation-checkpoint wrapper's prefix)
                captured[name.replace("_checkpoint_wrapped_module.", "")] = param.grad.detach().clone()

    handle = trainer.optimizer.register_step_pre_hook(hook)
    trainer.train_step(micro)
    handle.remove()
    return captured


def test_accumulation_equals_one_large_batch(tmp_path) -> None:
    model = tiny_model().double()
    micro = make_batches(model, [LAYOUT_A, LAYOUT_B], seed=3)
    (large,) = make_batches(model, [LAYOUT_A + LAYOUT_B], seed=3)
    assert micro[0].num_supervised != micro[1].num_supervised
    assert large.num_supervised == micro[0].num_supervised + micro[1].num_supervised
    state = {k: v.clone() for k, v in model.state_dict().items()}
    accumulated = _grads_at_step(build_trainer(model, micro, tmp_path / "a"), micro)
    model.load_state_dict(state)
    reference = _grads_at_step(build_trainer(model, [large], tmp_path / "b"), [large])
    assert accumulated.keys() == reference.keys() and len(reference) > 10
    # Both equal the gradient of the mean token loss, computed here without the trainer.
    model.load_state_dict(state)
    named = {name: p for name, p in model.named_parameters() if name in reference}
    expected = torch.autograd.grad(model.loss_sum(large) / large.num_supervised, list(named.values()))
    for name, grad in zip(named, expected, strict=True):
        torch.testing.assert_close(reference[name], grad, rtol=1e-10, atol=1e-12, msg=name)
        torch.testing.assert_close(accumulated[name], grad, rtol=1e-10, atol=1e-12, msg=name)


def test_freezing_and_parameter_groups(tmp_path) -> None:
    model = tiny_model()
    cfg = default_job()
    cfg.optim.lr_vision = cfg.optim.lr_right = 0.0
    trainer = build_trainer(model, [], tmp_path, cfg)
    names = [group["name"] for group in trainer.optimizer.param_groups]
    assert names == ["projector", "left"]
    assert not any(p.requires_grad for p in model.vision_encoder.parameters())
    assert not any(p.requires_grad for p in model.right_decoder.parameters())
    assert all(not p.requires_grad for p in model.unused_parameters())
    in_optimizer = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert not in_optimizer & {id(p) for p in model.unused_parameters()}
    assert model.left_decoder.blocks[0].attn.q_proj.weight.requires_grad


@pytest.mark.parametrize("implementation", ["foreach", "fused"])
def test_nonfinite_steps_are_skipped_then_stop(tmp_path, implementation: str) -> None:
    model = tiny_model()
    batches = make_batches(model, [LAYOUT_A] * 6, seed=1)
    cfg = default_job()
    cfg.optim.implementation = implementation
    cfg.training.steps = 6
    cfg.training.max_nonfinite_in_row = 3
    trainer = build_trainer(model, batches, tmp_path, cfg)
    real_loss = model.loss_sum
    poisoned = {2, 3, 4, 5}  # optimizer steps (1-based) whose loss is NaN
    model.loss_sum = lambda batch: real_loss(batch) * (math.nan if trainer.step + 1 in poisoned else 1.0)
    snapshots = []
    trainer.train_step([batches[0]])
    trainer.step += 1
    for index in range(1, 4):
        before = {k: v.clone() for k, v in model.state_dict().items()}
        if index < 3:
            trainer.train_step([batches[index]])
        else:
            with pytest.raises(NonFiniteLossError, match="3 optimizer steps in a row"):
                trainer.train_step([batches[index]])
                trainer._check_nonfinite()  # the fused path checks at logging steps
        trainer.step += 1
        snapshots.append(all(torch.equal(before[k], v) for k, v in model.state_dict().items()))
    assert snapshots == [True, True, True]  # skipped steps leave every weight untouched
    assert int(trainer.skipped_total) == 3
    state = trainer.optimizer.state[next(iter(trainer.optimizer.state))]
    assert float(state["step"]) == 1.0  # skipped updates do not advance Adam's step count


def test_flop_counter_tracks_freezing() -> None:
    model = tiny_model()
    (batch,) = make_batches(model, [LAYOUT_B], seed=0)
    for p in model.unused_parameters():
        p.requires_grad_(False)
    all_trainable = FlopCounter(model).batch_flops(batch)
    model.vision_encoder.requires_grad_(False)
    model.right_decoder.requires_grad_(False)
    default = FlopCounter(model)
    assert default.text_flow and default.left_flow and not default.vision_flow
    assert default.batch_flops(batch) < all_trainable
    # A frozen ViT costs only its forward: 2 FLOPs per weight per patch.
    vit_weights = sum(p.numel() for p in model.vision_encoder.parameters() if p.ndim >= 2 and p.shape[0] > 1)
    assert default.vision_per_patch == 2 * vit_weights
    # A frozen right LM that gradients must cross costs 4 per weight; a trainable one 6.
    text_weights = sum(p.numel() for p in model.right_decoder.blocks.parameters() if p.ndim == 2)
    assert default.text_per_token == 4 * text_weights
    model.requires_grad_(True)
    assert FlopCounter(model).text_per_token == 6 * text_weights
    everything_frozen_but_right = FlopCounter(model)
    assert everything_frozen_but_right.batch_flops(batch) > 0


def test_activation_checkpointing_keeps_gradients_and_parameter_names(tmp_path) -> None:
    model = tiny_model().double()
    micro = make_batches(model, [LAYOUT_B], seed=4)
    names = set(model.state_dict())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    plain = _grads_at_step(build_trainer(model, micro, tmp_path / "plain"), micro)
    model.load_state_dict(state)
    cfg = default_job()
    cfg.parallel.activation_checkpointing = True
    trainer = build_trainer(model, micro, tmp_path / "ac", cfg)
    assert type(model.left_decoder.blocks[0]).__name__ == "CheckpointWrapper"
    assert set(model.state_dict()) == names  # checkpoints and exports keep their keys
    recomputed = _grads_at_step(trainer, micro)
    assert recomputed.keys() == plain.keys()
    for name, grad in plain.items():
        torch.testing.assert_close(recomputed[name], grad, rtol=1e-10, atol=1e-12, msg=name)


def _poisoned_trainer(tmp_path, implementation: str, steps: int, poisoned: set[int], **training):
    """A trainer whose loss is NaN at the given optimizer steps (1-based); log_every = 5."""
    model = tiny_model()
    batches = make_batches(model, [LAYOUT_A] * steps, seed=1)
    cfg = default_job()
    cfg.optim.implementation = implementation
    cfg.training.steps = steps
    cfg.metrics.log_every = 5
    for key, value in training.items():
        setattr(cfg.training, key, value)
    trainer = build_trainer(model, batches, tmp_path, cfg)
    real_loss = model.loss_sum
    model.loss_sum = lambda batch: real_loss(batch) * (math.nan if trainer.step + 1 in poisoned else 1.0)
    return trainer


@pytest.mark.parametrize("implementation", ["foreach", "fused"])
def test_a_streak_that_ends_between_logging_steps_still_stops(tmp_path, implementation: str) -> None:
    trainer = _poisoned_trainer(tmp_path, implementation, 8, {2, 3, 4}, max_nonfinite_in_row=2)
    # foreach stops as soon as the limit is reached, fused at the next logging step with the whole streak.
    expected = "2 optimizer steps in a row .*steps 2-3" if implementation == "foreach" else "3 .*steps 2-4"
    with pytest.raises(NonFiniteLossError, match=expected):
        trainer.train()
    assert trainer.step == (2 if implementation == "foreach" else 5)


@pytest.mark.parametrize("implementation", ["foreach", "fused"])
def test_skipped_step_warning_names_the_right_step(tmp_path, caplog, implementation: str) -> None:
    trainer = _poisoned_trainer(tmp_path, implementation, 5, {2})
    with caplog.at_level("WARNING", logger="dualtower.training.trainer"):
        trainer.train()
    warnings = [r.getMessage() for r in caplog.records if "non-finite" in r.getMessage()]
    assert warnings == ["non-finite loss/gradient: update skipped (1 in a row, step 2)"]


def test_skipped_steps_leave_the_window_loss_and_tokens_alone(tmp_path) -> None:
    per_step = _poisoned_trainer(tmp_path / "each", "fused", 5, {2})
    per_step.parts.metrics.cfg.log_every = 1
    per_step.train()
    windowed = _poisoned_trainer(tmp_path / "window", "fused", 5, {2})
    windowed.train()
    steps = {r["step"]: r for r in read_metrics(tmp_path / "each")}
    assert steps[2]["loss"] is None and steps[2]["supervised_tokens"] == 0  # a window of only skipped steps
    applied = [steps[s] for s in (1, 3, 4, 5)]
    tokens = sum(r["supervised_tokens"] for r in applied)
    (record,) = read_metrics(tmp_path / "window")
    assert record["step"] == 5 and record["skipped_steps"] == 1
    assert record["supervised_tokens"] == tokens
    assert record["loss"] == pytest.approx(sum(r["loss"] * r["supervised_tokens"] for r in applied) / tokens)


@pytest.mark.parametrize(
    ("name", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H100 NVL", 835e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA H200 NVL", 835e12),
        ("NVIDIA H100 80GB HBM3 MIG 3g.40gb", None),  # a slice: its share of the peak is unknown
        ("NVIDIA GeForce RTX 4090", None),
    ],
)
def test_peak_flops_by_device_name(monkeypatch: pytest.MonkeyPatch, name: str, peak: float | None) -> None:
    from dualtower.training.flops import peak_flops

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert peak_flops(torch.device("cuda")) == peak
    assert peak_flops(torch.device("cpu")) is None


def test_gradients_are_clipped_to_max_grad_norm_and_the_norm_before_is_logged(tmp_path) -> None:
    model = tiny_model().double()
    micro = make_batches(model, [LAYOUT_A], seed=5)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    unclipped_trainer = build_trainer(model, micro, tmp_path / "free")
    unclipped = _grads_at_step(unclipped_trainer, micro)
    norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in unclipped.values()])).item()
    assert unclipped_trainer.last_grad_norm.item() == pytest.approx(norm, rel=1e-12)

    model.load_state_dict(state)
    cfg = default_job()
    cfg.training.max_grad_norm = norm / 10
    clipped_trainer = build_trainer(model, micro, tmp_path / "clipped", cfg)
    clipped = _grads_at_step(clipped_trainer, micro)
    assert clipped_trainer.last_grad_norm.item() == pytest.approx(norm, rel=1e-12)  # the norm before clipping
    for name, grad in unclipped.items():  # the same direction, scaled to max_grad_norm
        torch.testing.assert_close(clipped[name], grad / 10, rtol=1e-6, atol=1e-12, msg=name)


def test_a_fatal_streak_stops_the_fused_path_before_a_checkpoint_keeps_it(tmp_path) -> None:
    """The fused path checks streaks at logging steps; a checkpoint in between must not save the run past its
    fatal streak, or a restarted job would resume from it and train on."""
    trainer = _poisoned_trainer(tmp_path, "fused", 8, {2, 3}, max_nonfinite_in_row=2)
    trainer.parts.checkpointer.cfg.enabled, trainer.parts.checkpointer.cfg.every = True, 4
    with pytest.raises(NonFiniteLossError, match=r"2 optimizer steps in a row .*steps 2-3"):
        trainer.train()
    assert trainer.step == 4 and trainer.parts.checkpointer.checkpoints() == []


@pytest.mark.parametrize("implementation", ["foreach", "fused"])
def test_a_step_without_supervised_tokens_is_a_finite_no_op(tmp_path, implementation: str) -> None:
    model = tiny_model()
    (batch,) = make_batches(model, [LAYOUT_A], seed=2)
    unsupervised = replace(batch, labels=torch.full_like(batch.labels, IGNORE_INDEX), num_supervised=0)
    cfg = default_job()
    cfg.optim.implementation = implementation
    cfg.optim.weight_decay = 0.0  # decoupled decay would move the weights even with zero gradients
    trainer = build_trainer(model, [unsupervised], tmp_path, cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer.train_step([unsupervised])
    trainer._check_nonfinite()
    assert trainer.last_grad_norm.item() == 0.0  # zero loss (not 0/0): finite, zero gradients
    assert int(trainer.skipped_total) == 0 and int(trainer.nonfinite_streak) == 0
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name
