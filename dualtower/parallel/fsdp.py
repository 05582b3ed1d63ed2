"""FSDP2 (`fully_shard`): the vision tower as one unit, each LM block as a unit, then the root.

One all-gather for the whole (small) vision tower beats one per block; LM blocks are sharded one by one so
only one block's full weights live at a time. Gradients are SUMMED across ranks (divide factor 1) because the
trainer already divides each rank's loss by the global supervised-token count of the optimizer step.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method


def apply_fsdp(
    model: nn.Module,
    mesh: DeviceMesh,
    param_dtype: torch.dtype | None,
    reduce_dtype: torch.dtype | None,
    reshard_after_forward: bool = True,
) -> None:
    # Decoder blocks return their K/V as views; nothing writes to them in place, so FSDP's warning is moot.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    kwargs = {"mesh": mesh, "mp_policy": policy, "reshard_after_forward": reshard_after_forward}
    # Each unit all-gathers its weights in its own forward, so every rank must call the vision tower, even on a
    # micro-batch without images (data.allow_text_only): the model then encodes one blank tile.
    model.encode_blank_tile_without_images = True
    fully_shard(model.vision_encoder, **kwargs)
    for decoder in (model.left_decoder, model.right_decoder):
        if decoder is None:
            continue
        for block in decoder.blocks:
            fully_shard(block, **kwargs)
            # The left tower's last block runs only its K/V projections through this method.
            register_fsdp_forward_method(block, "kv_only")
    # The root (projector, embeddings, norms, tied head) stays unsharded after forward: loss_sum() reads the
    # head weight after forward() returns, and backward needs it again right away.
    fully_shard(model, **{**kwargs, "reshard_after_forward": False})
    register_fsdp_forward_method(model, "loss_sum")
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            # A plain SUM (Gloo has no PREMUL_SUM; with factor 1 there is nothing to pre-multiply anyway).
            module.set_force_sum_reduction_for_comms(True)


def set_gradient_sync(model: nn.Module, enabled: bool) -> None:
    """Skip the reduce-scatter on all but the last micro-batch of an optimizer step."""
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(enabled)
