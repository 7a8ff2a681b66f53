"""The HTTP doors: OpenAI Chat Completions with audio, the audio-modalities SSE stream, transcription, models.

These doors answer one request with one engine response: no VAD and no turns. The request's `messages` become a
`ResponseRequest` (text, `input_audio` / `audio_url` parts decoded to 16 kHz, `image_url` data URLs, and assistant
turns that refer to earlier audio by `audio.id`, which enter the conversation as their transcript); the engine's
deltas are rendered as SSE chunks or as one JSON body. A client that disconnects mid-stream cancels the engine work
at once.

Routes:
- `POST /v1/chat/completions`: OpenAI's shape. `modalities` `["text"]` (default) or `["text", "audio"]` with
  `audio: {voice, format}`; `format` is pcm16 | wav | mp3 | flac | opus, and streaming requires pcm16 (24 kHz mono).
  Streamed audio arrives as `delta.audio.transcript` pieces and `delta.audio.data` chunks as the engine makes them.
  `input_audio` of format pcm16 is read as 24 kHz mono, OpenAI's pcm16 rate.
- `POST /audio/chat/completions`: the audio-modalities format of the voice-agent platforms (Agora's custom LLM).
  Always streamed: one `delta.audio {id, transcript}` chunk, then `delta.audio {id, data}` chunks of exactly 1280 bytes
  (40 ms of PCM16 16 kHz mono; only the last may be shorter), then `data: [DONE]`.
- `POST /v1/audio/transcriptions`: multipart upload, answered by the engine's recogniser (501 where it has none).
- `GET /v1/models` and `GET /openapi.json` (the schema of these routes).

Transcript first, audio as soon as it is ready (the audio-modalities door): the format allows one transcript, before
any audio, while the Qwen-Omni thinker runs only one token ahead of the talker, so the complete text exists only when
the audio is complete too; waiting for it would delay the first audio by the whole reply. The door therefore sends
the transcript known when the first audio is ready, holding that audio only until the engine has produced its first
words, and at most `http.transcript_wait_ms` (default 1000). With the Qwen engines the text leads the audio, so
nothing is held and the transcript holds the first words; the scripted engine releases each word as the audio that
speaks it is made, so its first audio waits for its first word (about 130 ms at 4x real time; set the wait to 0 for
first audio at once with an empty transcript). An engine that finishes within the wait (or whose text is complete
before its audio starts) gives the complete transcript. The complete transcript is always recorded under the audio
id: a later request whose assistant history entry carries `audio: {id}` puts the whole text into the conversation,
so platforms should refer to earlier turns by id rather than by the transcript they were sent.

Errors are OpenAI error objects: 400 invalid request, 401 missing or wrong key, 404 unknown model, 413 body over
`limits.max_http_body_bytes`, 429 engine busy, 501 no recogniser, 503 engine not ready. Once a stream has started,
an error is sent as `data: {"error": {...}}` and ends the stream (no `[DONE]`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import re
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeVar

import anyio
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route
from starlette.types import Receive, Scope, Send

from omnivox.pipeline.audio import (
    StreamResampler,
    decode_audio_file,
    encode_audio_file,
    float_to_pcm16,
    pcm16_to_float,
    resample,
)
from omnivox.pipeline.engines.base import (
    INPUT_RATE,
    AudioDelta,
    AudioPart,
    Delta,
    EngineBusy,
    EngineError,
    EngineNotReady,
    EngineOutOfMemory,
    ImagePart,
    Message,
    Part,
    ResponseRequest,
    SamplingParams,
    TextDelta,
    TextPart,
    Usage,
)
from omnivox.server.auth import is_authorized
from omnivox.server.disconnect import ClientDisconnected, unless_disconnected
from omnivox.server.state import ServerState

log = logging.getLogger(__name__)

CHAT_DOOR = "http_chat"
AUDIO_CHAT_DOOR = "http_audio_chat"
CHAT_AUDIO_RATE = 24_000
"""OpenAI's pcm16 rate: streamed `delta.audio.data` and raw pcm16 `input_audio`."""
AUDIO_CHAT_RATE = 16_000
AUDIO_CHAT_CHUNK_BYTES = 1280
"""40 ms of PCM16 16 kHz mono, the audio-modalities chunk size."""
INPUT_AUDIO_FORMATS = ("wav", "mp3", "flac", "ogg", "opus", "pcm16")
OUTPUT_AUDIO_FORMATS = ("pcm16", "wav", "mp3", "flac", "opus")
VOICES = ("alloy", "ash", "ballad", "coral", "echo", "sage", "shimmer", "verse", "marin", "cedar")
"""The OpenAI voice names every engine maps (the schema advertises these; engines may accept more)."""
TRANSCRIPTION_FORMATS = ("json", "text", "verbose_json")
_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?:;[^,;]*)*?;base64,(?P<data>.*)$", re.DOTALL)


