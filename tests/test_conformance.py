"""Conformance cases C1-C18 of protocols.md for the WebSocket door, driven by the official clients.

The clients are the `openai` PyPI SDK (GA `realtime.connect`, beta `beta.realtime.connect`) and `openai-agents`
(`RealtimeRunner`). The SDK's own connection parses events leniently, so every event we receive is also validated
with the SDK's pydantic models (GA or beta) — what a strict client such as `openai-agents` does. The caller audio
is real speech made by espeak-ng.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
import typing
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import numpy as np
import pytest
import websockets
from openai import AsyncOpenAI
from openai.types.beta.realtime import RealtimeServerEvent as BetaServerEvent
from openai.types.realtime import RealtimeServerEvent as GaServerEvent
from pydantic import BaseModel, ValidationError

from omnivox.pipeline.audio import audio_format, pcm16_to_float
from tests.audio_fixtures import b64, caller_audio, chunk_bytes, chunks, encode, speech, stream_realtime
from tests.server_helpers import RunningServer, running_server, scripted_config

REPLY = "Sure, one moment please."
MODEL = "qwen-omni-test"


def event_models(union: Any) -> dict[str, type[BaseModel]]:
    """The SDK's server-event union (Annotated[Union[...], discriminator]) as `type` -> pydantic model."""
    models: dict[str, type[BaseModel]] = {}
    for model in typing.get_args(typing.get_args(union)[0]):
        for event_type in typing.get_args(model.model_fields["type"].annotation):
            models[event_type] = model
    return models


GA_EVENTS = event_models(GaServerEvent)
BETA_EVENTS = event_models(BetaServerEvent)

GA_NAMES = {
    "item.done": "conversation.item.done",
    "audio.delta": "response.output_audio.delta",
    "audio.done": "response.output_audio.done",
    "transcript.delta": "response.output_audio_transcript.delta",
    "transcript.done": "response.output_audio_transcript.done",
}
BETA_NAMES = {
    "item.done": "conversation.item.created",
    "audio.delta": "response.audio.delta",
    "audio.done": "response.audio.done",
    "transcript.delta": "response.audio_transcript.delta",
    "transcript.done": "response.audio_transcript.done",
}


@pytest.fixture(scope="module")
def server() -> RunningServer:
    config = scripted_config(engine={"options": {"scripted": {"reply": REPLY, "speed": 8.0, "first_audio_ms": 20}}})
    with running_server(config) as running:
        yield running


class Wire:
    """One SDK connection: every server event is recorded, checked for a string `event_id` and validated
    with the SDK's pydantic models of its dialect."""

    def __init__(self, connection: Any, beta: bool) -> None:
        self.connection = connection
        self.beta = beta
        self.names = BETA_NAMES if beta else GA_NAMES
        self.received: list[dict[str, Any]] = []
        self.arrived: list[float] = []
        """`time.monotonic()` at which each event of `received` arrived."""
        self.invalid: list[str] = []

    async def send(self, event: dict[str, Any]) -> None:
        await self.connection.send(event)

    async def next(self, timeout: float = 10.0) -> dict[str, Any]:
        async with asyncio.timeout(timeout):
            event = json.loads(await self.connection.recv_bytes())
        self.arrived.append(time.monotonic())
        self.received.append(event)
        if not isinstance(event.get("event_id"), str):
            self.invalid.append(f"{event.get('type')}: no string event_id")
        self.invalid.extend(self._validation_errors(event))
        return event

    def _validation_errors(self, event: dict[str, Any]) -> list[str]:
        """Beta models pin `session.model` to OpenAI's names; any served model name is allowed, nothing else."""
        model = (BETA_EVENTS if self.beta else GA_EVENTS).get(event.get("type"))
        if model is None:
            return [f"{event.get('type')}: not an event type of the SDK"]
        try:
            model.model_validate(event)
        except ValidationError as exc:
            errors = [e for e in exc.errors() if not (self.beta and e["loc"] == ("session", "model"))]
            return [f"{event['type']}: {e['loc']}: {e['msg']}" for e in errors]
        return []

    async def until(self, event_type: str, timeout: float = 15.0) -> list[dict[str, Any]]:
        """Events up to and including the first of `event_type`."""
        events = []
        async with asyncio.timeout(timeout):
            while True:
                events.append(await self.next(timeout))
                if events[-1]["type"] == event_type:
                    return events

    async def during(self, seconds: float) -> list[dict[str, Any]]:
        """Every event that arrives within `seconds`."""
        events = []
        deadline = asyncio.get_running_loop().time() + seconds
        while (left := deadline - asyncio.get_running_loop().time()) > 0:
            try:
                events.append(await self.next(left))
            except TimeoutError:
                break
        return events

    async def append(self, data: bytes) -> None:
        await self.send({"type": "input_audio_buffer.append", "audio": b64(data)})

    async def manual_mode(self) -> None:
        if self.beta:
            await self.send({"type": "session.update", "session": {"turn_detection": None}})
        else:
            session = {"type": "realtime", "audio": {"input": {"turn_detection": None}}}
            await self.send({"type": "session.update", "session": session})
        session = (await self.until("session.updated"))[-1]["session"]
        assert (session["turn_detection"] if self.beta else session["audio"]["input"]["turn_detection"]) is None


