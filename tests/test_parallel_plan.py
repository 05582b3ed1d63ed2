"""How [parallel] is applied: the plan a single process gets, which blocks are checkpointed, compiled and sharded
and in which order, FSDP2's mixed-precision and reduction settings, and how a process joins torchrun's group.

FSDP runs for real here, in a one-rank gloo group inside the test process (no launcher, about 0.1 s to join), so
the settings are read back from the sharded modules themselves. The multi-rank numerics are test_train_dist.py's.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
import torch
import torch.distributed as dist
import torch.fx.experimental._config as fx_config
from test_train_utils import make_batches, single_env, tiny_model
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
from torch.distributed.fsdp import FSDPModule

from dualtower.config import ParallelSection
from dualtower.model import DualTowerVLM
from dualtower.model.config import ConfigError
from dualtower.parallel import DistEnv, ParallelPlan, init_distributed, parallelize, set_gradient_sync, teardown

BLOCK_UNITS = ["left_decoder.blocks.0", "left_decoder.blocks.1", "right_decoder.blocks.0", "right_decoder.blocks.1"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def one_rank(monkeypatch: pytest.MonkeyPatch) -> Iterator[DistEnv]:
    """What torchrun --nproc_per_node=1 would set; the group is destroyed after the test."""
    for name, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    env = init_distributed("cpu")
    try:
        yield env
    finally:
        teardown()


def _units(model: DualTowerVLM) -> dict[str, FSDPModule]:
    return {name: module for name, module in model.named_modules() if isinstance(module, FSDPModule)}


def _groups(module: FSDPModule) -> list:
    return module._get_fsdp_state()._fsdp_param_groups


# -- a single plain process ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("precision", "autocast"), [("auto", None), ("fp32", None), ("bf16", torch.bfloat16)], ids=str)
def test_a_single_process_trains_the_plain_module_with_autocast_only_for_bf16(precision, autocast) -> None:
    # "auto" is bf16 on CUDA only: a CPU run must not silently train in bf16.
    plan = parallelize(tiny_model(), ParallelSection(mixed_precision=precision), single_env())
    assert plan == ParallelPlan(fsdp=False, autocast_dtype=autocast)


def test_fsdp_without_a_process_group_or_ranks_without_fsdp_are_refused() -> None:
    with pytest.raises(ValueError, match="launch with torchrun"):
        parallelize(tiny_model(), ParallelSection(fsdp="on"), single_env())
    two_ranks = DistEnv(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"), mesh=None)
    with pytest.raises(ValueError, match="no other data parallelism"):
        parallelize(tiny_model(), ParallelSection(fsdp="off"), two_ranks)


def test_checkpointing_wraps_every_block_and_compile_sees_the_wrappers(monkeypatch: pytest.MonkeyPatch) -> None:
    """AC first, then per-block compile of the wrapped blocks (dynamic sizes, the configured fullgraph). A recorder
    stands in for torch.compile: what it is asked to compile is the point, and real compiles take seconds."""
    calls = []

    def record(fn, **kwargs):
        calls.append((fn.__self__, kwargs))
        return fn

    monkeypatch.setattr(torch, "compile", record)
    model = tiny_model()
    cfg = ParallelSection(activation_checkpointing=True, compile=True, compile_fullgraph=False)
    # Restored afterwards by the configs' own patch(): monkeypatch's undo would delete these config entries (they
    # live outside the instance __dict__) and leave every later reader an AttributeError. The values before are
    # whatever earlier compiling tests in this process left, so the check below compares with them.
    before = torch._dynamo.config.recompile_limit, fx_config.use_duck_shape
    with torch._dynamo.config.patch(recompile_limit=8), fx_config.patch(use_duck_shape=True):
        assert parallelize(model, cfg, single_env()) == ParallelPlan(fsdp=False, autocast_dtype=None)
        assert torch._dynamo.config.recompile_limit == 32  # two graphs per LM block, plus packed-size variants
        assert not fx_config.use_duck_shape
    blocks = [*model.vision_encoder.blocks, *model.left_decoder.blocks, *model.right_decoder.blocks]
    assert len(blocks) == 5 and all(isinstance(block, CheckpointWrapper) for block in blocks)
    assert [module for module, _ in calls] == blocks  # the wrappers are compiled, not the blocks inside them
    assert all(kwargs["fullgraph"] is False and kwargs["dynamic"] is True for _, kwargs in calls)
    assert (torch._dynamo.config.recompile_limit, fx_config.use_duck_shape) == before


# -- FSDP2 in a one-rank group ---------------------------------------------------------------------------------


def test_joining_the_group_gives_a_data_parallel_mesh_and_can_be_repeated(one_rank: DistEnv) -> None:
    assert (one_rank.rank, one_rank.world_size, one_rank.local_rank) == (0, 1, 0)
    assert one_rank.distributed and one_rank.is_main and one_rank.mesh.mesh_dim_names == ("dp",)
    again = init_distributed("cpu")  # the group already exists (e.g. a test harness made it): reuse it
    assert again.world_size == 1 and dist.is_initialized()


@pytest.mark.parametrize(
    ("precision", "reshard", "param_dtype", "reduce_dtype"),
    [("bf16", True, torch.bfloat16, torch.float32), ("fp32", False, None, None)],
    ids=["bf16-reshard", "fp32-keep"],
)
def test_fsdp_shards_the_vision_tower_each_lm_block_and_the_root(
    one_rank: DistEnv, precision: str, reshard: bool, param_dtype, reduce_dtype
) -> None:
    model = tiny_model()
    cfg = ParallelSection(fsdp="on", mixed_precision=precision, reshard_after_forward=reshard)
    # FSDP casts the parameters itself: autocast on top of it would be a second, unsharded cast.
    assert parallelize(model, cfg, one_rank) == ParallelPlan(fsdp=True, autocast_dtype=None)
    units = _units(model)
    assert sorted(units) == sorted(["", "vision_encoder", *BLOCK_UNITS])
    for name, unit in units.items():
        (group,) = _groups(unit)
        # bf16 compute, fp32 gradient reduction (bf16 sums lose the small gradients of a large world).
        assert (group.mp_policy.param_dtype, group.mp_policy.reduce_dtype) == (param_dtype, reduce_dtype), name
        # SUM across ranks: the trainer already divides by the global supervised-token count.
        assert group.gradient_divide_factor == 1.0 and group.force_sum_reduction_for_comms, name
        # The root keeps its weights after forward: loss_sum() reads the tied head right after forward().
        resharded = group.post_forward_mesh_info is not None
        assert resharded == (reshard and name != ""), name
    assert all("kv_only" in units[name].__dict__ for name in BLOCK_UNITS)  # runs through FSDP's gather hooks
    assert "loss_sum" in model.__dict__
    assert model.encode_blank_tile_without_images  # every rank must gather the vision tower, images or not


def test_gradient_sync_is_switched_on_every_unit(one_rank: DistEnv) -> None:
    model = tiny_model()
    parallelize(model, ParallelSection(fsdp="on"), one_rank)
    groups = [group for unit in _units(model).values() for group in _groups(unit)]
    set_gradient_sync(model, False)  # the micro-batches before the last of an optimizer step
    assert len(groups) == 6 and not any(group.reduce_grads for group in groups)
    set_gradient_sync(model, True)
    assert all(group.reduce_grads for group in groups)


def test_a_sharded_step_gives_the_plain_models_gradients(one_rank: DistEnv) -> None:
    """One rank, fp32: the sharded model (kv_only and loss_sum through FSDP's hooks) must match the plain one."""
    plain, sharded = tiny_model(), tiny_model()
    (batch,) = make_batches(plain, [[(1, 2, 5), (0, 0, 4)]], seed=3)
    parallelize(sharded, ParallelSection(fsdp="on", mixed_precision="fp32"), one_rank)
    plain.loss_sum(batch).backward()
    sharded.loss_sum(batch).backward()
    expected = {name: param.grad for name, param in plain.named_parameters() if param.grad is not None}
    got = {name: param.grad.full_tensor() for name, param in sharded.named_parameters() if param.grad is not None}
    assert got.keys() == expected.keys() and len(got) > 10
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-5, atol=1e-6, msg=name)


# -- joining (or not) ------------------------------------------------------------------------------------------


def test_a_process_not_launched_by_torchrun_runs_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    # torchrun sets both; one of them alone (e.g. a stray WORLD_SIZE in the shell) is no launch.
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    env = init_distributed("cpu")
    assert (env.rank, env.world_size, env.mesh, env.distributed) == (0, 1, None, False)
    assert not dist.is_initialized()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_asking_for_cuda_without_it_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(ConfigError, match="CUDA is not available"):
        init_distributed("cuda")
    assert init_distributed("auto").device == torch.device("cpu")