# ---------------------------------------------------------------------------------------------- errors


class ApiError(Exception):
    """A request the door refuses, rendered as an OpenAI error object with its HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        kind: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def engine_api_error(exc: EngineError) -> ApiError:
    """HTTP status of an engine failure: busy 429, not loaded or out of memory 503, anything else 500."""
    if isinstance(exc, EngineBusy):
        return ApiError(429, str(exc) or "the engine is busy; retry later", kind="rate_limit_error", code=exc.code)
    if isinstance(exc, EngineNotReady | EngineOutOfMemory):
        return ApiError(503, str(exc) or "the engine is not ready", kind="server_error", code=exc.code)
    return ApiError(500, str(exc) or "the engine failed", kind="server_error", code=exc.code)


def openai_errors(handler: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
    """Answer refused requests and unexpected failures with OpenAI error objects instead of bare 500 pages."""

    async def endpoint(request: Request) -> Response:
        try:
            return await handler(request)
        except ApiError as exc:
            return JSONResponse(exc.body(), status_code=exc.status)
        except ClientDisconnected:
            return Response(status_code=499)  # nobody is listening any more
        except EngineError as exc:
            error = engine_api_error(exc)
            log.warning("%s %s: engine error %s: %s", request.method, request.url.path, exc.code, exc)
            return JSONResponse(error.body(), status_code=error.status)
        except Exception:
            log.exception("%s %s failed", request.method, request.url.path)
            error = ApiError(500, "internal server error", kind="server_error", code="internal_error")
            return JSONResponse(error.body(), status_code=500)

    return endpoint


# ---------------------------------------------------------------------------------------------- request bodies


class _Body(BaseModel):
    """Unknown fields are accepted and ignored, as OpenAI's SDKs send fields this server does not use."""

    model_config = ConfigDict(extra="allow")


class TextContent(_Body):
    type: Literal["text"]
    text: str


class InputAudio(_Body):
    data: str = Field(description="base64 audio file (or raw pcm16 24 kHz mono)")
    format: str = Field(description=f"one of {', '.join(INPUT_AUDIO_FORMATS)}")


class InputAudioContent(_Body):
    type: Literal["input_audio"]
    input_audio: InputAudio


class UrlReference(_Body):
    url: str = Field(description="a data: URL (remote URLs are not fetched)")


class ImageContent(_Body):
    type: Literal["image_url"]
    image_url: UrlReference


class AudioUrlContent(_Body):
    """vLLM-Omni's way to send audio: a data: URL."""

    type: Literal["audio_url"]
    audio_url: UrlReference


ContentPart = Annotated[TextContent | InputAudioContent | ImageContent | AudioUrlContent, Field(discriminator="type")]


class AudioReference(_Body):
    id: str


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    audio: AudioReference | None = Field(None, description="assistant turns: an earlier response's audio")


class AudioOutput(_Body):
    voice: str = Field("alloy", min_length=1, max_length=64)
    format: Literal["pcm16", "wav", "mp3", "flac", "opus"] = "pcm16"


class StreamOptions(_Body):
    include_usage: bool = False


class ChatCompletionRequest(_Body):
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    modalities: list[Literal["text", "audio"]] | None = None
    audio: AudioOutput | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)
    stop: str | list[str] | None = None
    prompt_cache_key: str | None = Field(
        None,
        max_length=256,
        description="the conversation this request continues: the engine keeps its encoded prompt under this key",
    )
    instructions: str | None = Field(
        None, description="an extension: instructions appended to the model's own system prompt (as Realtime's)"
    )


class AudioChatRequest(_Body):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    audio: AudioOutput | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)


BodyModel = TypeVar("BodyModel", bound=BaseModel)


def parse_body(body: bytes, model: type[BodyModel]) -> BodyModel:
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}") from None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(part) for part in first["loc"]) or None
        raise ApiError(400, f"invalid request: {param or 'body'}: {first['msg']}", param=param) from None


# ---------------------------------------------------------------------------------------------- audio id cache


@dataclass(frozen=True)
class CachedAudio:
    transcript: str
    expires_at: int


