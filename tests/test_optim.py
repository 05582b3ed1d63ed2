"""Parameter groups per tower: the weight-decay exemption of norms and biases, per-tower LRs, the AdamW flags."""

from __future__ import annotations

import pytest
from test_train_utils import default_job, tiny_model

from dualtower.training.optim import apply_freezing, build_optimizer, tower_modules

LRS = {"vision": 1e-4, "projector": 2e-3, "left": 5e-4, "right": 3e-4}


def _optim_cfg(decay_norms_and_biases: bool):
    cfg = default_job().optim
    cfg.lr_vision, cfg.lr_projector, cfg.lr_left, cfg.lr_right = LRS.values()
    cfg.weight_decay = 0.05
    cfg.decay_norms_and_biases = decay_norms_and_biases
    return cfg


def test_norms_and_biases_can_be_exempt_from_weight_decay() -> None:
    model = tiny_model()
    cfg = _optim_cfg(decay_norms_and_biases=False)
    apply_freezing(model, cfg)
    groups = {group["name"]: group for group in build_optimizer(model, cfg).param_groups}
    # The projector is one bias-free matrix: no exempt group. The other towers have norms (and biases).
    assert set(groups) == {*LRS, "vision_no_decay", "left_no_decay", "right_no_decay"}
    for name, module in tower_modules(model).items():
        decayed, exempt = (
            groups[name],
            groups.get(f"{name}_no_decay", {"lr": LRS[name], "weight_decay": 0.0, "params": []}),
        )
        assert decayed["lr"] == exempt["lr"] == LRS[name]
        assert decayed["weight_decay"] == 0.05 and exempt["weight_decay"] == 0.0
        assert decayed["params"] and all(p.ndim >= 2 for p in decayed["params"])
        assert all(p.ndim == 1 for p in exempt["params"])
        trainable = {id(p) for p in module.parameters() if p.requires_grad}
        assert {id(p) for p in decayed["params"] + exempt["params"]} == trainable  # every one, once


def test_by_default_every_parameter_of_a_tower_decays_in_one_group() -> None:
    model = tiny_model()
    cfg = _optim_cfg(decay_norms_and_biases=True)
    apply_freezing(model, cfg)
    optimizer = build_optimizer(model, cfg)
    assert [(g["name"], g["lr"], g["weight_decay"]) for g in optimizer.param_groups] == [
        (name, lr, 0.05) for name, lr in LRS.items()
    ]
    assert optimizer.defaults["fused"] and not optimizer.defaults["foreach"]  # "auto" is the fused kernel


@pytest.mark.parametrize("implementation", ["fused", "foreach"])
def test_implementation_betas_and_eps_come_from_the_config(implementation: str) -> None:
    model = tiny_model()
    cfg = _optim_cfg(decay_norms_and_biases=True)
    cfg.implementation, cfg.betas, cfg.eps = implementation, (0.8, 0.95), 1e-6
    apply_freezing(model, cfg)
    defaults = build_optimizer(model, cfg).defaults
    assert (defaults["fused"], defaults["foreach"]) == (implementation == "fused", implementation == "foreach")
    assert defaults["betas"] == (0.8, 0.95) and defaults["eps"] == 1e-6
