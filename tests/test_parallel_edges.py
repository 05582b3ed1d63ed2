"""Edges of the parallelism wrappers: torchrun's environment checked before joining a group, activation
checkpointing and per-block compile changing neither the numbers nor the parameter names, and every trainable
parameter in exactly one optimizer group."""

from __future__ import annotations

import pytest
import torch
import torch.fx.experimental._config as fx_config
from test_train_utils import default_job, make_batches, one_thread, tiny_model  # noqa: F401
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

from dualtower.model import DualTowerVLM
from dualtower.model.config import ConfigError
from dualtower.parallel import init_distributed
from dualtower.parallel.ac import apply_ac
from dualtower.parallel.compile import apply_compile
from dualtower.training.optim import apply_freezing, build_optimizer, tower_modules

pytestmark = pytest.mark.usefixtures("one_thread")

WRAPPER_PREFIX = "._checkpoint_wrapped_module"


def _set_env(monkeypatch: pytest.MonkeyPatch, **values: str | None) -> None:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        value = values.get(name)
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    # No rendezvous may be reached: a refusal must come before init_process_group, which would wait.
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)


# -- torchrun's environment ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"RANK": "1", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}, r"RANK=1 must be in \[0, WORLD_SIZE=1\)"),
        ({"RANK": "-1", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, r"RANK=-1 must be in"),
        ({"RANK": "0", "WORLD_SIZE": "0", "LOCAL_RANK": "0"}, r"WORLD_SIZE=0 must be at least 1"),
        ({"RANK": "x", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, r"RANK='x' is not an integer"),
        ({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "gpu0"}, r"LOCAL_RANK='gpu0' is not an integer"),
        ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "2"}, r"LOCAL_RANK=2 must be in \[0, WORLD_SIZE=2\)"),
        ({"RANK": "1", "WORLD_SIZE": "2"}, r"LOCAL_RANK is not: launch with torchrun"),
    ],
    ids=["rank-past-world", "negative-rank", "empty-world", "rank-not-int", "local-not-int", "local-past", "no-local"],
)
def test_a_bad_or_inconsistent_launch_environment_is_a_clear_config_error(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], message: str
) -> None:
    _set_env(monkeypatch, **env)
    with pytest.raises(ConfigError, match=message):
        init_distributed("cpu", timeout_s=5)


def test_a_plain_process_ignores_a_stray_local_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    # Without RANK and WORLD_SIZE there is no launch, so LOCAL_RANK picks neither a rank nor a device.
    _set_env(monkeypatch, LOCAL_RANK="not-a-number")
    env = init_distributed("cpu")
    assert (env.rank, env.world_size, env.local_rank, env.mesh) == (0, 1, 0, None)


def test_one_launched_process_may_omit_local_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    """A lone process has only local rank 0; the check passes and only the missing rendezvous address stops it."""
    _set_env(monkeypatch, RANK="0", WORLD_SIZE="1")
    with pytest.raises(ValueError, match="MASTER_ADDR"):
        init_distributed("cpu", timeout_s=5)


# -- activation checkpointing and compile ----------------------------------------------------------------------


def _grads(model: DualTowerVLM, batch) -> dict[str, torch.Tensor | None]:
    loss = model.loss_sum(batch)
    loss.backward()
    return {name.replace(WRAPPER_PREFIX, ""): param.grad for name, param in model.named_parameters()}


def _frozen_like_the_original(model: DualTowerVLM) -> DualTowerVLM:
    cfg = default_job().optim
    cfg.lr_vision = 0.0  # a frozen tower under checkpointing: its blocks' inputs need no gradient
    apply_freezing(model, cfg)
    return model


