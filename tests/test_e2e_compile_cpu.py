"""torch.compile and activation checkpointing end to end on the CPU: the trainer's compiled (and checkpointed)
step against eager, resuming across the two, the compiled generation engine, fullgraph blocks on edge shapes,
and exports from compiled models.

Inductor's C++ compile of every graph here would take minutes on a 2-core CI machine, so most cases count
graphs through `CompileCounterWithBackend("aot_eager")` (dynamo's tracing, guards and AOT autograd: what decides
recompiles and graph breaks); the decode step, the smallest graph, runs through inductor itself.
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_generation import make_prompt
from test_train_utils import build_trainer, default_job, make_batches, one_thread, tiny_model  # noqa: F401
from torch._dynamo.testing import CompileCounterWithBackend

from dualtower import hub, ops
from dualtower.generation import Generator, SamplingConfig
from dualtower.generation import engine as engine_module
from dualtower.model import DualTowerVLM
from dualtower.parallel import compile as compile_module

pytestmark = pytest.mark.usefixtures("one_thread")

# Packed micro-batches of varying shapes: (tiles, extra prefix tokens, text tokens) per document. Token and
# document counts change every step; a later step repeats no earlier shape.
LAYOUTS = [
    [(1, 2, 5), (0, 0, 3)],
    [(2, 1, 17), (1, 0, 9), (0, 0, 11)],
    [(1, 0, 4), (1, 3, 6)],
    [(0, 0, 4), (0, 0, 2), (2, 0, 3), (1, 1, 8)],
    [(3, 0, 12)],
]
STEPS = len(LAYOUTS)


def _graphs(counter: CompileCounterWithBackend) -> int:
    """Graphs compiled so far, less dynamo's empty ones (frames without an op: nothing to recompile)."""
    return sum(1 for graph in counter.graphs if len(graph.graph.nodes))


def _strip(name: str) -> str:
    return name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")


