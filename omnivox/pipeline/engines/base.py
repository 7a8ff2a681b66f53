"""The engine protocol: a conversation in, an async stream of text and audio deltas out.

Engines never see sockets, protocols or wire formats. The session core builds a
`ResponseRequest` from the conversation as the caller heard it; the I/O shell iterates
`Engine.respond(request)` and feeds every delta back into the core. Cancelling the task
that iterates the stream cancels the engine work at its next step.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

import numpy as np

INPUT_RATE = 16_000
"""Rate of all audio handed to engines (what the Qwen-Omni feature extractor wants)."""


@dataclass(frozen=True)
class TextPart:
    text: str


@dataclass(frozen=True)
class AudioPart:
    """Mono float32 PCM in [-1, 1] at `INPUT_RATE`."""

    pcm: np.ndarray


@dataclass(frozen=True)
class ImagePart:
    """Encoded image bytes (PNG/JPEG/...) as received from the client."""

    data: bytes
    mime_type: str = "image/png"


Part = TextPart | AudioPart | ImagePart


@dataclass(frozen=True)
class Message:
    role: Literal["system", "user", "assistant"]
    parts: tuple[Part, ...]


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling overrides; `None` means the model's generation default."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    max_tokens: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()


def cut_at_stop(text: str, stops: tuple[str, ...]) -> tuple[str, bool]:
    """`text` up to (not including) the earliest stop string, and whether one was found (OpenAI `stop`)."""
    cuts = [index for stop in stops if stop and (index := text.find(stop)) >= 0]
    return (text[: min(cuts)], True) if cuts else (text, False)


@dataclass(frozen=True)
class ResponseRequest:
    """Everything an engine needs to answer one turn."""

    messages: tuple[Message, ...]
    instructions: str = ""
    voice: str = "alloy"
    output_audio: bool = True
    sampling: SamplingParams = field(default_factory=SamplingParams)
    request_id: str = ""
    conversation_id: str = ""
    """The same for every turn of one conversation (the session id); an engine may keep per-conversation state
    under it until `forget_conversation`. Empty for one-off requests."""
    max_prompt_tokens: int | None = None
    """The prompt budget (config `generation.max_prompt_tokens`): an engine refuses a longer prompt with
    `PromptTooLong` instead of running it. None: no budget (the engine's own requests, such as transcriptions)."""


@dataclass(frozen=True)
class TextDelta:
    text: str


@dataclass(frozen=True)
class AudioDelta:
    """Mono float32 PCM in [-1, 1] at the engine's `native_rate`."""

    pcm: np.ndarray


@dataclass(frozen=True)
class Usage:
    """Token counts reported once at the end of a response."""

    input_tokens: int = 0
    output_tokens: int = 0
    cached_input_tokens: int = 0
    """Input tokens whose encoding was reused from an earlier turn (OpenAI's `cached_tokens`)."""


Delta = TextDelta | AudioDelta | Usage


class EngineError(Exception):
    """A failure of one request that the client should hear about; the server keeps running."""

    code = "engine_error"


class EngineBusy(EngineError):
    """Too many queued requests: the client should retry later."""

    code = "server_busy"


class EngineNotReady(EngineError):
    """The model is still loading or failed to load."""

    code = "engine_not_ready"


class PromptTooLong(EngineError):
    """The prompt is longer than the request's `max_prompt_tokens`: the client must shorten the conversation."""

    code = "context_length_exceeded"


def check_prompt_budget(prompt_tokens: int, request: ResponseRequest) -> None:
    """Raise `PromptTooLong` when a prompt of `prompt_tokens` outgrows the request's budget."""
    budget = request.max_prompt_tokens
    if budget is not None and prompt_tokens > budget:
        raise PromptTooLong(
            f"the prompt is {prompt_tokens} tokens, over the budget of {budget}; delete older conversation items"
        )


class EngineOutOfMemory(EngineError):
    """The accelerator ran out of memory for this request; other sessions go on."""

    code = "engine_out_of_memory"


@runtime_checkable
class Engine(Protocol):
    """What every engine offers the server."""

    name: str
    model_id: str
    native_rate: int

    async def start(self) -> None:
        """Load weights and warm up; called once before the first request."""

    def respond(self, request: ResponseRequest) -> AsyncIterator[Delta]:
        """Stream the answer to `request`; raise `EngineError` for per-request failures."""

    @property
    def ready(self) -> bool:
        """True once `start()` has finished successfully."""

    async def close(self) -> None:
        """Release the model and any worker threads."""


def forget_conversation(engine: Engine, conversation_id: str) -> None:
    """Tell an engine that keeps per-conversation state (an optional `forget_conversation` method) to drop it."""
    forget = getattr(engine, "forget_conversation", None)
    if forget is not None:
        forget(conversation_id)