class RawConnection:
    """A plain `websockets` connection offering the two calls `Wire` makes on the SDK's connection."""

    def __init__(self, ws: websockets.ClientConnection) -> None:
        self.ws = ws

    async def send(self, event: dict[str, Any]) -> None:
        await self.ws.send(json.dumps(event))

    async def recv_bytes(self) -> str | bytes:
        return await self.ws.recv()


@asynccontextmanager
async def connect(server: RunningServer, *, beta: bool = False, api_key: str = "sk-local") -> AsyncIterator[Wire]:
    """An SDK connection whose first event is checked to be `session.created` (C1/C3); on exit, every event
    received must have passed the SDK's validation."""
    client = AsyncOpenAI(api_key=api_key, base_url=f"{server.http_url}/v1", websocket_base_url=f"{server.ws_url}/v1")
    realtime = client.beta.realtime if beta else client.realtime
    async with realtime.connect(model=MODEL) as connection:
        wire = Wire(connection, beta)
        created = await wire.next()
        assert created["type"] == "session.created"
        yield wire
    await client.close()
    assert wire.invalid == []


def text_item(text: str) -> dict[str, Any]:
    return {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}


def non_delta_types(events: list[dict[str, Any]]) -> list[str]:
    types = [e["type"] for e in events if not e["type"].endswith(".delta")]
    return [t for index, t in enumerate(types) if index == 0 or types[index - 1] != t]


def pcm16_audio(events: list[dict[str, Any]], delta_type: str) -> bytes:
    return b"".join(base64.b64decode(e["delta"]) for e in events if e["type"] == delta_type)


# ---------------------------------------------------------------- C1-C4 handshake and session


async def test_c1_ga_handshake_session_created_first(server: RunningServer) -> None:
    async with connect(server) as wire:
        session = wire.received[0]["session"]
    assert session["type"] == "realtime" and session["model"] == MODEL
    assert session["audio"]["input"]["format"] == {"type": "audio/pcm", "rate": 24000}
    assert session["audio"]["input"]["turn_detection"]["type"] == "server_vad"


async def test_c1_bearer_key_is_checked_with_the_sdk() -> None:
    with running_server(scripted_config(server={"api_keys": ["sk-right"]})) as secured:
        async with connect(secured, api_key="sk-right") as wire:
            assert wire.received[0]["type"] == "session.created"
        client = AsyncOpenAI(api_key="sk-wrong", websocket_base_url=f"{secured.ws_url}/v1")
        async with client.realtime.connect(model=MODEL) as connection:
            refused = json.loads(await connection.recv_bytes())
        await client.close()
    assert refused["type"] == "error" and refused["error"]["code"] == "invalid_api_key"


