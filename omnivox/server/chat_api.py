"""`POST /v1/chat/completions`: OpenAI's shape, with audio.

`modalities` `["text"]` (default) or `["text", "audio"]` with `audio: {voice, format}`; `format` is pcm16 | wav | mp3 |
flac | opus, and streaming requires pcm16 (24 kHz mono). Streamed audio arrives as `delta.audio.transcript` pieces
and `delta.audio.data` chunks as the engine makes them. A client that disconnects mid-stream cancels the engine work
at once.
"""

from __future__ import annotations

import asyncio
import base64
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

import numpy as np
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from omnivox.pipeline.audio import StreamResampler, encode_audio_file, float_to_pcm16, resample
from omnivox.pipeline.engines.base import AudioDelta, Delta, ResponseRequest, TextDelta, Usage
from omnivox.server.http_bodies import ChatCompletionRequest
from omnivox.server.http_common import (
    SSE_DONE,
    ApiError,
    EventStream,
    ResponseTracker,
    check_auth,
    check_model,
    open_engine_stream,
    parse_body,
    read_body,
    sse,
    stream_error,
)
from omnivox.server.http_media import CHAT_AUDIO_RATE, AudioCache, audio_cache, build_messages, sampling_params
from omnivox.server.state import ServerState

CHAT_DOOR = "http_chat"


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
        sampling=sampling_params(body, state.config.generation),
        request_id=f"chatcmpl-{uuid.uuid4().hex}",
        max_prompt_tokens=state.config.generation.max_prompt_tokens,
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
    deltas = await open_engine_stream(state, engine_request)
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
