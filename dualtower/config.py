"""Training job configuration: typed nested dataclasses, TOML recipes and `--section.key=value` overrides.

Precedence: command line > TOML file > the defaults below. Every section is its own dataclass and every builder
receives only its own section (the trainer gets [training], the optimizer [optim], ...). `load_job_config`
raises `ConfigError` with a one-line message naming the offending key or value; `train/main.py` prints it and
exits non-zero without a traceback.

    python train/main.py --config train/configs/debug.toml --training.steps=50 --optim.lr_left=1e-3
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dualtower import ops
from dualtower.data.config import DataConfig
from dualtower.model.config import FLAVORS, ConfigError
from dualtower.typed_fields import check, cli_text, coerce, field_hints, merge_table, parse_cli_text, suggest


@dataclass
class JobSection:
    run_dir: str = "runs/debug"  # metrics.jsonl, checkpoints/, export/, profile/ go here
    description: str = ""


@dataclass
class ModelSection:
    flavor: str = "debug"
    checkpoint: str = ""  # a DualTowerVLM checkpoint (directory or Hub id) to start from; "" = random init
    vision_backbone: str = ""  # SigLIP weights (directory or Hub id) loaded into the vision tower
    lm_backbone: str = ""  # SmolLM2 weights (directory, Hub id or .gguf file) loaded into both LMs
    tokenizer_id: str = ""  # "" = the flavor's tokenizer
    # Pixel normalization (saved with the model); empty = the flavor's. Models trained from scratch learn far
    # faster from zero-centred pixels, e.g. [0.5, 0.5, 0.5] / [0.5, 0.5, 0.5] (SigLIP's own normalization).
    image_mean: tuple[float, ...] = ()
    image_std: tuple[float, ...] = ()
    dtype: str = "float32"  # storage dtype of the (master) parameters
    attention_backend: str = "auto"  # one of dualtower.ops.BACKENDS: auto, triton, flash, torch_varlen, chunked, ...


@dataclass
class OptimSection:
    # Per-tower peak learning rates; 0 freezes the tower (its parameters get requires_grad=False).
    lr_vision: float = 0.0
    lr_projector: float = 1e-4
    lr_left: float = 5e-5
    lr_right: float = 0.0
    weight_decay: float = 0.01
    decay_norms_and_biases: bool = True  # the original decays every parameter; False exempts 1-D tensors
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    implementation: str = "auto"  # auto (= fused, on CUDA and CPU) | fused | foreach


@dataclass
class ScheduleSection:
    kind: str = "cosine"  # cosine (linear warmup, cosine to min_lr_ratio * max) | constant (after warmup)
    warmup_steps: int = -1  # -1: round(warmup_ratio * training.steps)
    warmup_ratio: float = 0.03
    min_lr_ratio: float = 0.1


@dataclass
class TrainingSection:
    steps: int = 100  # optimizer steps
    micro_batches: int = 1  # gradient accumulation: micro-batches per optimizer step and rank
    seed: int = 42
    max_grad_norm: float = 1.0  # 0 disables clipping (the norm is still logged)
    max_nonfinite_in_row: int = 5  # skipped non-finite steps in a row before the run stops
    device: str = "auto"  # auto | cpu | cuda


@dataclass
class ParallelSection:
    fsdp: str = "auto"  # auto (when world size > 1) | on | off
    compile: bool = False  # torch.compile each transformer block
    compile_fullgraph: bool = True
    activation_checkpointing: bool = False  # recompute each block in backward
    mixed_precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32
    reshard_after_forward: bool = True


@dataclass
class CheckpointSection:
    enabled: bool = True
    every: int = 500  # optimizer steps between checkpoints (0: only the final one)
    keep: int = 2  # most recent checkpoints kept
    folder: str = "checkpoints"  # inside job.run_dir
    resume: str = "auto"  # auto (latest in folder) | none | path to a checkpoint directory
    save_final: bool = True
    export_final: bool = True  # save_pretrained() format at the end
    export_folder: str = "export"
    export_only: bool = False  # load the resume checkpoint's weights, export them and stop (no training)


@dataclass
class MetricsSection:
    log_every: int = 10  # a training record every N steps; also at the last step and at each checkpoint
    progress: str = "bar"  # bar | line | none (console output on stderr, rank 0)
    wandb: bool = False
    wandb_project: str = "dualtower"
    wandb_entity: str = ""
    wandb_mode: str = "offline"  # offline | online | disabled
    run_name: str = ""


@dataclass
class EvalSection:
    every: int = 0  # optimizer steps between evaluations (0: only at the end)
    at_end: bool = True
    val_batches: int = 8  # validation loss over this many batches per rank
    accuracy_samples: int = 64  # held-out synthetic questions answered by greedy generation (synthetic source)
    accuracy_seed: int = 1234
    max_new_tokens: int = 8


@dataclass
class ProfileSection:
    enabled: bool = False
    steps: tuple[int, ...] = (3, 4)  # optimizer steps (1-based) traced, one chrome trace each
    folder: str = "profile"  # inside job.run_dir


@dataclass
class JobConfig:
    job: JobSection = field(default_factory=JobSection)
    model: ModelSection = field(default_factory=ModelSection)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimSection = field(default_factory=OptimSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    training: TrainingSection = field(default_factory=TrainingSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    metrics: MetricsSection = field(default_factory=MetricsSection)
    eval: EvalSection = field(default_factory=EvalSection)
    profile: ProfileSection = field(default_factory=ProfileSection)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def validate(self) -> JobConfig:
        _validate_sections(self)
        try:
            self.data.validate()
        except ConfigError:
            raise
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"[data] {exc}") from None
        return self


# -- validation ----------------------------------------------------------------------------------------------


def _one_of(value: str, allowed: tuple[str, ...], key: str) -> None:
    check(value in allowed, f"{key} must be one of {', '.join(allowed)}, got {value!r}")


def _validate_sections(cfg: JobConfig) -> None:
    m, o, s, t, p = cfg.model, cfg.optim, cfg.schedule, cfg.training, cfg.parallel
    # Path("") is the working directory: checkpoints would be written (and resumed) from wherever the run started.
    check(bool(cfg.job.run_dir), "job.run_dir must not be empty")
    check(m.flavor in FLAVORS, f"model.flavor must be one of {', '.join(sorted(FLAVORS))}, got {m.flavor!r}")
    _one_of(m.dtype, ("float32", "bfloat16"), "model.dtype")
    _one_of(m.attention_backend, ops.BACKENDS, "model.attention_backend")
    for key in ("image_mean", "image_std"):
        check(len(getattr(m, key)) in (0, 3), f"model.{key} needs 3 values (one per RGB channel) or none")
        check(all(math.isfinite(v) for v in getattr(m, key)), f"model.{key} must be finite numbers")
    check(all(s > 0 for s in m.image_std), "model.image_std must be positive")
    lrs = {"lr_vision": o.lr_vision, "lr_projector": o.lr_projector, "lr_left": o.lr_left, "lr_right": o.lr_right}
    for key, lr in lrs.items():
        check(math.isfinite(lr) and lr >= 0, f"optim.{key} must be a finite number >= 0, got {lr}")
    check(any(lr > 0 for lr in lrs.values()), "every optim.lr_* is 0: nothing would train")
    check(math.isfinite(o.weight_decay) and o.weight_decay >= 0, "optim.weight_decay must be a finite number >= 0")
    check(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "optim.betas must be two numbers in [0, 1)")
    check(math.isfinite(o.eps) and o.eps > 0, "optim.eps must be a finite number > 0")
    _one_of(o.implementation, ("auto", "fused", "foreach"), "optim.implementation")
    _one_of(s.kind, ("cosine", "constant"), "schedule.kind")
    check(0 <= s.min_lr_ratio <= 1, "schedule.min_lr_ratio must be in [0, 1]")
    check(0 <= s.warmup_ratio < 1, "schedule.warmup_ratio must be in [0, 1)")
    check(s.warmup_steps >= -1, "schedule.warmup_steps must be >= 0 (or -1 for warmup_ratio)")
    check(t.steps >= 1, f"training.steps must be >= 1, got {t.steps}")
    check(t.micro_batches >= 1, f"training.micro_batches must be >= 1, got {t.micro_batches}")
    check(t.max_grad_norm >= 0, "training.max_grad_norm must be >= 0")
    check(t.max_nonfinite_in_row >= 1, "training.max_nonfinite_in_row must be >= 1")
    _one_of(t.device, ("auto", "cpu", "cuda"), "training.device")
    _one_of(p.fsdp, ("auto", "on", "off"), "parallel.fsdp")
    _one_of(p.mixed_precision, ("auto", "bf16", "fp32"), "parallel.mixed_precision")
    check(cfg.checkpoint.every >= 0 and cfg.checkpoint.keep >= 1, "checkpoint.every >= 0 and checkpoint.keep >= 1")
    check(cfg.metrics.log_every >= 1, "metrics.log_every must be >= 1")
    _one_of(cfg.metrics.progress, ("bar", "line", "none"), "metrics.progress")
    _one_of(cfg.metrics.wandb_mode, ("offline", "online", "disabled"), "metrics.wandb_mode")
    check(cfg.eval.every >= 0 and cfg.eval.val_batches >= 0, "eval.every and eval.val_batches must be >= 0")
    check(cfg.eval.accuracy_samples >= 0, "eval.accuracy_samples must be >= 0")
    check(cfg.eval.max_new_tokens >= 1, "eval.max_new_tokens must be >= 1")
    check(all(step >= 1 for step in cfg.profile.steps), "profile.steps are 1-based optimizer steps")


# -- building from TOML / CLI --------------------------------------------------------------------------------


def apply_override(cfg: JobConfig, dotted: str, text: str) -> None:
    """Set `section.key[.subkey]` from its command-line text."""
    parts = dotted.split(".")
    if len(parts) == 1 and (homes := _sections_with(dotted)):
        raise ConfigError(f"--{dotted}: keys need their section: did you mean {' or '.join(homes)}?")
    check(len(parts) >= 2, f"override {dotted!r} must look like --section.key=value")
    obj: Any = cfg
    for i, part in enumerate(parts):
        known = [f.name for f in dataclasses.fields(obj)]
        if part not in known:
            where = ".".join(parts[:i]) or "sections"
            raise ConfigError(f"unknown key {'.'.join(parts[: i + 1])!r} in {where}{suggest(part, known)}")
        if i == len(parts) - 1:
            hint = field_hints(type(obj))[part]
            value = parse_cli_text(text, hint, dotted)
            current = getattr(obj, part)
            if dataclasses.is_dataclass(current) and isinstance(value, dict):
                merge_table(current, value, dotted)  # an inline table: the keys it omits keep the recipe's values
            else:
                setattr(obj, part, coerce(value, hint, dotted))
        else:
            obj = getattr(obj, part)
            check(dataclasses.is_dataclass(obj), f"{'.'.join(parts[: i + 1])!r} is a value, not a section")


def _sections_with(name: str) -> list[str]:
    """`--section.key` for every key named `name` (or, failing that, close to it), for a key typed bare."""
    keys = [key for key, _ in _leaves(JobConfig())]
    leaves = sorted({key.rpartition(".")[2] for key in keys})
    wanted = [name] if name in leaves else difflib.get_close_matches(name.lower(), leaves, n=1)
    return [f"--{key}" for key in sorted(keys) if key.rpartition(".")[2] in wanted]


def _check_top_level(table: dict[str, Any]) -> None:
    """A key written above its [section] header lands at the top level: name the sections that have it."""
    sections = {f.name for f in dataclasses.fields(JobConfig)}
    for key in table:
        if key not in sections and (homes := _sections_with(key)):
            dotted = " or ".join(home[2:] for home in homes)
            raise ConfigError(f"unknown key {key!r} at the top level (did you mean {dotted}?)")


def split_cli(argv: list[str]) -> tuple[str | None, list[tuple[str, str]]]:
    """argv -> (config path, [(dotted key, text)]); accepts --k=v and --k v; --profile is short for profile.enabled."""
    config_path, overrides, i = None, [], 0
    while i < len(argv):
        arg = argv[i]
        check(arg.startswith("--"), f"unexpected argument {arg!r}; use --config PATH and --section.key=value")
        name, eq, value = arg[2:].partition("=")
        if name == "profile" and not eq:
            overrides.append(("profile.enabled", "true"))
            i += 1
            continue
        if not eq:
            # A following flag is never a value: `--job.run_dir --training.steps=3` would silently drop the override.
            missing = i + 1 == len(argv) or argv[i + 1].startswith("--")
            check(not missing, f"--{name} needs a value (write --{name}=VALUE for one that starts with --)")
            value, i = argv[i + 1], i + 1
        if name == "config":
            config_path = value
        else:
            overrides.append((name, value))
        i += 1
    return config_path, overrides


def usage() -> str:
    """Every `--section.key` with its default, for `train/main.py --help`."""
    lines = [
        "usage: [torchrun ...] train/main.py --config RECIPE.toml [--section.key=value ...] [--profile]",
        "",
        "keys (defaults before the recipe is applied):",
    ]

    lines += [f"  --{key}={cli_text(value)}" for key, value in _leaves(JobConfig())]
    return "\n".join(lines)


def _leaves(obj: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted key, value) of every non-section field, depth first in declaration order."""
    found: list[tuple[str, Any]] = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            found += _leaves(value, f"{prefix}{f.name}.")
        else:
            found.append((f"{prefix}{f.name}", value))
    return found


def load_job_config(argv: list[str]) -> JobConfig:
    """Defaults, then the TOML file given by --config, then the --section.key=value overrides; validated."""
    config_path, overrides = split_cli(argv)
    cfg = JobConfig()
    if config_path is not None:
        path = Path(config_path)
        check(path.is_file(), f"config file not found: {config_path}")
        try:
            table = tomllib.loads(path.read_bytes().decode("utf-8"))  # TOML is UTF-8 whatever the locale
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{config_path}: invalid TOML: not UTF-8 (byte {exc.start})") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{config_path}: invalid TOML: {exc}") from None
        try:
            _check_top_level(table)
            merge_table(cfg, table, "")
        except ConfigError as exc:  # the same key may come from the command line too: say which was wrong
            raise ConfigError(f"{config_path}: {exc}") from None
    for dotted, text in overrides:
        apply_override(cfg, dotted, text)
    return cfg.validate()
