"""Edge cases of the dual-tower split, checked against computations independent of the model's forward code:
the left tower's per-layer K/V against a dense causal run, the right tower's document isolation, GQA ratios with
head dims that are not powers of two, frozen parameters, every CPU attention backend and the autocast rule."""

from __future__ import annotations

import ast
import itertools
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from model_helpers import _layer, image_features, original_text_hidden, random_batch
from test_dual_tower import tiny_config
from test_ops import _automatic_backends, _VarlenRecorder  # noqa: F401 (autouse: automatic backends per test)

from dualtower import ops
from dualtower.batch import IGNORE_INDEX
from dualtower.model import DualTowerVLM
from dualtower.model.config import LMConfig

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")

# (tiles, extra prefix tokens, text tokens) per document; every prefix ends on its last image placeholder.
LAYOUTS = {
    "text_only": [(0, 0, 6), (0, 0, 1)],
    "image_last_token": [(1, 0, 1)],  # the prefix is the image alone, the text one token
    "several_images": [(3, 2, 4), (2, 0, 3)],
    "mixed": [(1, 3, 5), (0, 0, 2), (2, 1, 1), (0, 0, 4)],
}


def _model(cfg=None, dtype=torch.float64) -> DualTowerVLM:
    """Norm weights and biases are initialized to ones / zeros, which would hide a norm used in the wrong place
    (norm1 for norm2) or a bias left out: move every 1-D parameter off its initial value."""
    model = DualTowerVLM.from_config(cfg or tiny_config()).to(dtype)
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 1:
                param.add_(0.2 * torch.randn_like(param))
    return model


def _batch(model: DualTowerVLM, docs, seed: int = 0, dtype=torch.float64):
    batch = random_batch(model, docs, torch.Generator().manual_seed(seed))
    batch.pixel_values = batch.pixel_values.to(dtype)
    return batch


def _dense_left_kv(model: DualTowerVLM, batch) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (k, v) of every prefix token, (Np, Hkv, D): each document alone, dense causal mask, the
    oracle's own ViT / projector / decoder math."""
    cfg, left = model.cfg.lm, model.left_decoder
    features = image_features(model, batch.pixel_values) if batch.pixel_values.numel() else None
    per_layer: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in left.blocks]
    cu, used = batch.cu_prefix.tolist(), 0
    for start, end in itertools.pairwise(cu):
        ids = batch.prefix_ids[start:end]
        x = left.token_embedding(ids).clone()
        is_image = ids == model.cfg.image_token_id
        n_image = int(is_image.sum())
        if n_image:
            x[is_image] = features[used : used + n_image]
            used += n_image
        causal = torch.ones(ids.numel(), ids.numel(), dtype=torch.bool).tril()
        for layer, block in enumerate(left.blocks):
            x, (k, v) = _layer(block, x, torch.arange(ids.numel()), causal, cfg)
            per_layer[layer].append((k.transpose(0, 1), v.transpose(0, 1)))  # (H, L, D) -> (L, H, D)
    return [(torch.cat([k for k, _ in kvs]), torch.cat([v for _, v in kvs])) for kvs in per_layer]


@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_left_tower_kv_of_every_layer_equals_a_dense_causal_run(layout) -> None:
    model = _model()
    batch = _batch(model, layout)
    ours = model.prefix_kv(batch)
    expected = _dense_left_kv(model, batch)
    assert len(ours) == len(expected) == model.cfg.lm.n_blocks
    for layer, ((k, v), (k_ref, v_ref)) in enumerate(zip(ours, expected, strict=True)):
        assert k.shape == k_ref.shape == (batch.prefix_ids.numel(), model.cfg.lm.n_kv_heads, model.cfg.lm.head_dim)
        torch.testing.assert_close(k, k_ref, atol=1e-12, rtol=0, msg=lambda m, i=layer: f"k, layer {i}: {m}")
        torch.testing.assert_close(v, v_ref, atol=1e-12, rtol=0, msg=lambda m, i=layer: f"v, layer {i}: {m}")


