"""dualtower.ops: backend selection and overrides, every op through the triton backend, and compiled blocks
that call the registered ops without a graph break."""

from __future__ import annotations

import logging

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from dualtower import ops
from dualtower.model.config import LMConfig
from dualtower.model.language import DecoderBlock, RotaryEmbedding
from dualtower_kernels.decode_attention import decode_attention_reference
from dualtower_kernels.linear_cross_entropy import linear_cross_entropy_reference
from dualtower_kernels.prefix_attention_reference import prefix_attention_reference
from dualtower_kernels.projector import pixel_shuffle_project_reference
from dualtower_kernels.testing import (
    assert_close,
    assert_error_within,
    eager_low_precision,
    packed_attention,
    random_packing,
)

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")
OPS = ("prefix_attention", "decode_attention", "linear_cross_entropy", "pixel_shuffle_project")


@pytest.fixture(autouse=True)
def _automatic_backends(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("DUALTOWER_BACKEND", raising=False)
    yield
    ops.set_backend(None)
    for op in OPS:
        ops.set_backend(None, op=op)


def test_auto_on_cpu_is_chunked_where_implemented_else_reference() -> None:
    for op in OPS:
        expected = ops.CHUNKED if op == "linear_cross_entropy" else ops.REFERENCE
        assert ops.selected_backend(op, "cpu") == expected
    ops.set_backend("chunked")  # attention has no chunked version: it keeps its automatic choice
    assert ops.selected_backend("prefix_attention", "cpu") == ops.REFERENCE


def test_rejects_unknown_names(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="unknown backend"):
        ops.set_backend("cudnn")
    with pytest.raises(ValueError, match="unknown op"):
        ops.set_backend("triton", op="rmsnorm")
    monkeypatch.setenv("DUALTOWER_BACKEND", "fast")
    with pytest.raises(ValueError, match="DUALTOWER_BACKEND"):
        ops.selected_backend("prefix_attention", "cpu")


def test_precedence_op_then_global_then_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DUALTOWER_BACKEND", "triton")  # CPU tests run the Triton interpreter
    assert ops.selected_backend("linear_cross_entropy", "cpu") == ops.TRITON
    ops.set_backend("reference")
    assert ops.selected_backend("linear_cross_entropy", "cpu") == ops.REFERENCE
    ops.set_backend("triton", op="linear_cross_entropy")
    assert ops.selected_backend("linear_cross_entropy", "cpu") == ops.TRITON
    assert ops.selected_backend("prefix_attention", "cpu") == ops.REFERENCE


def test_library_backends_touch_attention_only() -> None:
    ops.set_backend("flash")
    assert ops.selected_backend("linear_cross_entropy", "cpu") == ops.CHUNKED  # flash has no CE: automatic
    with pytest.raises(RuntimeError, match="not available"):
        ops.selected_backend("prefix_attention", "cpu")  # flash implements it but cannot run on a CPU
    assert not ops.is_available("torch_varlen", "cpu")


def test_logs_the_choice_once(caplog: pytest.LogCaptureFixture) -> None:
    ops._logged.clear()
    batch = packed_attention([3], [2], 2, 1, 16, requires_grad=False)
    with caplog.at_level(logging.INFO, logger="dualtower.ops"):
        ops.prefix_attention(*batch.args)
        ops.prefix_attention(*batch.args)
    assert [r.getMessage() for r in caplog.records] == ["prefix_attention: using the 'reference' backend on cpu"]


def test_every_op_through_triton_backend() -> None:
    ops.set_backend("triton")
    batch = packed_attention([4, 2], [3, 0], 4, 2, 16, requires_grad=False)
    expected = prefix_attention_reference(*batch.args)
    assert_close(ops.prefix_attention(*batch.args), expected, atol=1e-5, rtol=1e-5, name="prefix_attention")
    cu, q, k, v = batch.cu_text, batch.q, batch.k, batch.v
    expected = prefix_attention_reference(q, k, v, k[:0], v[:0], cu, torch.zeros_like(cu), 4, 0)
    assert_close(ops.causal_attention(q, k, v, cu, 4), expected, atol=1e-5, rtol=1e-5, name="causal_attention")

    q, cache, lengths = torch.randn(2, 4, 16), torch.randn(2, 2, 9, 16), torch.tensor([9, 2])
    expected = decode_attention_reference(q, cache, cache, lengths)
    assert_close(ops.decode_attention(q, cache, cache, lengths), expected, atol=1e-5, rtol=1e-5, name="decode")

    hidden, weight, labels = torch.randn(6, 16), torch.randn(30, 16), torch.tensor([1, -100, 3, 29, 0, -100])
    expected = linear_cross_entropy_reference(hidden, weight, labels)
    assert_close(ops.linear_cross_entropy(hidden, weight, labels), expected, atol=1e-5, rtol=1e-5, name="ce")

    x, proj = torch.randn(2, 16, 8), torch.randn(10, 32)
    expected = pixel_shuffle_project_reference(x, proj, 2)
    assert_close(ops.pixel_shuffle_project(x, proj, 2), expected, atol=1e-5, rtol=1e-5, name="projector")


def _bottom_right_causal_library(q, keys, values, cu_q, cu_k, max_q, max_k, scale, window=(-1, 0)):
    """Stands in for flash-attn / varlen_attn on CPU: per segment, causal aligned to the bottom right (or the
    libraries' (left, right) window, -1 for unbounded). Rows past the last segment get NaN that depends on the
    unowned rows of every input: the libraries leave those rows, and their gradients, unwritten."""
    # The libraries size their work from max_q / max_k: a bound below a real segment is undefined behaviour.
    assert max_q >= int(cu_q.diff().max()) and max_k >= int(cu_k.diff().max()), (max_q, max_k, cu_q, cu_k)
    segments = []
    for q0, q1, k0, k1 in zip(cu_q[:-1].tolist(), cu_q[1:].tolist(), cu_k[:-1].tolist(), cu_k[1:].tolist(),
                              strict=True):
        query_at = torch.arange(q1 - q0)[:, None] + (k1 - k0) - (q1 - q0)  # bottom-right aligned
        key_at = torch.arange(k1 - k0)[None, :]
        left, right = window
        mask = (right < 0) | (key_at <= query_at + right)
        mask = mask & ((left < 0) | (key_at >= query_at - left))
        heads_first = lambda t: t.transpose(0, 1)
        attended = torch.nn.functional.scaled_dot_product_attention(
            heads_first(q[q0:q1]), heads_first(keys[k0:k1]), heads_first(values[k0:k1]), attn_mask=mask,
            scale=scale, enable_gqa=True)
        segments.append(heads_first(attended))
    q_end, k_end = int(cu_q[-1]), int(cu_k[-1])
    garbage = (q[q_end:] + keys[k_end:].sum() + values[k_end:].sum()) * float("nan")
    return torch.cat([*segments, garbage])


@pytest.mark.parametrize("prefix", [[4, 0, 6], [0, 0, 0]], ids=["right_tower", "left_tower"])
def test_library_wrappers_merge_kv_and_zero_padding(prefix: list[int]) -> None:
    """The flash / torch_varlen glue (K = [prefix; text] per document, padding rows masked), on CPU."""
    batch = packed_attention([5, 2, 0], prefix, 4, 2, 16, pad_text=3, pad_prefix=2 if any(prefix) else 0)
    grad_out = torch.randn_like(batch.q)
    library = lambda *args: ops._library_prefix_attention(_bottom_right_causal_library, *args)
    results = []
    for impl in (library, prefix_attention_reference):
        out = impl(*batch.args)
        grads = torch.autograd.grad(out, batch.leaves, grad_out, allow_unused=True, materialize_grads=True)
        results.append((out, *grads))
    for name, a, e in zip(("out", "dq", "dk", "dv", "dkp", "dvp"), *results, strict=True):
        assert_close(a, e, atol=1e-5, rtol=1e-5, name=name)


class _VarlenRecorder:
    """Stands in for torch.nn.attention.varlen.varlen_attn on CPU: records its keyword arguments and attends as
    they say (window_size / is_causal; enable_gqa is needed for fewer K/V heads than query heads)."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def __call__(self, q, keys, values, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1),
                 enable_gqa=False, is_causal=False, **rest):
        self.calls.append({"window_size": window_size, "is_causal": is_causal, "enable_gqa": enable_gqa, **rest})
        assert not rest, rest
        assert enable_gqa or q.shape[1] == keys.shape[1]
        assert cu_q.dtype == cu_k.dtype == torch.int32
        window = (-1, 0) if is_causal else window_size
        return _bottom_right_causal_library(q, keys, values, cu_q, cu_k, max_q, max_k, scale, window)


@pytest.mark.parametrize("prefix", [[4, 0, 6], [0, 0, 0]], ids=["right_tower", "left_tower"])
def test_torch_varlen_asks_for_bottom_right_causal_attention(prefix: list[int], monkeypatch) -> None:
    """The torch_varlen glue as it calls the installed varlen_attn's signature: causal, GQA, scale."""
    recorder = _VarlenRecorder()
    monkeypatch.setattr("torch.nn.attention.varlen.varlen_attn", recorder)
    batch = packed_attention([5, 2, 3], prefix, 4, 2, 16, pad_text=3, pad_prefix=2 if any(prefix) else 0,
                             requires_grad=False)
    ours = ops._library_prefix_attention(ops.torch_varlen_attention, *batch.args, 0.3)
    assert_close(ours, prefix_attention_reference(*batch.args, scale=0.3), atol=1e-5, rtol=1e-5, name="out")
    [call] = recorder.calls
    assert call["window_size"] == (-1, 0) or call["is_causal"] is True


def _tiny_block_step(device: str):
    """A decoder block (right tower: text over a prefix) followed by the tied-head loss, and its inputs."""
    cfg = LMConfig(hidden_dim=64, inter_dim=96, n_heads=4, n_kv_heads=2, n_blocks=1)
    block, rotary = DecoderBlock(cfg).to(device), RotaryEmbedding(cfg.head_dim, cfg.rope_theta).to(device)
    text, prefix = [5, 3], [4, 0]
    positions = torch.tensor([4, 5, 6, 7, 8, 0, 1, 2], device=device)
    cu_text = torch.tensor([0, 5, 8], dtype=torch.int32, device=device)
    cu_prefix = torch.tensor([0, 4, 4], dtype=torch.int32, device=device)
    labels = torch.tensor([3, -100, 7, 1, 0, -100, 2, 9], device=device)

    def step(x, k_prefix, v_prefix, head):
        cos, sin = rotary(positions)
        y, _, _ = block(x, cos, sin, cu_text, max(text), k_prefix, v_prefix, cu_prefix, max(prefix))
        return ops.linear_cross_entropy(y, head, labels)

    inputs = [torch.randn(8, 64), torch.randn(4, 2, 16), torch.randn(4, 2, 16), torch.randn(50, 64)]
    return step, [t.to(device).requires_grad_() for t in inputs], block


def _compiled_matches_eager(device: str, backend: str, attention_op: str = "dualtower.prefix_attention_fwd") -> None:
    step, inputs, block = _tiny_block_step(device)
    params = [p for p in block.parameters() if p.requires_grad]
    expected = step(*inputs)
    expected_grads = torch.autograd.grad(expected, inputs + params)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(step, fullgraph=True, backend=counter)  # fullgraph: a graph break is an error
    loss = compiled(*inputs)
    grads = torch.autograd.grad(loss, inputs + params)
    assert counter.frame_count == 1
    code = counter.graphs[0].code
    assert attention_op in code and "dualtower.linear_cross_entropy_fwd" in code
    assert_close(loss, expected, atol=1e-5, rtol=1e-5, name="loss")
    for i, (a, e) in enumerate(zip(grads, expected_grads, strict=True)):
        assert_close(a, e, atol=1e-4, rtol=1e-4, name=f"grad {i}")


def test_compiled_block_no_graph_break_cpu() -> None:
    ops.set_backend("triton")
    _compiled_matches_eager("cpu", "aot_eager")


def test_compiled_block_no_graph_break_cpu_reference() -> None:
    """CPU's own backends: the reference attention (an opaque op under compile) and the chunked loss."""
    _compiled_matches_eager("cpu", "aot_eager", attention_op="dualtower.prefix_attention_reference")


@pytest.mark.gpu
def test_compiled_block_no_graph_break_gpu() -> None:
    ops.set_backend("triton")
    _compiled_matches_eager("cuda", "inductor")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "flash", "torch_varlen"])
