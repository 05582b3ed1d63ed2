"""Host-side bookkeeping of the rows being generated: end of sequence, stop strings, streamed text.

The device decides EOS on its own (no host sync per token); this tracker sees the tokens in chunks at
each synchronization, finds stop strings (which need the tokenizer), and produces the final text.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from dualtower.generation.requests import GenerationResult

TextCallback = Callable[[int, str], None]  # (row, new text)
_REPLACEMENT = "\ufffd"  # what a decoder yields for an incomplete UTF-8 sequence


class RowTracker:
    """The tokens and finish state of one row."""

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.finish_reason: str | None = None
        self.emitted = 0  # characters of text already streamed

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class StopTracker:
    def __init__(
        self,
        tokenizer: Any,
        rows: int,
        max_new_tokens: int,
        eos_token_ids: Sequence[int],
        stop_strings: Sequence[str] = (),
        on_text: TextCallback | None = None,
    ):
        self.tokenizer = tokenizer
        self.rows = [RowTracker() for _ in range(rows)]
        self.max_new_tokens = max_new_tokens
        self.eos = frozenset(eos_token_ids)
        self.stop_strings = tuple(stop_strings)
        self.on_text = on_text
        # Streamed text lags this many characters so that a stop string is never half printed.
        self.hold_back = max((len(s) for s in self.stop_strings), default=1) - 1

    @property
    def all_finished(self) -> bool:
        return all(row.finished for row in self.rows)

    def update(self, chunk: list[list[int]]) -> list[int]:
        """Append one chunk of tokens per row; returns the rows a stop string has just finished.

        The result does not depend on how the tokens are chunked: a row ends at the first of its EOS token, its
        max_new_tokens-th token, or the token that completes a stop string ("stop" wins when they coincide).
        """
        stopped = []
        for index, (row, tokens) in enumerate(zip(self.rows, chunk, strict=True)):
            if row.finished:
                continue
            added = self._append(row, tokens)
            # Searched even when this chunk also ended the row (EOS or max_new_tokens): a stop string completed
            # in the same chunk wins, and the tokens after it (up to that EOS) are dropped.
            if self.stop_strings and self._find_stop(row, added):
                stopped.append(index)
            if self.on_text is not None:
                self._stream(index, row)
        return stopped

    def _append(self, row: RowTracker, tokens: list[int]) -> int:
        added = 0
        for token in tokens:
            row.tokens.append(token)
            added += 1
            if token in self.eos:
                row.finish_reason = "eos"
                break
            if len(row.tokens) >= self.max_new_tokens:
                row.finish_reason = "length"
                break
        return added

    def _find_stop(self, row: RowTracker, added: int) -> bool:
        """If a stop string appears, cut the row at the token that completed it."""
        if not self._has_stop(self._decode(row.tokens)):
            return False
        first_new = len(row.tokens) - added
        for end in range(max(first_new, 1), len(row.tokens) + 1):
            if self._has_stop(self._decode(row.tokens[:end])):
                del row.tokens[end:]
                break
        row.finish_reason = "stop"
        return True

    def _has_stop(self, text: str) -> bool:
        return any(stop in text for stop in self.stop_strings)

    def _decode(self, tokens: list[int]) -> str:
        if self.tokenizer is None:  # token-level use (tests, benchmarks): no text
            return ""
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def text(self, row: RowTracker) -> str:
        """Final text of a row: special tokens skipped, cut before the first stop string."""
        text = self._decode(row.tokens)
        cut = min((text.find(s) for s in self.stop_strings if s in text), default=-1)
        return text[:cut] if cut >= 0 else text

    def _stream(self, index: int, row: RowTracker) -> None:
        if row.finished:
            ready = self.text(row)
        else:
            ready = self._decode(row.tokens).rstrip(_REPLACEMENT)
            ready = ready[: max(len(ready) - self.hold_back, 0)]
        if len(ready) > row.emitted:
            self.on_text(index, ready[row.emitted :])
            row.emitted = len(ready)

    def finish(self) -> None:
        """Rows still running when the loop ends ran out of tokens."""
        for index, row in enumerate(self.rows):
            if not row.finished:
                row.finish_reason = "length"
                if self.on_text is not None:
                    self._stream(index, row)

    def results(self) -> list[GenerationResult]:
        return [GenerationResult(self.text(row), list(row.tokens), row.finish_reason or "length") for row in self.rows]
