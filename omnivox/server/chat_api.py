"""`POST /v1/chat/completions`: OpenAI's shape, with audio and function calling.

`modalities` `["text"]` (default) or `["text", "audio"]` with `audio: {voice, format}`; `format` is pcm16 | wav | mp3 |
flac | opus, and streaming requires pcm16 (24 kHz mono). Streamed audio arrives as `delta.audio.transcript` pieces
and `delta.audio.data` chunks as the engine makes them. `tools`/`tool_choice` reach the engine; its calls come back
as `delta.tool_calls` pieces (or `message.tool_calls`) with `finish_reason: "tool_calls"`, and `role: "tool"`
messages carry the results on the next request (`http_tools`). A client that disconnects mid-stream cancels the
engine work at once.
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
from omnivox.pipeline.engines.base import AudioDelta, Delta, TextDelta, ToolCallDelta, Usage
from omnivox.server.http_bodies import ChatCompletionRequest
from omnivox.server.http_common import (
    SSE_DONE,
    ApiError,
    EventStream,
    ResponseTracker,
    check_auth,
    check_model,
    open_engine_stream,
    read_json_body,
    sse,
    stream_error,
)
from omnivox.server.http_media import CHAT_AUDIO_RATE, AudioCache, audio_cache, chat_engine_request
from omnivox.server.http_tools import ChatToolCalls, message_tool_calls
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
    calls: ChatToolCalls

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
    body = await read_json_body(request, state, ChatCompletionRequest)
    check_model(state, body.model)
    modalities = body.modalities or ["text"]
    wants_audio = "audio" in modalities
    if wants_audio and body.audio is None:
        message = 'modalities include "audio": the audio parameter {voice, format} is required'
        raise ApiError(400, message, param="audio")
    if wants_audio and body.stream and body.audio.format != "pcm16":
        raise ApiError(400, "streamed audio must use format pcm16", param="audio.format")
    engine_request = await chat_engine_request(
        request,
        state,
        body,
        output_audio=wants_audio,
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
        calls=ChatToolCalls(engine_request.tools, engine_request.parallel_tool_calls, state.metrics, CHAT_DOOR),
    )
    deltas = await open_engine_stream(state, engine_request, request, CHAT_DOOR)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return EventStream(chat_events(context, deltas, include_usage))
    return JSONResponse(await chat_body(context, deltas, body.audio.format if body.audio else None))


async def chat_events(context: ChatContext, deltas: AsyncIterator[Delta], include_usage: bool) -> AsyncIterator[str]:
    """`delta.content` pieces, or `delta.audio` transcript pieces and 24 kHz PCM16 data; `delta.tool_calls` pieces;
    finish; usage; [DONE]."""
    state, calls = context.state, context.calls
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
                    if calls.started:
                        continue  # the call's text, never the answer
                    transcript.append(delta.text)
                    piece = {"id": audio_id, "transcript": delta.text}
                    yield sse(context.chunk({"audio": piece} if audio_id else {"content": delta.text}))
                elif isinstance(delta, AudioDelta) and audio_id:
                    if calls.started and not transcript:
                        continue  # nothing was said before the call: nothing may be heard
                    pcm = float_to_pcm16(resampler.process(delta.pcm))
                    if pcm:
                        tracker.audio()
                        yield sse(context.chunk({"audio": {"id": audio_id, "data": base64.b64encode(pcm).decode()}}))
                elif isinstance(delta, ToolCallDelta):
                    call_piece = calls.piece(delta)
                    if call_piece is not None:
                        yield sse(context.chunk({"tool_calls": [call_piece]}))
                elif isinstance(delta, Usage):
                    usage = delta
        if audio_id:
            tail = float_to_pcm16(resampler.flush())
            if tail:
                yield sse(context.chunk({"audio": {"id": audio_id, "data": base64.b64encode(tail).decode()}}))
            entry = context.cache.put(audio_id, "".join(transcript))
            yield sse(context.chunk({"audio": {"id": audio_id, "expires_at": entry.expires_at}}))
        made, last_pieces = calls.finish()
        for call_piece in last_pieces:
            yield sse(context.chunk({"tool_calls": [call_piece]}))
        yield sse(context.chunk({}, "tool_calls" if made else context.finish_reason(usage)))
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
    """The whole completion: `message.content`, or `message.audio {id, data, expires_at, transcript}`, and
    `message.tool_calls`."""
    state, calls = context.state, context.calls
    tracker = ResponseTracker(state, CHAT_DOOR)
    text: list[str] = []
    audio: list[np.ndarray] = []
    usage: Usage | None = None
    try:
        async with aclosing(deltas):
            async for delta in deltas:
                if isinstance(delta, TextDelta) and not calls.started:
                    text.append(delta.text)
                elif isinstance(delta, AudioDelta) and (text or not calls.started):
                    tracker.audio()
                    audio.append(delta.pcm)
                elif isinstance(delta, ToolCallDelta):
                    calls.piece(delta)
                elif isinstance(delta, Usage):
                    usage = delta
        made, _ = calls.finish()
        tracker.status = "completed"
    except Exception:
        tracker.status = "failed"
        raise
    finally:
        tracker.finish()
    message: dict[str, Any] = {"role": "assistant", "content": "".join(text), "refusal": None}
    if made:
        message["tool_calls"] = message_tool_calls(made)
        message["content"] = message["content"] or None
    if context.audio_id and audio_format and (audio or not made):
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
        "choices": [
            {"index": 0, "message": message, "finish_reason": "tool_calls" if made else context.finish_reason(usage)}
        ],
        "usage": usage_body(usage),
    }