def test_gpu_attention_backends_within_twice_pytorch(backend: str) -> None:
    if not ops.is_available(backend, "cuda"):
        pytest.skip(f"{backend} is not installed here")
    ops.set_backend(backend)
    text, prefix = random_packing(rows=1, row_tokens=4096, seed=7)
    batch = packed_attention(text, prefix, 9, 3, 64, device="cuda", pad_text=5, pad_prefix=3)
    grad_out = torch.randn_like(batch.q)

    def run(b, dtype, impl):
        b = b.cast(dtype)
        out = impl(*b.args)
        return out, *torch.autograd.grad(out, b.leaves, grad_out.to(dtype))

    expected = run(batch, torch.float64, prefix_attention_reference)
    with eager_low_precision():  # PyTorch's own bf16 attention
        theirs = run(batch, torch.bfloat16, prefix_attention_reference)
    ours = run(batch, torch.bfloat16, ops.prefix_attention)
    for name, a, t, e in zip(("out", "dq", "dk", "dv", "dkp", "dvp"), ours, theirs, expected, strict=True):
        assert_error_within(a, t, e, name=f"{backend} {name}")


def _autocast_model_and_batch():
    from model_helpers import random_batch

    from dualtower.model import DualTowerVLM
    from dualtower.model.config import VisionConfig, flavor

    cfg = flavor("debug")
    cfg.vision = VisionConfig(image_size=32, patch_size=8, hidden_dim=16, inter_dim=32, n_heads=2, n_blocks=1)
    cfg.lm = LMConfig(hidden_dim=48, inter_dim=64, n_heads=6, n_kv_heads=2, n_blocks=2, base_vocab_size=200)
    model = DualTowerVLM.from_config(cfg.validate())
    for param in model.unused_parameters():
        param.requires_grad_(False)
    # An image document, a text-only one (the left tower's causal pass over an empty prefix) and a 1-token text.
    return model, random_batch(model, [(1, 2, 7), (0, 0, 5), (1, 0, 1)], torch.Generator().manual_seed(5))


