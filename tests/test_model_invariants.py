"""Model invariants that the oracle comparisons cannot see, found by a mutation audit of dualtower/model and the
attention twins: the initialization contract of reference_spec.md (it matters for deferred init, where the
parameters start as uninitialized memory), and the argument handling of the op wrappers."""

from __future__ import annotations

import pytest
import torch
from model_helpers import random_batch
from test_dual_tower import tiny_config
from test_ops import _VarlenRecorder
from torch import nn

from dualtower import ops
from dualtower.model import DualTowerVLM
from dualtower.model.config import ConfigError, LMConfig, ModelConfig, VisionConfig, flavor
from dualtower.model.language import RMSNorm
from dualtower_kernels.prefix_attention_reference import prefix_attention_reference
from dualtower_kernels.testing import assert_close, packed_attention


def _init_config() -> ModelConfig:
    """Small, but every matrix has thousands of entries so that a sample std is within a few percent."""
    cfg = flavor("debug")
    cfg.vision = VisionConfig(image_size=64, patch_size=8, hidden_dim=64, inter_dim=128, n_heads=2, n_blocks=1)
    cfg.lm = LMConfig(hidden_dim=96, inter_dim=160, n_heads=6, n_kv_heads=2, n_blocks=2, base_vocab_size=300)
    return cfg.validate()


def _model_from_garbage() -> DualTowerVLM:
    """A model whose every parameter holds a sentinel before init_weights(), as after meta -> to_empty(): any
    parameter init_weights() forgets keeps the sentinel instead of PyTorch's constructor default."""
    torch.manual_seed(0)
    model = DualTowerVLM.from_config(_init_config())
    with torch.no_grad():
        for param in model.parameters():
            param.fill_(7.0)
    model.init_weights()
    return model


def test_init_weights_sets_every_parameter_as_the_spec_says() -> None:
    """reference_spec.md: ViT Linear/Conv normal(0, 0.02) with zero bias, LayerNorm ones/zeros, positions uniform
    [0, 1); projector normal(0, 0.02); LM Linear/Embedding normal(0, 0.02), RMSNorm ones."""
    model = _model_from_garbage()
    seen: set[int] = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.LayerNorm):
            assert torch.equal(module.weight, torch.ones_like(module.weight)), name
            assert torch.equal(module.bias, torch.zeros_like(module.bias)), name
        elif isinstance(module, RMSNorm):
            assert torch.equal(module.weight, torch.ones_like(module.weight)), name
        elif isinstance(module, nn.Linear | nn.Conv2d | nn.Embedding):
            weight = module.weight
            # 0.02 within 10%: a std of 0.01 or 0.2 is a different model, a sentinel left over is far off.
            assert abs(weight.std().item() - 0.02) < 0.002, (name, weight.std().item())
            assert abs(weight.mean().item()) < 0.002, (name, weight.mean().item())
            if getattr(module, "bias", None) is not None:
                assert torch.equal(module.bias, torch.zeros_like(module.bias)), name
        else:
            continue
        seen.update(id(p) for p in module.parameters(recurse=False))
    positions = model.vision_encoder.patch_embedding.position_embedding
    seen.add(id(positions))
    assert positions.min() >= 0 and positions.max() < 1
    # uniform [0, 1): mean 1/2, std 1/sqrt(12) ~ 0.289; normal(0, 0.02) or a sentinel is nowhere near.
    assert abs(positions.mean().item() - 0.5) < 0.05 and abs(positions.std().item() - 0.289) < 0.03
    assert [name for name, p in model.named_parameters() if id(p) not in seen] == []


def test_init_weights_keeps_the_head_tied_to_the_embedding() -> None:
    """The head shares the embedding's storage after init too (a second normal draw would untie their values)."""
    model = _model_from_garbage()
    for decoder in (model.left_decoder, model.right_decoder):
        assert decoder is not None
        assert decoder.head.weight is decoder.token_embedding.weight


def test_torch_varlen_glue_on_a_varlen_attn_without_scale_or_gqa(monkeypatch: pytest.MonkeyPatch) -> None:
    """An older varlen_attn (torch 2.10: is_causal, no scale, no enable_gqa) takes the fallbacks: K/V heads
    repeated for their query groups (interleaved: query head h reads K/V head h // group, never h % Hkv) and
    the scale folded into q (varlen_attn then applies its own 1/sqrt(D)). The installed torch has both keywords,
    so nothing else runs these lines; 2 K/V heads of 3 query heads each tell the head orders apart."""
    monkeypatch.setattr(ops, "_VARLEN_PARAMS", frozenset({"is_causal"}))
    recorder = _VarlenRecorder()
    monkeypatch.setattr("torch.nn.attention.varlen.varlen_attn", recorder)
    torch.manual_seed(0)
    batch = packed_attention([3, 1, 5], [4, 0, 2], 6, 2, 12, pad_text=2, pad_prefix=1, requires_grad=False)
    ours = ops._library_prefix_attention(ops.torch_varlen_attention, *batch.args, 0.3)
    assert_close(ours, prefix_attention_reference(*batch.args, scale=0.3), atol=1e-5, rtol=1e-5, name="out")
    [call] = recorder.calls
    assert call["is_causal"] is True and call["enable_gqa"] is False


