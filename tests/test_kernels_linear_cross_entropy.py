"""Linear cross-entropy, the Triton row pass and the PyTorch one (the CPU path), vs the pure-PyTorch twin: loss,
d_hidden, d_weight; never the full logits."""

from __future__ import annotations

import pytest
import torch

from dualtower_kernels.linear_cross_entropy import (
    _ce_rows_torch,
    _ce_rows_triton,
    linear_cross_entropy,
    linear_cross_entropy_chunked,
    linear_cross_entropy_fwd,
    linear_cross_entropy_reference,
)
from dualtower_kernels.testing import assert_close, assert_error_within, other_layout

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")
IGNORE = -100
FAST_PATHS = pytest.mark.parametrize(
    "impl", [linear_cross_entropy, linear_cross_entropy_chunked], ids=["triton_rows", "torch_rows"]
)


def _problem(tokens: int, width: int, vocab: int, device="cpu", dtype=torch.float32, supervised_every: int = 3):
    hidden = torch.randn(tokens, width, device=device).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, width, device=device) / width**0.5).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab, (tokens,), device=device)
    labels[::supervised_every] = IGNORE
    return hidden, weight, labels


def _loss_and_grads(impl, hidden, weight, labels, **kwargs):
    loss = impl(hidden, weight, labels, IGNORE, **kwargs)
    wanted = [t for t in (hidden, weight) if t.requires_grad]
    # A scale other than 1 checks that the backward multiplies by the incoming gradient.
    return loss, *torch.autograd.grad(loss * 0.37, wanted)


@FAST_PATHS
@pytest.mark.parametrize("chunk_rows", [0, 7, 1], ids=["one_chunk", "chunks_of_7", "chunks_of_1"])
def test_matches_reference(impl, chunk_rows: int) -> None:
    hidden, weight, labels = _problem(37, 24, 150)
    ours = _loss_and_grads(impl, hidden, weight, labels, chunk_rows=chunk_rows)
    expected = _loss_and_grads(linear_cross_entropy_reference, hidden, weight, labels)
    for name, a, e in zip(("loss", "d_hidden", "d_weight"), ours, expected, strict=True):
        assert_close(a, e, atol=1e-5, rtol=1e-5, name=name)


@FAST_PATHS
def test_frozen_weight_and_no_grad(impl) -> None:
    """A frozen head (the right tower's default) skips d_weight; no_grad skips both gradients."""
    hidden, weight, labels = _problem(11, 16, 70)
    weight.requires_grad_(False)
    ours = _loss_and_grads(impl, hidden, weight, labels)
    expected = _loss_and_grads(linear_cross_entropy_reference, hidden, weight, labels)
    for name, a, e in zip(("loss", "d_hidden"), ours, expected, strict=True):
        assert_close(a, e, atol=1e-5, rtol=1e-5, name=name)
    with torch.no_grad():
        assert_close(impl(hidden, weight, labels), expected[0], atol=1e-5, rtol=1e-5, name="loss")


@FAST_PATHS
def test_nothing_supervised(impl) -> None:
    hidden, weight, labels = _problem(5, 16, 40)
    labels.fill_(IGNORE)
    loss, d_hidden, d_weight = _loss_and_grads(impl, hidden, weight, labels)
    assert loss.item() == 0.0 and not d_hidden.any() and not d_weight.any()


def test_torch_rows_bf16_logits_within_twice_pytorch() -> None:
    """16-bit logits: the PyTorch row pass works on an fp32 copy and writes dlogits back into the chunk."""
    hidden, weight, labels = _problem(41, 32, 300)
    leaves = lambda dtype: [t.detach().to(dtype).requires_grad_() for t in (hidden, weight)]
    expected = _loss_and_grads(linear_cross_entropy_reference, *leaves(torch.float64), labels)
    theirs = _loss_and_grads(linear_cross_entropy_reference, *leaves(torch.bfloat16), labels)
    ours = _loss_and_grads(linear_cross_entropy_chunked, *leaves(torch.bfloat16), labels, chunk_rows=9)
    assert_error_within(ours[0], theirs[0], expected[0], atol=1e-4 * expected[0].abs().item(), name="loss")
    for name, a, t, e in zip(("d_hidden", "d_weight"), ours[1:], theirs[1:], expected[1:], strict=True):
        assert_error_within(a, t, e, name=name)


