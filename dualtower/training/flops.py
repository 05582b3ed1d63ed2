"""Model FLOPs of a training step and MFU (model FLOPs utilization).

MFU = (model FLOPs the step requires) / (step time x number of devices x peak bf16 dense FLOP/s of the device).

FLOPs required by each tower, over the tokens that tower actually processes:
    vision     ViT over tiles x patches (patch-embedding conv + block matmuls)
    projector  one matmul per image token (tiles x tokens_per_tile)
    left LM    the prefix tokens; every block but the last in full, the last only its K/V projections
    right LM   the text tokens; every block, plus the tied head over the supervised tokens only
               (vanilla architecture: the single LM plays both roles)

Matmul FLOPs per token, for a tower with P_t trainable and P_f frozen matmul weights (embedding lookups and
norms excluded; the tied head counts as a matmul):
    forward                 2 (P_t + P_f)
    weight gradients        2 P_t
    input gradients         2 (P_t + P_f) if gradients flow through the tower, i.e. it or any tower upstream
                            of it (vision -> projector -> left LM -> right LM) trains
So a trainable tower costs 6 P, a frozen tower that gradients must cross (the default right LM, which passes
gradients to the left tower's K/V) 4 P, and a frozen tower with nothing trainable upstream (the default
frozen ViT) 2 P: forward only. The first layer of a tower never needs its input gradient when nothing upstream
trains; that overcount (2 P of one layer) is ignored, except for the projector: it is one layer, so its input
gradient counts only when the vision tower trains.

Attention FLOPs: 4 x head_dim x heads per (query, visible key) pair in the forward pass (Q K^T and P V), and
3 times that when gradients flow through the tower (the backward pass costs twice the forward; a
flash-attention recompute is not counted). Only the visible pairs are counted: causal prefixes P(P+1)/2 per
document and layer, text queries P + j + 1 keys each, the ViT S^2 per tile and layer. (torchtitan counts
the full square; this counts the work the model requires, so the number is the same whichever kernel runs.)

Peak bf16 dense FLOP/s (torchtitan's table): H100 SXM 989e12, H100 NVL 835e12, H100 PCIe 756e12, H200 989e12,
H200 NVL 835e12, GH200 989e12, A100 312e12, B200 2.25e15, GB200 2.5e15. A model is matched as a whole word of
the device name (an "RTX A1000" is no A100). On other devices, MIG slices and CPUs MFU is reported as null.
"""

from __future__ import annotations

import logging
import re

import torch
from torch import nn

from dualtower.batch import PackedBatch

logger = logging.getLogger(__name__)

# Ordered: the first model found in the device name wins (variants before their base model).
PEAK_BF16_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),
    ("H200 NVL", 835e12),
    ("H200", 989e12),
    ("GH200", 989e12),  # the Hopper GPU of a Grace Hopper superchip runs at an H100 SXM's peak
    ("A100", 312e12),
    ("GB200", 2.5e15),
    ("B200", 2.25e15),
)


def _names_model(device_name: str, model: str) -> bool:
    """`model` as whole words of `device_name`: "A100-SXM4-80GB" names an A100, "RTX A1000" does not."""
    return re.search(rf"(?<![A-Za-z0-9]){re.escape(model)}(?![A-Za-z0-9])", device_name) is not None


def peak_flops(device: torch.device) -> float | None:
    """Peak bf16 dense FLOP/s of a CUDA device, or None (unknown GPU, CPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    if " MIG " in f" {name} ":  # a slice of the card: its share of the peak is not known from the name
        logger.warning("MIG device %r: MFU is reported as null", name)
        return None
    for model, value in PEAK_BF16_FLOPS:
        if _names_model(name, model):
            return value
    logger.warning("unknown peak FLOP/s for %r: MFU is reported as null", name)
    return None


def _matmul_weights(modules: list[nn.Module]) -> tuple[int, int]:
    """(trainable, frozen) element counts of Linear / Conv2d weights in `modules`."""
    trainable = frozen = 0
    for module in modules:
        for sub in module.modules():
            if isinstance(sub, nn.Linear | nn.Conv2d):
                if sub.weight.requires_grad:
                    trainable += sub.weight.numel()
                else:
                    frozen += sub.weight.numel()
    return trainable, frozen


def _per_token(trainable: int, frozen: int, grads_flow: bool) -> int:
    return 2 * (trainable + frozen) + 2 * trainable + (2 * (trainable + frozen) if grads_flow else 0)


def _trains(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


class FlopCounter:
    """Per-batch model FLOPs from the batch's host-side metadata (call before moving the batch)."""

    def __init__(self, model: nn.Module):
        cfg = model.cfg
        left, text = model.left_decoder, model.text_decoder
        vision_trains, projector_trains = _trains(model.vision_encoder), _trains(model.projector)
        left_trains, text_trains = _trains(left), _trains(text)
        self.vision_flow = vision_trains
        self.projector_flow = self.vision_flow or projector_trains
        self.left_flow = self.projector_flow or left_trains
        self.text_flow = self.left_flow or text_trains

        last = left.blocks[-1]
        vision_t, vision_f = _matmul_weights([model.vision_encoder])
        projector_t, projector_f = _matmul_weights([model.projector])
        left_t, left_f = _matmul_weights([*left.blocks[:-1], last.attn.k_proj, last.attn.v_proj])
        text_t, text_f = _matmul_weights(list(text.blocks))
        head_trains = text.head.weight.requires_grad
        head = text.head.weight.numel()
        self.vision_per_patch = _per_token(vision_t, vision_f, self.vision_flow)
        # One layer: its input gradient is needed only where the vision tower upstream trains.
        self.projector_per_token = _per_token(projector_t, projector_f, self.vision_flow)
        self.left_per_token = _per_token(left_t, left_f, self.left_flow)
        self.text_per_token = _per_token(text_t, text_f, self.text_flow)
        self.head_per_token = _per_token(head if head_trains else 0, 0 if head_trains else head, self.text_flow)

        self.patches = cfg.vision.patches_per_side**2
        self.tokens_per_tile = cfg.image_tokens_per_tile
        self.vit_pair = 4 * cfg.vision.hidden_dim * cfg.vision.n_blocks * (3 if self.vision_flow else 1)
        lm_width = 4 * cfg.lm.n_heads * cfg.lm.head_dim
        self.left_pair = lm_width * (cfg.lm.n_blocks - 1) * (3 if self.left_flow else 1)
        self.text_pair = lm_width * cfg.lm.n_blocks * (3 if self.text_flow else 1)

    def batch_flops(self, batch: PackedBatch) -> float:
        tiles = int(batch.pixel_values.shape[0])
        prefix_lens = torch.diff(batch.cu_prefix.cpu().long()).tolist()
        text_lens = torch.diff(batch.cu_text.cpu().long()).tolist()
        n_prefix, n_text = sum(prefix_lens), sum(text_lens)
        prefix_pairs = sum(p * (p + 1) // 2 for p in prefix_lens)
        text_pairs = sum(t * p + t * (t + 1) // 2 for p, t in zip(prefix_lens, text_lens, strict=True))
        flops = tiles * (self.patches * self.vision_per_patch + self.patches**2 * self.vit_pair)
        flops += tiles * self.tokens_per_tile * self.projector_per_token
        flops += n_prefix * self.left_per_token + prefix_pairs * self.left_pair
        flops += n_text * self.text_per_token + text_pairs * self.text_pair
        flops += batch.num_supervised * self.head_per_token
        return float(flops)
