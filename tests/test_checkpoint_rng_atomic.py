"""Checkpoints: the RNG states a resume restores (or, on another world size, deliberately does not), and a save
that fails partway through."""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from test_train_utils import (
    build_trainer,
    checkpointed_job,
    make_batches,
    one_thread,  # noqa: F401 (fixture)
    tiny_model,
)

import dualtower.training.checkpoint as checkpoint_module


@pytest.fixture(autouse=True)
def _keep_global_rng() -> Iterator[None]:
    """These tests seed and restore the process-wide generators: later tests get them back as they were."""
    saved = checkpoint_module.rng_state()
    yield
    checkpoint_module.set_rng_state(saved)


pytestmark = pytest.mark.usefixtures("one_thread")

LAYOUT = [(1, 2, 6), (0, 0, 4)]
LOGGER = "dualtower.training.checkpoint"


def _draws() -> tuple[list[float], list[float], list[float]]:
    """What the next random numbers of torch's CPU generator, python's `random` and numpy's global state are."""
    return torch.rand(5).tolist(), [random.random() for _ in range(5)], np.random.rand(5).tolist()


def _scramble_rng() -> None:
    torch.manual_seed(1234)
    random.seed(1234)
    np.random.seed(1234)


def test_resume_restores_the_torch_python_and_numpy_rng_states(tmp_path) -> None:
    batches = make_batches(tiny_model(), [LAYOUT] * 6, seed=5)
    torch.manual_seed(7)
    random.seed(7)
    np.random.seed(7)
    # Its last act: the checkpoint of step 3.
    build_trainer(tiny_model(), batches, tmp_path, checkpointed_job(3, 3, keep=2)).train()
    uninterrupted = _draws()  # what the run would draw next, had it gone on

    _scramble_rng()  # a new process: other states, and building the trainer draws from them
    resumed = build_trainer(tiny_model(seed=99), batches, tmp_path, checkpointed_job(6, 3, keep=2))
    unrestored = checkpoint_module.rng_state()  # fresh copies of the states
    assert resumed._resume() and resumed.step == 3
    assert _draws() == uninterrupted

    # The check can fail: without the restore the same trainer draws other numbers.
    checkpoint_module.set_rng_state(unrestored)
    assert _draws() != uninterrupted


def _as_if_saved_on_two_ranks(path) -> None:
    """Make a single-process checkpoint look like one of a 2-rank run (DCP shards load on any number of ranks)."""
    state_file = path / "train_state.json"
    state = json.loads(state_file.read_text())
    state["world_size"] = 2
    state_file.write_text(json.dumps(state))
    shutil.copy(path / "rank_00000.pt", path / "rank_00001.pt")


def test_resume_on_another_world_size_says_it_leaves_the_rng_alone(tmp_path, caplog) -> None:
    batches = make_batches(tiny_model(), [LAYOUT] * 6, seed=5)
    build_trainer(tiny_model(), batches, tmp_path, checkpointed_job(3, 3, keep=2)).train()
    _as_if_saved_on_two_ranks(tmp_path / "checkpoints" / "step_00000003")

    _scramble_rng()
    resumed = build_trainer(tiny_model(seed=99), batches, tmp_path, checkpointed_job(6, 3, keep=2))
    before = torch.get_rng_state()
    with caplog.at_level("INFO", logger=LOGGER):
        assert resumed._resume() and resumed.step == 3
    assert torch.equal(torch.get_rng_state(), before)  # no saved rank's state is imposed on this one
    messages = [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelname == "INFO"]
    assert any("saved on 2 ranks, this run has 1" in m and "RNG states are not restored" in m for m in messages)


class _SaveFailedError(OSError):
    pass


def _fail_in_dcp_save(monkeypatch) -> None:
    real = checkpoint_module.dcp.save

    def write_then_fail(*args, **kwargs):
        real(*args, **kwargs)  # the shards are on disk ...
        raise _SaveFailedError("disk full")  # ... and then the save dies

    monkeypatch.setattr(checkpoint_module.dcp, "save", write_then_fail)


def _fail_in_train_state(monkeypatch) -> None:
    def write_half_then_fail(path, data) -> None:
        path.write_text(json.dumps(data)[:20])  # a truncated train_state.json
        raise _SaveFailedError("disk full")

    monkeypatch.setattr(checkpoint_module, "_write_json", write_half_then_fail)


@pytest.mark.parametrize("fail", [_fail_in_dcp_save, _fail_in_train_state], ids=["dcp", "train_state"])
def test_a_save_that_fails_partway_leaves_the_previous_checkpoint_in_charge(tmp_path, monkeypatch, fail) -> None:
    batches = make_batches(tiny_model(), [LAYOUT] * 6, seed=5)
    first = build_trainer(tiny_model(), batches, tmp_path, checkpointed_job(5, 3, keep=2))
    first.train_step([batches[0]])  # any step: what matters is the weights the good checkpoint holds
    first.step = 3
    good = first.save()
    saved_weights = {name: tensor.clone() for name, tensor in first.model.state_dict().items()}
    first.train_step([batches[1]])
    first.step = 5

    with monkeypatch.context() as patch:
        fail(patch)
        with pytest.raises(_SaveFailedError):
            first.save()
    folder = tmp_path / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == [".tmp_step_00000005", "step_00000003"]
    assert any((folder / ".tmp_step_00000005").iterdir())  # the failure came after something was written

    # resume=auto picks the previous checkpoint, and it loads whole.
    second = build_trainer(tiny_model(seed=99), batches, tmp_path, checkpointed_job(4, 4, keep=2))
    assert second.parts.checkpointer.resume_path() == good
    assert second._resume() and second.step == 3
    for name, tensor in second.model.state_dict().items():
        torch.testing.assert_close(tensor, saved_weights[name], rtol=0, atol=0, msg=name)

    # The next save that succeeds (step 4) clears the leftover of the failed one.
    second.train()
    assert sorted(p.name for p in folder.iterdir()) == ["step_00000003", "step_00000004"]
    assert json.loads((folder / "step_00000004" / "train_state.json").read_text())["step"] == 4