async def test_c3_beta_header_selects_the_beta_session_shape(server: RunningServer) -> None:
    async with connect(server, beta=True) as wire:
        session = wire.received[0]["session"]
    assert set(session["modalities"]) == {"audio", "text"}
    assert session["input_audio_format"] == "pcm16" and session["output_audio_format"] == "pcm16"
    assert session["turn_detection"]["type"] == "server_vad"
    assert "audio" not in session and "type" not in session


async def test_c2_c3_browser_beta_subprotocol_selects_realtime_and_the_beta_dialect(server: RunningServer) -> None:
    """The browser beta class cannot set headers: it offers `openai-beta.realtime-v1` as a subprotocol."""
    offered = ["realtime", "openai-insecure-api-key.sk-local", "openai-beta.realtime-v1"]
    async with websockets.connect(f"{server.ws_url}/v1/realtime?model={MODEL}", subprotocols=offered) as ws:
        wire = Wire(RawConnection(ws), beta=True)
        created = await wire.next()
        await wire.send({"type": "session.update", "session": {"instructions": "be brief"}})
        updated = (await wire.until("session.updated"))[-1]
    assert ws.subprotocol == "realtime"
    assert created["type"] == "session.created" and "input_audio_format" in created["session"]
    assert updated["session"]["instructions"] == "be brief"
    assert wire.invalid == []


async def test_c4_agents_realtime_session_updates_then_manual_mode(server: RunningServer) -> None:
    agents_session = {
        "type": "realtime",
        "model": MODEL,
        "output_modalities": ["audio"],
        "instructions": "be brief",
        "audio": {
            "input": {
                "format": {"type": "audio/pcm", "rate": 24000},
                "noise_reduction": None,
                "transcription": {"model": "gpt-4o-mini-transcribe"},
                "turn_detection": {"type": "semantic_vad"},
            },
            "output": {"format": {"type": "audio/pcm", "rate": 24000}, "voice": "ash", "speed": 1},
        },
        "tools": [],
    }
    async with connect(server) as wire:
        await wire.send({"type": "session.update", "session": agents_session})
        await wire.send({"type": "session.update", "session": {"type": "realtime", "tracing": "auto"}})
        first = await wire.until("session.updated")
        second = await wire.until("session.updated")
        await wire.manual_mode()
        manual = wire.received[-1]["session"]
    assert [e["type"] for e in first + second] == ["session.updated", "session.updated"]
    session = second[-1]["session"]
    assert session["instructions"] == "be brief" and session["audio"]["output"]["voice"] == "ash"
    assert session["audio"]["input"]["turn_detection"]["type"] == "semantic_vad"
    assert manual["audio"]["input"]["turn_detection"] is None
    assert manual["instructions"] == "be brief"


# ---------------------------------------------------------------- C5-C8 manual turns (C18: SDK smoke, GA and beta)