def _loss_and_grads(model, batch, backend: str, autocast: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    ops.set_backend(backend)
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model.loss_sum(batch)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]


@pytest.mark.parametrize("backend", ["triton", "chunked"])
def test_training_step_under_bf16_autocast(backend: str) -> None:
    """Single-device training runs under bf16 autocast with fp32 weights: the ops get bf16 activations next to
    fp32 weights and fp32 empty prefixes. Ours must run and be as close to the fp32 truth as the reference
    backend under the same autocast: twice its error (the FlashAttention convention) plus two bf16 units of
    roundoff (2^-7), since the kernels round attention probabilities and their gradients to bf16 before the
    matmuls, as FlashAttention does and the CPU reference does not."""
    model, batch = _autocast_model_and_batch()
    true_loss, true_grads = _loss_and_grads(model, batch, "reference", autocast=False)
    ref_loss, ref_grads = _loss_and_grads(model, batch, "reference", autocast=True)
    loss, grads = _loss_and_grads(model, batch, backend, autocast=True)
    assert loss.dtype == torch.float32
    assert (loss - true_loss).abs() <= 2 * (ref_loss - true_loss).abs() + 1e-3 * true_loss.abs()
    assert len(grads) == len(true_grads)
    for ours, ref, truth in zip(grads, ref_grads, true_grads, strict=True):
        scale = truth.abs().max().clamp_min(1e-12)
        ours_err, ref_err = ((ours - truth).abs().max() / scale), ((ref - truth).abs().max() / scale)
        assert ours_err <= 2 * ref_err + 2**-7, (ours_err.item(), ref_err.item())


