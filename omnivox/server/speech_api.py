"""`POST /v1/audio/speech`: OpenAI's text-to-speech shape, served by the TTS stage and always streamed.

`model` (any name: the server has one TTS stage), `input` (at most `tts.max_input_chars`), `voice` (OpenAI's names map
to configured voices; the backend's own voice names are accepted too), `response_format` pcm (16-bit 24 kHz mono) |
wav | mp3 | opus | flac (default mp3), `speed` 0.25-4.0, `stream_format` `audio` (default: the file's bytes as they
are encoded) or `sse` (`speech.audio.delta` events with base64 audio, then `speech.audio.done`). `instructions` is
accepted and ignored. Clauses are synthesised one after another on the TTS stage's threads (never on the event loop),
and the response starts once the first clause's first audio exists, so a failure before it is a plain HTTP error.
A client that goes away stops the synthesis. Each request has one clause on the threads at a time, so at most
`tts.workers` are synthesised while the others wait: `tts.max_queued_requests` may wait, and a request beyond them is
refused at once (429 `server_busy`) instead of queueing without bound.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import Response

from omnivox.pipeline.audio import StreamResampler
from omnivox.pipeline.audio_encoder import StreamingEncoder
from omnivox.pipeline.engines.base import EngineBusy, EngineError
from omnivox.pipeline.internal_errors import report_internal_error
from omnivox.pipeline.tts.stage import MAX_SPEED, MIN_SPEED, TtsStage
from omnivox.server.http_common import (
    ApiError,
    EventStream,
    ResponseTracker,
    check_auth,
    engine_api_error,
    read_json_body,
    sse,
    stream_error,
)
from omnivox.server.state import ServerState

log = logging.getLogger(__name__)

SPEECH_DOOR = "http_speech"
SPEECH_RATE = 24_000
"""OpenAI's speech rate (its `pcm` is 16-bit at 24 kHz)."""
SPEECH_FORMATS = ("mp3", "opus", "wav", "pcm", "flac")
MEDIA_TYPES = {
    "mp3": "audio/mpeg",
    "opus": "audio/ogg",
    "wav": "audio/wav",
    "pcm": "audio/pcm",
    "flac": "audio/flac",
}