@pytest.mark.parametrize("beta", [False, True], ids=["ga", "beta"])
async def test_c5_c18_manual_audio_turn_full_sequence(server: RunningServer, beta: bool) -> None:
    question = encode(speech("What is the weather like in Paris today?"))
    async with connect(server, beta=beta) as wire:
        await wire.manual_mode()
        for piece in chunks(question, 7_000):  # uneven chunking: 145.8 ms each, the last shorter
            await wire.append(piece)
        await wire.send({"type": "input_audio_buffer.commit"})
        committed = await wire.until("input_audio_buffer.committed")
        user_items = [await wire.next() for _ in range(1 if beta else 2)]
        await wire.send({"type": "response.create"})
        response = await wire.until("response.done", timeout=20)
    item_id = committed[-1]["item_id"]
    assert [e["type"] for e in user_items] == (
        ["conversation.item.created"] if beta else ["conversation.item.added", "conversation.item.done"]
    )
    assert all(e["item"]["id"] == item_id and e["item"]["role"] == "user" for e in user_items)
    assert user_items[-1]["item"]["content"][0]["type"] == "input_audio"
    item_event = "conversation.item.created" if beta else "conversation.item.added"
    expected = [
        "response.created",
        "response.output_item.added",
        item_event,
        "response.content_part.added",
        wire.names["audio.done"],
        wire.names["transcript.done"],
        "response.content_part.done",
        "response.output_item.done",
        *([] if beta else ["conversation.item.done"]),
        "response.done",
    ]
    assert non_delta_types(response) == expected
    audio = pcm16_audio(response, wire.names["audio.delta"])
    assert audio and len(audio) % 2 == 0
    samples = pcm16_to_float(audio)
    assert abs(samples.size / 24_000 - speech(REPLY).size / 24_000) < 0.2
    assert float(np.abs(samples).max()) > 0.05
    transcript = "".join(e["delta"] for e in response if e["type"] == wire.names["transcript.delta"])
    done = next(e for e in response if e["type"] == wire.names["transcript.done"])
    assert transcript == done["transcript"] == REPLY
    assert response[-1]["response"]["status"] == "completed"
    assert response[-1]["response"]["output"][0]["content"][0]["type"] == ("audio" if beta else "output_audio")


async def test_c6_short_commit_is_an_error_and_the_connection_stays_open(server: RunningServer) -> None:
    async with connect(server) as wire:
        await wire.manual_mode()
        await wire.append(encode(speech("Hi"))[: chunk_bytes(chunk_ms=50)])
        await wire.send({"type": "input_audio_buffer.commit", "event_id": "evt_short"})
        error = await wire.until("error")
        await wire.send({"type": "input_audio_buffer.clear"})
        cleared = await wire.until("input_audio_buffer.cleared")
    assert error[-1]["error"]["code"] == "input_audio_buffer_commit_empty"
    assert error[-1]["error"]["event_id"] == "evt_short"
    assert cleared[-1]["type"] == "input_audio_buffer.cleared"


async def test_c7_clear_empties_the_buffer(server: RunningServer) -> None:
    async with connect(server) as wire:
        await wire.manual_mode()
        await wire.append(encode(speech("Please forget this sentence.")))
        await wire.send({"type": "input_audio_buffer.clear"})
        cleared = await wire.until("input_audio_buffer.cleared")
        await wire.send({"type": "input_audio_buffer.commit"})
        error = await wire.until("error")
    assert [e["type"] for e in cleared] == ["input_audio_buffer.cleared"]
    assert [e["type"] for e in error] == ["error"]
    assert error[-1]["error"]["code"] == "input_audio_buffer_commit_empty"


async def test_c8_text_turn_gets_an_audio_response(server: RunningServer) -> None:
    async with connect(server) as wire:
        await wire.manual_mode()
        await wire.send({"type": "conversation.item.create", "item": text_item("Tell me a joke")})
        added = await wire.until("conversation.item.done")
        await wire.send({"type": "response.create"})
        response = await wire.until("response.done", timeout=20)
    assert [e["type"] for e in added] == ["conversation.item.added", "conversation.item.done"]
    assert added[0]["item"]["content"][0] == {"type": "input_text", "text": "Tell me a joke"}
    assert response[-1]["response"]["status"] == "completed"
    assert len(pcm16_audio(response, "response.output_audio.delta")) > 24_000


# ---------------------------------------------------------------- C9 server VAD


