"""The Realtime WebSocket door end to end, with a raw websockets client: framing, errors, limits, teardown."""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

import numpy as np
import pytest
import websockets

from omnivox.pipeline.audio import float_to_pcm16, pcm16_to_float, synthesize_speech
from tests.server_helpers import RunningServer, running_server, scripted_config


@pytest.fixture(scope="module")
def server() -> RunningServer:
    config = scripted_config(server={"max_sessions": 3}, limits={"max_message_bytes": 256 * 1024})
    with running_server(config) as running:
        yield running


async def receive_until(ws: Any, event_type: str, timeout: float = 10.0) -> list[dict[str, Any]]:
    events = []
    async with asyncio.timeout(timeout):
        while True:
            event = json.loads(await ws.recv())
            events.append(event)
            if event["type"] == event_type:
                return events


def manual_session(**extra: Any) -> str:
    return json.dumps(
        {
            "type": "session.update",
            "session": {"type": "realtime", "audio": {"input": {"turn_detection": None}}, **extra},
        }
    )


async def test_session_created_first_then_full_manual_turn(server: RunningServer) -> None:
    speech = synthesize_speech("What time is it?", 24_000)
    async with websockets.connect(f"{server.ws_url}/v1/realtime?model=qwen-test") as ws:
        first = json.loads(await ws.recv())
        assert first["type"] == "session.created"
        assert first["session"]["model"] == "qwen-test"
        await ws.send(manual_session())
        await receive_until(ws, "session.updated")
        for start in range(0, speech.size, 4800):
            await ws.send(
                json.dumps(
                    {
                        "type": "input_audio_buffer.append",
                        "audio": base64.b64encode(float_to_pcm16(speech[start : start + 4800])).decode(),
                    }
                )
            )
        await ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
        await ws.send(json.dumps({"type": "response.create"}))
        events = await receive_until(ws, "response.done", timeout=30)
    assert all(isinstance(e["event_id"], str) for e in events)
    audio = b"".join(base64.b64decode(e["delta"]) for e in events if e["type"] == "response.output_audio.delta")
    assert len(audio) % 2 == 0
    pcm = pcm16_to_float(audio)
    assert 2.0 < pcm.size / 24_000 < 10.0
    assert float(np.abs(pcm).max()) > 0.05
    transcript = "".join(e["delta"] for e in events if e["type"] == "response.output_audio_transcript.delta")
    done = next(e for e in events if e["type"] == "response.output_audio_transcript.done")
    assert transcript == done["transcript"] and transcript.startswith("Hello")
    assert events[-1]["response"]["status"] == "completed"


async def test_malformed_and_unknown_events_get_errors_and_socket_stays_open(server: RunningServer) -> None:
    async with websockets.connect(f"{server.ws_url}/v1/realtime") as ws:
        await receive_until(ws, "session.created")
        await ws.send("{not json")
        bad_json = json.loads(await ws.recv())
        await ws.send(json.dumps({"type": "no.such.event", "event_id": "evt_42"}))
        unknown = json.loads(await ws.recv())
        await ws.send(b"\x00\x01")
        binary = json.loads(await ws.recv())
        await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": "A" * (300 * 1024)}))
        too_big = json.loads(await ws.recv())
        await ws.send(json.dumps({"type": "input_audio_buffer.clear"}))
        cleared = json.loads(await ws.recv())
    assert bad_json["type"] == "error" and bad_json["error"]["type"] == "invalid_request_error"
    assert unknown["error"]["event_id"] == "evt_42"
    assert binary["type"] == "error"
    assert too_big["error"]["code"] == "message_too_large"
    assert cleared["type"] == "input_audio_buffer.cleared"


async def test_sessions_over_the_limit_get_an_error_and_close_1013(server: RunningServer) -> None:
    sockets = [await websockets.connect(f"{server.ws_url}/v1/realtime") for _ in range(3)]
    try:
        for ws in sockets:
            await receive_until(ws, "session.created")
        async with websockets.connect(f"{server.ws_url}/v1/realtime") as extra:
            error = json.loads(await extra.recv())
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await extra.recv()
        assert error["error"]["code"] == "session_limit_reached"
        assert closed.value.rcvd.code == 1013
    finally:
        for ws in sockets:
            await ws.close()


async def test_disconnect_mid_response_cancels_engine_and_leaks_nothing(server: RunningServer) -> None:
    async with websockets.connect(f"{server.ws_url}/v1/realtime") as ws:
        await receive_until(ws, "session.created")
        await ws.send(manual_session())
        await ws.send(
            json.dumps(
                {
                    "type": "conversation.item.create",
                    "item": {
                        "type": "message",
                        "role": "user",
                        "content": [{"type": "input_text", "text": "Talk to me"}],
                    },
                }
            )
        )
        await ws.send(json.dumps({"type": "response.create"}))
        await receive_until(ws, "response.output_audio.delta")
    deadline = asyncio.get_running_loop().time() + 5
    while server.state.sessions_open and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.05)
    assert server.state.sessions_open == 0
    loop_tasks = await asyncio.to_thread(lambda: server_tasks(server))
    assert not [t for t in loop_tasks if t.startswith(("engine-", "pump-"))]


def server_tasks(server: RunningServer) -> list[str]:
    """Names of the tasks still alive in the server's event loop."""
    import gc

    names = []
    for obj in gc.get_objects():
        if isinstance(obj, asyncio.Task) and not obj.done():
            names.append(obj.get_name())
    return names


async def test_browser_subprotocol_auth_selects_realtime() -> None:
    config = scripted_config(server={"api_keys": ["sk-secret"]})
    with running_server(config) as running:
        async with websockets.connect(
            f"{running.ws_url}/v1/realtime",
            subprotocols=["realtime", "openai-insecure-api-key.sk-secret"],
        ) as ws:
            assert ws.subprotocol == "realtime"
            assert json.loads(await ws.recv())["type"] == "session.created"
        async with websockets.connect(
            f"{running.ws_url}/v1/realtime", additional_headers={"Authorization": "Bearer wrong"}
        ) as ws:
            error = json.loads(await ws.recv())
            assert error["error"]["code"] == "invalid_api_key"
        async with websockets.connect(
            f"{running.ws_url}/v1/realtime", additional_headers={"Authorization": "Bearer sk-secret"}
        ) as ws:
            assert json.loads(await ws.recv())["type"] == "session.created"


async def test_healthz_and_metrics(server: RunningServer) -> None:
    import httpx

    async with httpx.AsyncClient(base_url=server.http_url) as client:
        health = (await client.get("/healthz")).json()
        metrics = (await client.get("/metrics")).text
    assert health["status"] == "ok" and health["engine"] == "scripted"
    assert "omnivox_sessions_total" in metrics
