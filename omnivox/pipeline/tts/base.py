"""What every speech backend offers the TTS stage: a clause's words in, audio chunks and word start times out.

A backend speaks one clause at a time. With its first chunk it says where each word's audio begins (in samples from
the clause's start): exact where the model knows (Piper's durations), estimated otherwise. The stage releases each
word together with the audio that begins to speak it, so the text a caller was sent never runs ahead of the audio.
"""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Protocol, TypeVar

import numpy as np

from omnivox.pipeline.engines.base import EngineError

OPENAI_VOICES = (
    "alloy",
    "ash",
    "ballad",
    "coral",
    "echo",
    "fable",
    "onyx",
    "nova",
    "sage",
    "shimmer",
    "verse",
    "marin",
    "cedar",
)
"""OpenAI's voice names (TTS and Realtime); each maps to a configured voice of the backend."""

_UNSPOKEN = re.compile(r"[*_#`~|<>\[\]{}\\]+")


class SpeechError(EngineError):
    """Speech synthesis failed for one request."""

    code = "speech_failed"


@dataclass(frozen=True)
class SpeechChunk:
    pcm: np.ndarray
    """Mono float32 at the backend's rate."""
    word_starts: tuple[int, ...] = ()
    """In the first chunk of a clause: where each word's audio begins, in samples from the clause's start (one per
    word, non-decreasing). Later chunks leave it empty."""


class SpeechBackend(Protocol):
    name: str
    rate: int
    default_voice: str

    def has_voice(self, voice: str) -> bool:
        """Whether `voice` is one of the backend's own voice names."""

    async def start(self) -> None:
        """Load models; a missing voice raises an error naming it."""

    def synthesize(self, words: Sequence[str], voice: str, speed: float) -> AsyncIterator[SpeechChunk]:
        """Speak one clause given as its words (at least one has something to say)."""

    async def close(self) -> None: ...


def speakable(word: str) -> str:
    """A word as it should be read aloud: markdown and markup symbols dropped; nothing for a word without a letter or
    digit (a dash, an ellipsis, a list bullet)."""
    spoken = _UNSPOKEN.sub("", word).strip()
    return spoken if any(char.isalnum() for char in spoken) else ""


def proportional_starts(words: Sequence[str], samples: int) -> tuple[int, ...]:
    """Word starts estimated by spreading `samples` over the words in proportion to their length."""
    lengths = np.array([len(word) + 1 for word in words], dtype=np.float64)
    if not lengths.size:
        return ()
    starts = np.concatenate([[0.0], np.cumsum(lengths)[:-1]]) / lengths.sum() * samples
    return tuple(int(start) for start in starts)


T = TypeVar("T")
_END = object()


async def iterate_in_thread(iterator: Iterator[T], executor: Executor) -> AsyncIterator[T]:
    """Drive a blocking iterator on `executor`, one item per call, so the event loop never waits on it. Closing the
    async iterator (a cancelled response) closes the blocking one after the step in flight, on the executor."""
    loop = asyncio.get_running_loop()
    lock = threading.Lock()

    def step() -> object:
        with lock:
            return next(iterator, _END)

    def close() -> None:
        with lock:
            getattr(iterator, "close", lambda: None)()

    try:
        while (item := await loop.run_in_executor(executor, step)) is not _END:
            yield item  # type: ignore[misc]
    finally:
        executor.submit(close)