@pytest.mark.slow
async def test_c9_server_vad_on_real_time_speech(server: RunningServer) -> None:
    caller = caller_audio([1.0, "Hello, what is the weather like today?", 1.0])
    ((onset_ms, end_ms),) = caller.speech_spans_ms
    async with connect(server) as wire:
        await stream_realtime(wire.append, encode(caller.samples))
        turn = await wire.until("response.done", timeout=20)
    types = non_delta_types(turn)
    assert types[:5] == [
        "input_audio_buffer.speech_started",
        "input_audio_buffer.speech_stopped",
        "input_audio_buffer.committed",
        "conversation.item.added",
        "conversation.item.done",
    ]
    assert types[5] == "response.created" and turn[-1]["response"]["status"] == "completed"
    started, stopped, committed, added, done = turn[:5]
    item_id = started["item_id"]
    assert stopped["item_id"] == committed["item_id"] == added["item"]["id"] == done["item"]["id"] == item_id
    assert onset_ms - 300 - 100 <= started["audio_start_ms"] <= onset_ms - 300 + 250
    assert end_ms - 150 <= stopped["audio_end_ms"] <= end_ms + 300


@pytest.mark.parametrize("beta", [False, True], ids=["ga", "beta"])
async def test_c9_create_response_false_only_commits(server: RunningServer, beta: bool) -> None:
    caller = caller_audio([0.5, "Just listening, no answer please.", 1.0])
    turn_detection = {"type": "server_vad", "create_response": False}
    async with connect(server, beta=beta) as wire:
        session = (
            {"turn_detection": turn_detection}
            if beta
            else {"type": "realtime", "audio": {"input": {"turn_detection": turn_detection}}}
        )
        await wire.send({"type": "session.update", "session": session})
        await wire.until("session.updated")
        await stream_realtime(wire.append, encode(caller.samples), speed=8.0)
        turn = await wire.until(wire.names["item.done"])
        after = await wire.during(1.0)
    assert [e["type"] for e in turn][:3] == [
        "input_audio_buffer.speech_started",
        "input_audio_buffer.speech_stopped",
        "input_audio_buffer.committed",
    ]
    assert not [e for e in after if e["type"].startswith("response.")]


# ---------------------------------------------------------------- C11-C14 responses and items


@pytest.mark.parametrize("beta", [False, True], ids=["ga", "beta"])
async def test_c11_cancel_mid_response_then_cancel_with_none_active(server: RunningServer, beta: bool) -> None:
    async with connect(server, beta=beta) as wire:
        await wire.manual_mode()
        await wire.send({"type": "conversation.item.create", "item": text_item("Talk for a while")})
        await wire.send({"type": "response.create"})
        first = await wire.until(wire.names["audio.delta"])
        await wire.send({"type": "response.cancel"})
        done = await wire.until("response.done")
        trailing = await wire.during(0.5)
        await wire.send({"type": "response.cancel", "event_id": "evt_again"})
        error = await wire.until("error")
    response_id = next(e for e in first if e["type"] == "response.created")["response"]["id"]
    assert done[-1]["response"]["status"] == "cancelled"
    assert done[-1]["response"]["status_details"] == {"type": "cancelled", "reason": "client_cancelled"}
    assert not [e for e in trailing if e.get("response_id") == response_id]
    assert error[-1]["error"]["code"] == "response_cancel_not_active"
    assert error[-1]["error"]["event_id"] == "evt_again"


async def test_c12_second_response_create_is_refused_and_the_first_completes(server: RunningServer) -> None:
    async with connect(server) as wire:
        await wire.manual_mode()
        await wire.send({"type": "conversation.item.create", "item": text_item("Hello")})
        await wire.send({"type": "response.create"})
        await wire.until("response.created")
        await wire.send({"type": "response.create", "event_id": "evt_second"})
        events = await wire.until("response.done", timeout=20)
    errors = [e for e in events if e["type"] == "error"]
    assert [e["error"]["code"] for e in errors] == ["conversation_already_has_active_response"]
    assert errors[0]["error"]["event_id"] == "evt_second"
    assert events[-1]["response"]["status"] == "completed"