class AudioCache:
    """Transcripts of generated audio by audio id, so that a later request can refer to an assistant turn by id.

    Bounded in entries (oldest evicted first) and in time. The audio itself is not kept: the turn enters the
    conversation as its transcript, and holding every reply's samples would cost megabytes per entry."""

    def __init__(self, max_items: int, ttl_s: float, clock: Callable[[], float] = time.time) -> None:
        self.max_items = max_items
        self.ttl_s = ttl_s
        self._clock = clock
        self._entries: OrderedDict[str, CachedAudio] = OrderedDict()
        self._lock = threading.Lock()  # requests read it from the media-decoding threads

    def put(self, audio_id: str, transcript: str) -> CachedAudio:
        with self._lock:
            self._expire()
            entry = CachedAudio(transcript, int(self._clock() + self.ttl_s))
            self._entries[audio_id] = entry
            while len(self._entries) > self.max_items:
                self._entries.popitem(last=False)
            return entry

    def get(self, audio_id: str) -> CachedAudio | None:
        with self._lock:
            self._expire()
            return self._entries.get(audio_id)

    def _expire(self) -> None:
        now = self._clock()
        while self._entries:
            oldest = next(iter(self._entries.values()))
            if oldest.expires_at > now:
                return
            self._entries.popitem(last=False)


def audio_cache(request: Request) -> AudioCache:
    """The app's cache, created on its first use."""
    cache = getattr(request.app.state, "http_audio_cache", None)
    if cache is None:
        settings = request.app.state.omnivox.config.http
        cache = AudioCache(settings.audio_cache_max_items, settings.audio_cache_ttl_s)
        request.app.state.http_audio_cache = cache
    return cache


# ---------------------------------------------------------------------------------------------- request checks


def check_auth(request: Request, state: ServerState) -> None:
    if not is_authorized(state.config.server.api_keys, request.headers):
        raise ApiError(401, "missing or invalid API key (send Authorization: Bearer <key>)", code="invalid_api_key")


def check_model(state: ServerState, model: str | None) -> None:
    served = served_model_names(state)
    if model is not None and model not in served:
        raise ApiError(
            404,
            f"the model {model!r} does not exist; this server serves {served[0]!r}",
            param="model",
            code="model_not_found",
        )


def served_model_names(state: ServerState) -> list[str]:
    return list(dict.fromkeys([state.model_name, state.engine.model_id]))


def check_ready(state: ServerState) -> None:
    if not state.engine.ready:
        raise ApiError(503, "the engine is still loading; retry shortly", kind="server_error", code="engine_not_ready")


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, refused with 413 as soon as it exceeds `limit` bytes."""
    declared = request.headers.get("content-length", "")
    too_large = ApiError(413, f"the request body exceeds {limit} bytes", code="request_too_large")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


# ---------------------------------------------------------------------------------------------- messages -> engine


def decode_base64(data: str, param: str) -> bytes:
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, f"{param} is not valid base64", param=param, code="invalid_base64") from None


def decode_input_audio(raw: bytes, fmt: str, param: str, max_seconds: float) -> np.ndarray:
    """Any accepted input audio -> mono float32 at the engine input rate."""
    try:
        if fmt == "pcm16":
            samples, rate = pcm16_to_float(raw), CHAT_AUDIO_RATE
        else:
            samples, rate = decode_audio_file(raw)
    except ValueError as exc:
        raise ApiError(400, f"{param}: cannot decode this audio ({fmt}): {exc}", param=param) from None
    if samples.size == 0:
        raise ApiError(400, f"{param}: the audio is empty", param=param)
    if samples.size / rate > max_seconds:
        raise ApiError(400, f"{param}: the audio is longer than {max_seconds:g} s", param=param)
    return resample(samples, rate, INPUT_RATE)


def parse_data_url(url: str, param: str) -> tuple[str, bytes]:
    match = _DATA_URL.match(url)
    if match is None:
        raise ApiError(400, f"{param}: only base64 data: URLs are accepted (the server fetches nothing)", param=param)
    return match["mime"] or "application/octet-stream", decode_base64(match["data"], param)


class MessageBuilder:
    """Turns the request's messages into engine messages, decoding every media part."""

    def __init__(self, cache: AudioCache, max_audio_seconds: float) -> None:
        self.cache = cache
        self.max_audio_seconds = max_audio_seconds

    def build(self, messages: list[ChatMessage]) -> tuple[Message, ...]:
        built = []
        for index, message in enumerate(messages):
            parts: list[Part] = []
            if message.audio is not None:
                parts.append(self.earlier_audio(message.role, message.audio, f"messages.{index}.audio.id"))
            parts.extend(self.content(message.content, f"messages.{index}.content"))
            role = "system" if message.role == "developer" else message.role
            built.append(Message(role, tuple(parts)))
        return tuple(built)

    def earlier_audio(self, role: str, reference: AudioReference, param: str) -> TextPart:
        if role != "assistant":
            raise ApiError(400, f"{param}: only assistant messages refer to earlier audio", param=param)
        entry = self.cache.get(reference.id)
        if entry is None:
            raise ApiError(400, f"{param}: unknown or expired audio id {reference.id!r}", param=param)
        return TextPart(entry.transcript)

    def content(self, content: str | list[ContentPart] | None, param: str) -> list[Part]:
        if content is None or content == "":
            return []
        if isinstance(content, str):
            return [TextPart(content)]
        return [self.part(part, f"{param}.{index}") for index, part in enumerate(content)]

    def part(self, part: ContentPart, param: str) -> Part:
        if isinstance(part, TextContent):
            return TextPart(part.text)
        if isinstance(part, InputAudioContent):
            fmt = part.input_audio.format
            if fmt not in INPUT_AUDIO_FORMATS:
                raise ApiError(
                    400,
                    f"{param}.input_audio.format: unsupported audio format {fmt!r}; "
                    f"expected one of {', '.join(INPUT_AUDIO_FORMATS)}",
                    param=f"{param}.input_audio.format",
                    code="unsupported_audio_format",
                )
            raw = decode_base64(part.input_audio.data, f"{param}.input_audio.data")
            return AudioPart(decode_input_audio(raw, fmt, f"{param}.input_audio.data", self.max_audio_seconds))
        if isinstance(part, AudioUrlContent):
            _, raw = parse_data_url(part.audio_url.url, f"{param}.audio_url.url")
            return AudioPart(decode_input_audio(raw, "file", f"{param}.audio_url.url", self.max_audio_seconds))
        mime, data = parse_data_url(part.image_url.url, f"{param}.image_url.url")
        if not mime.startswith("image/"):
            raise ApiError(400, f"{param}.image_url.url: not an image ({mime})", param=f"{param}.image_url.url")
        return ImagePart(data, mime)


