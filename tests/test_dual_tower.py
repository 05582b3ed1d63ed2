"""The dual-tower forward equals the original algorithm (dense masks, right tower over everything)."""

from __future__ import annotations

import pytest
import torch
from model_helpers import original_text_hidden, random_batch

from dualtower.model import DualTowerVLM
from dualtower.model.config import LMConfig, ModelConfig, VisionConfig, flavor
from dualtower.model.language import RotaryEmbedding


def tiny_config(n_heads: int = 6, n_kv_heads: int = 2, n_blocks: int = 2) -> ModelConfig:
    cfg = flavor("debug")
    cfg.vision = VisionConfig(image_size=32, patch_size=8, hidden_dim=16, inter_dim=32, n_heads=2, n_blocks=1)
    # A 200-token base vocabulary keeps the embedding gradients cheap.
    cfg.lm = LMConfig(
        hidden_dim=8 * n_heads, inter_dim=64, n_heads=n_heads, n_kv_heads=n_kv_heads, n_blocks=n_blocks,
        base_vocab_size=200,
    )
    return cfg.validate()


def _build(cfg: ModelConfig) -> DualTowerVLM:
    return DualTowerVLM.from_config(cfg).double()


LAYOUTS = [
    [(1, 3, 5)],  # one document
    [(0, 0, 7)],  # no image: plain causal LM
    [(2, 3, 1), (0, 0, 4), (1, 0, 9)],  # one-token text, empty prefix, no extra prefix tokens
    [(1, 2, 3), (3, 1, 2), (1, 4, 6), (0, 0, 1)],  # four documents
]


def _outputs_and_grads(model: DualTowerVLM, batch, weights, fn):
    out = fn(model, batch)
    grads = torch.autograd.grad((out * weights.to(out.dtype)).sum(), list(model.parameters()), allow_unused=True)
    return out, grads


def _ours(model, batch):
    return model(batch)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda d: f"{len(d)}docs")
@pytest.mark.parametrize("heads", [(6, 2), (5, 5), (6, 1)], ids=["gqa3", "mha", "mqa"])
def test_forward_and_gradients_match_original_algorithm(layout, heads, dtype) -> None:
    torch.manual_seed(len(layout) * 10 + heads[1])
    model = DualTowerVLM.from_config(tiny_config(*heads)).to(dtype)
    with torch.no_grad():  # norm weights start at ones and biases at zeros: a swapped norm would not show
        for param in model.parameters():
            if param.ndim == 1:
                param.add_(0.2 * torch.randn_like(param))
    batch = random_batch(model, layout, torch.Generator().manual_seed(len(layout)))
    batch.pixel_values = batch.pixel_values.to(dtype)
    weights = torch.randn(batch.text_ids.numel(), model.cfg.lm.hidden_dim, dtype=torch.float64)

    ours, ours_grads = _outputs_and_grads(model, batch, weights, _ours)
    oracle, oracle_grads = _outputs_and_grads(model, batch, weights, original_text_hidden)
    assert ours.shape == (batch.text_ids.numel(), model.cfg.lm.hidden_dim)
    names = [n for n, _ in model.named_parameters()]

    if dtype == torch.float64:  # the two algorithms are the same computation
        torch.testing.assert_close(ours, oracle, atol=1e-10, rtol=0)
        for name, g_ours, g_oracle in zip(names, ours_grads, oracle_grads, strict=True):
            if g_oracle is None:
                assert g_ours is None or g_ours.abs().max() == 0, name
            else:
                torch.testing.assert_close(g_ours, g_oracle, atol=1e-10, rtol=0, msg=lambda m, n=name: f"{n}: {m}")
        return

    torch.testing.assert_close(ours, oracle, atol=1e-5, rtol=0)
    # fp32 gradients sum over every token that uses a weight; judge ours against the fp64 truth, allowing
    # twice the oracle's own fp32 rounding error plus 1e-5 (the FlashAttention test convention).
    model64 = model.double()
    batch.pixel_values = batch.pixel_values.double()
    _, true_grads = _outputs_and_grads(model64, batch, weights, original_text_hidden)
    for name, g_ours, g_oracle, g_true in zip(names, ours_grads, oracle_grads, true_grads, strict=True):
        if g_true is None:
            continue
        ours_err = (g_ours.double() - g_true).abs().max().item()
        oracle_err = (g_oracle.double() - g_true).abs().max().item()
        assert ours_err <= 2 * oracle_err + 1e-5, f"{name}: ours {ours_err:.2e}, oracle fp32 {oracle_err:.2e}"


def test_gradients_reach_the_left_tower_through_prefix_kv() -> None:
    model = _build(tiny_config())
    batch = random_batch(model, [(1, 2, 5)], torch.Generator().manual_seed(0))
    batch.pixel_values = batch.pixel_values.double()
    model.loss_sum(batch).backward()
    assert model.projector.proj.weight.grad.abs().sum() > 0
    assert model.left_decoder.blocks[0].attn.k_proj.weight.grad.abs().sum() > 0
    for param in model.unused_parameters():
        assert param.grad is None


def test_loss_sum_is_the_sum_of_supervised_token_losses() -> None:
    model = _build(tiny_config())
    batch = random_batch(model, [(1, 2, 6), (0, 0, 5)], torch.Generator().manual_seed(1))
    batch.pixel_values = batch.pixel_values.double()
    logits = model.logits(model(batch))
    expected = torch.nn.functional.cross_entropy(logits, batch.labels, reduction="sum")
    torch.testing.assert_close(model.loss_sum(batch), expected, atol=1e-10, rtol=1e-10)