@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_forward_matches_the_original_algorithm_on_edge_layouts(layout) -> None:
    model = _model()
    batch = _batch(model, layout, seed=1)
    torch.testing.assert_close(model(batch), original_text_hidden(model, batch), atol=1e-10, rtol=0)


def test_a_document_whose_text_is_empty_changes_no_other_document() -> None:
    """A prefix with nothing after it (the image tokens end the document) still runs the left tower; its K/V
    must not reach the other documents."""
    model = _model()
    batch = _batch(model, [(1, 2, 3), (2, 0, 0), (1, 1, 2)], seed=2)
    assert batch.text_ids.numel() == 5
    torch.testing.assert_close(model(batch), original_text_hidden(model, batch), atol=1e-10, rtol=0)


def test_right_tower_reads_only_its_own_documents_prefix_kv() -> None:
    """Perturbing the prefix K/V rows of one document changes that document's text outputs and nothing else."""
    model = _model()
    batch = _batch(model, [(1, 2, 3), (0, 0, 2), (2, 1, 4), (1, 0, 1)], seed=3)
    kv = [(k.detach(), v.detach()) for k, v in model.prefix_kv(batch)]
    with torch.no_grad():
        base = model(batch, prefix_kv=kv)
        cu_p, cu_t = batch.cu_prefix.tolist(), batch.cu_text.tolist()
        for doc in range(batch.num_docs):
            if cu_p[doc] == cu_p[doc + 1]:
                continue
            rows = slice(cu_p[doc], cu_p[doc + 1])
            for which in (0, 1):  # K, then V, of one layer each
                layer = doc % model.cfg.lm.n_blocks
                changed = [list(pair) for pair in kv]
                changed[layer][which] = changed[layer][which].clone()
                changed[layer][which][rows] += 1.0
                out = model(batch, prefix_kv=[tuple(pair) for pair in changed])
                own = slice(cu_t[doc], cu_t[doc + 1])
                others = torch.ones(base.shape[0], dtype=torch.bool)
                others[own] = False
                assert torch.equal(out[others], base[others]), (doc, which)
                assert (out[own] - base[own]).abs().max() > 1e-6, (doc, which)


def test_text_rope_positions_continue_after_the_prefix() -> None:
    """The text of a document at positions P..P+T-1 is what the oracle computes; restarting them at 0 (or
    shifting them by one) is detectably different, so the comparison pins the positions."""
    model = _model()
    batch = _batch(model, [(1, 2, 4), (2, 0, 3)], seed=4)
    expected = original_text_hidden(model, batch)
    with torch.no_grad():
        torch.testing.assert_close(model(batch), expected, atol=1e-10, rtol=0)
        for shift in (-1, 1):
            batch.text_positions = batch.text_positions + shift
            assert (model(batch) - expected).abs().max() > 1e-6
            batch.text_positions = batch.text_positions - shift


def _gqa_config(n_heads: int, n_kv_heads: int, head_dim: int):
    cfg = tiny_config()
    cfg.lm = LMConfig(hidden_dim=head_dim * n_heads, inter_dim=40, n_heads=n_heads, n_kv_heads=n_kv_heads,
                      n_blocks=2, base_vocab_size=200)
    return cfg.validate()


