"""Caller audio on its way from a door to the VAD, worked through a bounded step at a time.

Two stages. Audio received (base64 appends, or 16 kHz audio a door decoded) waits as it came and is decoded and
resampled a slice at a time (`PendingAudio`), then goes through the session's cleaner (echo cancellation, noise
reduction) when it has one. What comes out waits to be heard, and the session takes it a VAD frame's worth at a time.
So one long append never holds the event loop, and the cleaner's thread and the VAD's batcher are never waited on.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from omnivox.pipeline.audio import AudioFormat
from omnivox.pipeline.echo_cancel import CallerAudioCleaner, CleanupSettings
from omnivox.pipeline.engines.base import INPUT_RATE
from omnivox.pipeline.pending_audio import PendingAudio

STEP_SAMPLES = INPUT_RATE
"""Caller audio worked through per step at most (a second): more waits for the next step, so that one long append
never holds the event loop (the shell steps again while the session has `audio_pending`)."""
CleanerFactory = Callable[[CleanupSettings], CallerAudioCleaner | None]


class CallerAudio:
    def __init__(self, cleanup: CleanupSettings, cleaner_factory: CleanerFactory | None = None) -> None:
        self.cleanup = cleanup
        self._cleaner_factory = cleaner_factory
        self.cleaner: CallerAudioCleaner | None = None
        """Made on the first audio once `cleanup` asks for cleaning."""
        self.received = 0
        """Caller samples received at 16 kHz (ahead of the audio ready to hear by what the cleaner still holds)."""
        self._incoming = PendingAudio()
        self._ready = PendingAudio()

    def __bool__(self) -> bool:
        """Some audio is still to be worked through."""
        return bool(self._incoming or self._ready)

    @property
    def echo_suspected(self) -> bool:
        return self.cleaner is not None and self.cleaner.echo_suspected

    def add_base64(self, text: str, fmt: AudioFormat, event_id: str | None) -> None:
        self._incoming.add_base64(text, fmt, event_id)

    def add_samples(self, pcm: np.ndarray) -> None:
        self._incoming.add_samples(pcm)

    def next_step(self, max_samples: int, now: float) -> tuple[np.ndarray, int] | None:
        """Up to `max_samples` of audio ready to hear, and the samples of work it cost. When none is ready, the next
        `STEP_SAMPLES` received go through the cleaner instead (nothing to hear yet, this step). None once
        everything is worked through. Bad base64 raises `ProtocolError` for its append."""
        if self._ready:
            piece = self._ready.take(max_samples)
            return piece, piece.size
        if not self._incoming:
            return None
        received = self._incoming.take(STEP_SAMPLES)
        self._ready.add_samples(self._clean(received, now))
        return np.zeros(0, np.float32), received.size

    def unread(self, pcm: np.ndarray) -> None:
        """Put back what `next_step` handed out: it is handed out again first."""
        self._ready.unread(pcm)

    def cleaned(self) -> None:
        """The cleaner's thread is done: what it cleaned is ready to hear."""
        if self.cleaner is not None:
            self._ready.add_samples(self.cleaner.take())

    def end_turn(self) -> None:
        """The turn is over: the resampler's filter delay is released after what is queued."""
        self._incoming.flush_resampler()

    def flush_cleaner(self) -> None:
        """Everything the cleaner still holds is ready to hear (waits on its thread: at a commit, not per chunk)."""
        if self.cleaner is not None:
            self._ready.add_samples(self.cleaner.flush())

    def discard(self) -> None:
        """`input_audio_buffer.clear`: what is held anywhere was appended before it, and goes with the rest."""
        if self.cleaner is not None:
            self.cleaner.flush()
        self._incoming.clear()
        self._ready.clear()

    def change_cleanup(self, cleanup: CleanupSettings) -> None:
        """New echo/noise settings: what the old cleaner holds is heard first, the next audio goes to a new one."""
        self.flush_cleaner()
        self.cleanup, self.cleaner = cleanup, None

    def far_end(self, pcm: np.ndarray, rate: int, now: float) -> None:
        """Agent audio sent to the caller: the echo canceller's reference."""
        if self.cleaner is not None:
            self.cleaner.far_end(pcm, rate, now)

    def far_end_dropped(self) -> None:
        """The door dropped the agent audio it had queued: the reference forgets it too."""
        if self.cleaner is not None:
            self.cleaner.far_end_dropped()

    def _clean(self, pcm: np.ndarray, now: float) -> np.ndarray:
        if not pcm.size:
            return pcm
        self.received += pcm.size
        if self.cleaner is None and self._cleaner_factory is not None and self.cleanup.active:
            self.cleaner = self._cleaner_factory(self.cleanup)
        return self.cleaner.process(pcm, now) if self.cleaner is not None else pcm
