"""`POST /audio/chat/completions`: the audio-modalities format of the voice-agent platforms (Agora's custom LLM).

Always streamed: one `delta.audio {id, transcript}` chunk, then `delta.audio {id, data}` chunks of exactly 1280 bytes
(40 ms of PCM16 16 kHz mono; only the last may be shorter), then `data: [DONE]`.

Transcript first, audio as soon as it is ready: the format allows one transcript, before any audio, while the
Qwen-Omni thinker runs only one token ahead of the talker, so the complete text exists only when the audio is complete
too; waiting for it would delay the first audio by the whole reply. The door therefore sends the transcript known
when the first audio is ready, holding that audio only until the engine has produced its first words, and at most
`http.transcript_wait_ms` (default 1000). With the Qwen engines the text leads the audio, so nothing is held and the
transcript holds the first words; the scripted engine releases each word as the audio that speaks it is made, so its
first audio waits for its first word (about 130 ms at 4x real time; set the wait to 0 for first audio at once with an
empty transcript). An engine that finishes within the wait (or whose text is complete before its audio starts) gives
the complete transcript. The complete transcript is always recorded under the audio id: a later request whose
assistant history entry carries `audio: {id}` puts the whole text into the conversation, so platforms should refer to
earlier turns by id rather than by the transcript they were sent.
"""

from __future__ import annotations

import base64
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing

from starlette.requests import Request
from starlette.responses import Response

from omnivox.pipeline.audio import StreamResampler, float_to_pcm16
from omnivox.pipeline.engines.base import AudioDelta, Delta, ResponseRequest, TextDelta
from omnivox.server.http_bodies import AudioChatRequest
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
from omnivox.server.http_media import AudioCache, audio_cache, build_messages, sampling_params
from omnivox.server.state import ServerState

AUDIO_CHAT_DOOR = "http_audio_chat"
AUDIO_CHAT_RATE = 16_000
AUDIO_CHAT_CHUNK_BYTES = 1280
"""40 ms of PCM16 16 kHz mono, the audio-modalities chunk size."""


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
        sampling=sampling_params(body, state.config.generation),
        request_id=f"chatcmpl-{uuid.uuid4().hex}",
        max_prompt_tokens=state.config.generation.max_prompt_tokens,
    )
    deltas = await open_engine_stream(state, engine_request)
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
