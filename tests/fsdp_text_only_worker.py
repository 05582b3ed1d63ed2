"""Run by test_train_dist under torchrun (2 gloo ranks): rank 0's micro-batch has no image, rank 1's has.

FSDP2 all-gathers the vision tower inside its forward, so both ranks must call it; the summed sharded
gradients must equal one unsharded model's gradients over both batches. Exits non-zero on a mismatch (a
skipped vision tower aborts inside gloo instead).
"""

from __future__ import annotations

import copy

import torch
from model_helpers import random_batch

from dualtower.model import DualTowerVLM
from dualtower.model.config import LMConfig, VisionConfig, flavor
from dualtower.parallel import init_distributed, teardown
from dualtower.parallel.fsdp import apply_fsdp

LAYOUTS = ([(0, 0, 6), (0, 0, 5)], [(1, 2, 5), (0, 0, 3)])  # (tiles, extra prefix tokens, text) per document


def main() -> None:
    torch.set_num_threads(1)
    env = init_distributed("cpu")
    cfg = flavor("debug")
    cfg.vision = VisionConfig(image_size=32, patch_size=8, hidden_dim=16, inter_dim=32, n_heads=2, n_blocks=1)
    cfg.lm = LMConfig(hidden_dim=32, inter_dim=64, n_heads=4, n_kv_heads=2, n_blocks=2, base_vocab_size=200)
    torch.manual_seed(0)
    model = DualTowerVLM.from_config(cfg.validate())
    for param in model.unused_parameters():
        param.requires_grad_(False)
    reference = copy.deepcopy(model)
    batches = [random_batch(model, layout, torch.Generator().manual_seed(i)) for i, layout in enumerate(LAYOUTS)]

    apply_fsdp(model, env.mesh, param_dtype=None, reduce_dtype=None)
    model.loss_sum(batches[env.rank]).backward()
    sum(reference.loss_sum(batch) for batch in batches).backward()

    for (name, sharded), (_, full) in zip(model.named_parameters(), reference.named_parameters(), strict=True):
        if full.grad is None:
            assert sharded.grad is None, name
            continue
        torch.testing.assert_close(sharded.grad.full_tensor(), full.grad, rtol=1e-5, atol=1e-6, msg=name)
    assert reference.vision_encoder.patch_embedding.conv.weight.grad.abs().sum() > 0
    teardown()


if __name__ == "__main__":
    main()