async def build_messages(request: Request, messages: list[ChatMessage]) -> tuple[Message, ...]:
    """Decoding media takes CPU time: off the event loop."""
    state: ServerState = request.app.state.omnivox
    builder = MessageBuilder(audio_cache(request), state.config.limits.max_input_buffer_s)
    return await asyncio.to_thread(builder.build, messages)


def sampling_params(body: ChatCompletionRequest | AudioChatRequest) -> SamplingParams:
    max_tokens = getattr(body, "max_completion_tokens", None) or body.max_tokens
    stop = getattr(body, "stop", None)
    stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
    return SamplingParams(
        temperature=body.temperature, top_p=body.top_p, max_tokens=max_tokens, seed=body.seed, stop=stops
    )


async def open_engine_stream(
    state: ServerState, request: ResponseRequest, http_request: Request, door: str
) -> AsyncIterator[Delta]:
    """Start the engine and wait for its first delta, so that refusals (busy, not ready) become HTTP statuses
    before any header is sent; returns the whole stream, first delta included. A client that leaves meanwhile
    cancels the engine work at once."""
    check_ready(state)
    stream = state.engine.respond(request)
    try:
        first = await unless_disconnected(http_request, anext(stream))
    except StopAsyncIteration:
        return stream  # finished already: iterating it yields nothing
    except ClientDisconnected:
        await stream.aclose()
        log.info("%s: %s: the client left before the first delta; cancelled", door, request.request_id)
        state.metrics.responses.labels(door, "cancelled").inc()
        raise
    except BaseException:
        await stream.aclose()
        raise
    return _prepend(first, stream)


async def _prepend(first: Delta, rest: AsyncIterator[Delta]) -> AsyncIterator[Delta]:
    async with aclosing(rest):
        yield first
        async for delta in rest:
            yield delta


# ---------------------------------------------------------------------------------------------- SSE


def sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


SSE_DONE = "data: [DONE]\n\n"


