"""The request's messages -> engine messages: media parts decoded to 16 kHz audio or image bytes, and assistant
turns that refer to earlier audio by `audio.id` (kept in `AudioCache`) entered as their transcript."""

from __future__ import annotations

import asyncio
import base64
import binascii
import re
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

import numpy as np
from starlette.requests import Request

from omnivox.pipeline.audio import pcm16_to_float, resample
from omnivox.pipeline.engines.base import (
    INPUT_RATE,
    AudioPart,
    ImagePart,
    InvalidSampling,
    Message,
    Part,
    ResponseRequest,
    SamplingParams,
    TextPart,
    ToolCallPart,
    ToolResultPart,
    checked_sampling,
)
from omnivox.pipeline.media import (
    AUDIO_NAMES,
    MediaError,
    check_image,
    container_of_type,
    decode_audio,
)
from omnivox.pipeline.tools import MAX_ARGUMENTS_CHARS, MAX_OUTPUT_CHARS
from omnivox.server.config import GenerationLimitsConfig, MediaConfig
from omnivox.server.http_bodies import (
    INPUT_AUDIO_FORMATS,
    AudioChatRequest,
    AudioReference,
    AudioUrlContent,
    ChatCompletionRequest,
    ChatMessage,
    ContentPart,
    ImageContent,
    InputAudioContent,
    TextContent,
)
from omnivox.server.http_common import ApiError
from omnivox.server.http_tools import request_tools
from omnivox.server.state import ServerState

CHAT_AUDIO_RATE = 24_000
"""OpenAI's pcm16 rate: streamed `delta.audio.data` and raw pcm16 `input_audio`."""
_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?:;[^,;]*)*?;base64,(?P<data>.*)$", re.DOTALL)


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


def decode_base64(data: str, param: str) -> bytes:
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, f"{param} is not valid base64", param=param, code="invalid_base64") from None


FILE_AUDIO_CONTAINERS = ("wav", "mp3", "flac", "ogg", "webm")
"""Audio files accepted by the transcription door and as chat `audio_url` parts."""
INPUT_AUDIO_CONTAINERS = tuple(dict.fromkeys(AUDIO_NAMES[fmt] for fmt in INPUT_AUDIO_FORMATS if fmt != "pcm16"))
"""Audio files accepted as chat `input_audio` parts (the one their `format` names)."""


def refused_media(exc: MediaError, param: str) -> ApiError:
    return ApiError(400, f"{param}: {exc}", param=param, code=exc.code)


def decode_input_audio(
    raw: bytes, *, declared: str | None, allowed: Collection[str], param: str, media: MediaConfig, max_seconds: float
) -> np.ndarray:
    """Client audio (raw pcm16 at 24 kHz, or a file of an `allowed` container that is the `declared` one) -> mono
    float32 at the engine input rate, at most `max_seconds` of it."""
    try:
        if declared == "pcm16":
            samples = pcm16_to_float(raw)
            if samples.size > max_seconds * CHAT_AUDIO_RATE:
                raise MediaError(f"the audio is longer than {max_seconds:g} s", code="audio_too_long")
            samples = resample(samples, CHAT_AUDIO_RATE, INPUT_RATE)
        else:
            limits = media.audio_limits(max_seconds)
            samples = decode_audio(raw, declared=declared, allowed=allowed, limits=limits, out_rate=INPUT_RATE)
    except MediaError as exc:
        raise refused_media(exc, param) from None
    except ValueError as exc:
        raise ApiError(400, f"{param}: {exc}", param=param, code="invalid_audio") from None
    if samples.size == 0:
        raise ApiError(400, f"{param}: the audio is empty", param=param, code="invalid_audio")
    return samples


def parse_data_url(url: str, param: str) -> tuple[str, bytes]:
    match = _DATA_URL.match(url)
    if match is None:
        raise ApiError(400, f"{param}: only base64 data: URLs are accepted (the server fetches nothing)", param=param)
    return match["mime"] or "application/octet-stream", decode_base64(match["data"], param)