@pytest.mark.parametrize("layout", [lambda t: t, other_layout], ids=["contiguous", "strided"])
@pytest.mark.parametrize("triton_rows", [True, False], ids=["triton_rows", "torch_rows"])
def test_opcheck(triton_rows: bool, layout) -> None:
    hidden, weight, labels = (layout(t) for t in _problem(9, 16, 40))
    torch.library.opcheck(linear_cross_entropy_fwd, (hidden, weight, labels, IGNORE, True, True, 4, triton_rows))


@pytest.mark.gpu
@pytest.mark.parametrize("width", [576, 960], ids=["135m", "360m"])
def test_gpu_bf16_within_twice_pytorch(width: int) -> None:
    hidden, weight, labels = _problem(8192, width, 49218, device="cuda", supervised_every=2)
    leaves = lambda dtype: [t.detach().to(dtype).requires_grad_() for t in (hidden, weight)]
    expected = _loss_and_grads(linear_cross_entropy_reference, *leaves(torch.float64), labels)
    theirs = _loss_and_grads(linear_cross_entropy_reference, *leaves(torch.bfloat16), labels)
    ours = _loss_and_grads(linear_cross_entropy, *leaves(torch.bfloat16), labels)
    # The summed loss is one number: allow 1e-4 of it (bf16 itself resolves 4e-3) besides twice PyTorch's error.
    assert_error_within(ours[0], theirs[0], expected[0], atol=1e-4 * expected[0].abs().item(), name="loss")
    for name, a, t, e in zip(("d_hidden", "d_weight"), ours[1:], theirs[1:], expected[1:], strict=True):
        assert_error_within(a, t, e, name=name)


@pytest.mark.gpu
def test_gpu_peak_memory_quarter_of_eager() -> None:
    hidden, weight, labels = _problem(8192, 576, 49218, device="cuda", dtype=torch.bfloat16, supervised_every=8)

    def peak(impl) -> int:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        _loss_and_grads(impl, hidden, weight, labels)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    eager, ours = peak(linear_cross_entropy_reference), peak(linear_cross_entropy)
    assert ours <= 0.25 * eager, f"peak {ours / 2**20:.0f} MiB vs eager {eager / 2**20:.0f} MiB"


def test_row_passes_agree_on_ignored_rows() -> None:
    """The two row passes on one chunk: same losses, same dlogits written in place, ignored rows zero."""
    logits = torch.randn(6, 50) * 4
    labels = torch.tensor([3, IGNORE, 49, 0, IGNORE, 17])
    log_probs, supervised = logits.log_softmax(1), (labels != IGNORE)[:, None]
    expected_grad = (log_probs.exp() - torch.nn.functional.one_hot(labels.clamp(min=0), 50)) * supervised
    for row_pass in (_ce_rows_triton, _ce_rows_torch):
        chunk = logits.clone()
        losses = row_pass(chunk, labels, IGNORE, True)
        expected = torch.where(labels != IGNORE, -log_probs.gather(1, labels.clamp(min=0)[:, None]).squeeze(1), 0.0)
        assert_close(losses, expected, atol=1e-5, rtol=1e-5, name=f"{row_pass.__name__} losses")
        assert_close(chunk, expected_grad, atol=1e-5, rtol=1e-5, name=f"{row_pass.__name__} dlogits")


@pytest.mark.parametrize("label", [10, 13, -5], ids=["vocab", "beyond", "negative"])
@pytest.mark.parametrize("triton_rows", [True, False], ids=["triton_rows", "torch_rows"])
def test_labels_outside_the_vocabulary_raise(label: int, triton_rows: bool) -> None:
    """Like F.cross_entropy; the Triton row pass would otherwise read a neighbouring row's logit."""
    hidden, weight = torch.randn(4, 8), torch.randn(10, 8)
    labels = torch.tensor([label, 2, 3, IGNORE])
    with pytest.raises(RuntimeError, match="ignore_index or in"):
        linear_cross_entropy_fwd(hidden, weight, labels, IGNORE, False, False, 4, triton_rows)
