"""Real-time pacing of one response's audio in fixed frames, against the caller's clock.

A frame is released when the caller's playout position, plus `lead_ms`, reaches it. The lead is the
client's jitter buffer: big enough to hide network hiccups, small enough that barge-in stops the agent
within a frame or two and that the server knows how much the caller can have heard. Time comes from
the caller only (`now`, seconds on any monotonic clock), like aiortc's tracks pace against
`t0 + pts/rate`, so pacing never drifts.
"""

from __future__ import annotations

from collections import deque

import numpy as np

_HISTORY_S = 2.0
"""Released audio kept for rewinding a pause to what the caller heard (a door's playout queue is shorter)."""


class FramePacer:
    def __init__(self, rate: int, frame_ms: int = 40, lead_ms: int = 200) -> None:
        self.rate = rate
        self.frame_samples = rate * frame_ms // 1000
        self.lead_s = lead_ms / 1000
        self._chunks: list[np.ndarray] = []
        self._queued = 0
        self._finished = False
        self._t0: float | None = None
        self._history: deque[np.ndarray] = deque()
        self._history_samples = 0
        self.paused = False
        self.sent_samples = 0

    @property
    def sent_ms(self) -> float:
        return self.sent_samples * 1000 / self.rate

    @property
    def queued_samples(self) -> int:
        return self._queued

    @property
    def drained(self) -> bool:
        """All audio has been released and no more will come."""
        return self._finished and self._queued == 0 and not self.paused

    def push(self, samples: np.ndarray) -> None:
        if samples.size:
            self._chunks.append(samples.astype(np.float32, copy=False))
            self._queued += samples.size

    def finish(self) -> None:
        """No more audio will be pushed: the last, shorter frame may go out."""
        self._finished = True

    def clear(self) -> int:
        """Drop everything not yet released (barge-in); returns the dropped sample count."""
        dropped, self._chunks, self._queued = self._queued, [], 0
        self._finished, self.paused = True, False
        return dropped

    def pause(self, rewind_samples: int = 0) -> None:
        """Release nothing until `resume` (a suspected interruption); the last `rewind_samples` released, which the
        caller has not heard (a door dropped them from its queue), go back to the front of the queue."""
        self.paused = True
        rewind = min(rewind_samples, self._history_samples)
        if rewind <= 0:
            return
        released = np.concatenate(self._history)
        self._history.clear()
        self._history.append(released[: released.size - rewind])
        self._history_samples = released.size - rewind
        self._chunks.insert(0, released[released.size - rewind :])
        self._queued += rewind
        self.sent_samples -= rewind

    def resume(self) -> None:
        """Release again from where the pause left off; playout restarts at the next `pop_due`."""
        self.paused = False
        self._t0 = None

    def _due_at(self) -> float:
        """The next frame goes out once it keeps the caller at most `lead` (at least one frame) ahead."""
        assert self._t0 is not None
        ahead = max(self.lead_s, self.frame_samples / self.rate)
        return self._t0 + (self.sent_samples + self.frame_samples) / self.rate - ahead - 1e-9

    def _ready(self) -> bool:
        return self._queued >= self.frame_samples or (self._finished and self._queued > 0)

    def pop_due(self, now: float) -> list[np.ndarray]:
        """The frames whose time has come."""
        frames: list[np.ndarray] = []
        while self._ready() and not self.paused:
            if self._t0 is None or now > self._t0 + self.sent_samples / self.rate:
                # first frame, or the caller ran dry (underrun): its playout restarts now
                self._t0 = now - self.sent_samples / self.rate
            if now < self._due_at():
                break
            frames.append(self._take(min(self.frame_samples, self._queued)))
        return frames

    def next_due(self) -> float | None:
        """When the next frame becomes due, or None if nothing is waiting for time."""
        if self.paused:
            return None
        if not self._ready() or self._t0 is None:
            return None if not self._ready() else float("-inf")
        return self._due_at()

    def _take(self, count: int) -> np.ndarray:
        joined = np.concatenate(self._chunks) if len(self._chunks) > 1 else self._chunks[0]
        frame, rest = joined[:count], joined[count:]
        self._chunks = [rest] if rest.size else []
        self._queued -= count
        self.sent_samples += count
        self._history.append(frame)
        self._history_samples += frame.size
        while self._history_samples - self._history[0].size >= _HISTORY_S * self.rate:
            self._history_samples -= self._history.popleft().size
        return frame