class MessageBuilder:
    """Turns the request's messages into engine messages, decoding every media part within the request's budgets:
    `media.max_parts` parts, `media.max_images` images and `media.max_audio_s` seconds of audio in all."""

    def __init__(self, cache: AudioCache, media: MediaConfig) -> None:
        self.cache = cache
        self.media = media
        self.image_limits = media.image_limits()
        self.audio_seconds = 0.0
        self.media_parts = 0
        self.images = 0

    def build(self, messages: list[ChatMessage]) -> tuple[Message, ...]:
        built = []
        called: dict[str, str] = {}
        """call id -> function name, from the assistant turns so far (a tool result names its function)."""
        for index, message in enumerate(messages):
            if message.role == "tool":
                built.append(self.tool_result(message, called, f"messages.{index}"))
                continue
            parts: list[Part] = []
            if message.audio is not None:
                parts.append(self.earlier_audio(message.role, message.audio, f"messages.{index}.audio.id"))
            parts.extend(self.content(message.content, f"messages.{index}.content"))
            for call in message.tool_calls or []:
                if message.role != "assistant":
                    raise ApiError(
                        400,
                        f"messages.{index}: only assistant messages make tool calls",
                        param=f"messages.{index}.tool_calls",
                    )
                if len(call.function.arguments) > MAX_ARGUMENTS_CHARS:
                    raise ApiError(
                        400, f"messages.{index}: tool call arguments are too long", param=f"messages.{index}.tool_calls"
                    )
                called[call.id] = call.function.name
                parts.append(ToolCallPart(call.id, call.function.name, call.function.arguments))
            role = "system" if message.role == "developer" else message.role
            built.append(Message(role, tuple(parts)))
        return tuple(built)

    def tool_result(self, message: ChatMessage, called: dict[str, str], param: str) -> Message:
        """A `tool` message: the text result of the call `tool_call_id`."""
        if not message.tool_call_id:
            raise ApiError(400, f"{param}.tool_call_id is required in tool messages", param=f"{param}.tool_call_id")
        if isinstance(message.content, list):
            texts = [part.text for part in message.content if isinstance(part, TextContent)]
            if len(texts) != len(message.content):
                raise ApiError(400, f"{param}.content: a tool result is text", param=f"{param}.content")
            output = "".join(texts)
        else:
            output = message.content or ""
        if len(output) > MAX_OUTPUT_CHARS:
            raise ApiError(400, f"{param}.content: the tool result is too long", param=f"{param}.content")
        name = called.get(message.tool_call_id, "")
        return Message("tool", (ToolResultPart(message.tool_call_id, output, name),))

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
        self.media_parts += 1
        if self.media_parts > self.media.max_parts:
            message = f"{param}: a request holds at most {self.media.max_parts} audio and image parts"
            raise ApiError(400, message, param=param, code="too_many_parts")
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
            declared = "pcm16" if fmt == "pcm16" else AUDIO_NAMES[fmt]
            return self.audio(raw, declared, INPUT_AUDIO_CONTAINERS, f"{param}.input_audio.data")
        if isinstance(part, AudioUrlContent):
            mime, raw = parse_data_url(part.audio_url.url, f"{param}.audio_url.url")
            try:
                declared = container_of_type(mime)
            except MediaError as exc:
                raise refused_media(exc, f"{param}.audio_url.url") from None
            return self.audio(raw, declared, FILE_AUDIO_CONTAINERS, f"{param}.audio_url.url")
        return self.image(part, f"{param}.image_url.url")

    def audio(self, raw: bytes, declared: str | None, allowed: Collection[str], param: str) -> AudioPart:
        budget = self.media.max_audio_s - self.audio_seconds
        try:
            pcm = decode_input_audio(
                raw, declared=declared, allowed=allowed, param=param, media=self.media, max_seconds=budget
            )
        except ApiError as exc:
            if exc.code != "audio_too_long":
                raise
            message = f"{param}: the request's audio is longer than {self.media.max_audio_s:g} s in all"
            raise ApiError(400, message, param=param, code=exc.code) from None
        self.audio_seconds += pcm.size / INPUT_RATE
        return AudioPart(pcm)

    def image(self, part: ImageContent, param: str) -> ImagePart:
        self.images += 1
        if self.images > self.image_limits.max_count:
            message = f"{param}: a request holds at most {self.image_limits.max_count} images"
            raise ApiError(400, message, param=param, code="too_many_images")
        mime, data = parse_data_url(part.image_url.url, param)
        try:
            info = check_image(data, mime, self.image_limits)
        except MediaError as exc:
            raise refused_media(exc, param) from None
        return ImagePart(data, info.mime_type)


async def build_messages(request: Request, messages: list[ChatMessage]) -> tuple[Message, ...]:
    """Decoding media takes CPU time: off the event loop."""
    state: ServerState = request.app.state.omnivox
    builder = MessageBuilder(audio_cache(request), state.config.media)
    return await asyncio.to_thread(builder.build, messages)


async def chat_engine_request(
    request: Request, state: ServerState, body: ChatCompletionRequest | AudioChatRequest, **fields: Any
) -> ResponseRequest:
    """What a chat door asks the engine: the body's messages decoded, its voice, sampling and tools, and the door's
    own `fields` (`output_audio`, a conversation id, ...)."""
    tools, tool_choice, parallel = request_tools(body)
    return ResponseRequest(
        messages=await build_messages(request, body.messages),
        voice=body.audio.voice if body.audio else state.config.session.voice,
        sampling=sampling_params(body, state.config.generation),
        request_id=f"chatcmpl-{uuid.uuid4().hex}",
        max_prompt_tokens=state.config.generation.max_prompt_tokens,
        tools=tools,
        tool_choice=tool_choice,
        parallel_tool_calls=parallel,
        **fields,
    )


def sampling_params(body: ChatCompletionRequest | AudioChatRequest, limits: GenerationLimitsConfig) -> SamplingParams:
    """The request's sampling, within the configured bounds (`generation.*`)."""
    max_tokens = getattr(body, "max_completion_tokens", None) or body.max_tokens
    tokens_param = "max_completion_tokens" if getattr(body, "max_completion_tokens", None) else "max_tokens"
    stop = getattr(body, "stop", None)
    stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
    if len(stops) > limits.max_stop_strings:
        raise ApiError(400, f"stop holds at most {limits.max_stop_strings} strings", param="stop", code="invalid_value")
    if any(len(text) > limits.max_stop_chars for text in stops):
        raise ApiError(
            400, f"a stop string is at most {limits.max_stop_chars} characters", param="stop", code="invalid_value"
        )
    try:
        return checked_sampling(
            temperature=body.temperature,
            top_p=body.top_p,
            max_tokens=max_tokens,
            seed=body.seed,
            stop=stops,
            max_tokens_limit=limits.max_output_tokens,
            names={"max_tokens": tokens_param},
        )
    except InvalidSampling as exc:
        raise ApiError(400, str(exc), param=exc.field, code="invalid_value") from None
