"""espeak-ng as a speech backend: robotic but tiny, offline, and many languages. A clause is spoken whole by the
`espeak-ng` binary (on the synthesis executor); word starts are spread over its audio by word length."""

from __future__ import annotations

import functools
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator, Sequence
from concurrent.futures import Executor

from omnivox.pipeline.audio import synthesize_speech
from omnivox.pipeline.tts.base import SpeechChunk, SpeechError, iterate_in_thread, proportional_starts

ESPEAK_RATE = 24_000
WORDS_PER_MINUTE = 170

ESPEAK_VOICES = {
    "alloy": "en-us",
    "ash": "en-us+m3",
    "ballad": "en-gb",
    "coral": "en-us+f3",
    "echo": "en-us+m1",
    "sage": "en-us+f2",
    "shimmer": "en-us+f4",
    "verse": "en-gb+m3",
    "marin": "en-us+f1",
    "cedar": "en-us+m2",
}
"""OpenAI voice names -> espeak-ng voices; any other name speaks with the default `en-us`."""


@functools.cache
def installed_voices() -> tuple[frozenset[str], frozenset[str]]:
    """The languages and variants the installed espeak-ng lists."""
    binary = shutil.which("espeak-ng")
    if binary is None:
        return frozenset(), frozenset()

    def column(option: str, index: int) -> frozenset[str]:
        lines = subprocess.run([binary, option], capture_output=True, text=True, timeout=30).stdout.splitlines()[1:]
        return frozenset(line.split()[index].rsplit("/", 1)[-1] for line in lines if len(line.split()) > index)

    return column("--voices", 1), column("--voices=variant", 4)


class EspeakBackend:
    name = "espeak"
    rate = ESPEAK_RATE
    default_voice = "en-us"
    voice_map = ESPEAK_VOICES

    def __init__(self, executor: Executor, *, words_per_minute: int = WORDS_PER_MINUTE) -> None:
        self.executor = executor
        self.words_per_minute = words_per_minute

    def has_voice(self, voice: str) -> bool:
        """An installed espeak-ng language, optionally with a `+variant` (`en-us`, `en-gb+f3`)."""
        language, _, variant = voice.partition("+")
        languages, variants = installed_voices()
        return language in languages and (not variant or variant in variants)

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    def _clause(self, words: Sequence[str], voice: str, speed: float) -> Iterator[SpeechChunk]:
        text = " ".join(word for word in words if word)
        audio = synthesize_speech(text, self.rate, voice, round(self.words_per_minute * speed))
        yield SpeechChunk(audio, proportional_starts(words, audio.size))

    async def synthesize(self, words: Sequence[str], voice: str, speed: float) -> AsyncIterator[SpeechChunk]:
        try:
            async for chunk in iterate_in_thread(self._clause(words, voice, speed), self.executor):
                yield chunk
        except RuntimeError as exc:
            raise SpeechError(str(exc)) from exc
