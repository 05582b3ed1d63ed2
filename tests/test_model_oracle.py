"""The model's test oracle and op overrides: the dual-tower oracle must not share the model's code (or a
comparison with it cannot fail), and per-op backend overrides mean what set_backend's docstring says."""

from __future__ import annotations

import math

import pytest
import torch
from model_helpers import original_text_hidden, random_batch
from test_dual_tower import tiny_config
from test_ops import _automatic_backends  # noqa: F401 (autouse: every test starts from the automatic choice)

from dualtower import ops
from dualtower.model import DualTowerVLM


def _model_and_batch():
    torch.manual_seed(0)
    model = DualTowerVLM.from_config(tiny_config()).double()
    batch = random_batch(model, [(1, 2, 3), (2, 0, 4)], torch.Generator().manual_seed(0))
    batch.pixel_values = batch.pixel_values.double()
    return model, batch


def _shuffle_with_dw_before_dh(x: torch.Tensor, weight: torch.Tensor, factor: int) -> torch.Tensor:
    """A plausible pixel-shuffle mistake: feature groups ordered (dw, dh) instead of (dh, dw)."""
    tiles, patches, width = x.shape
    out_side = math.isqrt(patches) // factor
    x = x.reshape(tiles, out_side, factor, out_side, factor, width).permute(0, 1, 3, 4, 2, 5)
    return x.reshape(tiles, out_side * out_side, factor * factor * width) @ weight.t()


def _vit_attention_made_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)


def test_oracle_catches_a_wrong_pixel_shuffle_order(monkeypatch: pytest.MonkeyPatch) -> None:
    model, batch = _model_and_batch()
    torch.testing.assert_close(model(batch), original_text_hidden(model, batch), atol=1e-10, rtol=0)
    monkeypatch.setitem(ops._IMPLEMENTATIONS["pixel_shuffle_project"], ops.REFERENCE, _shuffle_with_dw_before_dh)
    assert (model(batch) - original_text_hidden(model, batch)).abs().max() > 1e-3


def test_oracle_catches_a_wrong_vision_tower(monkeypatch: pytest.MonkeyPatch) -> None:
    model, batch = _model_and_batch()
    monkeypatch.setattr(ops, "dense_attention", _vit_attention_made_causal)
    assert (model(batch) - original_text_hidden(model, batch)).abs().max() > 1e-6


def test_per_op_override_to_a_backend_the_op_lacks_is_an_error() -> None:
    """Globally, a forced backend applies to the ops that implement it; asked for by name for one op, a backend
    that op does not have must not silently become the automatic choice."""
    with pytest.raises(ValueError, match="linear_cross_entropy has no 'flash' backend"):
        ops.set_backend("flash", op="linear_cross_entropy")
    with pytest.raises(ValueError, match="prefix_attention has no 'chunked' backend"):
        ops.set_backend("chunked", op="prefix_attention")
    assert ops.selected_backend("prefix_attention", "cpu") == ops.REFERENCE


def test_per_op_auto_is_the_automatic_choice_whatever_the_global_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """set_backend's docstring: "auto" is the automatic choice, and an op-level choice beats the global one and
    DUALTOWER_BACKEND; None only clears the op-level choice."""
    monkeypatch.setenv("DUALTOWER_BACKEND", "reference")
    ops.set_backend("auto", op="linear_cross_entropy")
    assert ops.selected_backend("linear_cross_entropy", "cpu") == ops.CHUNKED
    ops.set_backend("reference")
    assert ops.selected_backend("linear_cross_entropy", "cpu") == ops.CHUNKED
    ops.set_backend(None, op="linear_cross_entropy")
    assert ops.selected_backend("linear_cross_entropy", "cpu") == ops.REFERENCE


@pytest.mark.parametrize(
    ("section", "values", "field"),
    [
        ("lm", {"n_heads": 0}, "lm.n_heads"),
        ("lm", {"n_kv_heads": 0}, "lm.n_kv_heads"),
        ("lm", {"n_blocks": 0}, "lm.n_blocks"),
        ("lm", {"hidden_dim": -8, "n_heads": 2, "n_kv_heads": 1}, "lm.hidden_dim"),
        ("lm", {"rms_eps": -1.0}, "lm.rms_eps"),
        ("lm", {"rope_theta": 0.0}, "lm.rope_theta"),
        ("vision", {"patch_size": 0}, "vision.patch_size"),
        ("vision", {"n_heads": 0}, "vision.n_heads"),
        ("vision", {"n_blocks": 0}, "vision.n_blocks"),
    ],
)
def test_config_rejects_non_positive_sizes_by_name(section: str, values: dict, field: str) -> None:
    """A corrupt config.json must fail validation naming the field, not with a ZeroDivisionError or later,
    deep inside the model (zero LM blocks leave the left tower without a last layer)."""
    from dualtower.model.config import ConfigError, ModelConfig

    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        ModelConfig.from_dict({section: values})
