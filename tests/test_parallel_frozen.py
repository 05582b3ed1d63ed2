"""Frozen towers under FSDP2: a tower with a zero learning rate gets no gradients, its weights take part in no
reduce-scatter, hold no optimizer state and do not move, while the trainable towers still train.

FSDP runs for real in a one-rank gloo group inside the test process (as in test_parallel_plan.py).
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
import torch
from test_train_utils import build_trainer, default_job, make_batches, one_thread, tiny_model  # noqa: F401
from torch.distributed.fsdp._fully_shard import _fsdp_param_group

from dualtower.parallel import DistEnv, init_distributed, teardown

pytestmark = pytest.mark.usefixtures("one_thread")

FROZEN = ("vision_encoder.", "right_decoder.")


@pytest.fixture
def one_rank(monkeypatch: pytest.MonkeyPatch) -> Iterator[DistEnv]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for name, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("MASTER_PORT", str(port))
    env = init_distributed("cpu")
    try:
        yield env
    finally:
        teardown()


def _full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def test_frozen_towers_under_fsdp_get_no_grads_reductions_or_optimizer_state(
    one_rank: DistEnv, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reduced: list[str] = []
    real_reduce = _fsdp_param_group.foreach_reduce

    def recording_reduce(fsdp_params, *args, **kwargs):
        reduced.extend(param._param_fqn for param in fsdp_params)
        return real_reduce(fsdp_params, *args, **kwargs)

    monkeypatch.setattr(_fsdp_param_group, "foreach_reduce", recording_reduce)
    model = tiny_model()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    batches = make_batches(model, [[(1, 2, 5), (0, 0, 3)], [(2, 1, 9)]], seed=1)
    cfg = default_job()
    cfg.parallel.fsdp = "on"
    cfg.parallel.mixed_precision = "fp32"
    cfg.optim.lr_vision = cfg.optim.lr_right = 0.0  # the original's default: only projector and left tower train
    cfg.training.micro_batches = 2
    trainer = build_trainer(model, batches, tmp_path, cfg, one_rank)

    frozen_grads = {}

    def capture(optimizer, args, kwargs):
        frozen_grads.update({n: p.grad for n, p in model.named_parameters() if n.startswith(FROZEN)})

    trainer.optimizer.register_step_pre_hook(capture)
    trainer.train_step(batches)

    assert frozen_grads and all(grad is None for grad in frozen_grads.values())
    assert reduced and not [name for name in reduced if name.startswith(FROZEN)]
    assert any(name.startswith("left_decoder.blocks.") for name in reduced)  # the trainable blocks are reduced
    in_state = {id(param) for param in trainer.optimizer.state}
    named = dict(model.named_parameters())
    assert not [n for n, p in named.items() if n.startswith(FROZEN) and id(p) in in_state]
    assert all(id(p) in in_state for n, p in named.items() if p.requires_grad)
    after = {name: _full(tensor) for name, tensor in model.state_dict().items()}
    moved = {name for name in after if not torch.equal(after[name], before[name])}
    assert not [name for name in moved if name.startswith(FROZEN)]
    assert any(name.startswith("projector.") for name in moved) and any(n.startswith("left_decoder.") for n in moved)