def test_autocast_casts_keyword_tensors_and_leaves_fp64_alone() -> None:
    hidden, weight, labels = torch.randn(6, 16), torch.randn(30, 16), torch.tensor([1, -100, 3, 29, 0, -100])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        by_keyword = ops.linear_cross_entropy(hidden=hidden, weight=weight, labels=labels)
        x, proj = torch.randn(2, 16, 8, dtype=torch.float64), torch.randn(10, 32, dtype=torch.float64)
        projected = ops.pixel_shuffle_project(x, proj, 2)
    expected = linear_cross_entropy_reference(hidden.bfloat16(), weight.bfloat16(), labels)
    torch.testing.assert_close(by_keyword, expected, rtol=1e-5, atol=1e-5)
    assert projected.dtype == torch.float64  # autocast leaves fp64 matmuls alone


def test_triton_runs_on_the_cpu_only_under_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    """The interpreter emulates Triton on host memory: it makes the CPU available, never MPS or meta tensors."""
    monkeypatch.setattr(ops, "INTERPRET", True)
    assert ops.is_available("triton", "cpu")
    assert not ops.is_available("triton", "meta")
    assert not ops.is_available("triton", "mps")
    monkeypatch.setattr(ops, "INTERPRET", False)
    assert not ops.is_available("triton", "cpu")
    assert ops.available_backends("decode_attention", "cpu") == [ops.REFERENCE]


@pytest.mark.parametrize("op", OPS)
def test_check_backends_checks_every_op(op: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ops, "INTERPRET", False)  # no Triton on this CPU
    ops.check_backends("cpu")  # automatic choices always run
    ops.set_backend("triton", op=op)
    with pytest.raises(RuntimeError, match=f"'triton' is not available for {op} on cpu"):
        ops.check_backends("cpu")


@pytest.mark.parametrize("backend", ["chunked", "reference", "triton"])
def test_linear_cross_entropy_passes_its_ignore_index_to_every_backend(backend: str) -> None:
    ops.set_backend(backend, op="linear_cross_entropy")
    hidden, weight = torch.randn(5, 16), torch.randn(30, 16)
    labels = torch.tensor([3, -1, 29, -1, 0])
    loss = ops.linear_cross_entropy(hidden, weight, labels, ignore_index=-1)
    logits = hidden @ weight.t()
    expected = torch.nn.functional.cross_entropy(logits[[0, 2, 4]], labels[[0, 2, 4]], reduction="sum")
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
