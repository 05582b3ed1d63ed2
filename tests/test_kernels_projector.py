"""Fused pixel-shuffle projector vs its pure-PyTorch twin: output, dX (unshuffled layout) and dW."""

from __future__ import annotations

import pytest
import torch

from dualtower_kernels.projector import (
    pixel_shuffle_project,
    pixel_shuffle_project_bwd,
    pixel_shuffle_project_op,
    pixel_shuffle_project_reference,
)
from dualtower_kernels.testing import assert_close, assert_error_within, other_layout

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")

# (tiles, patches per side, ViT width, factor, output width)
CPU_CASES = {
    "even_width": (3, 4, 16, 2, 20),  # width a multiple of the K tile: contiguous gathers
    "odd_width_factor3": (2, 6, 24, 3, 17),  # width not a multiple of the K tile: per-element gathers
    "one_tile": (1, 4, 8, 2, 5),
    "many_blocks": (5, 8, 16, 2, 40),  # several M and N blocks of the interpreter's 16 x 16 tiles in each grid
}


def _run(impl, x, weight, factor, grad_out=None):
    out = impl(x, weight, factor)
    grad_out = torch.randn_like(out) if grad_out is None else grad_out
    wanted = [t for t in (x, weight) if t.requires_grad]
    return out, *torch.autograd.grad(out, wanted, grad_out)


@pytest.mark.parametrize("case", list(CPU_CASES), ids=list(CPU_CASES))
def test_matches_reference(case: str) -> None:
    tiles, side, width, factor, out_width = CPU_CASES[case]
    x = torch.randn(tiles, side * side, width, requires_grad=True)
    weight = torch.randn(out_width, width * factor * factor, requires_grad=True)
    grad_out = torch.randn(tiles, side * side // factor**2, out_width)
    ours = _run(pixel_shuffle_project, x, weight, factor, grad_out)
    expected = _run(pixel_shuffle_project_reference, x, weight, factor, grad_out)
    for name, a, e in zip(("out", "dx", "dw"), ours, expected, strict=True):
        assert_close(a, e, atol=1e-5, rtol=1e-5, name=name)


def test_frozen_weight() -> None:
    x = torch.randn(2, 16, 16, requires_grad=True)
    weight = torch.randn(12, 64)
    grad_out = torch.randn(2, 4, 12)
    ours = _run(pixel_shuffle_project, x, weight, 2, grad_out)
    expected = _run(pixel_shuffle_project_reference, x, weight, 2, grad_out)
    for name, a, e in zip(("out", "dx"), ours, expected, strict=True):
        assert_close(a, e, atol=1e-5, rtol=1e-5, name=name)


def test_rejects_bad_grid() -> None:
    with pytest.raises(ValueError, match="square patch grid"):
        pixel_shuffle_project(torch.randn(1, 15, 8), torch.randn(4, 32), 2)


@pytest.mark.parametrize("layout", [lambda t: t, other_layout], ids=["contiguous", "strided"])
def test_opcheck(layout) -> None:
    x = layout(torch.randn(2, 16, 16, requires_grad=True))
    weight = layout(torch.randn(12, 64, requires_grad=True))
    torch.library.opcheck(pixel_shuffle_project_op, (x, weight, 2))
    bwd_args = (torch.randn(2, 4, 12), x.detach(), weight.detach(), 2, True, True)
    torch.library.opcheck(pixel_shuffle_project_bwd, bwd_args)


@pytest.mark.gpu
@pytest.mark.parametrize("out_width", [576, 960], ids=["135m", "360m"])
def test_gpu_bf16_within_twice_pytorch(out_width: int) -> None:
    """SigLIP2-B/16-512 tiles (32 x 32 patches of width 768), factor 4, into the LM width."""
    x = torch.randn(34, 1024, 768, device="cuda")
    weight = torch.randn(out_width, 768 * 16, device="cuda") / 768**0.5 / 4
    grad_out = torch.randn(34, 64, out_width, device="cuda")
    leaves = lambda dtype: [t.to(dtype).requires_grad_() for t in (x, weight)]
    expected = _run(pixel_shuffle_project_reference, *leaves(torch.float64), 4, grad_out.double())
    theirs = _run(pixel_shuffle_project_reference, *leaves(torch.bfloat16), 4, grad_out.bfloat16())
    ours = _run(pixel_shuffle_project, *leaves(torch.bfloat16), 4, grad_out.bfloat16())
    for name, a, t, e in zip(("out", "dx", "dw"), ours, theirs, expected, strict=True):
        assert_error_within(a, t, e, name=name)


def test_no_tiles_gives_zero_gradients() -> None:
    """N = 0: no kernel runs, so dW must be allocated zeroed, whatever the allocator hands back."""
    x = torch.randn(0, 16, 8, requires_grad=True)
    weight = torch.randn(6, 32, requires_grad=True)
    out = pixel_shuffle_project(x, weight, 2)
    assert out.shape == (0, 4, 6)
    out.sum().backward()
    assert torch.equal(weight.grad, torch.zeros(6, 32)) and x.grad.shape == (0, 16, 8)
    big = torch.randn(64, 1024)  # 256 KiB: the allocator's recycled blocks are not zeroed for us
    for _ in range(4):
        garbage = torch.full_like(big, 7.0)
        del garbage
        _, dw = pixel_shuffle_project_bwd(torch.zeros(0, 4, 64), torch.zeros(0, 16, 256), big, 2, False, True)
        assert torch.equal(dw, torch.zeros_like(big))
