"""Barge-in over the WebSocket door with silero server VAD at default settings, timed on the client's clock.

The caller asks a question, the agent starts a long answer, and ~1 s into it the caller speaks again, streamed
in real time as a microphone would. The agent's audio must stop within 250 ms of the caller's speech onset
(the moment the first chunk holding the interruption's speech was sent), the response must end cancelled with
reason `turn_detected`, and the next turn must see only the part of the answer the caller heard.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from omnivox.pipeline.audio import synthesize_speech
from omnivox.pipeline.engines.base import AudioPart, Delta, Engine, ResponseRequest, TextPart
from omnivox.pipeline.engines.scripted import ESPEAK_VOICES, ScriptedEngine
from tests.audio_fixtures import Microphone, silence, speech
from tests.server_helpers import running_server, scripted_config
from tests.test_conformance import Wire, connect

LONG_REPLY = (
    "Let me tell you everything about the weather this week. On Monday it will be sunny and warm, "
    "on Tuesday clouds come in from the west, and by Wednesday we expect heavy rain across the whole region."
)
MAX_BARGE_IN_MS = 250
INTERRUPT_AFTER_S = 1.0
MAX_DETECTION_S = 0.5


class RecordingEngine:
    """Wraps an engine and keeps every `ResponseRequest` it was asked to answer (what the model would see)."""

    def __init__(self, inner: Engine) -> None:
        self.inner = inner
        self.name = inner.name
        self.model_id = inner.model_id
        self.native_rate = inner.native_rate
        self.requests: list[ResponseRequest] = []

    @property
    def ready(self) -> bool:
        return self.inner.ready

    async def start(self) -> None:
        await self.inner.start()

    async def close(self) -> None:
        await self.inner.close()

    def respond(self, request: ResponseRequest) -> AsyncIterator[Delta]:
        self.requests.append(request)
        return self.inner.respond(request)


def audio_ms(events: list[dict[str, Any]], response_id: str) -> float:
    data = b"".join(
        base64.b64decode(e["delta"])
        for e in events
        if e["type"] == "response.output_audio.delta" and e["response_id"] == response_id
    )
    return len(data) / 48


async def wait_for(wire: Wire, predicate: Any, timeout: float) -> dict[str, Any]:
    async with asyncio.timeout(timeout):
        while not predicate(event := await wire.next(timeout)):
            pass
    return event


@pytest.mark.slow
async def test_barge_in_stops_the_agent_within_250_ms_and_keeps_only_the_heard_part() -> None:
    scripted = ScriptedEngine(reply=LONG_REPLY)
    engine = RecordingEngine(scripted)
    with running_server(scripted_config(), engine) as server:
        async with connect(server) as wire:
            microphone = Microphone(wire.append)
            streaming = asyncio.create_task(microphone.run())
            try:
                microphone.say(silence(0.5))
                microphone.say(speech("What will the weather be like this week?"))
                first_delta = await wait_for(wire, lambda e: e["type"] == "response.output_audio.delta", 20)
                first_delta_at = wire.arrived[-1]
                response_id = first_delta["response_id"]
                assistant_item = first_delta["item_id"]
                await asyncio.sleep(first_delta_at + INTERRUPT_AFTER_S - time.monotonic())
                microphone.say(speech("Wait, stop. What about tomorrow?"))
                await wait_for(wire, lambda e: e["type"] == "input_audio_buffer.speech_started", 5)
                playback_stopped_at = wire.arrived[-1]
                done = await wait_for(wire, lambda e: e["type"] == "response.done", 5)
                played_ms = int(
                    min((playback_stopped_at - first_delta_at) * 1000, audio_ms(wire.received, response_id))
                )
                await wire.send(
                    {
                        "type": "conversation.item.truncate",
                        "item_id": assistant_item,
                        "content_index": 0,
                        "audio_end_ms": played_ms,
                    }
                )
                truncated = await wait_for(wire, lambda e: e["type"] == "conversation.item.truncated", 5)
                await wait_for(wire, lambda e: e["type"] == "response.created", 15)
            finally:
                streaming.cancel()

    onset = microphone.onsets[-1]
    delta_times = [
        at
        for event, at in zip(wire.received, wire.arrived, strict=True)
        if event["type"] == "response.output_audio.delta" and event["response_id"] == response_id
    ]
    barge_in_ms = (delta_times[-1] - onset) * 1000
    done_ms = (wire.arrived[wire.received.index(done)] - onset) * 1000
    print(
        f"\nbarge-in after the caller's speech onset: speech_started {(playback_stopped_at - onset) * 1000:.0f} ms, "
        f"last audio delta {barge_in_ms:.0f} ms, response.done {done_ms:.0f} ms; caller heard {played_ms} ms"
    )
    assert len(microphone.onsets) == 2 and onset > first_delta_at + INTERRUPT_AFTER_S - 0.05
    first_turn_at = next(
        at for event, at in zip(wire.received, wire.arrived, strict=True) if event["type"].endswith("speech_started")
    )
    assert first_turn_at - microphone.onsets[0] < MAX_DETECTION_S, "the first caller waited for the VAD to load"
    assert -100 < barge_in_ms <= MAX_BARGE_IN_MS, "the agent's audio must flow until the caller speaks, then stop"
    assert done["response"]["id"] == response_id
    assert done["response"]["status"] == "cancelled"
    assert done["response"]["status_details"] == {"type": "cancelled", "reason": "turn_detected"}
    assert truncated["audio_end_ms"] == played_ms

    assert len(engine.requests) == 2
    roles = [message.role for message in engine.requests[1].messages]
    assert roles == ["user", "assistant", "user"]
    user_1, assistant, user_2 = engine.requests[1].messages
    assert all(isinstance(part, AudioPart) for part in (*user_1.parts, *user_2.parts))
    heard = "".join(part.text for part in assistant.parts if isinstance(part, TextPart))
    spoken_reply = synthesize_speech(LONG_REPLY, 24_000, ESPEAK_VOICES["alloy"], scripted.words_per_minute)
    full_reply_ms = spoken_reply.size / 24
    expected_chars = len(LONG_REPLY) * played_ms / full_reply_ms
    assert heard and LONG_REPLY.startswith(heard) and LONG_REPLY[len(heard)] == " "
    assert expected_chars - 20 <= len(heard) <= expected_chars + 2
