"""A client for OpenAI-compatible streaming chat completions with audio: request building, chunk parsing, HTTP.

Engines that answer through another server (the `remote` engine; the LLM stage of a cascade) share it. It speaks
three dialects of `POST /v1/chat/completions` with `stream: true`:

- `omnivox`: another omnivox's chat door. Audio out comes as `delta.audio` (`transcript` pieces, `data` PCM16
  24 kHz); the turn's instructions go as the top-level `instructions` field, so that the engine host appends them to
  its model's own system prompt exactly as it does in process; the conversation id goes as OpenAI's
  `prompt_cache_key`, under which the host keeps the conversation's encoded prompt for the next turn.
- `openai`: OpenAI's shape (`gpt-4o-audio-preview` and hosted look-alikes; also any text LLM server such as vLLM or
  NVIDIA NIM when no audio is asked for): chunks as above, instructions as a leading system message.
- `vllm-omni`: vLLM-Omni (`vllm serve ... --omni`). Every chunk names its `modality`; an audio chunk carries a whole
  base64 WAV file (header included, 24 kHz for Qwen-Omni) in `delta.content`; the voice is a top-level `voice`;
  caller audio goes as `audio_url` data URLs. Its Qwen2.5-Omni pipeline sends the whole answer's audio as one chunk
  at the end; a server that answers with one JSON body instead of a stream (whole reply at once: text and audio as
  separate choices, `message.audio.data` a WAV file) is read too.

Caller audio goes as 16 kHz PCM16 WAV parts (`input_audio`, or `audio_url` data URLs), images as `image_url` data
URLs, the conversation as heard (assistant turns as their heard text) on every turn.

Function calling is OpenAI's in every dialect: `tools`, `tool_choice` and `parallel_tool_calls` in the request, the
assistant's calls as `tool_calls` of its message and their results as `tool` messages with `tool_call_id`; streamed
`delta.tool_calls` pieces (or a whole reply's `message.tool_calls`) become `ToolCallDelta`s. From a response's first
call piece on, its text is the call's and is dropped (the engine protocol); vLLM-Omni's talker speaks every token its
thinker writes, the call's too (its server parses calls out of the text only), so its audio is dropped from there as
well. A host that refuses the call it streamed (`invalid_tool_call`) fails that call, not the response.

Server refusals become the engine error kinds of `base.py`: 429 busy, 503 not ready (or out of memory when the
error's code says so), a host that cannot be reached `HostUnreachable` (not ready), anything else failed.
Closing the stream (cancelling the task that iterates it) closes the HTTP connection at once, which the server sees
as the client going away and aborts its request.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import secrets
import threading
import weakref
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx
import numpy as np

from omnivox.pipeline.audio import encode_audio_file, pcm16_to_float
from omnivox.pipeline.engines.base import (
    INPUT_RATE,
    AudioPart,
    EngineBusy,
    EngineError,
    EngineNotReady,
    EngineOutOfMemory,
    ImagePart,
    Message,
    ResponseRequest,
    SamplingParams,
    TextPart,
    ToolCallDelta,
    ToolCallPart,
    ToolResultPart,
    Usage,
)
from omnivox.pipeline.engines.tool_calls import tool_specs
from omnivox.pipeline.media import AudioLimits, decode_audio_native
from omnivox.pipeline.tools import MAX_TOOLS

log = logging.getLogger(__name__)

Dialect = Literal["omnivox", "openai", "vllm-omni"]
DIALECTS: tuple[Dialect, ...] = ("omnivox", "openai", "vllm-omni")
PCM16_RATE = 24_000
"""The rate of OpenAI's `pcm16` (streamed `delta.audio.data`)."""
ENGINE_AUDIO_LIMITS = AudioLimits(max_seconds=600)
"""An engine host's WAV answers (a whole reply at once, from vLLM-Omni's Qwen2.5-Omni) are held to the media bounds."""
CHAT_PATH = "/v1/chat/completions"
THREAD_PARSE_BYTES = 256 * 1024
"""An event this large (a whole reply's audio) is decoded off the event loop."""
INLINE_ENCODE_SAMPLES = 10 * INPUT_RATE
"""New caller audio up to this long (about 1 ms to encode) is encoded on the event loop: a thread hop costs more."""
MAX_CALL_ID_CHARS = 128
"""A server's call id longer than this is replaced by one of ours (it is echoed to clients)."""


