"""The request's messages -> engine messages: media parts decoded to 16 kHz audio or image bytes, and assistant
turns that refer to earlier audio by `audio.id` (kept in `AudioCache`) entered as their transcript."""

from __future__ import annotations

import asyncio
import base64
import binascii
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from starlette.requests import Request

from omnivox.pipeline.audio import decode_audio_file, pcm16_to_float, resample
from omnivox.pipeline.engines.base import INPUT_RATE, AudioPart, ImagePart, Message, Part, SamplingParams, TextPart
from omnivox.server.config import GenerationLimitsConfig
from omnivox.server.http_bodies import (
    INPUT_AUDIO_FORMATS,
    AudioChatRequest,
    AudioReference,
    AudioUrlContent,
    ChatCompletionRequest,
    ChatMessage,
    ContentPart,
    InputAudioContent,
    TextContent,
)
from omnivox.server.http_common import ApiError
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


def sampling_params(body: ChatCompletionRequest | AudioChatRequest, limits: GenerationLimitsConfig) -> SamplingParams:
    """The request's sampling, within the configured bounds (`generation.*`)."""
    max_tokens = getattr(body, "max_completion_tokens", None) or body.max_tokens
    if max_tokens is not None and max_tokens > limits.max_output_tokens:
        param = "max_completion_tokens" if getattr(body, "max_completion_tokens", None) else "max_tokens"
        raise ApiError(400, f"{param} is at most {limits.max_output_tokens}", param=param, code="invalid_value")
    stop = getattr(body, "stop", None)
    stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
    if len(stops) > limits.max_stop_strings:
        raise ApiError(400, f"stop holds at most {limits.max_stop_strings} strings", param="stop", code="invalid_value")
    if any(len(text) > limits.max_stop_chars for text in stops):
        raise ApiError(
            400, f"a stop string is at most {limits.max_stop_chars} characters", param="stop", code="invalid_value"
        )
    return SamplingParams(
        temperature=body.temperature, top_p=body.top_p, max_tokens=max_tokens, seed=body.seed, stop=stops
    )
