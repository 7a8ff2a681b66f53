"""Word-level subtitles for streamed speech: when each word of the answer is heard, estimated as it streams.

Neither Qwen-Omni engine reports when a word is spoken, so a word is placed where its text arrives in the audio (the
engines release text at or before the audio that speaks it): it starts when both the previous word has ended and the
audio made so far has reached the point where its text arrived, and lasts in proportion to its letters at an average
speaking rate. A word is timed once the space after it (or the end of the text) completes it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

CHARS_PER_SECOND = 15.0
"""About 170 words a minute."""
MIN_WORD_MS = 80.0


@dataclass(frozen=True)
class TimedWord:
    text: str
    start_ms: float
    end_ms: float

    def to_json(self) -> dict[str, Any]:
        """The audio-modalities `words` entry: milliseconds from the start of the response's audio."""
        start, duration = round(self.start_ms), round(self.end_ms - self.start_ms)
        return {"text": self.text, "start_ts": start, "end_ts": start + duration, "duration": duration}


class WordTimeline:
    def __init__(self, chars_per_second: float = CHARS_PER_SECOND) -> None:
        self._ms_per_char = 1000.0 / chars_per_second
        self._partial = ""
        self._partial_arrived_ms = 0.0
        self._end_ms = 0.0

    def push(self, text: str, audio_ms: float) -> list[TimedWord]:
        """Text that arrived when `audio_ms` of audio had been made; returns the words it completed."""
        words: list[TimedWord] = []
        for char in text:
            if char.isspace():
                if self._partial:
                    words.append(self._word())
            else:
                if not self._partial:
                    self._partial_arrived_ms = audio_ms
                self._partial += char
        return words

    def finish(self) -> list[TimedWord]:
        """The last word, once the text is complete."""
        return [self._word()] if self._partial else []

    def _word(self) -> TimedWord:
        start = max(self._end_ms, self._partial_arrived_ms)
        end = start + max(MIN_WORD_MS, len(self._partial) * self._ms_per_char)
        word = TimedWord(self._partial, start, end)
        self._partial, self._end_ms = "", end
        return word