@pytest.mark.parametrize(
    ("n_heads", "n_kv_heads", "head_dim"),
    [(3, 3, 6), (4, 2, 10), (6, 2, 6), (3, 1, 14)],
    ids=["mha_d6", "gqa2_d10", "gqa3_d6", "gqa3_d14"],
)
def test_gqa_ratios_and_head_dims_forward_and_every_gradient(n_heads: int, n_kv_heads: int, head_dim: int) -> None:
    model = _model(_gqa_config(n_heads, n_kv_heads, head_dim))
    batch = _batch(model, LAYOUTS["mixed"], seed=5)
    weights = torch.randn(batch.text_ids.numel(), model.cfg.lm.hidden_dim, dtype=torch.float64)
    names, params = zip(*model.named_parameters(), strict=True)
    results = []
    for fn in (lambda: model(batch), lambda: original_text_hidden(model, batch)):
        out = fn()
        results.append((out, torch.autograd.grad((out * weights).sum(), params, allow_unused=True)))
    (ours, ours_grads), (oracle, oracle_grads) = results
    torch.testing.assert_close(ours, oracle, atol=1e-10, rtol=0)
    for name, g, g_ref in zip(names, ours_grads, oracle_grads, strict=True):
        if g_ref is None:
            assert g is None or g.abs().max() == 0, name
        else:
            torch.testing.assert_close(g, g_ref, atol=1e-10, rtol=0, msg=lambda m, n=name: f"{n}: {m}")
    assert oracle_grads[names.index("projector.proj.weight")].abs().max() > 0


def test_frozen_parameters_get_no_gradient_and_the_rest_match_the_oracle() -> None:
    """The reference's default training: ViT and right tower frozen, projector and left LM learn."""
    model = _model()
    batch = _batch(model, LAYOUTS["mixed"], seed=6)
    frozen = {name for name, _ in model.named_parameters() if name.startswith(("vision_encoder.", "right_decoder."))}
    for name, param in model.named_parameters():
        param.requires_grad_(name not in frozen)
    model.loss_sum(batch).backward()

    logits = model.logits(original_text_hidden(model, batch))
    oracle_loss = F.cross_entropy(logits, batch.labels, ignore_index=IGNORE_INDEX, reduction="sum")
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    expected = torch.autograd.grad(oracle_loss, [p for _, p in trainable], allow_unused=True)
    unused = {id(p) for p in model.unused_parameters()}
    for name, param in model.named_parameters():
        if name in frozen or id(param) in unused:
            assert param.grad is None, name
    for (name, param), g_ref in zip(trainable, expected, strict=True):
        if id(param) in unused:
            assert g_ref is None, name
            continue
        assert param.grad is not None, name
        torch.testing.assert_close(param.grad, g_ref, atol=1e-10, rtol=0, msg=lambda m, n=name: f"{n}: {m}")
    assert model.projector.proj.weight.grad.abs().max() > 0
    assert model.left_decoder.blocks[-1].attn.k_proj.weight.grad.abs().max() > 0