class SpeechRequest(BaseModel):
    """Unknown fields are accepted and ignored, as OpenAI's SDKs may send newer ones."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1, max_length=256)
    input: str = Field(min_length=1)
    voice: str = Field(min_length=1, max_length=64)
    instructions: str | None = Field(None, max_length=4096)
    response_format: Literal["mp3", "opus", "wav", "pcm", "flac"] = "mp3"
    speed: float = Field(1.0, ge=MIN_SPEED, le=MAX_SPEED)
    stream_format: Literal["audio", "sse"] = "audio"


def _speech_stage(state: ServerState) -> TtsStage:
    if state.tts is None:
        raise ApiError(501, "this server has no TTS stage", kind="server_error", code="not_implemented")
    return state.tts


async def speech(request: Request) -> Response:
    state: ServerState = request.app.state.omnivox
    check_auth(request, state)
    max_chars = state.config.tts.max_input_chars
    limit = min(state.config.limits.max_http_body_bytes, 16 * 1024 + 8 * max_chars)
    body = await read_json_body(request, state, SpeechRequest, limit)
    if len(body.input) > max_chars:
        message = f"input is longer than {max_chars} characters"
        raise ApiError(400, message, param="input", code="string_above_max_length")
    stage = _speech_stage(state)
    voice = stage.voice(body.voice)
    if voice is None:
        raise ApiError(400, f"unknown voice {body.voice!r}; use one of OpenAI's voice names", param="voice")
    release = _admit(state)
    tracker = ResponseTracker(state, SPEECH_DOOR)
    try:
        await stage.start()
        audio = stage.audio(body.input, body.voice, body.speed)
        first = await anext(audio, None)
    except EngineError as exc:
        tracker.status = "failed"
        tracker.finish()
        release()
        raise engine_api_error(exc) from None
    except (OSError, ValueError) as exc:  # a voice that cannot be loaded
        tracker.status = "failed"
        tracker.finish()
        release()
        message = report_internal_error(log, "the TTS stage cannot start", exc, "the TTS stage cannot start")
        raise ApiError(503, message, kind="server_error", code="tts_unavailable") from None
    except BaseException:  # the client went away (cancelled) or a bug: the slot is free again either way
        release()
        raise
    chunks = _chunks(first, audio)
    if body.stream_format == "sse":
        return EventStream(_sse_events(state, stage, tracker, chunks, body.response_format), on_close=release)
    return EventStream(
        _audio_bytes(state, stage, tracker, chunks, body.response_format),
        media_type=MEDIA_TYPES[body.response_format],
        on_close=release,
    )


def _admit(state: ServerState) -> Callable[[], None]:
    """Take one of the speech door's places, or refuse with 429 `server_busy`; returns what gives the place back
    (once, however often it is called)."""
    tts = state.config.tts
    places = tts.workers + tts.max_queued_requests
    if state.speech_requests >= places:
        log.warning("%s: %d speech requests in progress; refused one (tts.max_queued_requests)", SPEECH_DOOR, places)
        state.metrics.protocol_errors.labels(SPEECH_DOOR, EngineBusy.code).inc()
        message = f"the speech endpoint has {places} requests in progress; retry later"
        raise ApiError(429, message, kind="rate_limit_error", code=EngineBusy.code)
    state.speech_requests += 1
    released = False

    def release() -> None:
        nonlocal released
        if not released:
            released = True
            state.speech_requests -= 1

    return release


async def _chunks(first: np.ndarray | None, rest: AsyncIterator[np.ndarray]) -> AsyncIterator[np.ndarray]:
    async with aclosing(rest):
        if first is None:
            return
        yield first
        async for chunk in rest:
            yield chunk


async def _encoded(
    stage: TtsStage, tracker: ResponseTracker, chunks: AsyncIterator[np.ndarray], fmt: str
) -> AsyncIterator[bytes]:
    """Encoded bytes as the audio arrives (encoding of mp3/opus/flac runs off the event loop)."""
    encoder = StreamingEncoder(fmt, SPEECH_RATE)
    resampler = StreamResampler(stage.rate, SPEECH_RATE)
    heavy = fmt in ("mp3", "opus", "flac")
    async with aclosing(chunks):
        async for pcm in chunks:
            samples = resampler.process(pcm)
            data = await asyncio.to_thread(encoder.push, samples) if heavy else encoder.push(samples)
            tracker.audio()
            if data:
                yield data
    data = encoder.push(resampler.flush()) + await asyncio.to_thread(encoder.finish)
    if data:
        yield data


async def _audio_bytes(
    state: ServerState, stage: TtsStage, tracker: ResponseTracker, chunks: AsyncIterator[np.ndarray], fmt: str
) -> AsyncIterator[bytes]:
    try:
        async with aclosing(_encoded(stage, tracker, chunks, fmt)) as encoded:
            async for data in encoded:
                yield data
        tracker.status = "completed"
    except Exception as exc:  # headers are sent: the client sees the body end early
        tracker.status = "failed"
        stream_error(exc, SPEECH_DOOR, state)
    finally:
        tracker.finish()


async def _sse_events(
    state: ServerState, stage: TtsStage, tracker: ResponseTracker, chunks: AsyncIterator[np.ndarray], fmt: str
) -> AsyncIterator[str]:
    try:
        async with aclosing(_encoded(stage, tracker, chunks, fmt)) as encoded:
            async for data in encoded:
                yield sse({"type": "speech.audio.delta", "audio": base64.b64encode(data).decode()})
        usage = {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0}
        yield sse({"type": "speech.audio.done", "usage": usage})
        tracker.status = "completed"
    except Exception as exc:
        tracker.status = "failed"
        yield stream_error(exc, SPEECH_DOOR, state)
    finally:
        tracker.finish()
