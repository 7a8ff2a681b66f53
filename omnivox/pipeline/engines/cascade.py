"""The `cascade` engine: an LLM stage that answers in text, and the TTS stage that speaks it as it streams.

It makes any text-answering model a voice agent on every door: Phi-4-multimodal (on vLLM, NIM, or in process with
`llm.kind: phi4-mm`), or any chat LLM. The caller's audio goes to the LLM as audio when it hears (`llm.audio`),
otherwise each turn is first transcribed by the recogniser (pocketsphinx, a remote `/v1/audio/transcriptions`, or
the LLM itself) and sent as text; the transcripts of earlier turns are kept while the session keeps their audio.
The TTS stage cuts the text into clauses as it streams and speaks each as soon as it is complete, releasing every
word with the audio that begins to speak it, so barge-in truncation keeps exactly the words the caller was sent.
Function calls the LLM makes pass through once the words before them are spoken; a call's own text never reaches the
TTS stage (the stage sends none). Cancelling the response closes the LLM stream at once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator, Mapping
from contextlib import aclosing
from typing import Any

import numpy as np

from omnivox.pipeline.engines.base import (
    AudioPart,
    Delta,
    EngineError,
    Message,
    ResponseRequest,
    TextDelta,
    TextPart,
)
from omnivox.pipeline.engines.llm_stage import LlmStage, TranscriptCache, as_heard_by
from omnivox.pipeline.recognisers import PocketsphinxRecogniser, Recogniser, RemoteRecogniser
from omnivox.pipeline.tts import TtsStage

log = logging.getLogger(__name__)

TRANSCRIBE_PROMPT = "Transcribe the audio clip into text."


def create_llm_stage(model: str, options: Mapping[str, Any]) -> LlmStage:
    """`options`: `kind` and, under the kind's name, that stage's own options."""
    kind = options.get("kind", "remote")
    unknown = set(options) - {"kind", "remote", "phi4-mm"}
    if unknown:
        raise ValueError(f"cascade llm: unknown keys {sorted(unknown)} (options go under llm.remote or llm.phi4-mm)")
    settings = dict(options.get(kind) or {})
    if kind == "remote":
        from omnivox.pipeline.engines.llm_remote import RemoteLlmStage

        if not settings.get("url"):
            raise ValueError("the cascade engine's remote LLM needs engine.options.cascade.llm.remote.url")
        return RemoteLlmStage(model, **settings)
    if kind == "phi4-mm":
        from omnivox.pipeline.engines.phi4_mm import Phi4MmStage

        return Phi4MmStage(model, **settings)
    raise ValueError(f"cascade llm.kind must be remote or phi4-mm, got {kind!r}")


class LlmRecogniser:
    """The LLM stage itself transcribes (Phi-4-multimodal is a strong recogniser): with its own `transcribe` where it
    has one (in process: background work on its worker), else by asking it over its stream."""

    def __init__(self, llm: LlmStage) -> None:
        self.llm = llm

    async def transcribe(self, audio: np.ndarray, language: str | None = None, prompt: str = "") -> str:
        own = getattr(self.llm, "transcribe", None)
        if own is not None:
            return await own(audio, language, prompt)
        instruction = TRANSCRIBE_PROMPT if not language else f"{TRANSCRIBE_PROMPT[:-1]} ({language})."
        parts = (AudioPart(audio), TextPart(f"{instruction} {prompt}".strip()))
        request = ResponseRequest(messages=(Message("user", parts),), output_audio=False)
        pieces: list[str] = []
        async with aclosing(self.llm.stream(request)) as stream:
            async for delta in stream:
                if isinstance(delta, TextDelta):
                    pieces.append(delta.text)
        return "".join(pieces).strip()

    async def close(self) -> None:
        pass


def create_recogniser(options: Mapping[str, Any], llm: LlmStage) -> Recogniser:
    settings = dict(options)
    kind = settings.pop("kind", "auto")
    if kind == "auto":
        kind = "llm" if llm.hears_audio else "pocketsphinx"
    if kind == "pocketsphinx":
        return PocketsphinxRecogniser()
    if kind == "llm":
        if not llm.hears_audio:
            raise ValueError("cascade recogniser.kind llm needs an LLM that hears audio (llm.audio is none)")
        return LlmRecogniser(llm)
    if kind == "remote":
        if not settings.get("url"):
            raise ValueError("cascade recogniser.kind remote needs recogniser.url")
        return RemoteRecogniser(**settings)
    raise ValueError(f"cascade recogniser.kind must be auto, pocketsphinx, remote or llm, got {kind!r}")


class CascadeEngine:
    """An LLM stage and the TTS stage behind the engine protocol."""

    name = "cascade"
    text_follows_audio = True

    def __init__(
        self,
        model: str,
        *,
        tts: TtsStage,
        llm: LlmStage | Mapping[str, Any] | None = None,
        recogniser: Recogniser | Mapping[str, Any] | None = None,
        speed: float = 1.0,
    ) -> None:
        """`llm`: a stage, or its options (`kind` remote | phi4-mm, each stage's own under its name);
        `recogniser`: one, or its options (`kind` auto | pocketsphinx | remote | llm; auto is llm when the LLM hears
        audio); `speed` of the voice (0.25-4)."""
        if not 0.25 <= speed <= 4.0:
            raise ValueError(f"cascade speed must be within 0.25-4.0, got {speed}")
        self.model_id = model
        self.tts = tts
        self.llm = llm if llm is not None and not isinstance(llm, Mapping) else create_llm_stage(model, llm or {})
        self.recogniser = (
            recogniser
            if recogniser is not None and not isinstance(recogniser, Mapping)
            else create_recogniser(recogniser or {}, self.llm)
        )
        self.speed = speed
        self.transcripts = TranscriptCache()

    @property
    def native_rate(self) -> int:
        return self.tts.rate

    @property
    def ready(self) -> bool:
        return self.llm.ready and self.tts.ready

    async def start(self) -> None:
        await asyncio.gather(self.tts.start(), self.llm.start())

    async def close(self) -> None:
        await self.llm.close()
        await self.recogniser.close()

    async def transcribe(self, audio: np.ndarray, language: str | None = None, prompt: str = "") -> str:
        return await self.recogniser.transcribe(audio, language, prompt)

    async def respond(self, request: ResponseRequest) -> AsyncIterator[Delta | Any]:
        llm_request = dataclasses.replace(await self._as_heard(request), output_audio=False)
        answer = self.llm.stream(llm_request)
        if not request.output_audio:
            async with aclosing(answer):  # type: ignore[type-var]
                async for delta in answer:
                    yield delta
            return

        async def text_and_rest() -> AsyncIterator[Any]:
            async with aclosing(answer):  # type: ignore[type-var]
                async for delta in answer:
                    yield delta.text if isinstance(delta, TextDelta) else delta

        async with aclosing(self.tts.speak(text_and_rest(), request.voice, self.speed)) as speech:
            async for delta in speech:
                yield delta

    async def _as_heard(self, request: ResponseRequest) -> ResponseRequest:
        """The request as the LLM can take it: caller audio transcribed for an LLM that does not hear (each clip
        once), images left out for one that does not see."""
        if self.llm.hears_audio and self.llm.sees_images:
            return request
        transcripts: dict[int, str] = {}
        if not self.llm.hears_audio:
            clips = [p.pcm for m in request.messages for p in m.parts if isinstance(p, AudioPart)]
            for pcm in clips:
                text = self.transcripts.get(pcm)
                if text is None:
                    try:
                        text = await self.recogniser.transcribe(pcm)
                    except EngineError:
                        raise
                    except Exception as exc:
                        raise EngineError(f"transcribing the caller failed: {type(exc).__name__}: {exc}") from exc
                    self.transcripts.put(pcm, text)
                transcripts[id(pcm)] = text
        messages = tuple(as_heard_by(m, transcripts, self.llm.sees_images) for m in request.messages)
        return dataclasses.replace(request, messages=messages)
