"""Typed model configuration and the named flavors (`debug`, `135m`, `360m`)."""

from __future__ import annotations

import copy
import typing
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from typing import Any

BASE_VOCAB_SIZE = 49152
IMAGE_TOKEN = "<|image|>"
GLOBAL_IMAGE_TOKEN = "<|global_image|>"
MAX_GRID_SIDE = 8  # row/col tags exist for grids up to 8x8


def extra_tokens() -> list[str]:
    """The 66 tokens appended to SmolLM2's vocabulary, in id order (49152 .. 49217)."""
    tags = [f"<row_{r}_col_{c}>" for r in range(1, MAX_GRID_SIDE + 1) for c in range(1, MAX_GRID_SIDE + 1)]
    return [IMAGE_TOKEN, GLOBAL_IMAGE_TOKEN, *tags]


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range."""


@dataclass
class VisionConfig:
    image_size: int = 512
    patch_size: int = 16
    hidden_dim: int = 768
    inter_dim: int = 3072
    n_heads: int = 12
    n_blocks: int = 12
    ln_eps: float = 1e-6
    hub_id: str = "google/siglip2-base-patch16-512"

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    def validate(self) -> None:
        sizes = ("image_size", "patch_size", "hidden_dim", "inter_dim", "n_heads", "n_blocks")
        _require_positive(self, "vision", sizes)
        _require(self.ln_eps >= 0, "vision.ln_eps must be >= 0")
        _require(self.image_size % self.patch_size == 0, "vision.image_size must be a multiple of patch_size")
        _require(self.hidden_dim % self.n_heads == 0, "vision.hidden_dim must be a multiple of n_heads")


@dataclass
class LMConfig:
    hidden_dim: int = 576
    inter_dim: int = 1536
    n_heads: int = 9
    n_kv_heads: int = 3
    n_blocks: int = 30
    rms_eps: float = 1e-5
    rope_theta: float = 100000.0
    max_position_embeddings: int = 8192
    base_vocab_size: int = BASE_VOCAB_SIZE
    extra_token_amount: int = 66
    hub_id: str = "HuggingFaceTB/SmolLM2-135M-Instruct"

    @property
    def head_dim(self) -> int:
        return self.hidden_dim // self.n_heads

    @property
    def vocab_size(self) -> int:
        return self.base_vocab_size + self.extra_token_amount

    def validate(self) -> None:
        sizes = ("hidden_dim", "inter_dim", "n_heads", "n_kv_heads", "n_blocks", "base_vocab_size", "rope_theta")
        _require_positive(self, "lm", sizes)
        _require(self.rms_eps >= 0, "lm.rms_eps must be >= 0")
        _require(self.hidden_dim % self.n_heads == 0, "lm.hidden_dim must be a multiple of n_heads")
        _require(self.n_heads % self.n_kv_heads == 0, "lm.n_heads must be a multiple of n_kv_heads")
        _require(self.head_dim % 2 == 0, "lm head_dim must be even for RoPE")
        _require(self.extra_token_amount == len(extra_tokens()), "lm.extra_token_amount must be 66")


@dataclass
class ImageConfig:
    """How images become tiles; part of the model because checkpoints depend on it."""

    pixel_shuffle_factor: int = 4
    max_img_size: int = 2048  # longest side cap (pixels)
    resize_to_max_side_len: bool = True  # always resize the long side to max_img_size
    # The original feeds [0, 1] pixels (no normalization); keep that so its checkpoints keep working.
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)

    def validate(self) -> None:
        _require(self.pixel_shuffle_factor >= 1, "image.pixel_shuffle_factor must be >= 1")
        _require(all(s > 0 for s in self.std), "image.std must be positive")


@dataclass
class ModelConfig:
    architecture: str = "dual_tower"  # "dual_tower" or "vanilla" (single tower over the whole sequence)
    vision: VisionConfig = field(default_factory=VisionConfig)
    lm: LMConfig = field(default_factory=LMConfig)
    image: ImageConfig = field(default_factory=ImageConfig)
    tokenizer_id: str = "HuggingFaceTB/SmolLM2-135M-Instruct"

    @property
    def tile_size(self) -> int:
        return self.vision.image_size

    @property
    def image_tokens_per_tile(self) -> int:
        return (self.vision.patches_per_side // self.image.pixel_shuffle_factor) ** 2

    @property
    def image_token_id(self) -> int:
        return self.lm.base_vocab_size

    @property
    def global_image_token_id(self) -> int:
        return self.lm.base_vocab_size + 1

    def validate(self) -> ModelConfig:
        _require(self.architecture in ("dual_tower", "vanilla"), f"unknown architecture {self.architecture!r}")
        self.vision.validate()
        self.lm.validate()
        self.image.validate()
        _require(
            self.vision.patches_per_side % self.image.pixel_shuffle_factor == 0,
            "vision patches per side must be divisible by image.pixel_shuffle_factor",
        )
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        return _build(cls, data, "model").validate()


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _require_positive(section: Any, where: str, names: tuple[str, ...]) -> None:
    """Checked before any size is divided by another: a zero would raise ZeroDivisionError, not name the field."""
    for name in names:
        _require(getattr(section, name) > 0, f"{where}.{name} must be positive, got {getattr(section, name)!r}")


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    """Build a (nested) dataclass from a dict; unknown keys and values of the wrong type are errors that name
    them (a config.json with `"n_heads": "4"` would otherwise fail later, deep inside the model)."""
    from dualtower.typed_fields import coerce  # it imports this module

    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"unknown key(s) in [{where}]: {', '.join(unknown)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        default = known[name].default_factory() if callable(known[name].default_factory) else None
        if is_dataclass(default) and isinstance(value, dict):
            kwargs[name] = _build(type(default), value, f"{where}.{name}")
        else:
            kwargs[name] = coerce(value, hints[name], f"{where}.{name}")
    return cls(**kwargs)


SMOLLM2_135M = LMConfig()
SMOLLM2_360M = LMConfig(
    hidden_dim=960, inter_dim=2560, n_heads=15, n_kv_heads=5, n_blocks=32, hub_id="HuggingFaceTB/SmolLM2-360M-Instruct"
)

FLAVORS: dict[str, ModelConfig] = {
    "135m": ModelConfig(lm=SMOLLM2_135M),
    "360m": ModelConfig(lm=SMOLLM2_360M, tokenizer_id="HuggingFaceTB/SmolLM2-360M-Instruct"),
    # Same structure, CPU-sized: 128-px tiles of 8x8 patches, shuffle 2 -> 16 tokens per tile.
    "debug": ModelConfig(
        vision=VisionConfig(image_size=128, patch_size=16, hidden_dim=96, inter_dim=384, n_heads=4, n_blocks=2),
        lm=LMConfig(hidden_dim=128, inter_dim=384, n_heads=4, n_kv_heads=2, n_blocks=4),
        image=ImageConfig(pixel_shuffle_factor=2, max_img_size=256),
    ),
}
for _name in ("135m", "360m", "debug"):
    FLAVORS[f"vanilla-{_name}"] = ModelConfig(
        architecture="vanilla",
        vision=FLAVORS[_name].vision,
        lm=FLAVORS[_name].lm,
        image=FLAVORS[_name].image,
        tokenizer_id=FLAVORS[_name].tokenizer_id,
    )


def flavor(name: str) -> ModelConfig:
    """A fresh copy of a named flavor (callers may mutate it)."""
    if name not in FLAVORS:
        raise ConfigError(f"unknown flavor {name!r}; choose one of {', '.join(sorted(FLAVORS))}")
    return copy.deepcopy(FLAVORS[name]).validate()
