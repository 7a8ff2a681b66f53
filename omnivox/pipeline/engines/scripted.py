"""A deterministic engine: answers every turn with a fixed text spoken by espeak-ng.

It is the test double of the real engines and a no-GPU demo: a real (robotic) voice, offline,
streamed in small chunks at a configurable pace, with the text released word by word as the audio
that speaks it is released, so truncation and barge-in behave as with a streaming model. With tool rules
(`scripted_tools`) it calls functions when the caller's words ask for them and speaks their results.
"""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import AsyncIterator, Mapping
from typing import Any

import numpy as np

from omnivox.pipeline.audio import float_to_pcm16, synthesize_speech
from omnivox.pipeline.engines.base import (
    INPUT_RATE,
    AudioDelta,
    AudioPart,
    Delta,
    ResponseRequest,
    TextDelta,
    TextPart,
    ToolCallDelta,
    Usage,
    cut_at_stop,
)
from omnivox.pipeline.engines.scripted_tools import ToolRule, answer_to_output, choose_rule, last_user_words

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
        tools: list[Mapping[str, Any]] | None = None,
    ) -> None:
        """`speed` is how much faster than real time audio is produced (4.0 = a 40 ms chunk every 10 ms);
        `first_audio_ms` is the simulated time to the first chunk; `transcript` is what `transcribe` returns;
        `tools` are the tool rules of `scripted_tools`."""
        if speed <= 0 or chunk_ms <= 0:
            raise ValueError("scripted engine: speed and chunk_ms must be positive")
        self.model_id = model
        self.replies = list(replies) if replies else [reply]
        self.chunk_ms = chunk_ms
        self.speed = speed
        self.first_audio_ms = first_audio_ms
        self.words_per_minute = words_per_minute
        self.transcript = transcript
        self.tool_rules = [ToolRule.from_config(rule) for rule in tools or ()]
        self._turns = 0
        self._ready = False
        self._recogniser: Any = None
        self._recogniser_lock = threading.Lock()

    @property
    def ready(self) -> bool:
        return self._ready

    async def start(self) -> None:
        await asyncio.to_thread(self._speech, self.replies[0], "alloy")
        self._ready = True

    async def close(self) -> None:
        self._ready = False

    @functools.lru_cache(maxsize=32)  # noqa: B019 - one engine per process; the cache holds a few replies
    def _speech(self, text: str, voice: str) -> np.ndarray:
        return synthesize_speech(text, self.native_rate, ESPEAK_VOICES.get(voice, "en-us"), self.words_per_minute)

    def next_reply(self) -> str:
        reply = self.replies[self._turns % len(self.replies)]
        self._turns += 1
        return reply

    async def respond(self, request: ResponseRequest) -> AsyncIterator[Delta]:
        text, rule = await self._plan(request)
        reply = cut_at_stop(text, request.sampling.stop)[0].rstrip()
        words = reply.split(" ") if reply else []
        prompt_chars = sum(len(p.text) for m in request.messages for p in m.parts if isinstance(p, TextPart))
        await asyncio.sleep(self.first_audio_ms / 1000)
        async for delta in self._speak(reply, words, request):
            yield delta
        if rule is not None:  # the arguments in two pieces, as a streaming model sends them
            half = len(rule.arguments) // 2
            yield ToolCallDelta(0, name=rule.call, arguments=rule.arguments[:half])
            yield ToolCallDelta(0, arguments=rule.arguments[half:])
        yield Usage(input_tokens=prompt_chars // 4 + 1, output_tokens=len(words))

    async def _plan(self, request: ResponseRequest) -> tuple[str, ToolRule | None]:
        """What to say, and the rule whose function to call after it (tool mode), or the next scripted reply."""
        if self.tool_rules:
            answer = answer_to_output(self.tool_rules, request)
            if answer is not None:
                return answer, None
            if request.tools_enabled:
                rule = choose_rule(self.tool_rules, request, await self._callers_words(request))
                if rule is not None:
                    return rule.say, rule
        return self.next_reply(), None

    async def _callers_words(self, request: ResponseRequest) -> str:
        """The last user turn: its typed text and its recognised speech."""
        user = next((message for message in reversed(request.messages) if message.role == "user"), None)
        audio = [part.pcm for part in user.parts if isinstance(part, AudioPart)] if user else []
        heard = [await self.transcribe(np.concatenate(audio))] if audio else []
        return " ".join([last_user_words(request), *heard])

    async def _speak(self, reply: str, words: list[str], request: ResponseRequest) -> AsyncIterator[Delta]:
        if not words:
            return
        if not request.output_audio:
            for index, word in enumerate(words):
                yield TextDelta(word if index == 0 else " " + word)
                await asyncio.sleep(0)
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

    async def transcribe(self, audio: np.ndarray, language: str | None = None, prompt: str = "") -> str:
        """The configured `transcript` if set (tests), else offline English recognition with pocketsphinx."""
        if self.transcript:
            return self.transcript
        return await asyncio.to_thread(self._recognise, audio)

    def _recognise(self, audio: np.ndarray) -> str:
        with self._recogniser_lock:
            if self._recogniser is None:
                from pocketsphinx import Decoder  # ships its English model; loaded on first use only

                self._recogniser = Decoder(samprate=INPUT_RATE, loglevel="FATAL")
            decoder = self._recogniser
            decoder.start_utt()
            decoder.process_raw(float_to_pcm16(audio), full_utt=True)
            decoder.end_utt()
            hypothesis = decoder.hyp()
        return hypothesis.hypstr if hypothesis is not None else ""
