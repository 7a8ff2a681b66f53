"""The caller's audio held for the turn in progress, at 16 kHz, addressed by sample position since the session began.

Listening appends a chunk every 20 ms and drops what is too old to ever become part of a turn; the held audio is
compacted only once a second of dropped audio has piled up, so listening never copies the whole buffer per chunk.
"""

from __future__ import annotations

import numpy as np

from omnivox.pipeline.engines.base import INPUT_RATE

_COMPACT_SAMPLES = INPUT_RATE
"""Audio dropped from the buffer is freed once a second of it has piled up, not on every chunk."""


class InputBuffer:
    def __init__(self, max_seconds: float) -> None:
        self.max_samples = int(max_seconds * INPUT_RATE)
        self.total = 0
        """Samples received since the session began."""
        self.start = 0
        """Where the buffer starts (in samples since the session began); older audio is gone."""
        self._chunks: list[np.ndarray] = []
        self._held_start = 0
        """Where the audio held in `_chunks` starts: at or before `start`, trimmed in steps of `_COMPACT_SAMPLES`."""

    def append(self, pcm: np.ndarray) -> None:
        """Hold `pcm`; beyond `max_seconds` the oldest audio is dropped."""
        self._chunks.append(pcm.astype(np.float32, copy=False))
        self.total += pcm.size
        if self.total - self.start > self.max_samples:
            self.drop_before(self.total - self.max_samples)

    def empty(self) -> None:
        self._chunks, self.start, self._held_start = [], self.total, self.total

    def drop_before(self, sample: int) -> None:
        if sample <= self.start:
            return
        self.start = sample
        if sample - self._held_start >= _COMPACT_SAMPLES:
            audio = self.take(sample, self.total)
            self._chunks, self._held_start = ([audio] if audio.size else []), sample

    def take(self, start: int, end: int) -> np.ndarray:
        """Samples [start, end) of the buffer, clipped to what it still holds."""
        if not self._chunks:
            return np.zeros(0, np.float32)
        joined = np.concatenate(self._chunks) if len(self._chunks) > 1 else self._chunks[0]
        self._chunks = [joined]
        low = max(start, self.start) - self._held_start
        return joined[low : max(end, self.start) - self._held_start]

    def take_all(self) -> np.ndarray:
        return self.take(self.start, self.total)
