"""Backpressure and timeouts through a real server: clients that stop reading, flood, idle or crowd the server."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import numpy as np
import pytest
import websockets

from omnivox.pipeline.engines.base import AudioDelta, Delta, ResponseRequest, TextDelta
from omnivox.server.backpressure import WriteTimeout
from omnivox.server.telephony import _Playout
from omnivox.server.webrtc import Call
from tests.server_helpers import RunningServer, running_server, scripted_config, settles

WRITE_TIMEOUT_S = 1.0
BIG_INSTRUCTIONS = "Please answer in full sentences. " * 1900  # ~60 KB, echoed back by every session.updated


def tiny_socket(server: RunningServer) -> socket.socket:
    """A client socket with a small receive buffer, so that a client that stops reading is noticed soon."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((server.host, server.port))
    sock.setblocking(False)
    return sock


@asynccontextmanager
async def non_reader(server: RunningServer) -> AsyncIterator[Any]:
    """A Realtime client that reads nothing after `session.created`."""
    async with websockets.connect(
        f"{server.ws_url}/v1/realtime", sock=tiny_socket(server), max_queue=1, max_size=None, close_timeout=1
    ) as ws:
        assert json.loads(await ws.recv())["type"] == "session.created"
        yield ws


async def flood_updates(ws: Any, count: int) -> None:
    """Session updates whose answers are ~60 KB each, sent without reading any of them."""
    update = json.dumps({"type": "session.update", "session": {"type": "realtime", "instructions": BIG_INSTRUCTIONS}})
    for _ in range(count):
        await ws.send(update)


@pytest.fixture(scope="module")
def server() -> Iterator[RunningServer]:
    config = scripted_config(connections={"write_timeout_s": WRITE_TIMEOUT_S}, session_limits={"max_queued_events": 8})
    with running_server(config) as running:
        yield running


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
async def test_a_client_that_stops_reading_is_dropped_after_the_write_timeout(loop: str) -> None:
    config = scripted_config(connections={"write_timeout_s": WRITE_TIMEOUT_S})
    with running_server(config, loop=loop) as server:
        async with non_reader(server) as ws:
            assert server.state.sessions_open == 1
            began = time.monotonic()
            with pytest.raises(websockets.ConnectionClosed):  # the server aborts the connection
                async with asyncio.timeout(8 + WRITE_TIMEOUT_S):
                    await flood_updates(ws, 10_000)
            dropped = time.monotonic() - began
            assert await settles(lambda: server.state.sessions_open == 0, 2)
        async with httpx.AsyncClient() as client:
            metrics = (await client.get(f"{server.http_url}/metrics")).text
    assert dropped < 8 + WRITE_TIMEOUT_S
    assert 'omnivox_sessions_ended_by_server_total{door="realtime_ws",reason="write_timeout"} 1.0' in metrics


async def test_a_flooding_client_waits_in_a_bounded_queue(server: RunningServer) -> None:
    """While its session cannot send (the client reads nothing), the server stops reading it: its backlog stays at
    `max_queued_events` instead of growing with every message."""
    backlog: list[int] = []
    async with non_reader(server) as ws:
        flooding = asyncio.create_task(flood_updates(ws, 400))  # the server stops reading, then drops it
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            backlog += [runner._inputs.qsize() for runner in server.state.lifecycle.runners]
            await asyncio.sleep(0.02)
        flooding.cancel()
        with contextlib.suppress(asyncio.CancelledError, websockets.ConnectionClosed):
            await flooding
    assert backlog and max(backlog) <= 8 + 2


async def test_a_flood_is_read_no_faster_than_max_events_per_s() -> None:
    """A client sending 400 events at once is served at the session's rate (100/s here, after a burst of 100),
    while another session's events are answered at once."""
    with running_server(scripted_config(session_limits={"max_events_per_s": 100})) as server:
        async with (
            websockets.connect(f"{server.ws_url}/v1/realtime") as flood,
            websockets.connect(f"{server.ws_url}/v1/realtime") as calm,
        ):
            await flood.recv()
            await calm.recv()
            began = time.monotonic()
            for _ in range(400):
                await flood.send(json.dumps({"type": "input_audio_buffer.clear"}))
            round_trips = []
            for _ in range(5):
                sent = time.monotonic()
                await calm.send(json.dumps({"type": "input_audio_buffer.clear"}))
                assert json.loads(await asyncio.wait_for(calm.recv(), 5))["type"] == "input_audio_buffer.cleared"
                round_trips.append(time.monotonic() - sent)
            for _ in range(400):
                assert json.loads(await asyncio.wait_for(flood.recv(), 10))["type"] == "input_audio_buffer.cleared"
            took = time.monotonic() - began
    assert took > 2.5, f"400 events were served in {took:.2f} s"
    assert max(round_trips) < 0.3