@pytest.mark.parametrize("beta", [False, True], ids=["ga", "beta"])
async def test_c10_c13_truncate_rules(server: RunningServer, beta: bool) -> None:
    async with connect(server, beta=beta) as wire:
        await wire.manual_mode()
        await wire.send({"type": "conversation.item.create", "item": text_item("Hello")})
        user = (await wire.until(wire.names["item.done"]))[-1]["item"]["id"]
        await wire.send({"type": "response.create"})
        done = (await wire.until("response.done", timeout=20))[-1]
        assistant = done["response"]["output"][0]["id"]
        truncate = {"type": "conversation.item.truncate", "content_index": 0}
        # past the audio sent (frameworks compute it from their own playback clock): clamped, and it succeeds
        await wire.send({**truncate, "item_id": assistant, "audio_end_ms": 60_000})
        past_end = (await wire.until("conversation.item.truncated"))[-1]
        await wire.send({**truncate, "item_id": user, "audio_end_ms": 10, "event_id": "evt_user"})
        on_user = (await wire.until("error"))[-1]
        await wire.send({"type": "conversation.item.retrieve", "item_id": assistant})
        unchanged = (await wire.until("conversation.item.retrieved"))[-1]
        await wire.send({**truncate, "item_id": assistant, "audio_end_ms": 1200})
        truncated = (await wire.until("conversation.item.truncated"))[-1]
        await wire.send({"type": "conversation.item.retrieve", "item_id": assistant})
        cut = (await wire.until("conversation.item.retrieved"))[-1]
    assert 1000 < past_end["audio_end_ms"] < 3000  # the whole answer, as sent
    assert on_user["error"]["event_id"] == "evt_user"
    assert unchanged["item"]["content"][0]["transcript"] == REPLY
    assert (truncated["item_id"], truncated["content_index"], truncated["audio_end_ms"]) == (assistant, 0, 1200)
    heard = cut["item"]["content"][0]["transcript"]
    assert heard and REPLY.startswith(heard) and len(heard) < len(REPLY)


@pytest.mark.parametrize("beta", [False, True], ids=["ga", "beta"])
async def test_c14_delete_item(server: RunningServer, beta: bool) -> None:
    async with connect(server, beta=beta) as wire:
        await wire.manual_mode()
        await wire.send({"type": "conversation.item.create", "item": text_item("Delete me")})
        item_id = (await wire.until(wire.names["item.done"]))[-1]["item"]["id"]
        await wire.send({"type": "conversation.item.delete", "item_id": item_id})
        deleted = (await wire.until("conversation.item.deleted"))[-1]
        await wire.send({"type": "conversation.item.delete", "item_id": item_id, "event_id": "evt_gone"})
        error = (await wire.until("error"))[-1]
    assert deleted["item_id"] == item_id
    assert error["error"]["event_id"] == "evt_gone" and error["error"]["type"] == "invalid_request_error"


# ---------------------------------------------------------------- C15 G.711


async def test_c15_ga_pcmu_in_and_out_with_server_vad(server: RunningServer) -> None:
    caller = caller_audio([0.5, "Can you hear me on the phone?", 1.0], rate=8_000)
    pcmu = {"type": "audio/pcmu"}
    session = {"type": "realtime", "audio": {"input": {"format": pcmu}, "output": {"format": pcmu}}}
    async with connect(server) as wire:
        await wire.send({"type": "session.update", "session": session})
        updated = (await wire.until("session.updated"))[-1]["session"]
        await stream_realtime(wire.append, encode(caller.samples, "g711_ulaw"), wire_format="g711_ulaw", speed=8.0)
        turn = await wire.until("response.done", timeout=20)
    assert updated["audio"]["output"]["format"] == pcmu
    assert non_delta_types(turn)[:3] == [
        "input_audio_buffer.speech_started",
        "input_audio_buffer.speech_stopped",
        "input_audio_buffer.committed",
    ]
    assert_ulaw_reply(pcm16_audio(turn, "response.output_audio.delta"))


