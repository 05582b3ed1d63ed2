"""Work the model promises to skip really is skipped, not computed and thrown away.

- The left tower needs only its last layer's K/V: that layer's query / output projections, its MLP and the
  final norm must never run (the results would equal a full pass whose extra output is discarded).
- The linear cross-entropy never allocates the (tokens x vocab) logits: every tensor any aten op produces,
  inside the custom op included, is recorded and must stay smaller than the fp32 logits would be.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from model_helpers import random_batch
from test_dual_tower import tiny_config
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import dualtower_kernels.linear_cross_entropy as lce
from dualtower.model import DualTowerVLM

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")

# -- the left tower's last layer ---------------------------------------------------------------------------


def _watched(decoder: nn.Module, prefix: str) -> dict[str, nn.Module]:
    modules = {f"{prefix}.norm": decoder.norm}
    for i, block in enumerate(decoder.blocks):
        for name in ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.out_proj", "norm2", "mlp"):
            modules[f"{prefix}.blocks.{i}.{name}"] = block.get_submodule(name)
    return modules


def _count_calls(modules: dict[str, nn.Module]) -> tuple[Counter, list]:
    calls: Counter = Counter()
    handles = [
        module.register_forward_hook(lambda *_, name=name: calls.update([name])) for name, module in modules.items()
    ]
    return calls, handles


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_left_tower_skips_last_layer_beyond_kv(grad: bool) -> None:
    # Three blocks: "earlier blocks run in full" then covers more than one block.
    model = DualTowerVLM.from_config(tiny_config(n_heads=4, n_blocks=3))
    batch = random_batch(model, [(1, 3, 5), (0, 0, 4), (2, 1, 3)], torch.Generator().manual_seed(0))
    assert batch.pixel_values.shape[0] > 0  # the images go through the left tower too
    left, right = model.left_decoder, model.right_decoder
    last = len(left.blocks) - 1
    calls, handles = _count_calls(_watched(left, "left") | _watched(right, "right"))
    try:
        with torch.set_grad_enabled(grad):
            hidden = model(batch)
            if grad:
                hidden.sum().backward()
    finally:
        for handle in handles:
            handle.remove()
    assert hidden.shape == (batch.text_ids.numel(), model.cfg.lm.hidden_dim)

    skipped = [f"left.blocks.{last}.{n}" for n in ("attn.q_proj", "attn.out_proj", "norm2", "mlp")] + ["left.norm"]
    assert {name: calls[name] for name in skipped} == dict.fromkeys(skipped, 0)
    # The last layer still gives its K/V; every earlier left block and every right block runs in full, once.
    assert calls[f"left.blocks.{last}.attn.k_proj"] == calls[f"left.blocks.{last}.attn.v_proj"] == 1
    ran = [n for n in _watched(left, "left") if n not in skipped] + list(_watched(right, "right"))
    assert {name: calls[name] for name in ran} == dict.fromkeys(ran, 1)


# -- the linear cross-entropy's logits ---------------------------------------------------------------------

TOKENS, WIDTH, VOCAB, CHUNK_ROWS = 128, 32, 512, 16


class _ProducedSizes(TorchDispatchMode):
    """Records the size in bytes of every tensor an op returns, descending into custom ops' implementations.

    Bytes, not elements: the Triton interpreter moves each argument through a uint8 view of its storage.

    A dispatch mode is switched off while its handler runs, so a custom op (dualtower::...) would otherwise be
    one opaque call: its CPU kernel is called directly (past the Python dispatch key, which would come back
    here) under a fresh recorder sharing the same list, so the aten ops of its body are recorded.
    """

    def __init__(self, sizes: list[tuple[str, int]] | None = None):
        super().__init__()
        self.sizes = [] if sizes is None else sizes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace not in ("aten", "prims"):
            with _ProducedSizes(self.sizes):
                out = func.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CPU), *args, **(kwargs or {}))
        else:
            out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, tuple | list) else (out,):
            if isinstance(tensor, torch.Tensor):
                self.sizes.append((str(func), tensor.nbytes))
        return out


def _produced_sizes(impl) -> list[tuple[str, int]]:
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(TOKENS, WIDTH, generator=generator).requires_grad_()
    weight = (torch.randn(VOCAB, WIDTH, generator=generator) / WIDTH**0.5).requires_grad_()
    labels = torch.randint(0, VOCAB, (TOKENS,), generator=generator)  # every row supervised: no rows dropped
    with _ProducedSizes() as recorder:
        loss = impl(hidden, weight, labels)
        loss.backward()
    assert torch.isfinite(loss) and hidden.grad is not None and weight.grad is not None
    return recorder.sizes


@pytest.mark.parametrize("impl", [lce.linear_cross_entropy, lce.linear_cross_entropy_chunked],
                         ids=["triton_rows", "torch_rows"])
def test_linear_cross_entropy_never_builds_full_logits(impl, monkeypatch: pytest.MonkeyPatch) -> None:
    # The default sizing path, with a budget of CHUNK_ROWS fp32 rows: full logits are TOKENS / CHUNK_ROWS chunks.
    monkeypatch.setattr(lce, "LOGITS_CHUNK_BYTES", CHUNK_ROWS * VOCAB * 4)
    sizes = _produced_sizes(impl)
    largest = max(sizes, key=lambda entry: entry[1])
    assert largest[1] < TOKENS * VOCAB * 4, f"{largest[0]} produced {largest[1]} bytes: the full logits"
    # The recorder does see inside the custom op: the (R, V) logits chunks were produced there.
    assert any(n == CHUNK_ROWS * VOCAB * 4 for _, n in sizes), "no logits chunk recorded"


def test_full_logits_detector_catches_the_reference() -> None:
    """The same check on the twin, which does materialize the logits, must trip."""
    sizes = _produced_sizes(lce.linear_cross_entropy_reference)
    assert max(n for _, n in sizes) >= TOKENS * VOCAB * 4
