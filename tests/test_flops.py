"""The FLOP counter against an independent formula, written out from the config's dimensions.

Per token a matmul weight costs 2 (forward), +2 if it trains (weight gradient), +2 if gradients flow through
its tower (input gradient). Attention costs 4 x heads x head_dim per visible (query, key) pair and layer,
times 3 when gradients flow. See dualtower/training/flops.py for the model.
"""

from __future__ import annotations

import pytest
import torch
from model_helpers import random_batch

from dualtower.model import DualTowerVLM
from dualtower.model.config import LMConfig, ModelConfig, VisionConfig, flavor
from dualtower.training import FlopCounter
from dualtower.training.flops import peak_flops

# One tile, no extra prefix tokens: P = 1 global token + 4 image tokens; then a document of 2 tiles + 1 token.
DOCS = [(1, 0, 3), (2, 1, 4)]
PREFIX_LENS, TEXT_LENS = [5, 11], [3, 4]


def tiny_config() -> ModelConfig:
    cfg = flavor("debug")
    cfg.vision = VisionConfig(image_size=32, patch_size=8, hidden_dim=16, inter_dim=32, n_heads=2, n_blocks=2)
    cfg.lm = LMConfig(hidden_dim=32, inter_dim=64, n_heads=4, n_kv_heads=2, n_blocks=3, base_vocab_size=200)
    return cfg.validate()


def _cost(weights: int, trains: bool, flows: bool) -> int:
    return weights * (2 + (2 if trains else 0) + (2 if flows else 0))


def expected_flops(cfg: ModelConfig, num_supervised: int, trains: dict[str, bool]) -> int:
    """trains: vision / projector / left / right (the right LM with its tied head)."""
    v, lm = cfg.vision, cfg.lm
    patches = (v.image_size // v.patch_size) ** 2
    vit_block = 4 * v.hidden_dim**2 + 2 * v.hidden_dim * v.inter_dim  # qkv, out, fc1, fc2
    vit_weights = 3 * v.patch_size**2 * v.hidden_dim + v.n_blocks * vit_block  # + the patch conv
    projector_weights = lm.hidden_dim * v.hidden_dim * cfg.image.pixel_shuffle_factor**2
    q_o = 2 * lm.hidden_dim * lm.n_heads * lm.head_dim
    k_v = 2 * lm.hidden_dim * lm.n_kv_heads * lm.head_dim
    block = q_o + k_v + 3 * lm.hidden_dim * lm.inter_dim
    left_weights = (lm.n_blocks - 1) * block + k_v  # the last left block only feeds its K/V to the right tower
    right_weights, head_weights = lm.n_blocks * block, lm.vocab_size * lm.hidden_dim

    vision_flow = trains["vision"]
    projector_flow = vision_flow or trains["projector"]
    left_flow = projector_flow or trains["left"]
    right_flow = left_flow or trains["right"]
    pair = 4 * lm.n_heads * lm.head_dim

    tiles = sum(d[0] for d in DOCS)
    flops = tiles * patches * _cost(vit_weights, trains["vision"], vision_flow)
    flops += tiles * patches**2 * 4 * v.hidden_dim * v.n_blocks * (3 if vision_flow else 1)
    # The projector is one layer: its input gradient is needed only for a training vision tower.
    flops += tiles * cfg.image_tokens_per_tile * _cost(projector_weights, trains["projector"], vision_flow)
    flops += sum(PREFIX_LENS) * _cost(left_weights, trains["left"], left_flow)
    prefix_pairs = sum(p * (p + 1) // 2 for p in PREFIX_LENS)
    flops += prefix_pairs * pair * (lm.n_blocks - 1) * (3 if left_flow else 1)
    flops += sum(TEXT_LENS) * _cost(right_weights, trains["right"], right_flow)
    text_pairs = sum(t * p + t * (t + 1) // 2 for p, t in zip(PREFIX_LENS, TEXT_LENS, strict=True))
    flops += text_pairs * pair * lm.n_blocks * (3 if right_flow else 1)
    flops += num_supervised * _cost(head_weights, trains["right"], right_flow)
    return flops


CASES = {
    "default": {"vision": False, "projector": True, "left": True, "right": False},
    "projector_only": {"vision": False, "projector": True, "left": False, "right": False},
    "everything": {"vision": True, "projector": True, "left": True, "right": True},
    "right_only": {"vision": False, "projector": False, "left": False, "right": True},
}


@pytest.mark.parametrize("case", list(CASES))
def test_flop_counter_equals_the_formula(case: str) -> None:
    trains = CASES[case]
    model = DualTowerVLM.from_config(tiny_config())
    for part, module in [("vision", model.vision_encoder), ("projector", model.projector),
                         ("left", model.left_decoder), ("right", model.right_decoder)]:  # fmt: skip
        module.requires_grad_(trains[part])
    for param in model.unused_parameters():
        param.requires_grad_(False)
    batch = random_batch(model, DOCS, torch.Generator().manual_seed(0))
    assert torch.diff(batch.cu_prefix).tolist() == PREFIX_LENS and torch.diff(batch.cu_text).tolist() == TEXT_LENS
    counter = FlopCounter(model)
    # Gradients reach the left tower whenever anything upstream of it (here the projector) trains.
    assert counter.left_flow == (case != "right_only")
    assert counter.batch_flops(batch) == float(expected_flops(model.cfg, batch.num_supervised, trains))


@pytest.mark.parametrize("vision_trains", [False, True])
def test_projector_flops_equal_what_autograd_runs(vision_trains: bool) -> None:
    """torch's own FLOP counter over the projector's forward and backward, with its input needing a gradient
    only when the vision tower (upstream) trains."""
    from torch.utils.flop_counter import FlopCounterMode

    model = DualTowerVLM.from_config(tiny_config())
    model.vision_encoder.requires_grad_(vision_trains)
    cfg = model.cfg
    tiles = 3
    features = torch.randn(tiles, cfg.vision.patches_per_side**2, cfg.vision.hidden_dim, requires_grad=vision_trains)
    with FlopCounterMode(display=False) as measured:
        model.projector(features).sum().backward()
    counted = tiles * cfg.image_tokens_per_tile * FlopCounter(model).projector_per_token
    assert counted == measured.get_total_flops()


@pytest.mark.parametrize(
    ("name", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", 989e12),  # SXM
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H100 NVL", 835e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA H200 NVL", 835e12),
        ("NVIDIA GH200 480GB", 989e12),  # the Hopper GPU of a Grace Hopper superchip: an H100 SXM's peak
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA A100 80GB PCIe", 312e12),
        ("NVIDIA B200", 2.25e15),
        ("NVIDIA GB200", 2.5e15),
        ("NVIDIA RTX A1000 6GB Laptop GPU", None),  # not an A100: a name only containing "A100" must not match
        ("NVIDIA H20", None),
        ("NVIDIA H100 80GB HBM3 MIG 3g.40gb", None),
        ("NVIDIA GeForce RTX 4090", None),
    ],
)
def test_peak_flops_of_the_detected_gpu(monkeypatch: pytest.MonkeyPatch, name: str, peak: float | None) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert peak_flops(torch.device("cuda", 0)) == peak
    assert peak_flops(torch.device("cpu")) is None
