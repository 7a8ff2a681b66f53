"""Well-formed hostile JSON on every door that parses it: nesting past (or just under) Python's recursion limit,
non-finite and oversized numbers, odd Twilio marks, digits and ids. Each gets a protocol error (or is ignored, on
Twilio's protocol, which has no error message) and the connection goes on."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import websockets

from omnivox.pipeline.engines.base import TextPart
from tests.server_helpers import RunningServer, running_server, scripted_config
from tests.test_telephony import STREAM_SID, RecordingEngine, first_media, say, start_event
from tests.test_webrtc import Peer, loopback_ice  # noqa: F401 - the autouse fixture keeps ICE on loopback

DEEP = "[" * 100_000 + "]" * 100_000
"""Past the recursion limit: `json.loads` raises RecursionError, which is no ValueError."""
NEARLY_DEEP = "[" * 900 + "]" * 900
"""Under it: parses, then breaks the first recursive walk (the session's deep copy of an update)."""

HOSTILE_VALUES = {
    "past the recursion limit": DEEP,
    "just under it": NEARLY_DEEP,
    "NaN": "NaN",
    "Infinity": "-Infinity",
    "1e999": "1e999",
    "4000 digits": "9" * 4000,
    "30 digits": "9" * 30,
}


@pytest.fixture(scope="module")
def engine() -> RecordingEngine:
    return RecordingEngine()


@pytest.fixture(scope="module")
def server(engine: RecordingEngine) -> Iterator[RunningServer]:
    with running_server(scripted_config(), engine) as running:
        yield running


async def next_event(ws: Any) -> dict[str, Any]:
    async with asyncio.timeout(10):
        return json.loads(await ws.recv())


@pytest.mark.parametrize("value", HOSTILE_VALUES.values(), ids=HOSTILE_VALUES.keys())
async def test_realtime_websocket_refuses_hostile_json_and_stays_open(server: RunningServer, value: str) -> None:
    async with websockets.connect(f"{server.ws_url}/v1/realtime", max_size=None) as ws:
        assert (await next_event(ws))["type"] == "session.created"
        await ws.send(f'{{"type":"session.update","event_id":"evt_1","session":{{"metadata":{value}}}}}')
        refused = await next_event(ws)
        await ws.send(json.dumps({"type": "session.update", "session": {"type": "realtime", "instructions": "hi"}}))
        updated = await next_event(ws)
    assert refused["type"] == "error" and refused["error"]["code"] == "invalid_json", refused
    assert updated["type"] == "session.updated" and updated["session"]["instructions"] == "hi"


ODD_TYPES = {
    "modalities holding a list": {"type": "session.update", "session": {"output_modalities": [["audio"]]}},
    "audio a string": {"type": "session.update", "session": {"audio": "loud"}},  # (null would mean "not set")
    "audio input a number": {"type": "session.update", "session": {"audio": {"input": 7}}},
    "format type a list": {"type": "session.update", "session": {"audio": {"input": {"format": {"type": []}}}}},
    "eagerness a list": {
        "type": "session.update",
        "session": {"audio": {"input": {"turn_detection": {"type": "semantic_vad", "eagerness": ["low"]}}}},
    },
    "response modalities holding a list": {"type": "response.create", "response": {"output_modalities": [[]]}},
}


@pytest.mark.parametrize("event", ODD_TYPES.values(), ids=ODD_TYPES.keys())
async def test_values_of_unexpected_types_are_invalid_requests(server: RunningServer, event: dict[str, Any]) -> None:
    """Lists where strings belong (unhashable), null where objects belong: the client's error, named as such."""
    async with websockets.connect(f"{server.ws_url}/v1/realtime") as ws:
        assert (await next_event(ws))["type"] == "session.created"
        await ws.send(json.dumps(event))
        refused = await next_event(ws)
        await ws.send(json.dumps({"type": "input_audio_buffer.clear"}))
        cleared = await next_event(ws)
    assert refused["type"] == "error" and refused["error"]["type"] == "invalid_request_error", refused
    assert cleared["type"] == "input_audio_buffer.cleared"


@pytest.mark.parametrize("value", [DEEP, "NaN", "9" * 30], ids=["deep", "NaN", "30 digits"])
def test_http_bodies_with_hostile_json_are_a_400(server: RunningServer, value: str) -> None:
    body = f'{{"model":"scripted","messages":[{{"role":"user","content":"hi"}}],"max_tokens":{value}}}'
    for path in ("/v1/chat/completions", "/audio/chat/completions"):
        response = httpx.post(
            f"{server.http_url}{path}", content=body, headers={"Content-Type": "application/json"}, timeout=30
        )
        assert response.status_code == 400, response.text
        assert response.json()["error"]["code"] == "invalid_json"


async def test_twilio_stream_ignores_hostile_frames_and_the_call_goes_on(
    server: RunningServer, engine: RecordingEngine
) -> None:
    def mark(name: Any) -> str:
        return json.dumps({"event": "mark", "streamSid": STREAM_SID, "mark": {"name": name}})

    def dtmf(digit: Any) -> str:
        return json.dumps({"event": "dtmf", "streamSid": STREAM_SID, "dtmf": {"digit": digit}})

    start = json.loads(start_event())
    start["start"]["mediaFormat"] = ["audio/x-mulaw"]
    async with websockets.connect(f"{server.ws_url}/telephony/twilio") as ws:
        await ws.send(json.dumps(start))
        for frame in (
            DEEP,
            f'{{"event":"media","media":{NEARLY_DEEP}}}',
            '{"event":"mark","mark":{"name":NaN}}',
            mark("item_1:\u00b2"),  # a digit to str.isdigit, not to int()
            mark("item_1:" + "9" * 5000),  # past int()'s 4300-digit limit
            mark(["item_1:10"]),
            dtmf(["1"]),
            dtmf("1" * 100_000),
            json.dumps({"event": f"unknown-{'x' * 1000}"}),
        ):
            await ws.send(frame)
        await say(ws, "hello there")
        answer = await first_media(ws)
        await ws.send(json.dumps({"event": "stop", "streamSid": STREAM_SID, "stop": {}}))
    assert answer["streamSid"] == STREAM_SID
    user_parts = [part for message in engine.requests[-1].messages if message.role == "user" for part in message.parts]
    assert user_parts and not [part for part in user_parts if isinstance(part, TextPart)]  # no junk digits


@pytest.mark.parametrize("sid", ["x" * 10_000, ["MZ1"], "MZ 1"], ids=["huge", "list", "space"])
async def test_twilio_start_without_a_valid_stream_sid_is_refused(server: RunningServer, sid: Any) -> None:
    """The stream id is echoed in every message the server sends: a 10 kB one would be 50 copies a second (a start
    over `telephony.max_message_bytes` is not even read)."""
    start = json.loads(start_event())
    start["streamSid"] = start["start"]["streamSid"] = sid
    async with websockets.connect(f"{server.ws_url}/telephony/twilio") as ws:
        await ws.send(json.dumps(start))
        with pytest.raises(websockets.ConnectionClosed) as closed:
            async with asyncio.timeout(5):
                await ws.recv()
    assert closed.value.rcvd.code == 1008


@pytest.mark.slow
async def test_webrtc_data_channel_and_offer_refuse_hostile_json(server: RunningServer) -> None:
    files = {"sdp": (None, "v=0\r\n"), "session": (None, f'{{"metadata":{DEEP}}}')}
    async with httpx.AsyncClient(base_url=server.http_url, timeout=20) as client:
        offer = await client.post("/v1/realtime/calls", files=files)
    assert offer.status_code == 400 and offer.json()["error"]["code"] == "invalid_offer"
    peer = Peer()
    try:
        assert (await peer.connect(server)).status_code == 201
        await peer.wait_for("session.created", timeout=10)
        for value in (DEEP, NEARLY_DEEP, "NaN"):
            peer.channel.send(f'{{"type":"session.update","session":{{"metadata":{value}}}}}')
        peer.send({"type": "session.update", "session": {"type": "realtime", "instructions": "hi"}})
        updated = await peer.wait_for("session.updated", timeout=10)
        errors = [event["error"]["code"] for event in peer.events if event["type"] == "error"]
    finally:
        await peer.close()
    assert errors == ["invalid_json"] * 3
    assert updated["session"]["instructions"] == "hi"
