"""Text streaming in from an LLM, cut into clauses that can be spoken as soon as they are complete.

A clause ends at the first sentence punctuation (`.`, `!`, `?`, `;`, `:`, a line break) followed by white space, or
the first comma or dash once the clause is long enough to be worth speaking alone, or, with no punctuation in sight,
at the last word boundary before `max_chars`; text cut as it streams gives the same clauses as the whole text. A word
is never cut: a clause ends only where white space follows, so `3.5` and a word still arriving stay whole. The
clauses, joined, are exactly the text fed in (spaces included), so the words released with the audio add up to the
model's text.
"""

from __future__ import annotations

import re

_SENTENCE_END = re.compile(r"[.!?;:]+[\"')\]]*\s|\n")
_SOFT_END = re.compile(r"(?:,|\s[-–—])\s")
_WORD = re.compile(r"\s*\S+")


class ClauseCutter:
    """Feed text pieces; take complete clauses as soon as they exist."""

    def __init__(self, *, max_chars: int = 150, min_soft_chars: int = 24) -> None:
        """`max_chars`: a clause without punctuation is cut at a word boundary before this length; `min_soft_chars`:
        a comma or dash ends a clause only once the clause is at least this long."""
        if max_chars < 8 or min_soft_chars < 1:
            raise ValueError("clauses: max_chars must be at least 8 and min_soft_chars at least 1")
        self.max_chars = max_chars
        self.min_soft_chars = min_soft_chars
        self._pending = ""

    def feed(self, text: str) -> list[str]:
        """Add streamed text; returns the clauses it completed, in order."""
        self._pending += text
        clauses: list[str] = []
        while (end := self._clause_end()) is not None:
            clauses.append(self._pending[:end])
            self._pending = self._pending[end:]
        return clauses

    def flush(self) -> str:
        """The text still held (the end of the stream): the last clause, possibly empty."""
        rest, self._pending = self._pending, ""
        return rest

    def _clause_end(self) -> int | None:
        """Where the first complete clause of the pending text ends (its trailing white space included)."""
        text = self._pending
        start = len(text) - len(text.lstrip())
        ends = []
        sentence = _SENTENCE_END.search(text, start)
        if sentence is not None and sentence.end() - start <= self.max_chars:
            ends.append(sentence.end())
        soft = next((m for m in _SOFT_END.finditer(text, start) if m.start() - start >= self.min_soft_chars), None)
        if soft is not None and soft.end() - start <= self.max_chars:
            ends.append(soft.end())
        if ends:  # the earliest: what a stream would cut at, not knowing what comes after it
            return min(ends)
        if len(text) - start <= self.max_chars:
            return None
        words = [match.end() for match in _WORD.finditer(text, start)]
        complete = [end for end in words if end < len(text) and text[end].isspace()]
        fitting = [end for end in complete if end - start <= self.max_chars]
        if fitting:
            return fitting[-1] + 1
        return complete[0] + 1 if complete else None  # one word longer than max_chars: whole, once it is complete


def words_of(clause: str) -> list[str]:
    """The clause as pieces that each hold one word with the white space before it (the last one also the white
    space after it), so that the pieces joined are the clause."""
    pieces = _WORD.findall(clause)
    if not pieces:
        return [clause] if clause else []
    tail = len(clause) - sum(len(piece) for piece in pieces)
    if tail:
        pieces[-1] += clause[-tail:]
    return pieces
