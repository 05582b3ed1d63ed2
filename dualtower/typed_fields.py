"""Typed values for dataclass fields: TOML tables and command-line text checked against the fields' type hints.

`merge_table` applies a nested TOML table onto a dataclass, `parse_cli_text` + `coerce` turn one
`--section.key=value` text into the field's type, and `cli_text` writes a value back as text that
`parse_cli_text` reads. Every mistake raises `ConfigError` with a one-line message naming the key.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import tomllib
import types
import typing
from typing import Any

from dualtower.model.config import ConfigError


def check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def field_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def suggest(name: str, known: list[str]) -> str:
    # Compared in lower case: difflib scores 'TRAINING' against 'training' as nothing alike.
    by_lower = {key.lower(): key for key in known}
    close = difflib.get_close_matches(name.lower(), list(by_lower), n=1)
    return f" (did you mean {by_lower[close[0]]!r}?)" if close else ""


def coerce(value: Any, hint: Any, key: str) -> Any:
    """Check/convert a TOML or parsed-CLI value against a field's type hint."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return coerce(value, option, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if origin is typing.Literal:
        check(value in typing.get_args(hint), f"{key} must be one of {typing.get_args(hint)}, got {value!r}")
        return value
    if origin in (tuple, list):
        check(isinstance(value, list | tuple), f"{key} expects a list, got {value!r}")
        args = typing.get_args(hint)
        element = args[0] if args else Any
        if origin is tuple and args and args[-1] is not Ellipsis:
            check(len(value) == len(args), f"{key} expects {len(args)} values, got {len(value)}")
            return tuple(coerce(v, a, key) for v, a in zip(value, args, strict=True))
        items = [coerce(v, element, key) for v in value]
        return tuple(items) if origin is tuple else items
    if hint is Any:
        return value
    if hint is bool:
        check(isinstance(value, bool), f"{key} expects true or false, got {value!r}")
        return value
    if hint is int:
        check(isinstance(value, int) and not isinstance(value, bool), f"{key} expects an integer, got {value!r}")
        return value
    if hint is float:
        check(isinstance(value, int | float) and not isinstance(value, bool), f"{key} expects a number, got {value!r}")
        return float(value)
    if hint is str:
        check(isinstance(value, str), f"{key} expects a string, got {value!r}")
        return value
    if dataclasses.is_dataclass(hint):
        check(isinstance(value, dict), f"{key} expects a table, got {value!r}")
        return merge_table(hint(), value, key)
    return value


def merge_table(obj: Any, table: dict[str, Any], where: str) -> Any:
    """Apply a (nested) TOML table onto a dataclass instance; unknown keys are errors that name them."""
    hints = field_hints(type(obj))
    known = [f.name for f in dataclasses.fields(obj)]
    for key, value in table.items():
        name = f"{where}.{key}" if where else key
        if key not in hints:
            raise ConfigError(f"unknown key {name!r}{suggest(key, known)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current) and isinstance(value, dict):
            merge_table(current, value, name)
        else:
            setattr(obj, key, coerce(value, hints[key], name))
    return obj


def parse_cli_text(text: str, hint: Any, key: str) -> Any:
    """A command-line string -> a typed value for the field `key`.

    TOML syntax, with the brackets of a list optional (`0.9,0.95`); a list of strings also takes unquoted
    comma-separated words (`ai2d,chartqa`); a single number also takes Python's float syntax (`.5`).
    """
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType) and text.lower() in ("none", "null"):
        return None
    if hint is str:
        return text
    if hint is bool:
        lowered = text.lower()
        known = ("true", "false", "1", "0", "yes", "no", "on", "off")
        check(lowered in known, f"{key} expects true or false, got {text!r}")
        return lowered in ("true", "1", "yes", "on")
    toml_text = text
    if origin in (tuple, list) and not text.lstrip().startswith("["):
        # A pasted Python tuple would otherwise split into the words '(a' and 'b)'.
        check(not text.lstrip().startswith("("), f"{key} takes a,b or [a, b], not a tuple: got {text!r}")
        if _holds_strings(hint) and not any(quote in text for quote in "'\""):
            return _comma_list(text)  # --data.cauldron_configs=ai2d,chartqa (unquoted words)
        toml_text = "[" + text + "]"
    try:
        return tomllib.loads(f"v = {toml_text}")["v"]
    except tomllib.TOMLDecodeError:
        pass
    if hint is float:
        with contextlib.suppress(ValueError):
            return float(text)
    return text  # a bare word; _coerce reports it (as the user wrote it) if the field wants something else


def _holds_strings(hint: Any) -> bool:
    """Whether a tuple/list hint holds strings (tuple[str, ...], list[str])."""
    args = typing.get_args(hint)
    return bool(args) and all(arg is str for arg in args if arg is not Ellipsis)


def _comma_list(text: str) -> list[str]:
    """'a, b,c' -> ['a', 'b', 'c']; empty items (a trailing comma, an empty text) are dropped."""
    return [item.strip() for item in text.split(",") if item.strip()]


def cli_text(value: Any) -> str:
    """A default as `--key=` text that `parse_cli_text` reads back: true/false, comma lists ("" = empty list)."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list | tuple):
        return ",".join(cli_text(item) for item in value)
    return "none" if value is None else str(value)
