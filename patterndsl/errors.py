"""The one user-facing error type, with source spans rendered as `file:line:col`, the line and a caret.

>>> src = Source("pattern p() {\\n  attend softmax over slidng(4)\\n}\\n", "p.attn")
>>> err = PatternError("unknown mask 'slidng'", Span(2, 23, 2, 29), src, hint="did you mean 'sliding'?")
>>> print(err)
p.attn:2:23: error: unknown mask 'slidng'
    attend softmax over slidng(4)
                        ^^^^^^
hint: did you mean 'sliding'?
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Iterable


@dataclass(frozen=True)
class Span:
    """1-based line and column of the first character, and of one past the last character."""

    line: int
    column: int
    end_line: int | None = None
    end_column: int | None = None

    def __repr__(self) -> str:
        return f"Span({self.line}:{self.column})"


@dataclass(frozen=True)
class Source:
    """The text a program came from, and the name shown in errors (a path, `<string>` or `builtin:NAME`)."""

    text: str
    name: str = "<string>"

    def line_text(self, line: int) -> str:
        lines = self.text.splitlines()
        return lines[line - 1] if 1 <= line <= len(lines) else ""


_MAX_SHOWN = 200  # characters of a source line shown in an error; 1 MB one-liners stay readable


class PatternError(ValueError):
    """A user error: bad `.attn` text, a bad parameter, or a tensor of the wrong shape/dtype/device.

    `.line` and `.column` are 1-based (None when the error has no place in a source, e.g. a tensor shape);
    `str()` shows `file:line:col`, the source line, a caret under the offending token and a hint.
    """

    def __init__(self, message: str, span: Span | None = None, source: Source | None = None,
                 hint: str | None = None):
        self.message = message
        self.span = span
        self.source = source
        self.hint = hint
        super().__init__(self.render())

    @property
    def line(self) -> int | None:
        return self.span.line if self.span else None

    @property
    def column(self) -> int | None:
        return self.span.column if self.span else None

    def with_source(self, source: Source) -> "PatternError":
        """The same error, attached to `source` if it has none yet (the public entry points add it)."""
        if self.source is not None:
            return self
        return PatternError(self.message, self.span, source, self.hint)

    def render(self) -> str:
        if self.span is None:
            head = f"{self.source.name}: error: {self.message}" if self.source else f"error: {self.message}"
            return head + (f"\nhint: {self.hint}" if self.hint else "")
        name = self.source.name if self.source else "<string>"
        out = [f"{name}:{self.span.line}:{self.span.column}: error: {self.message}"]
        if self.source is not None:
            text = self.source.line_text(self.span.line).replace("\t", " ")
            col = self.span.column - 1
            width = 1
            if self.span.end_line == self.span.line and self.span.end_column:
                width = max(1, self.span.end_column - self.span.column)
            start = 0
            if len(text) > _MAX_SHOWN:  # window the line around the caret
                start = max(0, min(col - _MAX_SHOWN // 2, len(text) - _MAX_SHOWN))
                text = ("..." if start else "") + text[start:start + _MAX_SHOWN]
                col = col - start + (3 if start else 0)
            width = max(1, min(width, len(text) - col))
            out.append("  " + text)
            out.append("  " + " " * col + "^" * width)
        if self.hint:
            out.append(f"hint: {self.hint}")
        return "\n".join(out)

    def __str__(self) -> str:
        return self.render()

    def __reduce__(self):
        return (PatternError, (self.message, self.span, self.source, self.hint))


def did_you_mean(name: str, candidates: Iterable[str]) -> str | None:
    """A 'did you mean' hint for a misspelt name, or None if nothing is close."""
    close = difflib.get_close_matches(name, sorted(set(candidates)), n=1, cutoff=0.6)
    return f"did you mean '{close[0]}'?" if close else None
