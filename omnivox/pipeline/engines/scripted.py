"""A deterministic engine: answers every turn with a fixed text spoken by espeak-ng.

It is the test double of the real engines and a no-GPU demo: a real (robotic) voice, offline,
streamed in small chunks at a configurable pace, with the text released word by word as the audio
that speaks it is released, so truncation and barge-in behave as with a streaming model.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator

import numpy as np

from omnivox.pipeline.audio import synthesize_speech
from omnivox.pipeline.engines.base import (
    INPUT_RATE,
    AudioDelta,
    AudioPart,
    Delta,
    ResponseRequest,
    TextDelta,
    TextPart,
    Usage,
    check_prompt_budget,
    cut_at_stop,
)
from omnivox.pipeline.engines.recogniser import ProcessRecogniser

DEFAULT_REPLY = "Hello! This is omnivox, a self hosted voice agent. How can I help you today?"

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
AUDIO_TOKENS_PER_SECOND = 25
"""What Qwen2.5-Omni's audio encoder makes of a second of audio: the scripted engine counts prompts the same way."""


def prompt_tokens(request: ResponseRequest) -> int:
    """A Qwen-like token count without a tokenizer: a token per 4 characters of text, 25 per second of audio."""
    chars = len(request.instructions)
    seconds = 0.0
    for message in request.messages:
        for part in message.parts:
            if isinstance(part, TextPart):
                chars += len(part.text)
            elif isinstance(part, AudioPart):
                seconds += part.pcm.size / INPUT_RATE
    return chars // 4 + 1 + int(seconds * AUDIO_TOKENS_PER_SECOND)


class ScriptedEngine:
    """Speaks `reply` (or `replies` in turn) for every request; no model, no GPU."""

    name = "scripted"
    native_rate = 24_000

    def __init__(
        self,
        model: str = "scripted",
        *,
        reply: str = DEFAULT_REPLY,
        replies: list[str] | None = None,
        chunk_ms: int = 40,
        speed: float = 4.0,
        first_audio_ms: int = 50,
        words_per_minute: int = 170,
        transcript: str = "",
        recogniser_processes: int = 1,
    ) -> None:
        """`speed` is how much faster than real time audio is produced (4.0 = a 40 ms chunk every 10 ms);
        `first_audio_ms` is the simulated time to the first chunk; `transcript` is what `transcribe` returns;
        `recogniser_processes` is how many pocketsphinx worker processes transcribe callers at once."""
        if speed <= 0 or chunk_ms <= 0:
            raise ValueError("scripted engine: speed and chunk_ms must be positive")
        self.model_id = model
        self.replies = list(replies) if replies else [reply]
        self.chunk_ms = chunk_ms
        self.speed = speed
        self.first_audio_ms = first_audio_ms
        self.words_per_minute = words_per_minute
        self.transcript = transcript
        self._turns = 0
        self._ready = False
        self._recogniser = ProcessRecogniser(recogniser_processes)

    @property
    def ready(self) -> bool:
        return self._ready

    async def start(self) -> None:
        await asyncio.to_thread(self._speech, self.replies[0], "alloy")
        self._ready = True

    async def close(self) -> None:
        self._ready = False
        self._recogniser.close()

    @functools.lru_cache(maxsize=32)  # noqa: B019 - one engine per process; the cache holds a few replies
    def _speech(self, text: str, voice: str) -> np.ndarray:
        return synthesize_speech(text, self.native_rate, ESPEAK_VOICES.get(voice, "en-us"), self.words_per_minute)

    def next_reply(self) -> str:
        reply = self.replies[self._turns % len(self.replies)]
        self._turns += 1
        return reply

    async def respond(self, request: ResponseRequest) -> AsyncIterator[Delta]:
        reply = cut_at_stop(self.next_reply(), request.sampling.stop)[0].rstrip()
        words = reply.split(" ")
        input_tokens = prompt_tokens(request)
        check_prompt_budget(input_tokens, request)
        await asyncio.sleep(self.first_audio_ms / 1000)
        if not request.output_audio:
            for index, word in enumerate(words):
                yield TextDelta(word if index == 0 else " " + word)
                await asyncio.sleep(0)
            yield Usage(input_tokens=input_tokens, output_tokens=len(words))
            return
        audio = await asyncio.to_thread(self._speech, reply, request.voice)
        chunk = self.native_rate * self.chunk_ms // 1000
        word_ends = np.cumsum([len(w) + 1 for w in words]) / (len(reply) + 1) * audio.size
        next_word = 0
        for start in range(0, audio.size, chunk):
            end = min(start + chunk, audio.size)
            while next_word < len(words) and word_ends[next_word] <= end + chunk:
                yield TextDelta(words[next_word] if next_word == 0 else " " + words[next_word])
                next_word += 1
            yield AudioDelta(audio[start:end])
            await asyncio.sleep(self.chunk_ms / 1000 / self.speed)
        yield Usage(input_tokens=input_tokens, output_tokens=len(words))

    async def transcribe(self, audio: np.ndarray, language: str | None = None, prompt: str = "") -> str:
        """The configured `transcript` if set (tests), else offline English recognition with pocketsphinx."""
        if self.transcript:
            return self.transcript
        return await self._recogniser.transcribe(audio)
