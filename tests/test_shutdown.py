"""Shutdown: SIGTERM to a real `omnivox serve` process drains it: answers in flight finish, everyone is told."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
import yaml

from omnivox.pipeline.audio import synthesize_speech
from tests.server_helpers import running_server, scripted_config
from tests.test_webrtc import Peer, loopback_ice  # noqa: F401 - loopback_ice is an autouse fixture

LONG_REPLY = " ".join(["This answer is long on purpose so that it is still being spoken at shutdown."] * 4)


@dataclass
class ServerProcess:
    process: subprocess.Popen[str]
    port: int

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def terminate(self) -> float:
        self.process.send_signal(signal.SIGTERM)
        return time.monotonic()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def serve(tmp_path: Path, drain_timeout_s: float, reply: str) -> Iterator[ServerProcess]:
    config = {
        "engine": {"name": "scripted", "options": {"scripted": {"reply": reply}}},
        "connections": {"drain_timeout_s": drain_timeout_s},
        "server": {"log_level": "info"},
    }
    file = tmp_path / "server.yaml"
    file.write_text(yaml.safe_dump(config))
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMNIVOX_")}
    command = [sys.executable, "-m", "omnivox.server.cli", "serve", "--config", str(file), "--port", str(port)]
    process = subprocess.Popen(
        [*command, "--host", "127.0.0.1"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert process.poll() is None, process.stdout.read() if process.stdout else ""
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.2)
        yield ServerProcess(process, port)
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate(timeout=30)


async def next_event(ws: Any, *types: str, timeout: float = 30) -> dict[str, Any]:
    async with asyncio.timeout(timeout):
        while True:
            event = json.loads(await ws.recv())
            if event["type"] in types:
                return event


async def events_until_closed(ws: Any, timeout: float = 30) -> tuple[list[dict[str, Any]], int | None, float]:
    """Every event until the server closes the socket: (events, close code, when it closed)."""
    events = []
    async with asyncio.timeout(timeout):
        try:
            while True:
                events.append(json.loads(await ws.recv()))
        except websockets.ConnectionClosed as closed:
            return events, closed.rcvd.code if closed.rcvd else None, time.monotonic()


async def sse_lines(server: ServerProcess, started: asyncio.Event) -> list[str]:
    """A streamed spoken chat completion: every `data:` line until the stream ends."""
    body = {
        "model": "scripted",
        "messages": [{"role": "user", "content": "talk to me"}],
        "modalities": ["text", "audio"],
        "audio": {"voice": "alloy", "format": "pcm16"},
        "stream": True,
    }
    lines = []
    async with (
        httpx.AsyncClient(timeout=60) as client,
        client.stream("POST", f"{server.http_url}/v1/chat/completions", json=body) as response,
    ):
        async for line in response.aiter_lines():
            if line.startswith("data:"):
                lines.append(line[5:].strip())
                started.set()
    return lines


async def telephony_call(server: ServerProcess) -> Any:
    ws = await websockets.connect(f"{server.ws_url}/telephony/twilio")
    start = {"event": "start", "streamSid": "MZ1", "start": {"streamSid": "MZ1", "callSid": "CA1"}}
    await ws.send(json.dumps(start))
    return ws


@pytest.mark.slow
async def test_sigterm_lets_answers_finish_then_tells_every_client(tmp_path: Path) -> None:
    with serve(tmp_path, drain_timeout_s=20, reply="Hello there, this answer is short.") as server:
        speaking = await websockets.connect(f"{server.ws_url}/v1/realtime")
        idle = await websockets.connect(f"{server.ws_url}/v1/realtime")
        phone = await telephony_call(server)
        await next_event(idle, "session.created")
        await next_event(speaking, "session.created")
        await speaking.send(json.dumps({"type": "response.create"}))
        await next_event(speaking, "response.output_audio.delta")
        streaming = asyncio.Event()
        sse = asyncio.create_task(sse_lines(server, streaming))
        await asyncio.wait_for(streaming.wait(), 30)
        await asyncio.sleep(0.3)  # the telephony session has started

        signalled = server.terminate()
        idle_events, idle_code, idle_closed = await events_until_closed(idle)
        spoken, speaking_code, _ = await events_until_closed(speaking)
        with pytest.raises(websockets.ConnectionClosed) as phone_closed:
            async with asyncio.timeout(30):
                while True:
                    await phone.recv()
        lines = await asyncio.wait_for(sse, 30)
        with pytest.raises(OSError):
            await websockets.connect(f"{server.ws_url}/v1/realtime", open_timeout=5)
        server.process.wait(timeout=30)
        output = server.process.stdout.read() if server.process.stdout else ""

    assert idle_code == 1001 and idle_closed - signalled < 2.0 and idle_events == []
    done = [e for e in spoken if e["type"] == "response.done"]
    assert done and done[0]["response"]["status"] == "completed", "the answer in flight was cut"
    assert speaking_code == 1001
    assert phone_closed.value.rcvd is not None and phone_closed.value.rcvd.code == 1001
    assert lines[-1] == "[DONE]"
    assert server.process.returncode in (0, -signal.SIGTERM), output
    assert "draining" in output


@pytest.mark.slow
async def test_after_the_drain_time_answers_in_flight_are_cut_and_told(tmp_path: Path) -> None:
    with serve(tmp_path, drain_timeout_s=1.0, reply=LONG_REPLY) as server:
        speaking = await websockets.connect(f"{server.ws_url}/v1/realtime")
        await next_event(speaking, "session.created")
        await speaking.send(json.dumps({"type": "response.create"}))
        await next_event(speaking, "response.output_audio.delta")
        streaming = asyncio.Event()
        sse = asyncio.create_task(sse_lines(server, streaming))
        await asyncio.wait_for(streaming.wait(), 30)

        signalled = server.terminate()
        spoken, code, closed = await events_until_closed(speaking)
        lines = await asyncio.wait_for(sse, 30)
        server.process.wait(timeout=30)
        exited = time.monotonic()

    assert code == 1001 and 0.8 < closed - signalled < 4.0
    assert not [e for e in spoken if e["type"] == "response.done" and e["response"]["status"] == "completed"]
    assert json.loads(lines[-1])["error"]["code"] == "server_shutting_down"
    assert exited - signalled < 10


@pytest.mark.slow
async def test_shutdown_hangs_up_webrtc_calls() -> None:
    stack = contextlib.ExitStack()
    server = stack.enter_context(running_server(scripted_config(connections={"drain_timeout_s": 1.0})))
    peer = Peer()
    try:
        assert (await peer.connect(server)).status_code == 201
        await peer.wait_for("session.created")
        peer.mic.say(synthesize_speech("hello", 48_000))
        await asyncio.to_thread(stack.close)  # what SIGTERM does in `omnivox serve`
        async with asyncio.timeout(10):
            while peer.channel.readyState != "closed" and peer.pc.connectionState not in ("closed", "failed"):
                await asyncio.sleep(0.05)
    finally:
        await peer.close()
        stack.close()
