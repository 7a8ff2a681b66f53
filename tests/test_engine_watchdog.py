"""The GPU worker's watchdog against a real server: a worker thread that hangs (a stuck kernel) or dies turns
`/healthz` unhealthy and fails the waiting requests with a clear error instead of leaving them hanging."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator

import httpx
import pytest
import websockets

from tests.server_helpers import RunningServer, running_server, scripted_config
from tests.worker_engine import WorkerEngine

STALL_S = 0.5


@pytest.fixture
def engine() -> WorkerEngine:
    return WorkerEngine(stall_timeout_s=STALL_S)


@pytest.fixture
def server(engine: WorkerEngine) -> Iterator[RunningServer]:
    with running_server(scripted_config(), engine) as running:
        yield running


async def chat(client: httpx.AsyncClient) -> httpx.Response:
    body = {"model": "worker-model", "messages": [{"role": "user", "content": "hi"}]}
    return await client.post("/v1/chat/completions", json=body)


async def test_a_hung_worker_fails_waiting_requests_and_recovers(server: RunningServer, engine: WorkerEngine) -> None:
    engine.behaviour = "hang"
    async with httpx.AsyncClient(base_url=server.http_url, timeout=10) as client:
        assert (await client.get("/healthz")).status_code == 200
        started = time.monotonic()
        hung, queued = await asyncio.gather(chat(client), chat(client))
        failed_after = time.monotonic() - started
        health = await client.get("/healthz")
        engine.release.set()
        engine.behaviour = "speak"
        await asyncio.sleep(0.2)
        recovered = await client.get("/healthz")
        answered = await chat(client)
    for response in (hung, queued):
        assert response.status_code == 503 and response.json()["error"]["code"] == "engine_unhealthy"
        assert "no progress" in response.json()["error"]["message"]
    assert failed_after < STALL_S + 2.0
    assert health.status_code == 503 and health.json()["status"] == "unhealthy"
    assert "no progress" in health.json()["problem"]
    assert recovered.status_code == 200 and recovered.json()["status"] == "ok"
    assert answered.status_code == 200 and answered.json()["choices"][0]["message"]["content"] == "hi hi hi "


async def test_a_dead_worker_thread_is_unhealthy_and_refuses_at_once(
    server: RunningServer, engine: WorkerEngine
) -> None:
    engine.behaviour = "kill"
    async with httpx.AsyncClient(base_url=server.http_url, timeout=10) as client:
        waiting = await chat(client)
        health = await client.get("/healthz")
        started = time.monotonic()
        later = await chat(client)
        refused_in = time.monotonic() - started
    for response in (waiting, later):
        assert response.status_code == 503 and response.json()["error"]["code"] == "engine_unhealthy"
        assert "died" in response.json()["error"]["message"]
    assert refused_in < 0.5
    assert health.status_code == 503 and "died" in health.json()["problem"]


async def test_a_realtime_response_on_a_hung_worker_fails_and_the_session_goes_on(
    server: RunningServer, engine: WorkerEngine
) -> None:
    engine.behaviour = "hang"
    async with websockets.connect(f"{server.ws_url}/v1/realtime") as ws:

        async def until(event_type: str) -> dict:
            async with asyncio.timeout(10):
                while (event := json.loads(await ws.recv()))["type"] != event_type:
                    pass
            return event

        await until("session.created")
        await ws.send(json.dumps({"type": "response.create"}))
        done = await until("response.done")
        engine.release.set()
        await ws.send(json.dumps({"type": "input_audio_buffer.clear"}))
        cleared = await until("input_audio_buffer.cleared")
    assert done["response"]["status"] == "failed"
    assert done["response"]["status_details"]["error"]["code"] == "engine_unhealthy"
    assert cleared["type"] == "input_audio_buffer.cleared"
