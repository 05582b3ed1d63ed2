"""README.md against the code, so that drift fails CI: every command it shows parses, every file it names
exists, every file of the package folders is in its tree, and the defaults it states are the code's.

Nothing trains or generates. `python -m X` / `python path.py` commands go through their entry point's own
argument parser, stopped right after parsing; `train/main.py` commands through `load_job_config`; `train.sh`
and `evaluate.sh` expand their command with a stand-in interpreter; pytest flags are looked up in pytest's help.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import fnmatch
import importlib
import importlib.util
import inspect
import os
import posixpath
import re
import runpy
import shlex
import subprocess
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
PACKAGE_FOLDERS = ("dualtower", "kernels", "train", "scripts", "benchmarks", "csrc")
COMMANDS = ("python", "pytest", "bash", "torchrun", "pip", "lmms-eval", "pytest-benchmark")
ENTRY_POINTS = (
    "dualtower.generate",
    "dualtower.evaluate",
    "dualtower.data.stats",
    "dualtower.trace_breakdown",
    "dualtower_kernels.compile_check",
    "dualtower.generation.csrc_sampler",
)
# Named in README but kept outside this repository, with the project's specification.
OUTSIDE_REPO = {"reference_throughput.md"}


# -- reading README ------------------------------------------------------------------------------------------


def code_spans(text: str | None = None) -> list[str]:
    """The `inline code` of the prose (fenced blocks left out), line breaks inside a span read as spaces."""
    prose = re.sub(r"```.*?```", "", README if text is None else text, flags=re.S)
    return [span.replace("\n", " ") for span in re.findall(r"`([^`]+)`", prose)]


def block_commands(text: str | None = None) -> list[str]:
    """Each command line of the ```bash blocks, continuation lines joined."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", README if text is None else text, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        lines += [line.strip() for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return lines


def inline_commands() -> list[str]:
    """Inline spans that are commands: `python -m ...`, `pip install ...`. A flag quoted with its module in a
    sentence (`dualtower.generate --architecture vanilla`) is a fragment: its required arguments are left out."""
    commands = []
    for span in code_spans():
        words = span.split()
        first = next((w for w in words if not re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", w)), "")
        if first in COMMANDS:
            commands.append(span)
        elif first in ENTRY_POINTS and len(words) > 1:
            commands.append(f"fragment: python -m {span}")
    return commands


def split_command(line: str) -> tuple[dict[str, str], list[str]]:
    """(leading VAR=value assignments, words); README's placeholders `[recipe]` dropped, `[--flag]` kept."""
    words = shlex.split(line, comments=True)
    env = {}
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
        name, _, value = words.pop(0).partition("=")
        env[name] = value
    kept = []
    for word in words:
        if re.fullmatch(r"\[--[^\]]+\]", word):
            kept.append(word[1:-1])
        elif not re.fullmatch(r"\[[^\]=]*\]", word):
            kept.append(word)
    return env, kept


def layout_entries() -> list[tuple[list[str], str]]:
    """The Layout tree: ([paths], description); `a/b.py, c.py` names a/b.py and a/c.py."""
    tree = README.split("\n## Layout", 1)[1].split("```")[1]
    entries = []
    for line in tree.strip().splitlines():
        words = line.split()
        paths = [words.pop(0)]
        while paths[-1].endswith(","):
            paths[-1] = paths[-1].rstrip(",")
            paths.append(posixpath.join(posixpath.dirname(paths[0].rstrip("/")), words.pop(0)))
        entries.append((paths, " ".join(words)))
    return entries


def expand_braces(text: str) -> list[str]:
    match = re.search(r"\{([^{}]*)\}", text)
    if not match:
        return [text]
    return [
        expanded
        for choice in match.group(1).split(",")
        for expanded in expand_braces(text[: match.start()] + choice + text[match.end() :])
    ]


# -- checking one command ------------------------------------------------------------------------------------


class _ParsedError(Exception):
    """Raised by ArgumentParser.parse_args (patched) instead of returning: the entry point does no work."""

    def __init__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace | None):
        super().__init__("parsed")
        self.parser, self.namespace = parser, namespace