class HostUnreachable(EngineNotReady):
    """The server could not be reached or did not answer in time before the response started: nothing was
    received, so the request may be sent to another server."""


class InvalidToolCall(EngineError):
    """The server refused a function call its model made (another omnivox checks calls as this one does)."""

    code = "invalid_tool_call"


# ---------------------------------------------------------------------------------------------- request


@dataclass(frozen=True)
class ChatOptions:
    """How requests to one kind of server are written."""

    model: str
    dialect: Dialect = "openai"
    system_prompt: str = ""
    """Put before the turn's instructions (a system message; for `omnivox`, the `instructions` field). vLLM-Omni's
    Qwen2.5-Omni needs its official speech prompt here to speak."""
    voices: Mapping[str, str] = field(default_factory=dict)
    """OpenAI voice name -> the server's voice. `vllm-omni` sends only mapped voices (else the server's default
    speaker); the others send the request's voice as is, mapped if listed."""
    audio_part: Literal["input_audio", "audio_url"] | None = None
    """How caller audio is sent; None: `audio_url` for `vllm-omni`, `input_audio` otherwise."""
    extra_body: Mapping[str, Any] = field(default_factory=dict)
    """Fields merged into every request (e.g. vLLM's `chat_template_kwargs`, `sampling_params_list`)."""

    def __post_init__(self) -> None:
        if self.dialect not in DIALECTS:
            raise ValueError(f"dialect must be one of {list(DIALECTS)}, got {self.dialect!r}")


AudioData = Callable[[np.ndarray], str]
"""Caller audio (16 kHz float32) -> the base64 text of its WAV file in the request."""


def wav_base64(pcm: np.ndarray) -> str:
    return base64.b64encode(encode_audio_file(pcm, INPUT_RATE, "wav")).decode()