def test_vanilla_equals_one_causal_lm_over_the_whole_sequence() -> None:
    cfg = tiny_config()
    cfg.architecture = "vanilla"
    model = _build(cfg)
    batch = random_batch(model, [(1, 2, 4), (0, 0, 3), (2, 0, 2)], torch.Generator().manual_seed(2))
    batch.pixel_values = batch.pixel_values.double()
    ours = model(batch)
    # One causal pass per document over [prefix; text] with the same LM.
    lm = model.left_decoder
    embeds = model.prefix_embeddings(batch)
    cu_p, cu_t = batch.cu_prefix.tolist(), batch.cu_text.tolist()
    expected = []
    for doc in range(len(cu_t) - 1):
        text = lm.token_embedding(batch.text_ids[cu_t[doc] : cu_t[doc + 1]])
        x = torch.cat([embeds[cu_p[doc] : cu_p[doc + 1]], text])
        cu = torch.tensor([0, x.shape[0]], dtype=torch.int32)
        hidden = lm(x, torch.arange(x.shape[0]), cu, x.shape[0])
        expected.append(hidden[cu_p[doc + 1] - cu_p[doc] :])
    torch.testing.assert_close(ours, torch.cat(expected), atol=1e-10, rtol=0)


@pytest.mark.parametrize(("name", "expected"), [("135m", 362_616_960), ("360m", 821_998_464)])
def test_flavor_parameter_counts_on_meta(name: str, expected: int) -> None:
    model = DualTowerVLM.from_flavor(name, device="meta")
    assert model.num_parameters() == expected
    assert next(model.parameters()).is_meta


@pytest.mark.parametrize("convert", ["to_bfloat16", "half", "meta_to_empty"])
def test_rope_angles_keep_full_precision_through_module_conversions(convert: str) -> None:
    """bf16 would round positions above 256 and every frequency (radians of error at 4096): Module.to, half()
    and deferred init must all leave fp32 angles that match an independent fp64 computation."""
    head_dim, theta, positions = 64, 100000.0, torch.arange(4096)
    with torch.device("meta" if convert == "meta_to_empty" else "cpu"):
        rotary = RotaryEmbedding(head_dim, theta)
    if convert == "meta_to_empty":
        rotary.to_empty(device="cpu")
    else:
        rotary = rotary.to(torch.bfloat16) if convert == "to_bfloat16" else rotary.half()
    cos, sin = rotary(positions)
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim
    angles = positions.double()[:, None] * theta**-exponents
    angles = torch.cat([angles, angles], dim=-1)
    assert cos.dtype == sin.dtype == torch.float32
    # fp32 rounds an angle near 4096 rad to 2.4e-4; bf16 angles are off by whole radians.
    torch.testing.assert_close(cos.double(), angles.cos(), rtol=0, atol=2e-3)
    torch.testing.assert_close(sin.double(), angles.sin(), rtol=0, atol=2e-3)


def test_bfloat16_model_keeps_fp32_rope_buffers() -> None:
    model = DualTowerVLM.from_flavor("debug").to(torch.bfloat16)
    assert {name: buffer.dtype for name, buffer in model.named_buffers()} == {
        "left_decoder.rotary.inv_freq": torch.float32,
        "right_decoder.rotary.inv_freq": torch.float32,
    }


def test_text_only_batch_with_blank_tile_gives_every_parameter_a_gradient() -> None:
    """encode_blank_tile_without_images: the same output, and a gradient (zeros for the vision side) for every
    parameter the forward can use, as sharded training needs on a rank whose micro-batch has no image."""
    model = _build(tiny_config())
    batch = random_batch(model, [(0, 0, 5), (0, 0, 3)], torch.Generator().manual_seed(3))
    batch.pixel_values = batch.pixel_values.double()
    skipped = model(batch)
    model.encode_blank_tile_without_images = True
    with_blank = model(batch)
    torch.testing.assert_close(with_blank, skipped, rtol=0, atol=0)
    model.loss_sum(batch).backward()
    unused = {id(p) for p in model.unused_parameters()}
    missing = [name for name, p in model.named_parameters() if id(p) not in unused and p.grad is None]
    assert missing == []
    assert model.vision_encoder.patch_embedding.conv.weight.grad.abs().max() == 0


def test_tile_features_without_their_placeholders_are_an_error() -> None:
    model = _build(tiny_config())
    batch = random_batch(model, [(1, 2, 5)], torch.Generator().manual_seed(4))
    batch.pixel_values = batch.pixel_values.double()
    batch.image_token_index = batch.image_token_index[:0]  # the features would have nowhere to go
    with pytest.raises(IndexError, match="Number of indices"):
        model(batch)


def test_every_vit_layer_norm_uses_the_configured_eps() -> None:
    cfg = tiny_config()
    cfg.vision.ln_eps = 1e-3
    vit = DualTowerVLM.from_config(cfg.validate()).vision_encoder
    norms = [module for module in vit.modules() if isinstance(module, torch.nn.LayerNorm)]
    assert len(norms) == 2 * cfg.vision.n_blocks + 1  # ln1 and ln2 per block, and the final layer_norm
    assert [norm.eps for norm in norms] == [1e-3] * len(norms)


def test_bfloat16_model_takes_fp32_pixel_values() -> None:
    """The collator yields fp32 pixels; a bf16 model casts them itself (the same loss as pre-cast pixels)."""
    model = DualTowerVLM.from_config(tiny_config()).to(torch.bfloat16)
    batch = random_batch(model, [(1, 2, 5), (2, 0, 4)], torch.Generator().manual_seed(5))
    assert batch.pixel_values.dtype == torch.float32
    with torch.no_grad():
        loss = model.loss_sum(batch)
        batch.pixel_values = batch.pixel_values.bfloat16()
        expected = model.loss_sum(batch)
    assert loss.isfinite() and loss > 0
    assert torch.equal(loss, expected)