def _loss_and_grads(model: DualTowerVLM, batch):
    model.zero_grad()
    loss = model.loss_sum(batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("docs", [[*LAYOUTS["mixed"], (2, 1, 0)], LAYOUTS["text_only"]], ids=["mixed", "text_only"])
@pytest.mark.parametrize("backend", ["triton", "torch_varlen"])
def test_every_cpu_attention_backend_gives_the_reference_model_outputs_and_gradients(
    backend: str, docs, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Triton kernels (interpreter) and the varlen library glue (its library stood in for by per-segment
    SDPA, bottom-right causal), through the whole model: text-only documents, one-token and empty texts, several
    images. The same parameters get a gradient whatever the backend: on a text-only micro-batch the left tower
    gets zeros, not None (sharded data parallelism reduces the same set of gradients on every rank)."""
    if backend == "torch_varlen":
        monkeypatch.setattr("torch.nn.attention.varlen.varlen_attn", _VarlenRecorder())
        real_available = ops.is_available
        monkeypatch.setattr(ops, "is_available", lambda b, d: b == backend or real_available(b, d))
    model = _model(_gqa_config(6, 2, 10), dtype=torch.float32)
    batch = _batch(model, docs, seed=7, dtype=torch.float32)
    ops.set_backend("reference", op="prefix_attention")
    ref_loss, ref_grads = _loss_and_grads(model, batch)
    ref_out = model(batch).detach()
    ops.set_backend(backend, op="prefix_attention")
    assert ops.selected_backend("prefix_attention", "cpu") == backend
    loss, grads = _loss_and_grads(model, batch)
    torch.testing.assert_close(model(batch).detach(), ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss, ref_loss, atol=1e-4, rtol=1e-5)
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize(
    ("backend", "device", "hint"),
    [("flash", "cpu", "CUDA"), ("torch_varlen", "cpu", "CUDA"), ("triton", "cpu", "TRITON_INTERPRET")],
)
def test_an_unavailable_backend_says_why(backend: str, device: str, hint: str, monkeypatch) -> None:
    monkeypatch.setattr(ops, "INTERPRET", False)
    ops.set_backend(backend)
    with pytest.raises(RuntimeError, match=f"'{backend}' is not available for prefix_attention on {device}") as err:
        ops.selected_backend("prefix_attention", device)
    assert hint in str(err.value)


@pytest.mark.parametrize(
    "op", ["prefix_attention", "decode_attention", "pixel_shuffle_project", "linear_cross_entropy"]
)
def test_auto_on_cuda_leaves_fp64_to_the_twins(op: str) -> None:
    """The kernels refuse fp64 (their accumulators are fp32): "auto" must not hand them an fp64 parity check."""
    assert ops.selected_backend(op, "cuda", torch.float32) == ops.selected_backend(op, "cuda") == ops.TRITON
    assert ops.selected_backend(op, "cuda", torch.bfloat16) == ops.TRITON
    assert ops.selected_backend(op, "cuda", torch.float64) == ops.selected_backend(op, "cpu")


def test_flash_without_flash_attn_on_cuda_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ops, "_FLASH_INSTALLED", False)
    ops.set_backend("flash")
    with pytest.raises(RuntimeError, match="flash-attn"):
        ops.selected_backend("prefix_attention", "cuda")


def test_ops_under_autocast_run_in_the_autocast_dtype_and_leave_fp64_and_offsets_alone() -> None:
    """ops.py: floating inputs cast as a matmul's would be (fp64 excepted), integer offsets untouched."""
    q, k, v = torch.randn(5, 4, 8), torch.randn(5, 2, 8), torch.randn(5, 2, 8)
    kp, vp = torch.randn(3, 2, 8), torch.randn(3, 2, 8)
    cu_t, cu_p = torch.tensor([0, 2, 5], dtype=torch.int32), torch.tensor([0, 3, 3], dtype=torch.int32)
    args = (cu_t, cu_p, 3, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = ops.prefix_attention(q.bfloat16(), k, v, kp, vp, *args)  # bf16 queries beside fp32 K/V
        wide = ops.prefix_attention(q.double(), k.double(), v.double(), kp.double(), vp.double(), *args)
    assert mixed.dtype == torch.bfloat16 and wide.dtype == torch.float64
    low = [t.bfloat16() for t in (q, k, v, kp, vp)]
    assert torch.equal(mixed, ops.prefix_attention(*low, *args))
    torch.testing.assert_close(wide, ops.prefix_attention(q.double(), k.double(), v.double(), kp.double(),
                                                          vp.double(), *args), atol=0, rtol=0)


def test_the_model_package_imports_neither_parallelism_nor_compile() -> None:
    """DESIGN.md section 10: dualtower/model is plain PyTorch; wrappers add FSDP and compile from outside."""
    package = Path(__file__).resolve().parents[1] / "dualtower" / "model"
    banned = ("torch.distributed", "torch._dynamo", "torch.compiler", "torch._inductor", "dualtower.parallel")
    found = []
    for path in sorted(package.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found += [(path.name, a.name) for a in node.names if a.name.startswith(banned)]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith(banned):
                found.append((path.name, node.module))
            elif isinstance(node, ast.Attribute) and ast.unparse(node).startswith(("torch.compile", *banned)):
                found.append((path.name, ast.unparse(node)))
    assert found == []
    assert len(list(package.glob("*.py"))) >= 5