def build_chat_body(
    request: ResponseRequest, options: ChatOptions, audio_data: AudioData = wav_base64
) -> dict[str, Any]:
    """The streamed chat completion request for `request`."""
    dialect = options.dialect
    instructions = "\n\n".join(text for text in (options.system_prompt.strip(), request.instructions.strip()) if text)
    messages: list[dict[str, Any]] = []
    if instructions and dialect != "omnivox":
        messages.append({"role": "system", "content": instructions})
    audio_part = options.audio_part or ("audio_url" if dialect == "vllm-omni" else "input_audio")
    answered = {part.call_id for m in request.messages for part in m.parts if isinstance(part, ToolResultPart)}
    for message in request.messages:
        messages.extend(chat_messages(message, audio_part, audio_data, answered))
    body: dict[str, Any] = {
        "model": options.model,
        "messages": messages,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if instructions and dialect == "omnivox":
        body["instructions"] = instructions
    if request.conversation_id and dialect != "vllm-omni":
        body["prompt_cache_key"] = request.conversation_id
    voice = options.voices.get(request.voice, None if dialect == "vllm-omni" else request.voice)
    if request.output_audio:
        body["modalities"] = ["text", "audio"]
        if dialect == "vllm-omni":
            if voice:
                body["voice"] = voice
        else:
            body["audio"] = {"voice": voice, "format": "pcm16"}
    elif dialect != "openai":
        body["modalities"] = ["text"]
    body.update(sampling_fields(request.sampling, dialect))
    body.update(tool_fields(request))
    body.update(options.extra_body)
    return body


def tool_fields(request: ResponseRequest) -> dict[str, Any]:
    """`tools`, `tool_choice` and `parallel_tool_calls` in OpenAI's chat shape; nothing without tools (OpenAI refuses
    the other two alone)."""
    if not request.tools:
        return {}
    choice = request.tool_choice
    return {
        "tools": tool_specs(request.tools),
        "tool_choice": {"type": "function", "function": {"name": choice.function}} if choice.function else choice.mode,
        "parallel_tool_calls": request.parallel_tool_calls,
    }


def chat_messages(
    message: Message, audio_part: str, audio_data: AudioData = wav_base64, answered: Collection[str] = ()
) -> list[dict[str, Any]]:
    """One engine message as OpenAI chat messages: assistant and system turns are text (assistant audio is
    represented by the transcript the caller heard) with the assistant's function calls as its `tool_calls`; a
    `tool` message becomes one message per result. Only calls whose id is in `answered` are sent: OpenAI refuses a
    call that no `tool` message answers (a Realtime client may never return an output)."""
    if message.role == "tool":
        results = [part for part in message.parts if isinstance(part, ToolResultPart)]
        return [{"role": "tool", "tool_call_id": result.call_id, "content": result.output} for result in results]
    if message.role != "user":
        text = "".join(part.text for part in message.parts if isinstance(part, TextPart))
        made = [part for part in message.parts if isinstance(part, ToolCallPart)]
        calls = [call for call in made if call.call_id in answered]
        if made and not calls and not text:
            return []
        if not calls:
            return [{"role": message.role, "content": text}]
        tool_calls = [
            {"id": call.call_id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}
            for call in calls
        ]
        return [{"role": message.role, "content": text or None, "tool_calls": tool_calls}]
    content: list[dict[str, Any]] = []
    for part in message.parts:
        if isinstance(part, TextPart):
            content.append({"type": "text", "text": part.text})
        elif isinstance(part, AudioPart):
            wav = audio_data(part.pcm)
            if audio_part == "audio_url":
                content.append({"type": "audio_url", "audio_url": {"url": f"data:audio/wav;base64,{wav}"}})
            else:
                content.append({"type": "input_audio", "input_audio": {"data": wav, "format": "wav"}})
        elif isinstance(part, ImagePart):
            url = f"data:{part.mime_type};base64,{base64.b64encode(part.data).decode()}"
            content.append({"type": "image_url", "image_url": {"url": url}})
    return [{"role": "user", "content": content}]


def sampling_fields(sampling: SamplingParams, dialect: Dialect) -> dict[str, Any]:
    """The sampling overrides that are set; `top_k` only where the server is vLLM or omnivox."""
    fields: dict[str, Any] = {}
    if sampling.temperature is not None:
        fields["temperature"] = sampling.temperature
    if sampling.top_p is not None:
        fields["top_p"] = sampling.top_p
    if sampling.top_k is not None and dialect != "openai":
        fields["top_k"] = sampling.top_k
    if sampling.max_tokens is not None:
        fields["max_completion_tokens" if dialect == "openai" else "max_tokens"] = sampling.max_tokens
    if sampling.seed is not None:
        fields["seed"] = sampling.seed
    if sampling.stop:
        fields["stop"] = list(sampling.stop)
    return fields


class AudioEncodings:
    """The base64 WAV of each caller clip, kept while the clip lives (the conversation keeps its turns' arrays), so
    that a turn encodes only its new audio; bounded in bytes, oldest dropped first (a dropped clip is encoded again).

    A request body is then assembled around the encoded clips instead of passing them through `json.dumps`, which
    spends about 7 ms on every 2 MB of base64 holding the GIL: a turn costs its new audio, not the conversation's."""

    def __init__(self, max_bytes: int = 256 * 1024 * 1024) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[int, tuple[weakref.ref[np.ndarray], bytes]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.RLock()  # long clips are encoded on a worker thread; clips die on any thread

    def __len__(self) -> int:
        return len(self._entries)

    def cached(self, pcm: np.ndarray) -> bytes | None:
        with self._lock:
            entry = self._entries.get(id(pcm))
            if entry is None or entry[0]() is not pcm:
                return None
            self._entries.move_to_end(id(pcm))
            return entry[1]

    def get(self, pcm: np.ndarray) -> bytes:
        found = self.cached(pcm)
        if found is not None:
            return found
        encoded = wav_base64(pcm).encode()
        key = id(pcm)
        with self._lock:
            self._drop(key)
            self._entries[key] = (weakref.ref(pcm, lambda _: self._drop(key)), encoded)
            self._bytes += len(encoded)
            while self._bytes > self.max_bytes and self._entries:
                self._drop(next(iter(self._entries)))
        return encoded

    def _drop(self, key: int) -> None:
        with self._lock:
            entry = self._entries.pop(key, None)
            if entry is not None:
                self._bytes -= len(entry[1])

    def uncached_samples(self, request: ResponseRequest) -> int:
        """Caller audio this request would have to encode."""
        return sum(
            part.pcm.size
            for message in request.messages
            for part in message.parts
            if isinstance(part, AudioPart) and self.cached(part.pcm) is None
        )


def encode_chat_body(request: ResponseRequest, options: ChatOptions, encodings: AudioEncodings) -> bytes:
    """The request body as JSON bytes, encoded clips spliced in where unguessable placeholders stood (a caller's
    text can never name another clip)."""
    nonce = secrets.token_hex(16)
    clips: list[bytes] = []

    def placeholder(pcm: np.ndarray) -> str:
        clips.append(encodings.get(pcm))
        return f"{nonce}{len(clips) - 1:08d}"

    skeleton = json.dumps(build_chat_body(request, options, placeholder), separators=(",", ":")).encode()
    first, *rest = skeleton.split(nonce.encode())
    pieces = [first]
    for piece in rest:
        pieces += [clips[int(piece[:8])], piece[8:]]
    return b"".join(pieces)


# ---------------------------------------------------------------------------------------------- response


@dataclass(frozen=True)
class ChatText:
    text: str


@dataclass(frozen=True)
class ChatAudio:
    """Mono float32 PCM at `rate`."""

    pcm: np.ndarray
    rate: int


@dataclass(frozen=True)
class ChatUsage:
    usage: Usage


ChatEvent = ChatText | ChatAudio | ToolCallDelta | ChatUsage


def stream_events(chunk: Mapping[str, Any], dialect: Dialect) -> list[ChatEvent]:
    """The events of one streamed chunk (first choice only); an error chunk raises its engine error."""
    raise_if_error(chunk)
    events: list[ChatEvent] = []
    choices = chunk.get("choices") or []
    delta = choices[0].get("delta") if choices and isinstance(choices[0], Mapping) else None
    if isinstance(delta, Mapping):
        if dialect == "vllm-omni" and chunk.get("modality") == "audio":
            if isinstance(delta.get("content"), str) and delta["content"]:
                events.append(audio_event(delta["content"]))
        else:
            if isinstance(delta.get("content"), str) and delta["content"]:
                events.append(ChatText(delta["content"]))
            events.extend(tool_call_events(delta.get("tool_calls")))
            audio = delta.get("audio")
            if isinstance(audio, Mapping):
                if isinstance(audio.get("transcript"), str) and audio["transcript"]:
                    events.append(ChatText(audio["transcript"]))
                if isinstance(audio.get("data"), str) and audio["data"]:
                    events.append(audio_event(audio["data"]))
    if isinstance(chunk.get("usage"), Mapping):
        events.append(ChatUsage(parse_usage(chunk["usage"])))
    return events


def whole_events(body: Mapping[str, Any]) -> list[ChatEvent]:
    """The events of a completion answered at once: text, then function calls, then audio (vLLM-Omni puts text and
    audio in separate choices)."""
    raise_if_error(body)
    texts: list[ChatEvent] = []
    calls: list[ChatEvent] = []
    audio: list[ChatEvent] = []
    for choice in body.get("choices") or []:
        message = choice.get("message") if isinstance(choice, Mapping) else None
        if not isinstance(message, Mapping):
            continue
        spoken = message.get("audio") if isinstance(message.get("audio"), Mapping) else {}
        text = message.get("content") if isinstance(message.get("content"), str) else ""
        text = text or (spoken.get("transcript") if isinstance(spoken.get("transcript"), str) else "")
        if text:
            texts.append(ChatText(text))
        calls.extend(tool_call_events(message.get("tool_calls")))
        if isinstance(spoken.get("data"), str) and spoken["data"]:
            audio.append(audio_event(spoken["data"]))
    usage = [ChatUsage(parse_usage(body["usage"]))] if isinstance(body.get("usage"), Mapping) else []
    return [*texts, *calls, *audio, *usage]


def tool_call_events(entries: Any) -> list[ToolCallDelta]:
    """`delta.tool_calls` pieces (or a whole `message.tool_calls`, whose entries have no `index`: their position)."""
    if not isinstance(entries, list):
        return []
    deltas = []
    for position, entry in enumerate(entries):
        if not isinstance(entry, Mapping):
            continue
        index = entry.get("index", position)
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < MAX_TOOLS:
            raise EngineError(f"the engine server sent a function call with index {str(index)[:20]!r}")
        function = entry.get("function") if isinstance(entry.get("function"), Mapping) else {}
        name = function.get("name")
        arguments = function.get("arguments")
        if isinstance(arguments, Mapping):  # some servers send the object itself
            arguments = json.dumps(arguments, ensure_ascii=False)
        call_id = entry.get("id")
        deltas.append(
            ToolCallDelta(
                index,
                name=name if isinstance(name, str) else "",
                arguments=arguments if isinstance(arguments, str) else "",
                call_id=call_id if isinstance(call_id, str) and len(call_id) <= MAX_CALL_ID_CHARS else "",
            )
        )
    return deltas


class CallGate:
    """Keeps what follows a response's first function-call piece out of its answer: the text (the call's own), and
    for vLLM-Omni, whose talker speaks the call too, the audio."""

    def __init__(self, dialect: Dialect) -> None:
        self.drops_audio = dialect == "vllm-omni"
        self.first_call: int | None = None
        """The index of the response's first call, once one began."""

    def passes(self, event: ChatEvent) -> bool:
        if isinstance(event, ToolCallDelta):
            self.first_call = event.index if self.first_call is None else self.first_call
            return True
        if self.first_call is None:
            return True
        return not isinstance(event, ChatText) and not (self.drops_audio and isinstance(event, ChatAudio))


def audio_event(data: str) -> ChatAudio:
    """Base64 audio: a WAV file (vLLM-Omni) or OpenAI's raw PCM16 at 24 kHz."""
    try:
        raw = base64.b64decode(data, validate=True)
        if raw[:4] == b"RIFF":
            pcm, rate = decode_audio_native(raw, allowed=("wav",), limits=ENGINE_AUDIO_LIMITS)
            return ChatAudio(pcm, rate)
        return ChatAudio(pcm16_to_float(raw), PCM16_RATE)
    except ValueError as exc:
        raise EngineError(f"the engine server sent audio that cannot be decoded: {exc}") from None


def parse_usage(usage: Mapping[str, Any]) -> Usage:
    details = usage.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, Mapping) else 0
    return Usage(
        input_tokens=_count(usage.get("prompt_tokens")),
        output_tokens=_count(usage.get("completion_tokens")),
        cached_input_tokens=_count(cached),
    )


def _count(value: Any) -> int:
    return value if isinstance(value, int) and value >= 0 else 0


# ---------------------------------------------------------------------------------------------- errors


def raise_if_error(body: Mapping[str, Any]) -> None:
    """OpenAI's `{"error": {...}}` or vLLM's `{"object": "error", ...}` as the matching engine error."""
    if isinstance(body.get("error"), Mapping):
        error = body["error"]
    elif body.get("object") == "error":
        error = body
    else:
        return
    raise engine_error(None, error)


def engine_error(status: int | None, error: Mapping[str, Any]) -> EngineError:
    """The engine error kind for a server's refusal, by its code first and its HTTP status second."""
    code = error.get("code")
    message = str(error.get("message") or f"the engine server answered {status}")
    for kind in (EngineBusy, EngineOutOfMemory, EngineNotReady, InvalidToolCall):
        if code == kind.code:
            return kind(message)
    if status == 429:
        return EngineBusy(message)
    if status == 503:
        return EngineNotReady(message)
    prefix = f"the engine server answered {status}: " if status and status >= 400 else ""
    return EngineError(f"{prefix}{message}")


def error_from_response(status: int, body: bytes) -> EngineError:
    try:
        parsed = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        parsed = None
    if isinstance(parsed, Mapping):
        error = parsed.get("error") if isinstance(parsed.get("error"), Mapping) else parsed
        if isinstance(error, Mapping) and (error.get("message") or error.get("code")):
            return engine_error(status, error)
    text = body[:200].decode(errors="replace").strip()
    return engine_error(status, {"message": text or f"the engine server answered {status}"})


# ---------------------------------------------------------------------------------------------- HTTP


@dataclass(frozen=True)
class Timeouts:
    connect_s: float = 2.0
    """Connecting to the server; past it the server counts as unreachable."""
    read_s: float = 60.0
    """The longest wait for the next bytes of a response, the first ones included (a long prefill under load)."""


class ChatClient:
    """Streams chat completions from one OpenAI-compatible server."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        url: str,
        options: ChatOptions,
        *,
        api_key: str | None = None,
        timeouts: Timeouts = Timeouts(),
        max_event_bytes: int = 64 * 1024 * 1024,
        encodings: AudioEncodings | None = None,
    ) -> None:
        """`url` is the server's root or its `/v1` base; `max_event_bytes` bounds one SSE event or a whole body;
        `encodings` may be shared by the clients of several servers."""
        self.http = http
        self.encodings = encodings or AudioEncodings()
        self.root = server_root(url)
        self.options = options
        self.api_key = api_key
        self.timeouts = timeouts
        self.max_event_bytes = max_event_bytes

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    async def encode(self, request: ResponseRequest) -> bytes:
        """The request body; only audio not encoded before costs time, off the event loop when it is long."""
        if self.encodings.uncached_samples(request) <= INLINE_ENCODE_SAMPLES:
            return encode_chat_body(request, self.options, self.encodings)
        return await asyncio.to_thread(encode_chat_body, request, self.options, self.encodings)

    async def stream(self, request: ResponseRequest) -> AsyncIterator[ChatEvent]:
        body = await self.encode(request)
        async for event in self.stream_body(body):
            yield event

    async def stream_body(self, body: bytes) -> AsyncIterator[ChatEvent]:
        """POST an encoded request and yield its events until the answer ends."""
        timeout = httpx.Timeout(self.timeouts.read_s, connect=self.timeouts.connect_s)
        headers = {**self.headers(), "Content-Type": "application/json", "Accept": "text/event-stream"}
        gate = CallGate(self.options.dialect)
        try:
            async with self.http.stream(
                "POST", self.root + CHAT_PATH, content=body, headers=headers, timeout=timeout
            ) as response:
                if response.status_code != 200:
                    raise error_from_response(response.status_code, await self._read(response))
                if response.headers.get("content-type", "").startswith("application/json"):
                    whole = await self._read(response)
                    for event in await self._parse(whole, gate, whole=True):
                        yield event
                    return
                async for data in self._sse_data(response):
                    for event in await self._parse(data, gate, whole=False):
                        yield event
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            raise HostUnreachable(f"engine server {self.root} unreachable: {describe(exc)}") from None
        except httpx.TimeoutException as exc:
            raise EngineError(f"engine server {self.root} stopped answering: {describe(exc)}") from None
        except httpx.HTTPError as exc:
            raise EngineError(f"engine server {self.root} connection failed: {describe(exc)}") from None

    async def _read(self, response: httpx.Response) -> bytes:
        body = bytearray()
        async for piece in response.aiter_bytes():
            body += piece
            if len(body) > self.max_event_bytes:
                raise EngineError(f"the engine server's answer exceeds {self.max_event_bytes} bytes")
        return bytes(body)

    async def _sse_data(self, response: httpx.Response) -> AsyncIterator[bytes]:
        """The `data` of each server-sent event, until `[DONE]` or the end of the body; bounded in size."""
        buffer = bytearray()
        data: list[bytes] = []
        size = 0
        too_large = EngineError(f"an event from the engine server exceeds {self.max_event_bytes} bytes")
        async for piece in response.aiter_bytes():
            buffer += piece
            while (end := buffer.find(b"\n")) >= 0:
                line = bytes(buffer[:end]).rstrip(b"\r")
                del buffer[: end + 1]
                if line.startswith(b"data:"):
                    data.append(line[5:].removeprefix(b" "))
                    size += len(data[-1])
                    if size > self.max_event_bytes:
                        raise too_large
                elif not line and data:
                    event = b"\n".join(data)
                    data, size = [], 0
                    if event.strip() == b"[DONE]":
                        return
                    yield event
            if len(buffer) + size > self.max_event_bytes:
                raise too_large
        if data and b"\n".join(data).strip() != b"[DONE]":
            yield b"\n".join(data)

    async def _parse(self, data: bytes, gate: CallGate, *, whole: bool) -> list[ChatEvent]:
        """The events of one SSE event (or a whole body) that belong to the answer; a call the server refuses after
        streaming it fails (a `ToolCallDelta` with `error`), as it would in process."""
        try:
            if len(data) >= THREAD_PARSE_BYTES:
                events = await asyncio.to_thread(self._parse_now, data, whole)
            else:
                events = self._parse_now(data, whole)
        except InvalidToolCall as exc:
            if gate.first_call is None:
                raise
            return [ToolCallDelta(gate.first_call, error=str(exc))]
        return [event for event in events if gate.passes(event)]

    def _parse_now(self, data: bytes, whole: bool) -> list[ChatEvent]:
        try:
            parsed = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise EngineError(f"the engine server sent something that is not JSON: {data[:80]!r}") from None
        if not isinstance(parsed, Mapping):
            raise EngineError("the engine server sent a chunk that is not a JSON object")
        return whole_events(parsed) if whole else stream_events(parsed, self.options.dialect)


def server_root(url: str) -> str:
    """`http://host:8000/v1/` -> `http://host:8000`: paths are appended to the root."""
    root = url.strip().rstrip("/")
    return root.removesuffix("/v1")


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
