"""A deterministic engine: answers every turn with a fixed text spoken by espeak-ng.

It is the test double of the real engines and a no-GPU demo: a real (robotic) voice, offline,
streamed in small chunks at a configurable pace, with the text released word by word as the audio
that speaks it is released, so truncation and barge-in behave as with a streaming model. With tool rules
(`scripted_tools`) it calls functions when the caller's words ask for them and speaks their results.

As the no-GPU demo (`auto` without a GPU) it speaks through the TTS stage (the bundled Piper voice) and, with
`echo`, answers with what it recognised of the caller, so a first run is a real conversation loop.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Mapping
from typing import Any

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
    ToolCallDelta,
    Usage,
    check_prompt_budget,
    cut_at_stop,
)
from omnivox.pipeline.engines.scripted_tools import ToolRule, answer_to_output, choose_rule
from omnivox.pipeline.recognisers import PocketsphinxRecogniser
from omnivox.pipeline.tts import TtsStage
from omnivox.pipeline.tts.espeak import ESPEAK_RATE, ESPEAK_VOICES

DEFAULT_REPLY = "Hello! This is omnivox, a self hosted voice agent. How can I help you today?"
ECHO_REPLY = "You said: {heard}. This is omnivox without a GPU, so I can only repeat what I hear."
ECHO_UNHEARD = "Sorry, I did not catch that. This is omnivox without a GPU, so I can only repeat what I hear."
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
        echo: bool = False,
        echo_reply: str = ECHO_REPLY,
        echo_unheard: str = ECHO_UNHEARD,
        tts: TtsStage | None = None,
        tools: list[Mapping[str, Any]] | None = None,
        recogniser_processes: int = 1,
    ) -> None:
        """`speed` is how much faster than real time audio is produced (4.0 = a 40 ms chunk every 10 ms);
        `first_audio_ms` is the simulated time to the first chunk; `transcript` is what `transcribe` returns.
        `echo` answers with `echo_reply` about what it recognised of the caller's last turn (`echo_unheard` when
        nothing); `tts` speaks through that TTS stage (as it streams) instead of espeak-ng at the simulated pace;
        `tools` are the tool rules of `scripted_tools`;
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
        self.echo = echo
        self.echo_reply = echo_reply
        self.echo_unheard = echo_unheard
        self.tts = tts
        self.tool_rules = [ToolRule.from_config(rule) for rule in tools or ()]
        self._turns = 0
        self._ready = False
        self._recogniser = PocketsphinxRecogniser(recogniser_processes)

    @property
    def ready(self) -> bool:
        return self._ready

    @property
    def text_follows_audio(self) -> bool:
        """Through the TTS stage, each word comes with the audio that begins it."""
        return self.tts is not None

    @property
    def native_rate(self) -> int:
        return self.tts.rate if self.tts is not None else ESPEAK_RATE

    async def start(self) -> None:
        if self.tts is not None:
            await self.tts.start()
        else:
            await asyncio.to_thread(self._speech, self.replies[0], "alloy")
        self._ready = True

    async def close(self) -> None:
        self._ready = False
        await self._recogniser.close()

    @functools.lru_cache(maxsize=32)  # noqa: B019 - one engine per process; the cache holds a few replies
    def _speech(self, text: str, voice: str) -> np.ndarray:
        return synthesize_speech(text, self.native_rate, ESPEAK_VOICES.get(voice, "en-us"), self.words_per_minute)

    def next_reply(self) -> str:
        reply = self.replies[self._turns % len(self.replies)]
        self._turns += 1
        return reply

    async def heard(self, request: ResponseRequest) -> str:
        """What the caller said last: the typed text of the last user message and what its audio was recognised as."""
        last = next((m for m in reversed(request.messages) if m.role == "user"), None)
        if last is None:
            return ""
        typed = " ".join(part.text.strip() for part in last.parts if isinstance(part, TextPart))
        audio = [part.pcm for part in last.parts if isinstance(part, AudioPart)]
        recognised = await self.transcribe(np.concatenate(audio)) if audio else ""
        return " ".join(words for words in (typed.strip(), recognised.strip()) if words)

    async def respond(self, request: ResponseRequest) -> AsyncIterator[Delta]:
        input_tokens = prompt_tokens(request)
        check_prompt_budget(input_tokens, request)
        text, rule = await self._plan(request)
        reply = cut_at_stop(text, request.sampling.stop)[0].rstrip()
        words = reply.split(" ") if reply else []
        async for delta in self._speak(reply, words, request):
            yield delta
        if rule is not None:  # the arguments in two pieces, as a streaming model sends them
            half = len(rule.arguments) // 2
            yield ToolCallDelta(0, name=rule.call, arguments=rule.arguments[:half])
            yield ToolCallDelta(0, arguments=rule.arguments[half:])
        yield Usage(input_tokens=input_tokens, output_tokens=len(words))

    async def _plan(self, request: ResponseRequest) -> tuple[str, ToolRule | None]:
        """What to say, and the rule whose function to call after it (tool mode); else, with `echo`, what was heard;
        else the next scripted reply."""
        if self.tool_rules:
            answer = answer_to_output(self.tool_rules, request)
            if answer is not None:
                return answer, None
            if request.tools_enabled:
                rule = choose_rule(self.tool_rules, request, await self.heard(request))
                if rule is not None:
                    return rule.say, rule
        if self.echo:
            heard = await self.heard(request)
            return (self.echo_reply.format(heard=heard.rstrip(".?! ")) if heard else self.echo_unheard), None
        return self.next_reply(), None

    async def _speak(self, reply: str, words: list[str], request: ResponseRequest) -> AsyncIterator[Delta]:
        if not words:
            return
        if self.tts is not None and request.output_audio:
            async for delta in self.tts.speak(_once(reply), request.voice):
                yield delta
            return
        await asyncio.sleep(self.first_audio_ms / 1000)
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
        return await self._recogniser.transcribe(audio, language, prompt)


async def _once(text: str) -> AsyncIterator[str]:
    yield text