def _validate_generate(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    from dualtower.generate import validate

    validate(args, parser)


def _validate_evaluate(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    from dualtower.evaluate import parse_model_args

    parse_model_args(args.model_args)


# What an entry point checks right after parsing, before it does any work.
AFTER_PARSING: dict[str, Callable[[argparse.ArgumentParser, argparse.Namespace], None]] = {
    "dualtower.generate": _validate_generate,
    "dualtower.evaluate": _validate_evaluate,
}


def parse_only(main: Callable[[list[str]], Any], argv: list[str], stop_before_parsing: bool = False) -> _ParsedError:
    """Call `main(argv)` until its argument parser has parsed argv (or is about to); SystemExit if it rejects it."""
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(parser, args=None, namespace=None):
        raise _ParsedError(parser, None if stop_before_parsing else original(parser, args, namespace))

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
        try:
            main(argv)
        except _ParsedError as parsed:
            return parsed
    pytest.fail(f"{main} returned without parsing its arguments")


@pytest.fixture(scope="module")
def pytest_options() -> set[str]:
    """Every option pytest accepts here, plugins (pytest-benchmark) included."""
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "--help"], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return set(re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", result.stdout))


@dataclasses.dataclass
class Checker:
    monkeypatch: pytest.MonkeyPatch
    capsys: pytest.CaptureFixture
    tmp_path: Path
    pytest_options: set[str]
    markers: set[str]
    fragment: bool = False

    def command(self, line: str) -> None:
        self.fragment = line.startswith("fragment: ")
        env, words = split_command(line.removeprefix("fragment: "))
        program, args = words[0], words[1:]
        if program == "python" and args[:1] == ["-m"]:
            module, args = args[1], args[2:]
            self.pytest(args) if module == "pytest" else self.module(module, args)
        elif program == "python":
            self.script(args[0], args[1:])
        elif program == "pytest":
            self.pytest(args)
        elif program == "torchrun":
            self.train(args[args.index("train/main.py") + 1 :])
        elif program == "bash":
            self.bash(args[0], args[1:])
        elif program == "pip":
            self.pip(args)
        elif program == "lmms-eval":
            self.lmms_eval(env, args)
        elif program == "pytest-benchmark":
            from pytest_benchmark.cli import make_parser

            self.parse("pytest-benchmark", lambda argv: make_parser().parse_args(argv), args)
        else:
            pytest.fail(f"README command {line!r}: no check knows {program!r}; add one to tests/test_readme.py")

    def parse(self, name: str, main: Callable[[list[str]], Any], argv: list[str]) -> None:
        """Fail on what the entry point's parser (or its AFTER_PARSING check) rejects."""
        command = f"{name} {shlex.join(argv)}"
        try:
            parsed = parse_only(main, argv)
            check = AFTER_PARSING.get(name)
            if check is not None:
                check(parsed.parser, parsed.namespace)
        except SystemExit as exit_:
            error = self.capsys.readouterr().err
            if exit_.code == 0 and "--help" in argv:
                return
            if self.fragment and "the following arguments are required" in error:
                return
            pytest.fail(f"{command}: rejected: {error}")
        except ValueError as error:
            pytest.fail(f"{command}: rejected: {error}")

    def module(self, module: str, args: list[str]) -> None:
        assert importlib.util.find_spec(module) is not None, f"README runs `python -m {module}`: no such module"
        self.parse(module, importlib.import_module(module).main, args)

    def script(self, path: str, args: list[str]) -> None:
        assert (ROOT / path).is_file(), f"README runs `python {path}`: no such file"
        if path == "train/main.py":
            self.train(args)
            return
        self.parse(path, runpy.run_path(str(ROOT / path), run_name=Path(path).stem)["main"], args)

    def train(self, args: list[str]) -> None:
        from dualtower.config import load_job_config, usage
        from dualtower.model.config import ConfigError

        if "--help" in args:
            assert "--config" in usage()
            return
        self.monkeypatch.chdir(ROOT)  # the commands name recipes relative to the repository root
        try:
            load_job_config(args)
        except ConfigError as error:
            pytest.fail(f"train/main.py {shlex.join(args)}: {error}")

    def bash(self, script: str, args: list[str]) -> None:
        path = ROOT / script
        assert path.is_file(), f"README runs `bash {script}`: no such file"
        if script == "train.sh":
            words = self.run_bash([script, *args], DRY_RUN="1", PYTHON=sys.executable).split()
            self.train(words[words.index("train/main.py") + 1 :])
        elif script == "evaluate.sh":
            echo = self.tmp_path / "echo_args"
            echo.write_text("#!/bin/sh\nprintf '%s\\n' \"$@\"\n")
            echo.chmod(0o755)
            words = self.run_bash([script, *args], PYTHON=str(echo)).split("\n")[:-1]
            assert words[:2] == ["-m", "dualtower.evaluate"], words
            self.module("dualtower.evaluate", words[2:])
        elif script == "scripts/gpu_check.sh":
            modes = {m for case in re.findall(r"^\s*(-[\w|-]+)\)", path.read_text(), re.M) for m in case.split("|")}
            unknown = [arg for arg in args if arg.startswith("-") and arg not in modes]
            assert not unknown, f"scripts/gpu_check.sh does not take {unknown} (it takes {sorted(modes)})"
        elif script == "scripts/quickstart.sh":
            self.train(["--config", "train/configs/debug.toml", *args])  # its arguments go to train/main.py
        else:
            pytest.fail(f"README runs `bash {script}`: no check knows it; add one to tests/test_readme.py")

    @staticmethod
    def run_bash(argv: list[str], **env: str) -> str:
        inherited = {k: v for k, v in os.environ.items() if k not in ("RECIPE", "NPROC", "TORCHRUN_ARGS", "DEVICE")}
        result = subprocess.run(
            ["bash", *argv], capture_output=True, text=True, cwd=ROOT, env={**inherited, **env}, timeout=30
        )
        assert result.returncode == 0, result.stderr
        return result.stdout

    def pytest(self, args: list[str]) -> None:
        words = iter(args)
        for word in words:
            if word == "-k":
                next(words)
            elif word == "-m":
                expression = next(words)
                names = set(re.findall(r"[A-Za-z_]\w*", expression)) - {"and", "or", "not"}
                assert names <= self.markers, f"pytest -m {expression!r}: unknown markers {names - self.markers}"
            elif word.startswith("-"):
                name = word.split("=", 1)[0]
                assert name in self.pytest_options, f"pytest has no option {name} (README: {shlex.join(args)})"
            else:
                assert (ROOT / word.split("::")[0]).exists(), f"pytest path {word} does not exist"

    def pip(self, args: list[str]) -> None:
        extras = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
        for word in args:
            match = re.fullmatch(r"\.\[([\w,-]+)\]", word)
            if match:
                unknown = set(match.group(1).split(",")) - extras
                assert not unknown, f"README installs extras {sorted(unknown)} that pyproject.toml lacks"
        if "-c" in args:
            assert (ROOT / args[args.index("-c") + 1]).is_file()

    def lmms_eval(self, env: dict[str, str], args: list[str]) -> None:
        """The plugin package README names, its model and the model's arguments: read, not imported (lmms-eval
        takes seconds to import; tests/test_eval_lmms.py runs the plugin)."""
        plugin = env["LMMS_EVAL_PLUGINS"]
        options = dict(zip(args[::2], args[1::2], strict=False))
        models = importlib.import_module(f"{plugin}.models").AVAILABLE_MODELS
        name = options["--model"]
        assert name in models, f"lmms-eval plugin {plugin} has no model {name!r}"
        home = ast.parse(Path(importlib.util.find_spec(f"{plugin}.models.{name}").origin).read_text())
        (source,) = [n.module for n in home.body if isinstance(n, ast.ImportFrom) and n.names[0].name == models[name]]
        tree = ast.parse(Path(importlib.util.find_spec(source).origin).read_text())
        (init,) = [
            f for c in tree.body if isinstance(c, ast.ClassDef) and c.name == models[name]
            for f in c.body if isinstance(f, ast.FunctionDef) and f.name == "__init__"
        ]  # fmt: skip
        accepted = {a.arg for a in init.args.args + init.args.kwonlyargs}
        given = {pair.split("=", 1)[0] for pair in options.get("--model_args", "").split(",") if pair}
        assert given <= accepted, f"the {name} model takes no {sorted(given - accepted)}"


@pytest.fixture
def checker(monkeypatch, capsys, tmp_path, pytest_options, pytestconfig) -> Checker:
    markers = {line.split(":")[0].split("(")[0].strip() for line in pytestconfig.getini("markers")}
    return Checker(monkeypatch, capsys, tmp_path, pytest_options, markers)


def _command_id(line: str) -> str:
    return re.sub(r"[\[\]]", "", " ".join(shlex.split(line, comments=True)))[:100]


@pytest.mark.parametrize("line", block_commands() + inline_commands(), ids=_command_id)
def test_readme_command_parses(checker: Checker, line: str) -> None:
    checker.command(line)


def test_the_commands_are_found() -> None:
    """The extraction itself: README's main commands are among those checked."""
    commands = block_commands() + inline_commands()
    for expected in ("python -m pytest -q", "bash scripts/quickstart.sh", "python train/main.py --help", "torchrun"):
        assert any(line.startswith(expected) for line in commands), expected
    assert sum(line.startswith("python -m dualtower.generate") for line in commands) >= 4
    assert sum(line.startswith("python -m dualtower.evaluate") for line in commands) >= 2


def test_a_wrong_flag_or_override_fails(checker: Checker) -> None:
    fail = pytest.fail.Exception
    with pytest.raises(fail, match="unrecognized arguments: --no_such_flag"):
        checker.command("python -m dualtower.generate --checkpoint DIR --no_such_flag")
    with pytest.raises(fail, match="required: --checkpoint"):
        checker.command("python -m dualtower.generate --image a.png")
    with pytest.raises(fail, match="cannot be combined"):
        checker.command("python -m dualtower.generate --checkpoint DIR --image a.png --stream --jsonl")
    with pytest.raises(fail, match="unknown --model_args"):
        checker.command("python -m dualtower.evaluate --model DIR --model_args pretend=1")
    with pytest.raises(fail, match=r"unknown key 'optim\.lr_lft'"):
        checker.command("python train/main.py --config train/configs/debug.toml --optim.lr_lft=1e-3")
    with pytest.raises(fail, match=r"unknown key 'optim\.lr_lft'"):
        checker.command("bash train.sh debug --optim.lr_lft=1e-3")
    with pytest.raises(fail, match="unrecognized arguments: --nope"):
        checker.command("bash evaluate.sh --nope")
    with pytest.raises(AssertionError, match="no option --benchmark-nope"):
        checker.command("python -m pytest benchmarks/ --benchmark-nope")
    with pytest.raises(AssertionError, match="unknown markers"):
        checker.command('python -m pytest -m "not compild"')
    with pytest.raises(AssertionError, match="no such module"):
        checker.command("python -m dualtower.nope --x")
    with pytest.raises(AssertionError, match="takes no"):
        checker.command("LMMS_EVAL_PLUGINS=dualtower.eval lmms-eval --model dualtower --model_args checkpoint=DIR")


# -- the commands CI and the quick start run ----------------------------------------------------------------


def test_the_test_and_install_commands_are_the_ones_ci_runs() -> None:
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    quick_start = README.split("Tests: the same command CI runs", 1)[1].split("```bash\n", 1)[1].split("\n")[0]
    assert quick_start in ci
    tests_section = block_commands(README.split("\n## Tests", 1)[1])[0]
    assert shlex.split(tests_section, comments=True) == shlex.split(quick_start)
    (install,) = [s for s in code_spans() if s.startswith("pip install -c constraints/cpu.txt")]
    assert f"python -m pip install -q {install.removeprefix('pip install ')}" in ci


def test_quickstart_commands_parse(checker: Checker, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """scripts/quickstart.sh trains for minutes: its two commands are parsed, its question-picking step runs."""
    script = (ROOT / "scripts" / "quickstart.sh").read_text()
    text = re.sub(r"\\\n\s*", " ", script)
    commands = [line for line in text.splitlines() if not line.startswith("#")]
    lines = [line for line in commands if re.search(r"train/main\.py|-m dualtower", line)]
    assert len(lines) == 2, lines
    values = {"$RUN_DIR": str(tmp_path), "$SAMPLE": "x.png", "$QUESTION": "What?"}
    for line in lines:
        words = [w for w in shlex.split(line.replace('"$@"', "")) if w != "$PY"]
        for name, value in values.items():
            words = [w.replace(name, value) for w in words]
        checker.command(shlex.join(["python", *words]))
    (question_step,) = re.findall(r"<<'PY'\n(.*?)\nPY\n", script, flags=re.S)
    monkeypatch.setattr(sys, "argv", ["-", str(tmp_path / "sample.png")])
    exec(compile(question_step, "quickstart.sh", "exec"), {"__name__": "__main__"})
    assert (tmp_path / "sample.png").is_file()


# -- the file tree -------------------------------------------------------------------------------------------


def test_layout_names_only_existing_files() -> None:
    for paths, description in layout_entries():
        assert description, f"Layout: {paths} has no description"
        for path in paths:
            if "*" in path:
                assert list(ROOT.glob(path)), f"Layout names {path}: nothing matches"
            elif path.endswith("/"):
                assert (ROOT / path).is_dir(), f"Layout names {path}: no such folder"
            else:
                assert (ROOT / path).is_file(), f"Layout names {path}: no such file"


def _package_files() -> list[str]:
    files = []
    for folder in PACKAGE_FOLDERS:
        for path in (ROOT / folder).rglob("*"):
            relative = path.relative_to(ROOT).as_posix()
            skipped = "__pycache__" in path.parts or path.suffix in (".pyc", ".so") or ".egg-info" in relative
            if path.is_file() and not skipped and path.name not in ("__init__.py", "py.typed"):
                files.append(relative)
    return files


def test_layout_lists_every_file_of_the_package_folders() -> None:
    """Each file of dualtower/, kernels/, train/, scripts/, benchmarks/, csrc/ is in the tree: by name, by a
    glob, or in a listed sub-folder (a top-level folder such as `kernels/` does not count)."""
    paths = [path for entry_paths, _ in layout_entries() for path in entry_paths]
    folders = [p for p in paths if p.endswith("/") and p.count("/") > 1]
    globs = [p for p in paths if "*" in p]
    files = _package_files()
    assert "kernels/prefix_attention.py" in files and "train/main.py" in files
    missing = [
        f for f in files
        if f not in paths and not any(fnmatch.fnmatch(f, g) for g in globs)
        and not any(f.startswith(d) for d in folders)
    ]  # fmt: skip
    assert not missing, f"README's Layout does not list {missing}"


def test_layout_cli_entries_are_those_modules() -> None:
    checked = 0
    for paths, description in layout_entries():
        match = re.search(r"CLI: python -m ([\w.]+)", description)
        if match:
            origin = Path(importlib.util.find_spec(match.group(1)).origin).resolve()
            assert origin == (ROOT / paths[0]).resolve(), f"{paths[0]}: `python -m {match.group(1)}` is {origin}"
            checked += 1
    assert checked >= 3


def test_files_named_in_the_prose_exist() -> None:
    checked = 0
    for span in code_spans():
        if not re.fullmatch(r"[\w.{},/-]+", span) or span in OUTSIDE_REPO or span.endswith("/"):
            continue  # not a path; or a folder, mostly of a run's outputs (`export/`, `runs/gpu_assets/`)
        placeholder = any(part.isupper() or "XXXX" in part for part in span.split("/"))
        file_name = re.search(r"\.(py|sh|toml|cu|ipynb|md)$", span) is not None
        in_a_repo_folder = "/" in span and (ROOT / span.split("/")[0]).is_dir()  # not `eval/loss`, `runs/...`
        if placeholder or span.startswith(".") or not (file_name or in_a_repo_folder):
            continue
        for path in expand_braces(span):
            if "/" in path:
                assert (ROOT / path).exists(), f"README names {path}: not in the repository"
            elif not path.endswith(".md"):  # a bare name (`bench_train.py`): somewhere in the tree
                assert any(".venv" not in p.parts for p in ROOT.rglob(path)), f"README names {path}: not found"
            checked += 1
    assert checked >= 20


# -- keys, flags and facts named in the prose ----------------------------------------------------------------


def _job_field(dotted: str) -> bool:
    from dualtower.config import JobConfig

    obj: Any = JobConfig()
    for part in dotted.split("."):
        names = [f.name for f in dataclasses.fields(obj)] if dataclasses.is_dataclass(obj) else []
        matches = fnmatch.filter(names, part)
        if not matches:
            return False
        obj = getattr(obj, matches[0])
    return True


def test_config_keys_and_values_in_the_prose_are_accepted() -> None:
    from dualtower.config import JobConfig, apply_override
    from dualtower.model.config import ConfigError
    from dualtower.typed_fields import merge_table

    sections = {f.name for f in dataclasses.fields(JobConfig)}
    checked = 0
    for span in code_spans():
        override = re.fullmatch(r"--(\w+\.[\w.*]+)(?:=(.*))?", span)
        dotted = re.fullmatch(r"(\w+)\.([\w*]+)(?: = .*)?", span)
        table = re.fullmatch(r"\[(\w+)\] (\w+)(?: = (.*))?", span)
        try:
            if override:
                key, value = override.groups()
                assert _job_field(key), f"README names --{key}: no such config key"
                for choice in (value or "").split("|"):
                    if choice and choice != "..." and not choice.isupper():
                        apply_override(JobConfig(), key, choice)
            elif dotted and dotted.group(1) in sections and not re.search(r"\.(jsonl?|md)$", span):
                assert _job_field(f"{dotted.group(1)}.{dotted.group(2)}"), f"README names {span}: no such key"
            elif table:
                section, key, value = table.groups()
                assert _job_field(f"{section}.{key}"), f"README names [{section}] {key}: no such config key"
                if value and value != "...":
                    merge_table(JobConfig(), tomllib.loads(f"[{section}]\n{key} = {value}"), "")
            else:
                continue
        except ConfigError as error:
            pytest.fail(f"README's `{span}`: {error}")
        checked += 1
    assert checked >= 10


def _entry_point_options() -> set[str]:
    """The options of every CLI in ENTRY_POINTS, read from their own parsers, and train/main.py's own."""
    options = {"--config", "--profile", "--help"}  # train/main.py: dualtower.config.split_cli
    for module in ENTRY_POINTS:
        parser = parse_only(importlib.import_module(module).main, [], stop_before_parsing=True).parser
        options |= set(re.findall(r"--[\w-]+", parser.format_help()))
    return options


def test_flags_in_the_prose_exist(pytest_options: set[str]) -> None:
    gpu_check = (ROOT / "scripts" / "gpu_check.sh").read_text()
    known = _entry_point_options() | pytest_options | set(re.findall(r"^\s*(--[\w-]+)\)", gpu_check, re.M))
    flags = {span.split()[0].split("=")[0] for span in code_spans() if re.match(r"--[\w-]+(?:[ =]|$)", span)}
    assert {"--stream", "--jsonl", "--profile_steps", "--benchmark-compare-fail", "--prepare"} <= flags
    assert not flags - known, f"README names options no entry point takes: {sorted(flags - known)}"


def test_environment_variables_exist() -> None:
    sources = "".join(
        path.read_text()
        for folder in PACKAGE_FOLDERS
        for path in (ROOT / folder).rglob("*")
        if path.suffix in (".py", ".sh")
    )
    named = set(re.findall(r"\b(?:DUALTOWER|GPU_CHECK)_[A-Z_]+\b", README))
    assert len(named) >= 5
    assert not {name for name in named if name not in sources}, "README names variables the code never reads"


def test_extras_and_recipes_in_the_layout() -> None:
    descriptions = {paths[0]: text for paths, text in layout_entries()}
    listed = re.search(r"extras \(([^)]*)\)", descriptions["pyproject.toml"]).group(1).split(", ")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert sorted(listed) == sorted(extras)
    recipes = descriptions["train/configs/*.toml"].removeprefix("recipes: ")
    named = [name for item in re.split(r", (?![^{]*\})", recipes) for name in expand_braces(item)]
    assert sorted(named) == sorted(p.stem for p in (ROOT / "train" / "configs").glob("*.toml"))


def test_model_table_parameter_counts() -> None:
    from dualtower.model import FLAVORS, DualTowerVLM

    rows = re.findall(r"^\| (`[^|]+`) \|[^|]*\|[^|]*\| ([\d. M/]+) \|$", README, flags=re.M)
    counts = {}
    for names, millions in rows:
        for name, value in zip(re.findall(r"`([\w-]+)`", names), millions.split(" / "), strict=True):
            counts[name] = value.strip()
    assert set(counts) == set(FLAVORS)
    for name, stated in counts.items():
        parameters = sum(p.numel() for p in DualTowerVLM.from_flavor(name, device="meta").parameters())
        assert f"{parameters / 1e6:.1f} M" == stated, f"{name}: {parameters:,} parameters, README says {stated}"


def test_backends_and_mfu_peaks(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from dualtower import ops
    from dualtower.training import flops

    sentence = re.search(r"Backends of the hot ops: ([^.]*)\.", README).group(1)
    assert tuple(re.findall(r"`(\w+)`", sentence)) == ops.BACKENDS
    peaks = re.search(r"Peaks: (.*?)\. MFU is null", " ".join(README.split())).group(1)
    items = re.split(r", (?=[A-Z])", peaks)
    stated = dict(re.fullmatch(r"(.+) ([\d,]+)(?: TFLOP/s)?", item).groups() for item in items)
    keys_named = set()
    for name, tflops in stated.items():
        device_name = f"NVIDIA {name}"  # as torch.cuda.get_device_name spells it
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda _device, device_name=device_name: device_name)
        assert flops.peak_flops(torch.device("cuda")) == float(tflops.replace(",", "")) * 1e12, name
        keys_named.add(next(key for key, _ in flops.PEAK_BF16_FLOPS if flops._names_model(device_name, key)))
    assert keys_named == {key for key, _ in flops.PEAK_BF16_FLOPS}, "README's peaks leave out some GPUs"


def _recipe(name: str) -> dict[str, Any]:
    return tomllib.loads((ROOT / "train" / "configs" / f"{name}.toml").read_text())


def _default_job() -> Any:
    from dualtower.config import JobConfig

    return JobConfig()


def _debug_lm() -> Any:
    from dualtower.model import FLAVORS

    return FLAVORS["debug"].lm


def _prefix_cache_default() -> int:
    from dualtower.generation import Generator

    return inspect.signature(Generator).parameters["prefix_cache_bytes"].default


def _generate_default(name: str) -> Any:
    from dualtower.generate import build_parser

    return build_parser().get_default(name)


def _text(path: str) -> str:
    return (ROOT / path).read_text()


# (what README says, whether the code agrees)
FACTS: list[tuple[str, Callable[[], bool]]] = [
    ("(512 MiB by default", lambda: _prefix_cache_default() == 512 * 2**20),
    ("`--profile_steps` decode steps (default 8)", lambda: _generate_default("profile_steps") == 8),
    ("`--profile` traces optimizer steps 3 and 4", lambda: _default_job().profile.steps == (3, 4)),
    ("within a 460 s total budget", lambda: "GPU_CHECK_BUDGET_S:-460}" in _text("scripts/gpu_check.sh")),
    ("The recipes use `max_tiles_per_row = 64`", lambda: all(
        _recipe(r)["data"]["max_tiles_per_row"] == 64 for r in ("cauldron_135m", "cauldron_360m"))),
    ("The recipe stops at 800 steps", lambda: _recipe("debug")["training"]["steps"] == 800),
    ("SmolLM2's plus 66 tokens", lambda: _debug_lm().extra_token_amount == 66),
    ("`<|image|>` = 49152", lambda: _debug_lm().base_vocab_size == 49152),
    ("(`--checkpoint.resume=auto|none|PATH`)", lambda: _default_job().checkpoint.resume == "auto"),
    ("(offline unless `wandb_mode` says otherwise)", lambda: _default_job().metrics.wandb_mode == "offline"),
    ("the benchmarks run on one torch thread", lambda: '"DUALTOWER_BENCH_THREADS", "1"' in _text(
        "benchmarks/conftest.py")),
]  # fmt: skip


@pytest.mark.parametrize(("phrase", "holds"), FACTS, ids=[phrase for phrase, _ in FACTS])
def test_stated_defaults(phrase: str, holds: Callable[[], bool]) -> None:
    assert phrase in " ".join(README.split()), f"README no longer says {phrase!r}: update this test"
    assert holds(), f"README says {phrase!r}; the code disagrees"
