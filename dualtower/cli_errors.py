"""How the command-line entry points report a failure: one line, `error: <first line of the message>`."""

from __future__ import annotations


def error_line(error: BaseException) -> str:
    """The error's first non-blank message line (its type's name when the message is empty), as `error: ...`."""
    text = str(error).strip()
    return f"error: {text.splitlines()[0] if text else type(error).__name__}"
