"""The TTS stage: streamed text in, clauses spoken as soon as they are complete, words released with their audio.

`speak` reads a text stream (an LLM's deltas) in its own task, so the model keeps streaming while a clause is
synthesised; clauses are spoken in order. Each clause's audio goes out in `chunk_ms` deltas, and before each delta
the words whose audio begins in it are released as one text delta: the transcript a client holds never runs ahead of
the audio it was sent, so barge-in truncation cuts the text where the caller stopped hearing. Items of the stream
that are not text (usage, tool calls) pass through in order, after the audio of the text before them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Mapping
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

import numpy as np

from omnivox.pipeline.engines.base import AudioDelta, TextDelta
from omnivox.pipeline.tts.base import OPENAI_VOICES, SpeechBackend, SpeechError, speakable
from omnivox.pipeline.tts.clauses import ClauseCutter, words_of

log = logging.getLogger(__name__)

MIN_SPEED = 0.25
MAX_SPEED = 4.0


@dataclass(frozen=True)
class _Passed:
    item: Any


@dataclass(frozen=True)
class _Failed:
    error: BaseException


_END = object()


class TtsStage:
    """A speech backend behind clause cutting, voice mapping and aligned release."""

    def __init__(
        self,
        backend: SpeechBackend,
        *,
        voices: Mapping[str, str] | None = None,
        max_clause_chars: int = 150,
        min_soft_clause_chars: int = 24,
        chunk_ms: int = 40,
    ) -> None:
        """`voices` maps client voice names (OpenAI's) to the backend's voices; it is laid over the backend's own
        `voice_map` (espeak-ng has one)."""
        self.backend = backend
        self.voices = {**getattr(backend, "voice_map", {}), **(voices or {})}
        self.max_clause_chars = max_clause_chars
        self.min_soft_clause_chars = min_soft_clause_chars
        self.chunk_ms = chunk_ms
        self._started = False
        self._start_lock = asyncio.Lock()

    @property
    def rate(self) -> int:
        return self.backend.rate

    @property
    def ready(self) -> bool:
        return self._started

    async def start(self) -> None:
        """Load the backend once, whoever asks first (an engine at start-up, or the speech door on first use)."""
        async with self._start_lock:
            if not self._started:
                await self.backend.start()
                self._started = True

    async def close(self) -> None:
        if self._started:
            self._started = False
            await self.backend.close()

    def voice(self, name: str) -> str | None:
        """The backend voice for a client's voice name: configured mapping, then the backend's own names, then the
        default voice for OpenAI's names; None for a name nobody knows."""
        if name in self.voices:
            return self.voices[name]
        if self.backend.has_voice(name):
            return name
        return self.backend.default_voice if name in OPENAI_VOICES else None

    async def speak(
        self, stream: AsyncIterator[Any], voice: str, speed: float = 1.0
    ) -> AsyncIterator[TextDelta | AudioDelta | Any]:
        """Speak the text (`str` items) of `stream`; other items pass through. Closing this iterator closes
        `stream` at once."""
        backend_voice = self.voice(voice) or self.backend.default_voice
        queue: asyncio.Queue[object] = asyncio.Queue()
        reader = asyncio.create_task(self._read(stream, queue), name="tts-reader")
        try:
            while (item := await queue.get()) is not _END:
                if isinstance(item, _Failed):
                    raise item.error
                if isinstance(item, _Passed):
                    yield item.item
                    continue
                assert isinstance(item, str)
                async for delta in self._clause(item, backend_voice, speed):
                    yield delta
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader

    async def audio(self, text: str, voice: str, speed: float = 1.0) -> AsyncIterator[np.ndarray]:
        """Just the audio of a whole text, clause by clause (the speech endpoint)."""

        async def whole() -> AsyncIterator[str]:
            yield text

        async with aclosing(self.speak(whole(), voice, speed)) as deltas:
            async for delta in deltas:
                if isinstance(delta, AudioDelta):
                    yield delta.pcm

    async def _read(self, stream: AsyncIterator[Any], queue: asyncio.Queue[object]) -> None:
        cutter = ClauseCutter(max_chars=self.max_clause_chars, min_soft_chars=self.min_soft_clause_chars)
        try:
            async with aclosing(stream):  # type: ignore[type-var]
                async for item in stream:
                    if isinstance(item, str):
                        for clause in cutter.feed(item):
                            queue.put_nowait(clause)
                    else:
                        if rest := cutter.flush():
                            queue.put_nowait(rest)
                        queue.put_nowait(_Passed(item))
            if rest := cutter.flush():
                queue.put_nowait(rest)
            queue.put_nowait(_END)
        except Exception as exc:
            queue.put_nowait(_Failed(exc))

    async def _clause(self, clause: str, voice: str, speed: float) -> AsyncIterator[TextDelta | AudioDelta]:
        """One clause: its audio in `chunk_ms` deltas, each preceded by the words whose audio begins in it."""
        pieces = words_of(clause)
        spoken = [speakable(piece) for piece in pieces]
        if not any(spoken):
            yield TextDelta(clause)
            return
        chunk = max(1, self.rate * self.chunk_ms // 1000)
        starts: tuple[int, ...] = ()
        released = 0
        position = 0
        try:
            async for speech in self.backend.synthesize(spoken, voice, speed):
                starts = speech.word_starts or starts
                for offset in range(0, speech.pcm.size, chunk):
                    audio = speech.pcm[offset : offset + chunk]
                    position += audio.size
                    due = released
                    while due < len(pieces) and (not starts or starts[min(due, len(starts) - 1)] < position):
                        due += 1
                    if due > released:
                        yield TextDelta("".join(pieces[released:due]))
                        released = due
                    yield AudioDelta(np.ascontiguousarray(audio, dtype=np.float32))
        except SpeechError:
            raise
        except Exception as exc:
            log.exception("speech synthesis failed")
            raise SpeechError(f"speech synthesis failed: {type(exc).__name__}: {exc}") from exc
        if released < len(pieces):
            yield TextDelta("".join(pieces[released:]))
