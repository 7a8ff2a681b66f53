"""Caller audio received but not yet analysed, handed out a piece at a time.

One `input_audio_buffer.append` may carry minutes of audio (15 MiB of base64). Decoding, resampling and running the
VAD over all of it at once held the event loop for seconds (150 s of audio: 3.4 s with silero), stalling every other
session. Appends are queued here as their base64 text and decoded one slice (about a second of audio) at a time,
as the session asks for pieces, so the work of one message is spread over many short steps.
"""

from __future__ import annotations

import binascii
from collections import deque
from dataclasses import dataclass

import numpy as np

from omnivox.pipeline.audio import AudioFormat, StreamResampler
from omnivox.pipeline.engines.base import INPUT_RATE
from omnivox.pipeline.events import ProtocolError

SLICE_CHARS = 65_536
"""Base64 characters decoded per slice: a multiple of 8 (6 bytes: whole samples of every format), ~1 s of pcm16."""


@dataclass
class _Base64Audio:
    text: str
    fmt: AudioFormat
    event_id: str | None
    param: str
    offset: int = 0


class PendingAudio:
    def __init__(self) -> None:
        self._queue: deque[_Base64Audio | np.ndarray] = deque()
        self._ready: deque[np.ndarray] = deque()
        """Decoded 16 kHz samples not yet handed out, oldest first."""
        self._resampler: StreamResampler | None = None
        self._resampler_format = ""

    def __bool__(self) -> bool:
        return bool(self._ready or self._queue)

    def add_base64(self, text: str, fmt: AudioFormat, event_id: str | None, param: str = "audio") -> None:
        """Queue base64 audio in `fmt`; it is decoded (and resampled to 16 kHz) slice by slice in `take`."""
        if text:
            self._queue.append(_Base64Audio(text, fmt, event_id, param))

    def add_samples(self, pcm: np.ndarray) -> None:
        """Queue audio already at 16 kHz (the WebRTC and telephony doors decode their own)."""
        if pcm.size:
            self._queue.append(pcm)

    def take(self, max_samples: int) -> np.ndarray:
        """Up to `max_samples` of the next 16 kHz audio, decoding at most one slice of base64 to find them.

        Bad base64 raises `ProtocolError` for the append it came in (with its `event_id`); the rest of that append is
        dropped and what came before it stays."""
        if not self._ready and self._queue:
            self._decode_next()
        if not self._ready:
            return np.zeros(0, np.float32)
        head = self._ready.popleft()
        if head.size > max_samples:
            head, rest = head[:max_samples], head[max_samples:]
            self._ready.appendleft(rest)
        return head

    def unread(self, pcm: np.ndarray) -> None:
        """Put back what `take` just returned: it is handed out again first."""
        if pcm.size:
            self._ready.appendleft(pcm)

    def flush_resampler(self) -> None:
        """The turn is over: the resampler's filter delay is released after what is queued."""
        if self._resampler is not None:
            self.add_samples(self._resampler.flush())
            self._resampler, self._resampler_format = None, ""

    def clear(self) -> None:
        self._queue.clear()
        self._ready.clear()

    def _decode_next(self) -> None:
        entry = self._queue[0]
        if isinstance(entry, np.ndarray):
            self._queue.popleft()
            self._ready.append(entry)
            return
        end = entry.offset + SLICE_CHARS
        text = entry.text[entry.offset : end]
        entry.offset = end
        if entry.offset >= len(entry.text):
            self._queue.popleft()
        try:  # strict mode accepts exactly what b64decode(validate=True) does, without its regex pass over the text
            samples = entry.fmt.decode(binascii.a2b_base64(text, strict_mode=True))
        except (binascii.Error, ValueError) as exc:
            if entry.offset < len(entry.text):
                self._queue.popleft()
            kind = "not valid base64" if isinstance(exc, binascii.Error) else f"not {entry.fmt.name}: {exc}"
            raise ProtocolError(
                f"audio is {kind}", code="invalid_audio", param=entry.param, event_id=entry.event_id
            ) from None
        key = f"{entry.fmt.name}@{entry.fmt.rate}"
        if self._resampler is None or self._resampler_format != key:
            self._resampler, self._resampler_format = StreamResampler(entry.fmt.rate, INPUT_RATE), key
        resampled = self._resampler.process(samples)
        if resampled.size:
            self._ready.append(resampled)
