"""`POST /audio/chat/completions`: the audio-modalities format of the voice-agent platforms (Agora's custom LLM with
direct audio output).

Always streamed. Following Agora's description of direct LLM audio output, each chunk carries one kind of content
under `delta.audio` (all with the answer's `id`):

* `data`: 1280-byte pieces of PCM16 16 kHz mono (40 ms; only the last may be shorter), sent as the engine makes them;
* `words`: word-level subtitles `{text, start_ts, end_ts, duration}` in milliseconds from the start of the audio, sent
  as the words are known (timed by `word_timing`), so the platform's live subtitles follow the whole answer;
* `transcript`: the complete text of the answer, sent once after the audio, which the platform keeps as the turn's
  context (it stores only what `transcript` holds, so a transcript sent before the text is complete would lose the
  rest of the answer).

Function calls go out in the OpenAI chat shape (`delta.tool_calls`, `finish_reason: "tool_calls"`); the stream ends
with a `finish_reason` chunk and `data: [DONE]`. The transcript is also kept under the audio id, so a later request
may refer to the turn by `audio: {id}`. Any model name is accepted: the format says it is for identification only.
"""

from __future__ import annotations

import base64
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from omnivox.pipeline.audio import StreamResampler, float_to_pcm16
from omnivox.pipeline.engines.base import AudioDelta, Delta, TextDelta, ToolCallDelta
from omnivox.server.http_bodies import AudioChatRequest
from omnivox.server.http_common import (
    SSE_DONE,
    ApiError,
    EventStream,
    ResponseTracker,
    check_auth,
    open_engine_stream,
    read_json_body,
    sse,
    stream_error,
)
from omnivox.server.http_media import AudioCache, audio_cache, chat_engine_request
from omnivox.server.http_tools import ChatToolCalls
from omnivox.server.state import ServerState
from omnivox.server.word_timing import TimedWord, WordTimeline

AUDIO_CHAT_DOOR = "http_audio_chat"
AUDIO_CHAT_RATE = 16_000
AUDIO_CHAT_CHUNK_BYTES = 1280
"""40 ms of PCM16 16 kHz mono, the audio-modalities chunk size."""


async def audio_chat_completions(request: Request) -> Response:
    state: ServerState = request.app.state.omnivox
    check_auth(request, state)
    body = await read_json_body(request, state, AudioChatRequest)
    if not body.stream:
        raise ApiError(400, "this endpoint only streams: set stream to true", param="stream")
    engine_request = await chat_engine_request(request, state, body, output_audio=True)
    deltas = await open_engine_stream(state, engine_request, request, AUDIO_CHAT_DOOR)
    calls = ChatToolCalls(engine_request.tools, engine_request.parallel_tool_calls, state.metrics, AUDIO_CHAT_DOOR)
    return EventStream(audio_chat_events(state, audio_cache(request), engine_request.request_id, deltas, calls))


async def audio_chat_events(
    state: ServerState,
    cache: AudioCache,
    message_id: str,
    deltas: AsyncIterator[Delta],
    calls: ChatToolCalls | None = None,
) -> AsyncIterator[str]:
    """Audio data as it is made, word subtitles as words complete, the whole transcript after the audio, the
    function calls, the finish reason, then [DONE] (see the module docstring)."""
    calls = calls or ChatToolCalls((), True)
    tracker = ResponseTracker(state, AUDIO_CHAT_DOOR)
    audio_id = f"audio_{uuid.uuid4().hex}"
    resampler = StreamResampler(state.engine.native_rate, AUDIO_CHAT_RATE)
    timeline = WordTimeline()
    transcript: list[str] = []
    pending = bytearray()
    sent_bytes = 0

    def event(delta: dict[str, Any], finish_reason: str | None = None) -> str:
        return sse({"id": message_id, "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]})

    def words_event(words: list[TimedWord]) -> list[str]:
        return [event({"audio": {"id": audio_id, "words": [word.to_json() for word in words]}})] if words else []

    def audio_events(final: bool) -> list[str]:
        nonlocal sent_bytes
        events = []
        while len(pending) >= AUDIO_CHAT_CHUNK_BYTES or (final and pending):
            piece = bytes(pending[:AUDIO_CHAT_CHUNK_BYTES])
            del pending[:AUDIO_CHAT_CHUNK_BYTES]
            sent_bytes += len(piece)
            events.append(event({"audio": {"id": audio_id, "data": base64.b64encode(piece).decode()}}))
        return events

    def audio_ms() -> float:
        return (sent_bytes + len(pending)) / 2 / AUDIO_CHAT_RATE * 1000

    try:
        yield event({"role": "assistant", "audio": {"id": audio_id, "data": ""}})
        async with aclosing(deltas):
            async for delta in deltas:
                if isinstance(delta, TextDelta):
                    if calls.started:
                        continue  # the call's text, never the answer
                    transcript.append(delta.text)
                    for chunk in words_event(timeline.push(delta.text, audio_ms())):
                        yield chunk
                elif isinstance(delta, AudioDelta):
                    if calls.started and not transcript:
                        continue  # nothing was said before the call: nothing may be heard
                    pending.extend(float_to_pcm16(resampler.process(delta.pcm)))
                    if len(pending) >= AUDIO_CHAT_CHUNK_BYTES:
                        tracker.audio()
                        for chunk in audio_events(final=False):
                            yield chunk
                elif isinstance(delta, ToolCallDelta):
                    call_piece = calls.piece(delta)
                    if call_piece is not None:
                        yield event({"tool_calls": [call_piece]})
        if transcript or not calls.started:
            pending.extend(float_to_pcm16(resampler.flush()))
        if pending:
            tracker.audio()
        for chunk in [*audio_events(final=True), *words_event(timeline.finish())]:
            yield chunk
        text = "".join(transcript)
        if text:
            yield event({"audio": {"id": audio_id, "transcript": text}})
        cache.put(audio_id, text)
        made, last_pieces = calls.finish()
        for call_piece in last_pieces:
            yield event({"tool_calls": [call_piece]})
        yield event({}, "tool_calls" if made else "stop")
        tracker.status = "completed"
        yield SSE_DONE
    except Exception as exc:
        tracker.status = "failed"
        yield stream_error(exc, AUDIO_CHAT_DOOR, state)
    finally:
        tracker.finish()