async def test_c15_beta_g711_ulaw_manual_turn(server: RunningServer) -> None:
    question = encode(speech("Is this a phone line?", 8_000), "g711_ulaw")
    session = {"input_audio_format": "g711_ulaw", "output_audio_format": "g711_ulaw", "turn_detection": None}
    async with connect(server, beta=True) as wire:
        await wire.send({"type": "session.update", "session": session})
        updated = (await wire.until("session.updated"))[-1]["session"]
        for piece in chunks(question, chunk_bytes("g711_ulaw", 100)):
            await wire.append(piece)
        await wire.send({"type": "input_audio_buffer.commit"})
        await wire.send({"type": "response.create"})
        response = await wire.until("response.done", timeout=20)
    assert updated["input_audio_format"] == updated["output_audio_format"] == "g711_ulaw"
    assert_ulaw_reply(pcm16_audio(response, "response.audio.delta"))


def assert_ulaw_reply(data: bytes) -> None:
    """8 kHz mu-law, 1 byte per sample: as long as the scripted reply, and loud (not PCM16 misread)."""
    assert abs(len(data) / 8_000 - speech(REPLY).size / 24_000) < 0.2
    decoded = audio_format("g711_ulaw").decode(data)
    assert float(np.abs(decoded).max()) > 0.05


# ---------------------------------------------------------------- C16-C17 bad input through the SDK


@pytest.mark.parametrize("beta", [False, True], ids=["ga", "beta"])
async def test_c16_c17_bad_audio_and_unknown_events_get_errors_with_the_client_event_id(
    server: RunningServer, beta: bool
) -> None:
    async with connect(server, beta=beta) as wire:
        await wire.send({"type": "input_audio_buffer.append", "audio": "not base64 at all!", "event_id": "evt_b64"})
        not_base64 = (await wire.until("error"))[-1]
        await wire.send({"type": "input_audio_buffer.append", "audio": b64(b"\x01\x02\x03"), "event_id": "evt_odd"})
        odd_length = (await wire.until("error"))[-1]
        await wire.send({"type": "no.such.event", "event_id": "evt_unknown"})
        unknown = (await wire.until("error"))[-1]
        await wire.send({"type": "input_audio_buffer.clear"})
        still_open = (await wire.until("input_audio_buffer.cleared"))[-1]
    for error, event_id in ((not_base64, "evt_b64"), (odd_length, "evt_odd"), (unknown, "evt_unknown")):
        assert error["error"]["type"] == "invalid_request_error"
        assert error["error"]["event_id"] == event_id
    assert not_base64["error"]["code"] == odd_length["error"]["code"] == "invalid_audio"
    assert still_open["type"] == "input_audio_buffer.cleared"


# ---------------------------------------------------------------- C18 openai-agents


@pytest.mark.slow
async def test_c18_openai_agents_runner_validates_every_event(
    server: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    from agents.realtime import RealtimeAgent, RealtimeRunner

    caplog.set_level(logging.ERROR, logger="openai.agents")
    runner = RealtimeRunner(RealtimeAgent(name="caller", instructions="be brief"))
    config = {
        "url": f"{server.ws_url}/v1/realtime?model={MODEL}",
        "api_key": "sk-local",
        "initial_model_settings": {"turn_detection": None},
    }
    audio = bytearray()
    kinds: list[str] = []
    session = await runner.run(model_config=config)
    async with session:
        await session.send_audio(encode(speech("What is the weather like in Paris today?")), commit=True)
        await session.model.send_event(_response_create())
        async with asyncio.timeout(20):
            async for event in session:
                kinds.append(event.type)
                if event.type == "audio":
                    audio += event.audio.data
                elif event.type == "error":
                    pytest.fail(f"openai-agents reported an error: {event.error}")
                elif event.type == "agent_end":
                    break
    assert "Failed to validate server event" not in caplog.text
    assert "audio" in kinds and "audio_end" in kinds
    assert len(audio) % 2 == 0 and len(audio) / 48_000 > 1.0


def _response_create() -> Any:
    from agents.realtime.model_inputs import RealtimeModelSendRawMessage

    return RealtimeModelSendRawMessage(message={"type": "response.create"})