async def test_an_idle_session_ends_with_an_error_then_a_normal_close() -> None:
    with running_server(scripted_config(session_limits={"idle_timeout_s": 1.0})) as server:
        async with websockets.connect(f"{server.ws_url}/v1/realtime") as active:
            await active.recv()
            for _ in range(6):  # 3 s of activity: never idle for a whole second
                await active.send(json.dumps({"type": "input_audio_buffer.clear"}))
                assert json.loads(await active.recv())["type"] == "input_audio_buffer.cleared"
                await asyncio.sleep(0.5)
            async with websockets.connect(f"{server.ws_url}/v1/realtime") as idle:
                await idle.recv()
                began = time.monotonic()
                error = json.loads(await asyncio.wait_for(idle.recv(), 5))
                with pytest.raises(websockets.ConnectionClosedOK) as closed:
                    await asyncio.wait_for(idle.recv(), 5)
                waited = time.monotonic() - began
    assert error["error"]["code"] == "session_idle_timeout"
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1000
    assert 0.8 < waited < 2.5


class FireHose:
    """An engine that streams a second of audio every 5 ms for ever, and notes when its stream is closed."""

    name = "firehose"
    model_id = "firehose"
    native_rate = 24_000
    ready = True

    def __init__(self) -> None:
        self.closed_at: float | None = None

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def respond(self, request: ResponseRequest) -> AsyncIterator[Delta]:
        try:
            yield TextDelta("Streaming")
            while True:
                yield AudioDelta(np.full(24_000, 0.1, np.float32))
                await asyncio.sleep(0.005)
        finally:
            self.closed_at = time.monotonic()


async def test_an_sse_stream_to_a_stalled_reader_ends() -> None:
    engine = FireHose()
    config = scripted_config(connections={"write_timeout_s": WRITE_TIMEOUT_S})
    with running_server(config, engine) as server:
        body = json.dumps(
            {
                "model": "firehose",
                "messages": [{"role": "user", "content": "talk"}],
                "modalities": ["text", "audio"],
                "audio": {"voice": "alloy", "format": "pcm16"},
                "stream": True,
            }
        ).encode()
        reader, writer = await asyncio.open_connection(sock=tiny_socket(server))
        writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        assert (await asyncio.wait_for(reader.readline(), 10)).startswith(b"HTTP/1.1 200")
        stalled = time.monotonic()
        ended = await settles(lambda: engine.closed_at is not None, 10 + WRITE_TIMEOUT_S)
        with contextlib.suppress(ConnectionResetError):  # the stream ends: what the server had sent, then EOF or reset
            async with asyncio.timeout(5):
                while await reader.read(1 << 20):
                    pass
        writer.close()
    assert ended, "the engine still streamed to a reader that took nothing"
    assert engine.closed_at is not None and engine.closed_at - stalled > WRITE_TIMEOUT_S


async def test_connections_over_limit_concurrency_are_refused() -> None:
    with running_server(scripted_config(connections={"limit_concurrency": 3})) as server:
        sockets = [await websockets.connect(f"{server.ws_url}/v1/realtime") for _ in range(3)]
        try:
            async with httpx.AsyncClient() as client:
                crowded = await client.get(f"{server.http_url}/healthz")
            with pytest.raises(websockets.InvalidStatus):
                await websockets.connect(f"{server.ws_url}/v1/realtime")
        finally:
            for ws in sockets:
                await ws.close()
        async with httpx.AsyncClient() as client:
            fine = await client.get(f"{server.http_url}/healthz")
    assert crowded.status_code == 503
    assert fine.status_code == 200


async def test_telephony_drops_oversized_messages_and_the_call_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="omnivox.server.telephony")
    with running_server(scripted_config()) as server:
        async with websockets.connect(f"{server.ws_url}/telephony/twilio", max_size=None) as twilio:
            start = {"event": "start", "streamSid": "MZ1", "start": {"streamSid": "MZ1", "callSid": "CA1"}}
            await twilio.send(json.dumps(start))
            huge = "/" * (4 * 1024 * 1024)  # 3 MB of mu-law in one message: over 6 minutes of audio
            await twilio.send(json.dumps({"event": "media", "streamSid": "MZ1", "media": {"payload": huge}}))
            await twilio.send(json.dumps({"event": "dtmf", "streamSid": "MZ1", "dtmf": {"digit": "5"}}))
            assert await settles(lambda: "over telephony.max_message_bytes" in caplog.text, 5)
            await asyncio.sleep(0.2)
            assert server.state.sessions_open == 1
            await twilio.send(json.dumps({"event": "stop", "streamSid": "MZ1"}))


def test_telephony_remembers_a_bounded_number_of_marks() -> None:
    playout = _Playout(max_marks=4)
    for n in range(100):
        playout.remember(playout.pending, f"item:{n * 100}")
    assert list(playout.pending) == [f"item:{n * 100}" for n in range(96, 100)]


class _StuckChannel:
    readyState = "open"
    bufferedAmount = 0

    def send(self, text: str) -> None:
        self.bufferedAmount += len(text)  # the peer never acknowledges


async def test_webrtc_events_piling_up_on_the_data_channel_end_the_call() -> None:
    call = Call("id", None, None, None, None, None, max_buffered_bytes=100_000)  # type: ignore[arg-type]
    await call.send_text("x" * 1000)  # before the channel opens: queued
    call.attach_channel(_StuckChannel())
    with pytest.raises(WriteTimeout):
        for _ in range(200):
            await call.send_text("y" * 1000)
    assert call.channel.bufferedAmount <= 101_000
