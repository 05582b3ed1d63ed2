"""Typed data configuration: the `[data]` section of a training job."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, is_dataclass
from typing import Any

from dualtower.model.config import ConfigError

# The Cauldron configs enabled in the original's P-CAULDRON preset (reference_spec 4.1, subset 1).
P_CAULDRON_CONFIGS: tuple[str, ...] = (
    "textcaps",
    "textvqa",
    "screen2words",
    "vistext",
    "iam",
    "cocoqa",
    "visual7w",
    "iconqa",
)
SYNTHETIC_QUESTION_TYPES: tuple[str, ...] = ("color", "shape", "count", "position", "compare")
DIFFICULTIES: tuple[str, ...] = ("easy", "medium", "hard")
SPLITS: tuple[str, ...] = ("train", "val", "heldout")


@dataclass
class SyntheticConfig:
    """The built-in synthetic source (dualtower.data.synthetic); each split is a fixed set of samples."""

    num_train: int = 20_000
    num_val: int = 256
    num_heldout: int = 256
    question_types: tuple[str, ...] = ("color", "shape", "count", "position")
    difficulty: str = "easy"  # easy | medium | hard: object sizes, counts, image sizes
    max_turns: int = 4  # question/answer turns per sample: uniform in 1..max_turns (fewer if fewer apply)

    def num_samples(self, split: str) -> int:
        return {"train": self.num_train, "val": self.num_val, "heldout": self.num_heldout}[split]

    def validate(self) -> None:
        _require(min(self.num_train, self.num_val, self.num_heldout) >= 1, "data.synthetic sample counts must be >= 1")
        unknown = sorted(set(self.question_types) - set(SYNTHETIC_QUESTION_TYPES))
        _require(not unknown, f"unknown data.synthetic.question_types {unknown}; known: {SYNTHETIC_QUESTION_TYPES}")
        _require(len(self.question_types) >= 1, "data.synthetic.question_types must not be empty")
        _require(self.difficulty in DIFFICULTIES, f"data.synthetic.difficulty must be one of {DIFFICULTIES}")
        _require(self.max_turns >= 1, "data.synthetic.max_turns must be >= 1")


@dataclass
class DataConfig:
    source: str = "synthetic"  # "synthetic" | "cauldron" | a local parquet/arrow file or folder
    cauldron_id: str = "HuggingFaceM4/the_cauldron"
    cauldron_configs: tuple[str, ...] = P_CAULDRON_CONFIGS
    # Share held out for validation: local files, exactly (seeded); cauldron, each row whose content hash falls
    # below it (about this share of every config, the same rows under any sharding; data/sources.py).
    val_ratio: float = 0.05
    # Row budgets. At the 135m config every image is 5..17 tiles of 65 tokens: 18 tiles (the number, though not
    # the unit, of the original's max_images_per_knapsack) would bound a row at ~1,200 image tokens and fill
    # 4096-token rows to ~26%; 64 tiles packs >= 98.5% of the tokens (tests/test_data_packing.py).
    max_tokens_per_row: int = 4096
    max_tiles_per_row: int = 64
    rows_per_batch: int = 4
    pack: bool = True  # False: one document per row
    shuffle_buffer: int = 512  # documents the packer chooses from
    # A document buffered this many batches goes first (it seeds the next row, oldest first). A soft bound: with
    # more overdue documents than rows per batch some wait longer, up to ~shuffle_buffer / rows_per_batch more.
    max_wait_batches: int = 64
    num_workers: int = 2
    prefetch_factor: int = 2
    pin_memory: bool = True  # only when CUDA is available
    # How worker processes start: "" = Python's default ("fork" on Linux before 3.14, which 3.12+ warns about
    # in a multithreaded process), or "fork", "forkserver", "spawn" (the last two cost seconds per worker).
    worker_start_method: str = ""
    seed: int = 42
    max_sample_tokens: int = 0  # longer samples are truncated (whole turns first); 0 = max_tokens_per_row
    max_images_per_sample: int = 10  # the original's max_images_per_example
    min_image_side: int = 4  # smaller images (e.g. 1x1 placeholders) make the sample skipped
    allow_text_only: bool = False  # samples without images are skipped (the original drops them)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)

    @property
    def sample_token_limit(self) -> int:
        return self.max_sample_tokens or self.max_tokens_per_row

    def validate(self) -> DataConfig:
        _require(bool(self.source), "data.source must be 'synthetic', 'cauldron' or a path")
        _require(self.max_tokens_per_row >= 16, "data.max_tokens_per_row must be >= 16")
        _require(self.max_tiles_per_row >= 1, "data.max_tiles_per_row must be >= 1")
        _require(self.rows_per_batch >= 1, "data.rows_per_batch must be >= 1")
        _require(self.shuffle_buffer >= 1, "data.shuffle_buffer must be >= 1")
        # Each packed row starts from a buffered document: a smaller buffer would give shorter batches.
        _require(
            not self.pack or self.shuffle_buffer >= self.rows_per_batch,
            f"data.shuffle_buffer ({self.shuffle_buffer}) must be >= data.rows_per_batch ({self.rows_per_batch})",
        )
        _require(self.max_wait_batches >= 1, "data.max_wait_batches must be >= 1")
        _require(self.num_workers >= 0, "data.num_workers must be >= 0")
        _require(self.prefetch_factor >= 1, "data.prefetch_factor must be >= 1")
        _require(
            self.worker_start_method in ("", "fork", "forkserver", "spawn"),
            "data.worker_start_method must be '', 'fork', 'forkserver' or 'spawn'",
        )
        _require(0.0 <= self.val_ratio < 1.0, "data.val_ratio must be in [0, 1)")
        _require(self.max_sample_tokens >= 0, "data.max_sample_tokens must be >= 0 (0 = max_tokens_per_row)")
        _require(
            self.sample_token_limit <= self.max_tokens_per_row,
            "data.max_sample_tokens must not exceed data.max_tokens_per_row (a sample must fit a row)",
        )
        _require(self.max_images_per_sample >= 1, "data.max_images_per_sample must be >= 1")
        _require(self.min_image_side >= 1, "data.min_image_side must be >= 1")
        _require(len(self.cauldron_configs) >= 1 or self.source != "cauldron", "data.cauldron_configs is empty")
        self.synthetic.validate()
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DataConfig:
        return _from_dict(cls, data, "data").validate()


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _from_dict(cls: type, data: dict[str, Any], where: str) -> Any:
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"unknown key(s) in [{where}]: {', '.join(unknown)}")
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        factory = known[name].default_factory
        default = factory() if callable(factory) else known[name].default
        if is_dataclass(default) and isinstance(value, dict):
            kwargs[name] = _from_dict(type(default), value, f"{where}.{name}")
        elif isinstance(value, list):
            kwargs[name] = tuple(value)
        else:
            kwargs[name] = value
    return cls(**kwargs)
