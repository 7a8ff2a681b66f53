"""The engine protocol: a conversation in, an async stream of text and audio deltas out.

Engines never see sockets, protocols or wire formats. The session core builds a
`ResponseRequest` from the conversation as the caller heard it; the I/O shell iterates
`Engine.respond(request)` and feeds every delta back into the core. Cancelling the task
that iterates the stream cancels the engine work at its next step.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

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


@dataclass(frozen=True)
class ToolCallPart:
    """A function call the assistant made (in an assistant message); `arguments` is JSON text."""

    call_id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class ToolResultPart:
    """What a function call returned (the one part of a `tool` message), as the client sent it."""

    call_id: str
    output: str
    name: str = ""
    """The called function, where known (some chat templates name it in the result)."""


Part = TextPart | AudioPart | ImagePart | ToolCallPart | ToolResultPart


@dataclass(frozen=True)
class Message:
    role: Literal["system", "user", "assistant", "tool"]
    parts: tuple[Part, ...]


@dataclass(frozen=True)
class FunctionTool:
    """A function the model may call: its name, what it is for, and its JSON-schema parameters."""

    name: str
    description: str = ""
    parameters: Mapping[str, Any] = field(default_factory=dict, hash=False)


@dataclass(frozen=True)
class ToolChoice:
    """Whether the model may (`auto`), must not (`none`) or must (`required`) call a tool; `function` names the one
    it must call."""

    mode: Literal["auto", "none", "required"] = "auto"
    function: str | None = None


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling overrides; `None` means the model's generation default."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    max_tokens: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()


MAX_TEMPERATURE = 2.0
MIN_TEMPERATURE = 0.01
"""Smallest positive temperature used: below it logits / temperature overflow to inf and the probabilities turn
NaN (at 1e-40 they do). A smaller positive request is raised to it; 0 means greedy decoding."""


class InvalidSampling(ValueError):
    """A sampling parameter a client sent is not usable; `field` names it as the client spelled it."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def checked_sampling(
    *,
    temperature: Any = None,
    top_p: Any = None,
    top_k: Any = None,
    max_tokens: Any = None,
    max_tokens_limit: int | None = None,
    seed: int | None = None,
    stop: tuple[str, ...] = (),
    names: Mapping[str, str] | None = None,
) -> SamplingParams:
    """`SamplingParams` from values a client sent (any JSON type), or `InvalidSampling` naming the bad one.

    Every door and the engines go through this one check, so no value that could make the sampling probabilities
    NaN (on CUDA a device-side assert that breaks the context for every later request) reaches a sampler.
    Temperature is a finite number in [0, 2] (0 is greedy; tiny positive values are raised to `MIN_TEMPERATURE`),
    top_p a finite number in [0, 1], top_k and max_tokens integers (top_k >= 0, 0 = off; max_tokens >= 1, at most
    `max_tokens_limit` when given). None keeps the model's default. `names` maps a field to how the caller's wire
    format spells it, for the message and `InvalidSampling.field`.
    """

    def invalid(field: str, rule: str) -> InvalidSampling:
        name = (names or {}).get(field, field)
        return InvalidSampling(f"{name} must be {rule}", name)

    if temperature is not None:
        if not _number(temperature) or not math.isfinite(temperature) or not 0 <= temperature <= MAX_TEMPERATURE:
            raise invalid("temperature", f"a number in [0, {MAX_TEMPERATURE:g}]")
        temperature = float(temperature)
        if 0 < temperature < MIN_TEMPERATURE:
            temperature = MIN_TEMPERATURE
    if top_p is not None:
        if not _number(top_p) or not math.isfinite(top_p) or not 0 <= top_p <= 1:
            raise invalid("top_p", "a number in [0, 1]")
        top_p = float(top_p)
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 0):
        raise invalid("top_k", "an integer >= 0 (0 turns it off)")
    if max_tokens is not None:
        limit = max_tokens_limit or math.inf
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or not 1 <= max_tokens <= limit:
            raise invalid(
                "max_tokens", f"an integer in [1, {max_tokens_limit}]" if max_tokens_limit else "an integer >= 1"
            )
    return SamplingParams(
        temperature=temperature, top_p=top_p, top_k=top_k, max_tokens=max_tokens, seed=seed, stop=stop
    )


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
    tools: tuple[FunctionTool, ...] = ()
    tool_choice: ToolChoice = field(default_factory=ToolChoice)
    parallel_tool_calls: bool = True
    """False: at most one call per response (the engine ignores further calls)."""

    max_prompt_tokens: int | None = None
    """The prompt budget (config `generation.max_prompt_tokens`): an engine refuses a longer prompt with
    `PromptTooLong` instead of running it. None: no budget (the engine's own requests, such as transcriptions)."""

    @property
    def tools_enabled(self) -> bool:
        """The model may call a tool in this response."""
        return bool(self.tools) and self.tool_choice.mode != "none"


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


@dataclass(frozen=True)
class ToolCallDelta:
    """A piece of a function call the model makes. Pieces with the same `index` belong to one call: the first names
    it (`name`, and `call_id` where the engine has one, else the core assigns one), `arguments` pieces concatenate to
    the call's JSON arguments. `error` says the model's call could not be parsed: the call fails, and its text is
    neither spoken nor shown as the answer.

    From the first piece of a call on, an engine sends no more text for the response (the spoken part, if any, came
    before it); audio of that earlier text may still follow."""

    index: int
    name: str = ""
    arguments: str = ""
    call_id: str = ""
    error: str | None = None


Delta = TextDelta | AudioDelta | ToolCallDelta | Usage


class EngineError(Exception):
    """A failure of one request that the client should hear about; the server keeps running."""

    code = "engine_error"


class EngineBusy(EngineError):
    """Too many queued requests: the client should retry later."""

    code = "server_busy"


class EngineNotReady(EngineError):
    """The model is still loading or failed to load."""

    code = "engine_not_ready"


class InvalidRequest(EngineError):
    """The request itself cannot be answered (e.g. audio with NaN or infinite samples): the client's error."""

    code = "invalid_request_error"


class EngineUnhealthy(EngineNotReady):
    """The engine cannot serve at all (its worker died or stopped making progress); `/healthz` says so too."""

    code = "engine_unhealthy"


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

    # Optional: `text_follows_audio = True` says each text delta comes just before the audio delta in which its
    # words begin (a TTS stage); the session core then truncates the text exactly where the caller stopped hearing.


def engine_failure(engine: Engine) -> str | None:
    """Why the engine can no longer serve (e.g. a broken CUDA context), for an engine that says so through an
    optional `failure` attribute; None while it is healthy. Only a restart of the process recovers from it."""
    return getattr(engine, "failure", None)


def engine_health_problem(engine: Engine) -> str | None:
    """Why the engine cannot serve right now (its optional `health_problem` property: a dead or stalled worker, a
    failed device), or None when nothing is known to be wrong. Loading is not a problem: see `ready`."""
    return getattr(engine, "health_problem", None)


def forget_conversation(engine: Engine, conversation_id: str) -> None:
    """Tell an engine that keeps per-conversation state (an optional `forget_conversation` method) to drop it."""
    forget = getattr(engine, "forget_conversation", None)
    if forget is not None:
        forget(conversation_id)