def _train(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *, compile: bool, ac: bool, steps: int = STEPS,
           checkpoint_every: int = 0, counter=None) -> tuple[DualTowerVLM, list[dict[str, torch.Tensor]], list[int]]:
    """Train a fresh tiny model through the trainer (resuming from run_dir's checkpoints); returns it, the
    gradients of every step it ran, and the graphs compiled by the end of each step."""
    if counter is not None:
        monkeypatch.setattr("dualtower.parallel.apply_compile", functools.partial(compile_module.apply_compile,
                                                                                 backend=counter))
    model = tiny_model()
    batches = make_batches(model, LAYOUTS, seed=3)
    cfg = default_job()
    cfg.parallel.compile = compile
    cfg.parallel.activation_checkpointing = ac
    cfg.training.steps = steps
    cfg.schedule.kind = "constant"  # the same LRs whatever `steps` is: a short run is the start of a long one
    if checkpoint_every:
        cfg.checkpoint.enabled = True
        cfg.checkpoint.every = checkpoint_every
    trainer = build_trainer(model, batches, tmp_path, cfg)
    grads: list[dict[str, torch.Tensor]] = []
    graphs_per_step = []

    optimizer_step = trainer._optimizer_step

    # Wrapped here, not hooked on the optimizer: resuming runs one optimizer step to create the Adam state.
    def keep_grads(grad_norm: torch.Tensor) -> None:
        grads.append({_strip(n): p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        if counter is not None:
            graphs_per_step.append(_graphs(counter))
        optimizer_step(grad_norm)

    trainer._optimizer_step = keep_grads
    trainer.train()
    return model, grads, graphs_per_step


@pytest.fixture(scope="module")
def eager_run(tmp_path_factory) -> tuple[DualTowerVLM, list[dict[str, torch.Tensor]]]:
    with pytest.MonkeyPatch.context() as mp:
        model, grads, _ = _train(tmp_path_factory.mktemp("eager"), mp, compile=False, ac=False)
    return model, grads


@pytest.mark.parametrize("ac", [False, True], ids=["compile", "compile+ac"])
def test_compiled_training_matches_eager_without_per_step_recompiles(tmp_path, monkeypatch, eager_run, ac) -> None:
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    model, grads, graphs = _train(tmp_path, monkeypatch, compile=True, ac=ac, counter=counter)
    eager_model, eager_grads = eager_run
    assert len(grads) == len(eager_grads) == STEPS
    for step, (ours, theirs) in enumerate(zip(grads, eager_grads, strict=True)):
        assert ours.keys() == theirs.keys() and len(ours) > 10
        for name, grad in theirs.items():
            torch.testing.assert_close(ours[name], grad, rtol=1e-4, atol=1e-6, msg=f"step {step + 1}: {name}")
    for (name, ours), theirs in zip(model.state_dict().items(), eager_model.state_dict().values(), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6, msg=name)
    # The first two steps compile the vision block (twice: the first batch has one tile, a 0/1-specialized size)
    # and the LM block once per tower (the left tower's prefix K/V need no gradient, the right's do). The later
    # steps' new token, tile and document counts compile nothing.
    assert graphs[1] <= 4 and graphs[1:] == [graphs[1]] * (STEPS - 1), graphs


def _checkpoint_keys(run_dir: Path) -> set[str]:
    import torch.distributed.checkpoint as dcp

    (path,) = sorted((run_dir / "checkpoints").glob("step_*"))
    return set(dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata)


@pytest.mark.parametrize("first", ["eager", "compiled"])
def test_resume_across_eager_and_compiled_checkpointed_runs(tmp_path, monkeypatch, eager_run, first) -> None:
    """A run checkpointed at step 3 by one kind of run and finished by the other ends where an uninterrupted eager
    run does: the checkpoint's keys carry no wrapper names, so either kind loads the other's."""
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    kinds = {"eager": {"compile": False, "ac": False}, "compiled": {"compile": True, "ac": True, "counter": counter}}
    second = "eager" if first == "compiled" else "compiled"
    _train(tmp_path, monkeypatch, steps=3, checkpoint_every=3, **kinds[first])
    keys = _checkpoint_keys(tmp_path)
    assert not [key for key in keys if "_orig_mod" in key or "_checkpoint_wrapped" in key]
    assert "model.right_decoder.blocks.0.attn.q_proj.weight" in keys
    model, grads, _ = _train(tmp_path, monkeypatch, steps=STEPS, checkpoint_every=3, **kinds[second])
    eager_model, eager_grads = eager_run
    assert len(grads) == STEPS - 3  # resumed at step 3, not restarted
    for ours, theirs in zip(grads, eager_grads[3:], strict=True):
        for name, grad in theirs.items():
            torch.testing.assert_close(ours[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    for (name, ours), theirs in zip(model.state_dict().items(), eager_model.state_dict().values(), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6, msg=name)


# -- generation ----------------------------------------------------------------------------------------------


# Ragged batches of 1, 3 (4 cache rows), 4 and 2 requests: (tiles, extra prefix tokens, prompt text tokens).
GENERATION_BATCHES = [
    [(1, 1, 5)],
    [(2, 1, 9), (0, 0, 4), (1, 2, 1)],
    [(1, 0, 3), (3, 0, 7), (0, 0, 2), (1, 1, 6)],
    [(0, 0, 1), (2, 0, 12)],
]


@pytest.fixture(scope="module")
def generation_model() -> DualTowerVLM:
    model = tiny_model(seed=1).eval().requires_grad_(False)
    with torch.no_grad():  # spread-out weights, so that greedy decoding does not just repeat a token
        for name, param in model.named_parameters():
            if param.dim() >= 2 and "embedding" not in name:
                param.normal_(0.0, param.shape[-1] ** -0.5)
    return model


def test_compiled_generation_matches_eager_and_compiles_once_per_bucket(generation_model, monkeypatch) -> None:
    """compile=True (inductor decode block) with compile_prefill=True: the same greedy tokens as eager for ragged
    batches; the decode block compiles once per cache-rows bucket (not per layer or step), the prefill blocks once
    per tower."""
    import copy

    torch._dynamo.reset()
    decode, prefill = CompileCounterWithBackend("inductor"), CompileCounterWithBackend("aot_eager")
    compiled_block_decode = engine_module.compiled_block_decode.__wrapped__  # uncached: a fresh compile
    monkeypatch.setattr(engine_module, "compiled_block_decode", lambda: compiled_block_decode(decode))
    compile_prefill = functools.partial(engine_module.compile_prefill_blocks, backend=prefill)
    monkeypatch.setattr(engine_module, "compile_prefill_blocks", compile_prefill)
    compiled_model = copy.deepcopy(generation_model)
    engine = Generator(compiled_model, eos_token_ids=(), compile=True, compile_prefill=True, prefix_cache_bytes=0)
    eager = Generator(generation_model, eos_token_ids=(), compile=False, prefix_cache_bytes=0)
    sampling = SamplingConfig(max_new_tokens=5)
    graphs = []
    for index, layout in enumerate(GENERATION_BATCHES):
        prompts = [make_prompt(generation_model, *shape, seed=10 * index + row) for row, shape in enumerate(layout)]
        ours = engine.generate_prepared(prompts, sampling, return_logits=True)
        theirs = eager.generate_prepared(prompts, sampling, return_logits=True)
        for a, b in zip(ours, theirs, strict=True):
            assert a.token_ids == b.token_ids
            torch.testing.assert_close(a.logits, b.logits, atol=1e-4, rtol=0)
        graphs.append((_graphs(decode), _graphs(prefill)))
    assert len({tuple(r.token_ids) for r in ours}) > 1
    # Decode: one static graph per rows bucket (1, 4, 4, 2), shared by both layers and every step.
    assert [d for d, _ in graphs] == [1, 2, 2, 3], graphs
    # Prefill: vision (twice: one tile first, a 0/1-specialized size), left and right LM; later batches' prompt
    # lengths, tile and request counts add none.
    prefill_graphs = [p for _, p in graphs]
    assert prefill_graphs[1] <= 4 and prefill_graphs[1:] == [prefill_graphs[1]] * 3, graphs


# -- fullgraph blocks on edge shapes; exports of compiled models ---------------------------------------------


# (prefix tokens, text tokens) per document: empty prefixes, one-token texts, both, and a mix.
EDGE_LAYOUTS = [[(0, 5), (0, 3)], [(4, 1), (6, 1), (2, 1)], [(0, 1)], [(3, 1), (0, 4), (5, 7), (0, 1)]]


def _edge_inputs(layout: list[tuple[int, int]], seed: int) -> tuple:
    generator = torch.Generator().manual_seed(seed)
    prefix, text = [p for p, _ in layout], [t for _, t in layout]
    x = torch.randn(sum(text), 32, generator=generator, requires_grad=True)
    kv = [torch.randn(sum(prefix), 2, 8, generator=generator, requires_grad=True) for _ in range(2)]
    positions = torch.cat([torch.arange(t) + p for p, t in layout])
    cu_text = torch.tensor([0, *torch.tensor(text).cumsum(0).tolist()], dtype=torch.int32)
    cu_prefix = torch.tensor([0, *torch.tensor(prefix).cumsum(0).tolist()], dtype=torch.int32)
    return x, *kv, positions, cu_text, cu_prefix, max(text), max(prefix)


def test_fullgraph_block_has_no_graph_break_on_empty_prefixes_and_one_token_texts() -> None:
    """The reference backend's attention under torch.compile(fullgraph=True): a graph break would be an error.
    Every edge layout gives eager's output and gradients; new layouts add at most the 0/1 specializations."""
    model = tiny_model(seed=2)
    decoder = model.right_decoder
    block = decoder.blocks[0]
    params = list(block.parameters())

    def step(x, k_prefix, v_prefix, positions, cu_text, cu_prefix, max_text, max_prefix):
        cos, sin = decoder.rotary(positions)
        out, k, v = block(x, cos, sin, cu_text, max_text, k_prefix, v_prefix, cu_prefix, max_prefix)
        kk, vv = block.kv_only(out, cos, sin)
        return (out.square().sum() + k.sum() + v.sum() + kk.sum() + vv.sum()) / out.shape[0]

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(step, fullgraph=True, dynamic=True, backend=counter)
    assert ops.selected_backend("prefix_attention", "cpu") == "reference"
    for seed, layout in enumerate(EDGE_LAYOUTS):
        inputs = _edge_inputs(layout, seed)
        leaves = [t for t in inputs[:3] if t.numel()] + params
        expected = step(*inputs)
        expected_grads = torch.autograd.grad(expected, leaves)
        loss = compiled(*inputs)
        grads = torch.autograd.grad(loss, leaves)
        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6, msg=str(layout))
        for grad, want in zip(grads, expected_grads, strict=True):
            torch.testing.assert_close(grad, want, rtol=1e-5, atol=1e-6, msg=str(layout))
    assert "prefix_attention_reference" in counter.graphs[0].code
    assert _graphs(counter) <= 3, _graphs(counter)


def test_exports_of_a_compiled_checkpointed_model_have_clean_keys(tmp_path) -> None:
    from dualtower.parallel.ac import apply_ac

    eager = tiny_model(seed=3)
    eager.save_pretrained(tmp_path / "eager")
    wrapped = tiny_model(seed=3)
    apply_ac(wrapped)
    compile_module.apply_compile(wrapped, backend="aot_eager")
    whole = torch.compile(wrapped, backend="aot_eager")  # `_orig_mod.` before every name
    wrapped.save_pretrained(tmp_path / "blocks")
    whole.save_pretrained(tmp_path / "whole")  # through the whole-model wrapper
    hub.save_pretrained(whole, tmp_path / "hub")  # the wrapper handed to the function itself
    expected = load_file(tmp_path / "eager" / "model.safetensors")
    for name in ("blocks", "whole", "hub"):
        saved = load_file(tmp_path / name / "model.safetensors")
        assert saved.keys() == expected.keys(), name
        for key, tensor in expected.items():
            assert torch.equal(saved[key], tensor), key
        loaded = DualTowerVLM.from_pretrained(tmp_path / name)
        assert loaded.state_dict().keys() == eager.state_dict().keys()