def test_activation_checkpointing_keeps_names_outputs_and_gradients() -> None:
    plain, checkpointed = _frozen_like_the_original(tiny_model()), _frozen_like_the_original(tiny_model())
    apply_ac(checkpointed)
    wrapped = [m for m in checkpointed.modules() if isinstance(m, CheckpointWrapper)]
    assert len(wrapped) == 5  # 1 vision block + 2 left + 2 right, and nothing else
    assert list(checkpointed.state_dict()) == list(plain.state_dict())
    (batch,) = make_batches(plain, [[(1, 2, 5), (0, 0, 4), (2, 1, 7)]], seed=5)
    torch.testing.assert_close(checkpointed(batch), plain(batch), rtol=0, atol=0)
    expected, got = _grads(plain, batch), _grads(checkpointed, batch)
    assert got.keys() == expected.keys()
    with_grad = [name for name, grad in expected.items() if grad is not None]
    assert len(with_grad) > 10 and not any(name.startswith("vision_encoder.") for name in with_grad)
    for name, grad in expected.items():
        assert (got[name] is None) == (grad is None), name
        if grad is not None:
            torch.testing.assert_close(got[name], grad, rtol=0, atol=0, msg=name)


def test_per_block_compile_keeps_state_dict_keys_and_gradients() -> None:
    """The eager backend traces through dynamo like inductor does, without the C++ compile time."""
    plain, compiled = tiny_model(), tiny_model()
    apply_ac(compiled)
    # apply_compile sets these process-wide; the configs' patch() restores them for the other tests.
    with torch._dynamo.config.patch(recompile_limit=8), fx_config.patch(use_duck_shape=True):
        apply_compile(compiled, backend="eager")
    compiled_blocks = [m for m in compiled.modules() if getattr(m, "_compiled_call_impl", None) is not None]
    assert len(compiled_blocks) == 5 and all(isinstance(m, CheckpointWrapper) for m in compiled_blocks)
    assert list(compiled.state_dict()) == list(plain.state_dict())  # no `_orig_mod.` in the checkpoint
    (batch,) = make_batches(plain, [[(1, 2, 5), (0, 0, 4)]], seed=3)
    expected, got = _grads(plain, batch), _grads(compiled, batch)
    assert got.keys() == expected.keys()
    for name, grad in expected.items():
        assert (got[name] is None) == (grad is None), name
        if grad is not None:
            torch.testing.assert_close(got[name], grad, rtol=1e-5, atol=1e-6, msg=name)


# -- optimizer groups ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("decay_norms_and_biases", [True, False])
def test_every_trainable_parameter_is_in_exactly_one_group(decay_norms_and_biases: bool) -> None:
    model = tiny_model()
    apply_ac(model)  # the optimizer is built after parallelize(): wrapped blocks must not change the groups
    cfg = default_job().optim
    cfg.lr_vision, cfg.lr_right = 0.0, 3e-4
    cfg.weight_decay, cfg.decay_norms_and_biases = 0.1, decay_norms_and_biases
    apply_freezing(model, cfg)
    groups = build_optimizer(model, cfg).param_groups
    in_groups = [id(p) for group in groups for p in group["params"]]
    assert len(in_groups) == len(set(in_groups))  # the tied embedding/head once, no parameter twice
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert set(in_groups) == trainable
    frozen = {id(p) for p in tower_modules(model)["vision"].parameters()} | {id(p) for p in model.unused_parameters()}
    assert frozen and not frozen & set(in_groups)
    lr_of = {"projector": cfg.lr_projector, "left": cfg.lr_left, "right": cfg.lr_right}
    names = [group["name"] for group in groups]
    assert names == ["projector", "left", "right"] if decay_norms_and_biases else len(names) == 5
    for group in groups:
        tower = group["name"].removesuffix("_no_decay")
        assert group["lr"] == lr_of[tower]
        exempt = group["name"].endswith("_no_decay")
        assert group["weight_decay"] == (0.0 if exempt else 0.1)
        if not decay_norms_and_biases:
            # Exempt: norms and biases (1-D); the embeddings and the tied head are matrices and decay.
            assert all((p.ndim < 2) == exempt for p in group["params"]), group["name"]
    tied = tower_modules(model)["right"].token_embedding.weight
    assert sum(p is tied for group in groups for p in group["params"]) == 1