@pytest.mark.parametrize("mixed", ["autocast", "bf16_vision_side"])
def test_image_features_in_another_dtype_than_the_embeddings_still_match_fp32(mixed: str) -> None:
    """The image features and the left tower's token embeddings can differ in dtype: under bf16 autocast (single
    device training: the projector yields bf16, the embedding stays fp32) or with the vision tower and projector
    kept in bf16 beside an fp32 LM. Placing the features must convert them (index_copy outside autocast refuses
    mixed dtypes), and the result is the fp32 forward to bf16 precision."""
    torch.manual_seed(0)
    model = DualTowerVLM.from_config(tiny_config())
    batch = random_batch(model, [(1, 2, 4), (0, 0, 3), (2, 0, 2)], torch.Generator().manual_seed(5))
    expected = model(batch)
    if mixed == "autocast":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = model(batch)
    else:
        model.vision_encoder.to(torch.bfloat16)
        model.projector.to(torch.bfloat16)
        got = model(batch)
    assert got.shape == expected.shape and torch.isfinite(got).all()
    # bf16 keeps 8 bits of mantissa: a few percent of the hidden states' scale, after two layers.
    assert (got.float() - expected).abs().max() < 0.05 * expected.abs().max()


def test_rms_norm_of_bf16_activations_takes_its_statistics_in_fp32() -> None:
    """A bf16 model keeps bf16 activations, but the mean of squares, rsqrt and scaling run in fp32 and are rounded
    once: almost every element is then the exact fp64 result rounded to bf16. In bf16 arithmetic each step rounds
    (about 2^-9 relative), and a large share of the elements land one bf16 step away."""
    torch.manual_seed(0)
    norm = RMSNorm(384, eps=1e-5).to(torch.bfloat16)
    x = (torch.randn(64, 384) * 3 + 0.5).to(torch.bfloat16)
    got = norm(x)
    x64 = x.double()
    truth = (x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-5)).to(torch.bfloat16)
    assert got.dtype == torch.bfloat16
    mismatched = (got != truth).double().mean().item()
    assert mismatched < 0.01, mismatched


@pytest.mark.parametrize("section", ["vision", "lm"])
def test_every_zero_size_is_a_config_error_that_names_the_field(section: str) -> None:
    """A zero size must be refused by name before any size is divided by it (a ZeroDivisionError from
    `n_heads % n_kv_heads` would say nothing about the config)."""
    names = ["image_size", "patch_size", "hidden_dim", "inter_dim", "n_heads", "n_blocks"]
    if section == "lm":
        names = ["hidden_dim", "inter_dim", "n_heads", "n_kv_heads", "n_blocks", "base_vocab_size"]
    for name in names:
        cfg = flavor("debug")
        setattr(getattr(cfg, section), name, 0)
        with pytest.raises(ConfigError, match=f"{section}.{name} must be positive"):
            cfg.validate()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"n_heads": 6, "n_kv_heads": 4, "hidden_dim": 96}, "lm.n_heads must be a multiple of n_kv_heads"),
        ({"n_heads": 4, "n_kv_heads": 2, "hidden_dim": 36}, "lm head_dim must be even for RoPE"),
    ],
    ids=["gqa_groups_uneven", "odd_head_dim"],
)
def test_lm_shapes_the_attention_cannot_run_are_config_errors(change: dict[str, int], message: str) -> None:
    """A GQA ratio that is not whole, or an odd head dim (rotate-half RoPE splits each head in two), must be
    refused when the config is validated, not deep inside the first forward."""
    cfg = flavor("debug")
    for name, value in change.items():
        setattr(cfg.lm, name, value)
    with pytest.raises(ConfigError, match=message):
        cfg.validate()


def test_a_shuffle_factor_that_does_not_divide_the_patch_grid_is_a_config_error() -> None:
    """8x8 patches cannot be shuffled in 3x3 blocks: validate() says so, rather than the projector at run time."""
    cfg = flavor("debug")
    cfg.image.pixel_shuffle_factor = 3
    with pytest.raises(ConfigError, match=r"divisible by image\.pixel_shuffle_factor"):
        cfg.validate()
