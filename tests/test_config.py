"""Job config: TOML recipes load, CLI overrides win, bad keys/values give one-line errors and exit non-zero."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from dualtower.config import JobConfig, load_job_config
from dualtower.model.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "train" / "configs"


@pytest.mark.parametrize(("name", "flavor"), [("debug", "debug"), ("cauldron_135m", "135m"), ("cauldron_360m", "360m")])
def test_recipes_load_and_validate(name: str, flavor: str) -> None:
    cfg = load_job_config(["--config", str(CONFIGS / f"{name}.toml")])
    assert isinstance(cfg, JobConfig)
    assert cfg.model.flavor == flavor


@pytest.mark.parametrize("name", ["cauldron_135m", "cauldron_360m"])
def test_cauldron_recipe_matches_original_preset(name: str) -> None:
    cfg = load_job_config(["--config", str(CONFIGS / f"{name}.toml")])
    assert (cfg.optim.lr_projector, cfg.optim.lr_vision, cfg.optim.lr_left, cfg.optim.lr_right) == (5e-3, 0, 1e-5, 0)
    assert (cfg.training.steps, cfg.training.micro_batches, cfg.training.max_grad_norm) == (50_000, 32, 1.0)
    assert (cfg.data.rows_per_batch, cfg.data.max_tokens_per_row, cfg.data.source) == (4, 4096, "cauldron")
    assert (cfg.schedule.warmup_ratio, cfg.schedule.min_lr_ratio, cfg.optim.weight_decay) == (0.03, 0.1, 0.01)
    size = name.removeprefix("cauldron_")
    assert cfg.model.flavor == size and cfg.model.lm_backbone == f"HuggingFaceTB/SmolLM2-{size.upper()}-Instruct"


def test_precedence_cli_over_toml_over_defaults() -> None:
    defaults = JobConfig()
    cfg = load_job_config(
        [
            "--config",
            str(CONFIGS / "debug.toml"),
            "--training.steps=7",
            "--optim.lr_left",
            "1e-4",
            "--optim.betas=0.8,0.95",
            '--data.synthetic.question_types=["color"]',
            "--parallel.compile=true",
            "--profile",
        ]
    )
    assert cfg.training.steps == 7  # CLI
    assert cfg.optim.lr_left == 1e-4
    assert cfg.optim.betas == (0.8, 0.95)
    assert cfg.data.synthetic.question_types == ("color",)
    assert cfg.parallel.compile is True
    assert cfg.profile.enabled is True
    assert cfg.model.flavor == "debug"  # TOML
    assert cfg.optim.eps == defaults.optim.eps  # default


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("--data.cauldron_configs=ai2d,chartqa", ("ai2d", "chartqa")),
        ("--data.cauldron_configs=ai2d, chartqa,", ("ai2d", "chartqa")),
        ("--data.cauldron_configs=ai2d", ("ai2d",)),
        ('--data.cauldron_configs="ai2d","chartqa"', ("ai2d", "chartqa")),
        ("--data.cauldron_configs=['ai2d', 'chartqa']", ("ai2d", "chartqa")),
        ("--data.synthetic.question_types=color,shape", ("color", "shape")),
        ("--data.synthetic.question_types=count", ("count",)),
    ],
)
def test_string_lists_take_comma_separated_words(override: str, expected: tuple[str, ...]) -> None:
    cfg = load_job_config(["--data.source=cauldron", override])
    key = override[2:].partition("=")[0]
    assert _value(cfg, key) == expected


def test_number_lists_and_floats_parse() -> None:
    cfg = load_job_config(["--optim.betas=0.9, 0.95", "--model.image_mean=0.5,0.5,0.5", "--optim.lr_left=.5"])
    assert cfg.optim.betas == (0.9, 0.95) and cfg.model.image_mean == (0.5, 0.5, 0.5) and cfg.optim.lr_left == 0.5


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--training.stepz=3"], "unknown key 'training.stepz'"),
        (["--trainig.steps=3"], "unknown key 'trainig'"),
        (["--training.steps=abc"], "training.steps expects an integer"),
        (["--training.steps=0"], "training.steps must be >= 1"),
        (["--parallel.compile=maybe"], "expects true or false"),
        (["--optim.betas=0.9"], "expects 2 values"),
        (["--model.flavor=huge"], "model.flavor must be one of"),
        (["--data.rows_per_batch=0"], "rows_per_batch"),
        (["--optim.lr_vision=0", "--optim.lr_projector=0", "--optim.lr_left=0", "--optim.lr_right=0"], "nothing"),
        (["--optim.lr_left=inf"], "optim.lr_left must be a finite number"),
        (["--optim.lr_projector=nan"], "optim.lr_projector must be a finite number"),
        (["--optim.lr_right=-inf"], "optim.lr_right must be a finite number"),
        (["--optim.weight_decay=inf"], "optim.weight_decay must be a finite number"),
        (["--data.cauldron_configs=[1, 2]"], "expects a string"),  # bracketed text still goes through TOML
        (["--config", "missing.toml"], "config file not found"),
        (["stray"], "unexpected argument"),
    ],
)
def test_bad_values_raise_config_error(args: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_job_config(args)


def test_unknown_toml_key_is_named(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[optim]\nlr_lfet = 1e-3\n")
    with pytest.raises(ConfigError, match=r"unknown key 'optim.lr_lfet' \(did you mean 'lr_left'\?\)"):
        load_job_config(["--config", str(path)])


def test_cli_error_is_one_line_without_traceback() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "train" / "main.py"), "--config", str(CONFIGS / "debug.toml"), "--optim.lr=1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: unknown key 'optim.lr' in optim"), result.stderr
    assert "Traceback" not in result.stderr


def test_usage_lists_every_key_and_each_is_a_valid_override() -> None:
    from dualtower.config import usage

    printed = [line.strip() for line in usage().splitlines() if line.startswith("  --")]
    keys = [arg[2:].partition("=")[0] for arg in printed]
    assert {"training.steps", "data.synthetic.difficulty", "optim.lr_left", "profile.steps"} <= set(keys)
    assert {"--optim.betas=0.9,0.999", "--profile.steps=3,4", "--model.image_mean="} <= set(printed)
    defaults = JobConfig()
    for arg, key in zip(printed, keys, strict=True):  # the exact printed text reads back as the default
        assert _value(load_job_config([arg]), key) == _value(defaults, key), arg


@pytest.mark.parametrize(
    ("arg", "message"),
    [
        ("--optim.betas=(0.9, 0.999)", "optim.betas takes a,b or [a, b], not a tuple: got '(0.9, 0.999)'"),
        ("--data.cauldron_configs=(ai2d, chartqa)", "not a tuple: got '(ai2d, chartqa)'"),
        ("--profile.steps=three", "profile.steps expects a list, got 'three'"),  # the text as typed
        ("--model.attention_backend=bogus", "model.attention_backend must be one of auto, "),
    ],
)
def test_bad_list_and_backend_errors_quote_what_was_typed(arg: str, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_job_config([arg])
    assert message in str(error.value)


def test_empty_lists_and_backends_parse() -> None:
    cfg = load_job_config(["--model.image_mean=0.5,0.5,0.5", "--model.image_mean=", "--data.cauldron_configs="])
    assert cfg.model.image_mean == () and cfg.data.cauldron_configs == ()
    assert load_job_config(["--model.attention_backend=reference"]).model.attention_backend == "reference"


def _value(cfg: JobConfig, dotted: str):
    value = cfg
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["--parallel.fsdp=on"], "parallel.fsdp = 'on' needs a process group"),
        (  # the vanilla architecture has no right tower: nothing trains
            ["--model.flavor=vanilla-debug", "--optim.lr_vision=0", "--optim.lr_projector=0", "--optim.lr_left=0"],
            "no trainable parameters",
        ),
    ],
)
def test_settings_refused_when_the_run_is_built_are_one_line_errors(tmp_path, capsys, overrides, message) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_main", ROOT / "train" / "main.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    argv = ["--config", str(CONFIGS / "debug.toml"), f"--job.run_dir={tmp_path}", "--data.num_workers=0", *overrides]
    assert module.main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and any(line.startswith("error: ") and message in line for line in err.splitlines())


@pytest.mark.parametrize("arg", ["--model.image_mean=inf,0.5,0.5", "--model.image_std=0.5,inf,0.5",
                                 "--model.image_mean=nan,0.5,0.5"])  # fmt: skip
def test_pixel_normalization_must_be_finite(arg: str) -> None:
    with pytest.raises(ConfigError, match=r"model\.image_(mean|std) must be finite"):
        load_job_config([arg])


def test_an_inline_table_override_merges_into_the_recipes_section() -> None:
    """--section.sub={key=value} changes only the keys it names: the others keep the recipe's values (as a
    [data.synthetic] table in a second TOML file would), not the defaults."""
    recipe = load_job_config(["--config", str(CONFIGS / "debug.toml")])
    cfg = load_job_config(["--config", str(CONFIGS / "debug.toml"), '--data.synthetic={difficulty="hard"}'])
    assert cfg.data.synthetic.difficulty == "hard"
    assert cfg.data.synthetic.question_types == recipe.data.synthetic.question_types == ("color", "shape", "count")
    with pytest.raises(ConfigError, match=r"unknown key 'data.synthetic.difficultly'"):
        load_job_config(['--data.synthetic={difficultly="hard"}'])
