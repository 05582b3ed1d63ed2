"""Job config edge cases: flags given without a value, TOML mistakes named with their file, case slips,
an empty run_dir, and the run's config.json reading back to the same config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dualtower.config import JobConfig, load_job_config
from dualtower.model.config import ConfigError
from dualtower.typed_fields import merge_table

ROOT = Path(__file__).resolve().parents[1]
DEBUG_RECIPE = str(ROOT / "train" / "configs" / "debug.toml")


@pytest.mark.parametrize(
    "args",
    [
        ["--job.run_dir", "--training.steps=3"],  # a string field would silently take the next flag as its value
        ["--model.checkpoint", "--config", DEBUG_RECIPE],
        ["--config", "--training.steps=3"],
    ],
)
def test_a_flag_is_never_taken_as_the_previous_flags_value(args: list[str]) -> None:
    name = args[0]
    with pytest.raises(ConfigError, match=rf"^{name} needs a value"):
        load_job_config(args)


def test_a_value_starting_with_dashes_still_fits_after_an_equals_sign() -> None:
    assert load_job_config(["--job.description=--x"]).job.description == "--x"
    assert load_job_config(["--optim.lr_left", "-0", "--optim.lr_projector=1"]).optim.lr_left == 0.0


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("[training]\nsteps = 2.5\n", "training.steps expects an integer, got 2.5"),
        ('[parallel]\ncompile = "yes"\n', "parallel.compile expects true or false, got 'yes'"),
        ("[optim]\nlr_lfet = 1e-3\n", "unknown key 'optim.lr_lfet' (did you mean 'lr_left'?)"),
        ("optim = 3\n", "optim expects a table, got 3"),
    ],
)
def test_toml_mistakes_name_the_file_and_the_field(tmp_path: Path, toml: str, message: str) -> None:
    path = tmp_path / "recipe.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as error:
        load_job_config(["--config", str(path)])
    assert str(error.value) == f"{path}: {message}"


def test_cli_mistakes_are_not_blamed_on_the_recipe() -> None:
    with pytest.raises(ConfigError) as error:
        load_job_config(["--config", DEBUG_RECIPE, "--training.steps=2.5"])
    assert str(error.value) == "training.steps expects an integer, got 2.5"


@pytest.mark.parametrize(
    ("arg", "suggestion"),
    [("--TRAINING.steps=3", "'training'"), ("--training.STEPS=3", "'steps'"), ("--Optim.LR_Left=1", "'optim'")],
)
def test_a_key_in_the_wrong_case_gets_a_suggestion(arg: str, suggestion: str) -> None:
    with pytest.raises(ConfigError, match=rf"did you mean {suggestion}\?"):
        load_job_config([arg])


def test_an_empty_run_dir_is_refused() -> None:
    # Path("") is the working directory: config.json, checkpoints/ and export/ would land (and resume) there.
    with pytest.raises(ConfigError, match=r"job\.run_dir must not be empty"):
        load_job_config(["--job.run_dir="])


@pytest.mark.parametrize("recipe", sorted((ROOT / "train" / "configs").glob("*.toml")), ids=lambda p: p.stem)
def test_every_recipe_and_its_config_json_read_back_equal(recipe: Path) -> None:
    overrides = [
        "--profile.steps=[6]",
        "--optim.betas=0.8,0.95",
        "--model.image_mean=",
        "--parallel.compile=on",
        "--data.cauldron_configs=ai2d",
        "--training.max_grad_norm=inf",
        '--job.description=a "quoted" é',
    ]
    for args in ([], overrides):
        cfg = load_job_config(["--config", str(recipe), *args])
        written = json.loads(json.dumps(cfg.to_dict(), indent=1))  # what train/main.py writes to config.json
        reloaded = merge_table(JobConfig(), written, "").validate()
        assert reloaded == cfg and reloaded.to_dict() == cfg.to_dict()


def test_repeated_overrides_last_one_wins() -> None:
    cfg = load_job_config(["--training.steps=3", "--training.steps", "5", "--profile", "--profile.enabled=false"])
    assert cfg.training.steps == 5 and cfg.profile.enabled is False


def test_a_recipe_that_is_not_utf8_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes('[job]\ndescription = "café"\n'.encode("latin-1"))  # TOML files are UTF-8 by definition
    with pytest.raises(ConfigError, match=r"latin1\.toml: invalid TOML: not UTF-8"):
        load_job_config(["--config", str(path)])


@pytest.mark.parametrize(
    ("arg", "message"),
    [
        ("--steps=3", "--steps: keys need their section: did you mean --profile.steps or --training.steps?"),
        ("--lr_lfet=1", "--lr_lfet: keys need their section: did you mean --optim.lr_left?"),
        ("--zzz=1", "override 'zzz' must look like --section.key=value"),
    ],
)
def test_a_key_without_its_section_names_the_sections_that_have_it(arg: str, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_job_config([arg])
    assert str(error.value) == message


def test_a_toml_key_outside_its_table_names_the_tables_that_have_it(tmp_path: Path) -> None:
    path = tmp_path / "recipe.toml"
    path.write_text("steps = 3\n[optim]\nlr_left = 1e-3\n")  # `steps` belongs under a [training] header
    with pytest.raises(ConfigError) as error:
        load_job_config(["--config", str(path)])
    expected = "unknown key 'steps' at the top level (did you mean profile.steps or training.steps?)"
    assert str(error.value) == f"{path}: {expected}"