class EventStream(StreamingResponse):
    """An SSE response that stops its producer (and so the engine) the moment the client disconnects, whatever
    ASGI spec version the server speaks (Starlette only listens for disconnects below 2.4)."""

    def __init__(self, events: AsyncIterator[str]) -> None:
        super().__init__(
            events,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async with anyio.create_task_group() as group:

            async def produce() -> None:
                await self.stream_response(send)
                group.cancel_scope.cancel()

            group.start_soon(produce)
            await self.listen_for_disconnect(receive)
            group.cancel_scope.cancel()


def stream_error(exc: BaseException, door: str, state: ServerState) -> str:
    """The terminal `data: {"error": ...}` event of a stream that failed after its headers were sent."""
    if isinstance(exc, EngineError):
        log.warning("%s: engine error mid-stream %s: %s", door, exc.code, exc)
        error = engine_api_error(exc)
    else:
        log.error("%s: stream failed", door, exc_info=exc)
        error = ApiError(500, "internal server error", kind="server_error", code="internal_error")
    state.metrics.protocol_errors.labels(door, str(error.code)).inc()
    return sse(error.body())


class ResponseTracker:
    """First-audio latency and final status of one response, for the metrics."""

    def __init__(self, state: ServerState, door: str) -> None:
        self.state = state
        self.door = door
        self.started = time.monotonic()
        self.first_audio_seen = False
        self.status = "cancelled"

    def audio(self) -> None:
        if not self.first_audio_seen:
            self.first_audio_seen = True
            self.state.metrics.first_audio.labels(self.door).observe(time.monotonic() - self.started)

    def finish(self) -> None:
        self.state.metrics.responses.labels(self.door, self.status).inc()


# ---------------------------------------------------------------------------------------------- chat completions


@dataclass
class ChatContext:
    """What one chat completion's rendering needs besides the deltas."""

    state: ServerState
    cache: AudioCache
    completion_id: str
    created: int
    model: str
    max_tokens: int | None
    audio_id: str | None

    def chunk(self, delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        return {
            "id": self.completion_id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
        }

    def finish_reason(self, usage: Usage | None) -> str:
        if usage is not None and self.max_tokens is not None and usage.output_tokens >= self.max_tokens:
            return "length"
        return "stop"


def usage_body(usage: Usage | None) -> dict[str, Any]:
    usage = usage or Usage()
    return {
        "prompt_tokens": usage.input_tokens,
        "completion_tokens": usage.output_tokens,
        "total_tokens": usage.input_tokens + usage.output_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_input_tokens},
    }


async def chat_completions(request: Request) -> Response:
    state: ServerState = request.app.state.omnivox
    check_auth(request, state)
    body = parse_body(await read_body(request, state.config.limits.max_http_body_bytes), ChatCompletionRequest)
    check_model(state, body.model)
    modalities = body.modalities or ["text"]
    wants_audio = "audio" in modalities
    if wants_audio and body.audio is None:
        message = 'modalities include "audio": the audio parameter {voice, format} is required'
        raise ApiError(400, message, param="audio")
    if wants_audio and body.stream and body.audio.format != "pcm16":
        raise ApiError(400, "streamed audio must use format pcm16", param="audio.format")
    engine_request = ResponseRequest(
        messages=await build_messages(request, body.messages),
        voice=body.audio.voice if body.audio else state.config.session.voice,
        output_audio=wants_audio,
        sampling=sampling_params(body),
        request_id=f"chatcmpl-{uuid.uuid4().hex}",
        conversation_id=body.prompt_cache_key or "",
        instructions=body.instructions or "",
    )
    context = ChatContext(
        state=state,
        cache=audio_cache(request),
        completion_id=engine_request.request_id,
        created=int(time.time()),
        model=body.model,
        max_tokens=engine_request.sampling.max_tokens,
        audio_id=f"audio_{uuid.uuid4().hex}" if wants_audio else None,
    )
    deltas = await open_engine_stream(state, engine_request, request, CHAT_DOOR)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return EventStream(chat_events(context, deltas, include_usage))
    return JSONResponse(await chat_body(context, deltas, body.audio.format if body.audio else None))


async def chat_events(context: ChatContext, deltas: AsyncIterator[Delta], include_usage: bool) -> AsyncIterator[str]:
    """`delta.content` pieces, or `delta.audio` transcript pieces and 24 kHz PCM16 data; finish; usage; [DONE]."""
    state = context.state
    tracker = ResponseTracker(state, CHAT_DOOR)
    resampler = StreamResampler(state.engine.native_rate, CHAT_AUDIO_RATE)
    audio_id = context.audio_id
    transcript: list[str] = []
    usage: Usage | None = None
    first = {"role": "assistant", **({"audio": {"id": audio_id, "transcript": ""}} if audio_id else {"content": ""})}
    yield sse(context.chunk(first))
    try:
        async with aclosing(deltas):
            async for delta in deltas:
                if isinstance(delta, TextDelta):
                    transcript.append(delta.text)
                    piece = {"id": audio_id, "transcript": delta.text}
                    yield sse(context.chunk({"audio": piece} if audio_id else {"content": delta.text}))
                elif isinstance(delta, AudioDelta) and audio_id:
                    pcm = float_to_pcm16(resampler.process(delta.pcm))
                    if pcm:
                        tracker.audio()
                        yield sse(context.chunk({"audio": {"id": audio_id, "data": base64.b64encode(pcm).decode()}}))
                elif isinstance(delta, Usage):
                    usage = delta
        if audio_id:
            tail = float_to_pcm16(resampler.flush())
            if tail:
                yield sse(context.chunk({"audio": {"id": audio_id, "data": base64.b64encode(tail).decode()}}))
            entry = context.cache.put(audio_id, "".join(transcript))
            yield sse(context.chunk({"audio": {"id": audio_id, "expires_at": entry.expires_at}}))
        yield sse(context.chunk({}, context.finish_reason(usage)))
        if include_usage:
            yield sse({**context.chunk({}), "choices": [], "usage": usage_body(usage)})
        tracker.status = "completed"
        yield SSE_DONE
    except Exception as exc:
        tracker.status = "failed"
        yield stream_error(exc, CHAT_DOOR, state)
    finally:
        tracker.finish()


async def chat_body(context: ChatContext, deltas: AsyncIterator[Delta], audio_format: str | None) -> dict[str, Any]:
    """The whole completion: `message.content`, or `message.audio {id, data, expires_at, transcript}`."""
    state = context.state
    tracker = ResponseTracker(state, CHAT_DOOR)
    text: list[str] = []
    audio: list[np.ndarray] = []
    usage: Usage | None = None
    try:
        async with aclosing(deltas):
            async for delta in deltas:
                if isinstance(delta, TextDelta):
                    text.append(delta.text)
                elif isinstance(delta, AudioDelta):
                    tracker.audio()
                    audio.append(delta.pcm)
                elif isinstance(delta, Usage):
                    usage = delta
        tracker.status = "completed"
    except Exception:
        tracker.status = "failed"
        raise
    finally:
        tracker.finish()
    message: dict[str, Any] = {"role": "assistant", "content": "".join(text), "refusal": None}
    if context.audio_id and audio_format:
        samples = resample(
            np.concatenate(audio) if audio else np.zeros(0, np.float32), state.engine.native_rate, CHAT_AUDIO_RATE
        )
        encoded = await asyncio.to_thread(encode_audio_file, samples, CHAT_AUDIO_RATE, audio_format)
        entry = context.cache.put(context.audio_id, message["content"])
        message["audio"] = {
            "id": context.audio_id,
            "data": base64.b64encode(encoded).decode(),
            "expires_at": entry.expires_at,
            "transcript": message["content"],
        }
        message["content"] = None
    return {
        "id": context.completion_id,
        "object": "chat.completion",
        "created": context.created,
        "model": context.model,
        "choices": [{"index": 0, "message": message, "finish_reason": context.finish_reason(usage)}],
        "usage": usage_body(usage),
    }


# ---------------------------------------------------------------------------------------------- audio-modalities


async def audio_chat_completions(request: Request) -> Response:
    state: ServerState = request.app.state.omnivox
    check_auth(request, state)
    body = parse_body(await read_body(request, state.config.limits.max_http_body_bytes), AudioChatRequest)
    check_model(state, body.model)
    if not body.stream:
        raise ApiError(400, "this endpoint only streams: set stream to true", param="stream")
    engine_request = ResponseRequest(
        messages=await build_messages(request, body.messages),
        voice=body.audio.voice if body.audio else state.config.session.voice,
        output_audio=True,
        sampling=sampling_params(body),
        request_id=f"chatcmpl-{uuid.uuid4().hex}",
    )
    deltas = await open_engine_stream(state, engine_request, request, AUDIO_CHAT_DOOR)
    return EventStream(audio_chat_events(state, audio_cache(request), engine_request.request_id, deltas))


async def audio_chat_events(
    state: ServerState, cache: AudioCache, message_id: str, deltas: AsyncIterator[Delta]
) -> AsyncIterator[str]:
    """The transcript known once the first audio and words exist (see the module docstring), then 1280-byte
    16 kHz PCM16 chunks, then [DONE]."""
    tracker = ResponseTracker(state, AUDIO_CHAT_DOOR)
    audio_id = f"audio_{uuid.uuid4().hex}"
    resampler = StreamResampler(state.engine.native_rate, AUDIO_CHAT_RATE)
    wait_s = state.config.http.transcript_wait_ms / 1000
    transcript: list[str] = []
    pending = bytearray()
    first_audio_at: float | None = None
    transcript_sent = False

    def event(audio: dict[str, str]) -> str:
        return sse({"id": message_id, "choices": [{"index": 0, "delta": {"audio": audio}, "finish_reason": None}]})

    def audio_events(final: bool) -> list[str]:
        events = []
        while len(pending) >= AUDIO_CHAT_CHUNK_BYTES or (final and pending):
            piece = bytes(pending[:AUDIO_CHAT_CHUNK_BYTES])
            del pending[:AUDIO_CHAT_CHUNK_BYTES]
            events.append(event({"id": audio_id, "data": base64.b64encode(piece).decode()}))
        return events

    try:
        async with aclosing(deltas):
            async for delta in deltas:
                if isinstance(delta, TextDelta):
                    transcript.append(delta.text)
                elif isinstance(delta, AudioDelta):
                    pending.extend(float_to_pcm16(resampler.process(delta.pcm)))
                    if first_audio_at is None and pending:
                        first_audio_at = time.monotonic()
                if (
                    not transcript_sent
                    and first_audio_at is not None
                    and (transcript or time.monotonic() - first_audio_at >= wait_s)
                ):
                    transcript_sent = True
                    yield event({"id": audio_id, "transcript": "".join(transcript)})
                if transcript_sent and len(pending) >= AUDIO_CHAT_CHUNK_BYTES:
                    tracker.audio()
                    for chunk in audio_events(final=False):
                        yield chunk
        pending.extend(float_to_pcm16(resampler.flush()))
        if not transcript_sent:
            yield event({"id": audio_id, "transcript": "".join(transcript)})
        if pending:
            tracker.audio()
        for chunk in audio_events(final=True):
            yield chunk
        cache.put(audio_id, "".join(transcript))
        tracker.status = "completed"
        yield SSE_DONE
    except Exception as exc:
        tracker.status = "failed"
        yield stream_error(exc, AUDIO_CHAT_DOOR, state)
    finally:
        tracker.finish()


# ---------------------------------------------------------------------------------------------- transcription


async def _replay(body: bytes) -> AsyncIterator[bytes]:
    yield body


async def transcriptions(request: Request) -> Response:
    state: ServerState = request.app.state.omnivox
    check_auth(request, state)
    body = await read_body(request, state.config.limits.max_http_body_bytes)
    if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
        raise ApiError(400, "send the audio as multipart/form-data with a `file` field")
    try:
        form = await MultiPartParser(
            request.headers, _replay(body), max_files=1, max_fields=16, max_part_size=64 * 1024
        ).parse()
    except MultiPartException as exc:
        raise ApiError(400, f"malformed multipart body: {exc.message}") from None
    upload = form.get("file")
    if not isinstance(upload, UploadFile):
        raise ApiError(400, "the `file` field (an audio file) is required", param="file")
    fields = {name: form.get(name) for name in ("model", "language", "prompt", "response_format")}
    if any(value is not None and not isinstance(value, str) for value in fields.values()):
        raise ApiError(400, "model, language, prompt and response_format are text fields")
    if not fields["model"]:
        raise ApiError(400, "the `model` field is required", param="model")
    check_model(state, fields["model"])
    response_format = fields["response_format"] or "json"
    if response_format not in TRANSCRIPTION_FORMATS:
        raise ApiError(
            400,
            f"response_format {response_format!r} is not supported; use one of {', '.join(TRANSCRIPTION_FORMATS)}",
            param="response_format",
        )
    recognise = getattr(state.engine, "transcribe", None)
    if recognise is None:
        raise ApiError(
            501, f"the {state.engine.name} engine cannot transcribe", kind="server_error", code="not_implemented"
        )
    check_ready(state)
    raw = await upload.read()
    max_seconds = state.config.limits.max_input_buffer_s
    audio = await asyncio.to_thread(decode_input_audio, raw, "file", "file", max_seconds)
    text = await recognise(audio, fields["language"] or None, fields["prompt"] or "")
    if response_format == "text":
        return PlainTextResponse(text)
    if response_format == "json":
        return JSONResponse({"text": text})
    return JSONResponse(
        {
            "task": "transcribe",
            "language": fields["language"] or "",
            "duration": round(audio.size / INPUT_RATE, 3),
            "text": text,
            "segments": [],
        }
    )


# ---------------------------------------------------------------------------------------------- models, schema


async def list_models(request: Request) -> Response:
    state: ServerState = request.app.state.omnivox
    check_auth(request, state)
    return JSONResponse(
        {
            "object": "list",
            "data": [{"id": state.model_name, "object": "model", "created": 0, "owned_by": "omnivox"}],
        }
    )


def _error_responses(*statuses: int) -> dict[str, Any]:
    error = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
    return {str(status): {"description": "an OpenAI error object", "content": error} for status in statuses}


def openapi_schema(model_names: list[str]) -> dict[str, Any]:
    """OpenAPI 3.1 for the HTTP doors, request bodies generated from the pydantic models above."""
    schemas: dict[str, Any] = {}
    for model in (ChatCompletionRequest, AudioChatRequest):
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
    schemas["ChatCompletionRequest"]["properties"]["model"] = {"type": "string", "enum": model_names}
    schemas["AudioChatRequest"]["properties"]["model"] = {"type": "string", "enum": model_names}
    schemas["AudioChatRequest"]["properties"]["stream"] = {"const": True, "description": "this endpoint only streams"}
    schemas["AudioChatRequest"]["required"].append("stream")
    schemas["AudioOutput"]["properties"]["voice"] = {"type": "string", "enum": list(VOICES), "default": "alloy"}
    schemas["InputAudio"]["properties"]["format"] = {"type": "string", "enum": list(INPUT_AUDIO_FORMATS)}
    schemas["Error"] = {
        "type": "object",
        "required": ["error"],
        "properties": {"error": {"type": "object", "required": ["message", "type"]}},
    }
    security = [{"bearer": []}]
    json_body = {"required": True, "content": {"application/json": {"schema": {}}}}
    sse_or_json = {
        "description": "a completion (JSON) or a stream of chunks (text/event-stream)",
        "content": {"application/json": {"schema": {"type": "object"}}, "text/event-stream": {"schema": {}}},
    }

    def body(name: str) -> dict[str, Any]:
        return {**json_body, "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{name}"}}}}

    return {
        "openapi": "3.1.0",
        "info": {"title": "omnivox HTTP API", "version": "1"},
        "components": {"schemas": schemas, "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "paths": {
            "/v1/chat/completions": {
                "post": {
                    "operationId": "createChatCompletion",
                    "security": security,
                    "requestBody": body("ChatCompletionRequest"),
                    "responses": {"200": sse_or_json, **_error_responses(400, 401, 404, 413, 429, 503)},
                }
            },
            "/audio/chat/completions": {
                "post": {
                    "operationId": "createAudioChatCompletion",
                    "security": security,
                    "requestBody": body("AudioChatRequest"),
                    "responses": {
                        "200": {"description": "SSE audio chunks", "content": {"text/event-stream": {"schema": {}}}},
                        **_error_responses(400, 401, 404, 413, 429, 503),
                    },
                }
            },
            "/v1/audio/transcriptions": {
                "post": {
                    "operationId": "createTranscription",
                    "security": security,
                    "requestBody": {
                        "required": True,
                        "content": {
                            "multipart/form-data": {
                                "schema": {
                                    "type": "object",
                                    "required": ["file", "model"],
                                    "properties": {
                                        "file": {"type": "string", "format": "binary"},
                                        "model": {"type": "string", "enum": model_names},
                                        "language": {"type": "string"},
                                        "prompt": {"type": "string"},
                                        "response_format": {"type": "string", "enum": list(TRANSCRIPTION_FORMATS)},
                                    },
                                }
                            }
                        },
                    },
                    "responses": {
                        "200": {
                            "description": "the transcript",
                            "content": {"application/json": {"schema": {"type": "object"}}, "text/plain": {}},
                        },
                        **_error_responses(400, 401, 404, 413, 501, 503),
                    },
                }
            },
            "/v1/models": {
                "get": {
                    "operationId": "listModels",
                    "security": security,
                    "responses": {
                        "200": {"description": "the served model", "content": {"application/json": {"schema": {}}}},
                        **_error_responses(401),
                    },
                }
            },
        },
    }


async def openapi(request: Request) -> Response:
    state: ServerState = request.app.state.omnivox
    return JSONResponse(openapi_schema(served_model_names(state)))


def http_api_routes() -> list[BaseRoute]:
    return [
        Route("/v1/chat/completions", openai_errors(chat_completions), methods=["POST"]),
        Route("/audio/chat/completions", openai_errors(audio_chat_completions), methods=["POST"]),
        Route("/v1/audio/transcriptions", openai_errors(transcriptions), methods=["POST"]),
        Route("/v1/models", openai_errors(list_models), methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"]),
    ]
