"""Caller audio for tests and benchmarks: real speech from espeak-ng, silence, and real-time streaming.

A realistic caller sends 20 ms chunks at the pace a microphone produces them; `stream_realtime` keeps that pace
against an absolute schedule (no drift when one send is slow) and reports when each chunk left the client.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import numpy as np

from omnivox.pipeline.audio import audio_format, synthesize_speech

CHUNK_MS = 20
WIRE_RATE = 24_000


@functools.lru_cache(maxsize=32)
def speech(text: str, rate: int = WIRE_RATE) -> np.ndarray:
    """`text` spoken by espeak-ng, float32 mono at `rate` (cached: espeak-ng takes ~100 ms a call)."""
    samples = synthesize_speech(text, rate)
    samples.flags.writeable = False
    return samples


def silence(seconds: float, rate: int = WIRE_RATE) -> np.ndarray:
    return np.zeros(round(seconds * rate), dtype=np.float32)


@dataclass(frozen=True)
class CallerAudio:
    """A caller's stream and where its speech is, so tests can compare server events with the truth."""

    samples: np.ndarray
    rate: int
    speech_spans_ms: tuple[tuple[float, float], ...]
    """(start, end) of each spoken segment, in ms from the start of the stream."""


def caller_audio(segments: Sequence[str | float], rate: int = WIRE_RATE) -> CallerAudio:
    """Concatenate segments: a string is spoken by espeak-ng, a number is that many seconds of silence."""
    parts: list[np.ndarray] = []
    spans: list[tuple[float, float]] = []
    position = 0
    for segment in segments:
        part = speech(segment, rate) if isinstance(segment, str) else silence(segment, rate)
        if isinstance(segment, str):
            voiced = np.flatnonzero(np.abs(part) > 0.01)
            first, last = (voiced[0], voiced[-1]) if voiced.size else (0, part.size)
            spans.append(((position + first) * 1000 / rate, (position + last) * 1000 / rate))
        parts.append(part)
        position += part.size
    samples = np.concatenate(parts) if parts else np.zeros(0, np.float32)
    return CallerAudio(samples, rate, tuple(spans))


def encode(samples: np.ndarray, wire_format: str = "pcm16") -> bytes:
    """Float32 at the format's rate -> wire bytes (`pcm16`, `g711_ulaw`, `g711_alaw`)."""
    return audio_format(wire_format).encode(samples)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def chunks(data: bytes, bytes_per_chunk: int) -> list[bytes]:
    return [data[start : start + bytes_per_chunk] for start in range(0, len(data), bytes_per_chunk)]


def chunk_bytes(wire_format: str = "pcm16", chunk_ms: int = CHUNK_MS) -> int:
    """Bytes in one chunk of `chunk_ms` (960 for 20 ms PCM16 24 kHz, 160 for 20 ms G.711)."""
    fmt = audio_format(wire_format)
    return fmt.rate * chunk_ms // 1000 * (2 if wire_format == "pcm16" else 1)


async def stream_realtime(
    send: Callable[[bytes], Awaitable[None]],
    data: bytes,
    *,
    wire_format: str = "pcm16",
    chunk_ms: int = CHUNK_MS,
    speed: float = 1.0,
) -> list[float]:
    """Send `data` in `chunk_ms` chunks at `speed` x real time; return the `time.monotonic()` of each send."""
    sent_at: list[float] = []
    start = time.monotonic()
    for index, chunk in enumerate(chunks(data, chunk_bytes(wire_format, chunk_ms))):
        delay = start + index * chunk_ms / 1000 / speed - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        sent_at.append(time.monotonic())
        await send(chunk)
    return sent_at


class Microphone:
    """A caller's open microphone: 20 ms chunks at real-time pace, silence unless a phrase is queued with `say`.

    `onsets` holds, for every phrase said, the `time.monotonic()` at which the chunk holding its first voiced
    sample was sent: the client-clock speech onset that barge-in latency is measured from.
    """

    def __init__(
        self, send: Callable[[bytes], Awaitable[None]], wire_format: str = "pcm16", chunk_ms: int = CHUNK_MS
    ) -> None:
        self._send = send
        self._format = wire_format
        self._chunk_samples = audio_format(wire_format).rate * chunk_ms // 1000
        self._chunk_s = chunk_ms / 1000
        self._pending = np.zeros(0, dtype=np.float32)
        self._onset_samples: list[int] = []
        self.onsets: list[float] = []

    def say(self, samples: np.ndarray) -> None:
        """Queue a phrase (float32 at the format's rate) after whatever is still being said."""
        voiced = np.flatnonzero(np.abs(samples) > 0.01)
        if voiced.size:
            self._onset_samples.append(self._pending.size + int(voiced[0]))
        self._pending = np.concatenate((self._pending, samples.astype(np.float32)))

    async def run(self) -> None:
        """Stream until cancelled, against an absolute schedule."""
        start = time.monotonic()
        index = 0
        while True:
            delay = start + index * self._chunk_s - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            chunk = self._pending[: self._chunk_samples]
            self._pending = self._pending[self._chunk_samples :]
            if chunk.size < self._chunk_samples:
                chunk = np.concatenate((chunk, np.zeros(self._chunk_samples - chunk.size, np.float32)))
            if self._onset_samples and self._onset_samples[0] < self._chunk_samples:
                self.onsets.append(time.monotonic())
            self._onset_samples = [s - self._chunk_samples for s in self._onset_samples if s >= self._chunk_samples]
            await self._send(encode(chunk, self._format))
            index += 1
