"""Internal failures seen by clients on every door: a generic message with an error id, never the exception's text
(CUDA, driver, paths); the log holds the details under the same id."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import re
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
import websockets

from omnivox.pipeline.audio import encode_audio_file, float_to_pcm16
from omnivox.pipeline.session import Session
from tests.server_helpers import RunningServer, running_server, scripted_config
from tests.worker_engine import CUDA_DETAILS, WorkerEngine

ERROR_ID = re.compile(r"\(error id (err_[0-9a-f]{12})\)")


@pytest.fixture
def engine() -> WorkerEngine:
    return WorkerEngine()


@pytest.fixture
def server(engine: WorkerEngine) -> Iterator[RunningServer]:
    with running_server(scripted_config(), engine) as running:
        yield running


def assert_generic_and_logged(message: str, caplog: pytest.LogCaptureFixture) -> None:
    """The client sees an error id and nothing of the failure; the log has the failure under that id."""
    assert "CUDA" not in message and "/opt/" not in message and "RuntimeError" not in message, message
    match = ERROR_ID.search(message)
    assert match, message
    logged = [record for record in caplog.records if match[1] in record.getMessage()]
    assert logged and logged[0].exc_info and CUDA_DETAILS in str(logged[0].exc_info[1])


def chat_body(**extra: Any) -> dict[str, Any]:
    return {"model": "worker-model", "messages": [{"role": "user", "content": "hi"}], **extra}


def test_http_engine_crash_before_and_during_a_stream(
    server: RunningServer, engine: WorkerEngine, caplog: pytest.LogCaptureFixture
) -> None:
    engine.behaviour = "crash"
    url = f"{server.http_url}/v1/chat/completions"
    refused = httpx.post(url, json=chat_body(), timeout=10)
    assert refused.status_code == 500 and refused.json()["error"]["code"] == "internal_error"
    assert_generic_and_logged(refused.json()["error"]["message"], caplog)
    engine.at = 1
    with httpx.stream("POST", url, json=chat_body(stream=True), timeout=10) as response:
        lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    last = json.loads(lines[-1][len("data: ") :])
    assert_generic_and_logged(last["error"]["message"], caplog)


def test_http_transcription_crash(server: RunningServer, caplog: pytest.LogCaptureFixture) -> None:
    wav = encode_audio_file(np.zeros(1600, np.float32), 16_000, "wav")
    response = httpx.post(
        f"{server.http_url}/v1/audio/transcriptions",
        files={"file": ("a.wav", wav)},
        data={"model": "worker-model"},
        timeout=10,
    )
    assert response.status_code == 500
    assert_generic_and_logged(response.json()["error"]["message"], caplog)


async def events_until(ws: Any, event_type: str) -> list[dict[str, Any]]:
    events = []
    async with asyncio.timeout(10):
        while not events or events[-1]["type"] != event_type:
            events.append(json.loads(await ws.recv()))
    return events


async def test_realtime_engine_and_transcription_crashes(
    server: RunningServer, engine: WorkerEngine, caplog: pytest.LogCaptureFixture
) -> None:
    engine.behaviour = "crash"
    async with websockets.connect(f"{server.ws_url}/v1/realtime") as ws:
        await events_until(ws, "session.created")
        audio_in = {"turn_detection": None, "transcription": {"model": "worker-model"}}
        session = {"type": "realtime", "audio": {"input": audio_in}}
        await ws.send(json.dumps({"type": "session.update", "session": session}))
        await events_until(ws, "session.updated")
        await ws.send(json.dumps({"type": "response.create"}))
        events = await events_until(ws, "response.done")
        pcm = base64.b64encode(float_to_pcm16(np.zeros(4800, np.float32))).decode()
        await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": pcm}))
        await ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
        events += await events_until(ws, "conversation.item.input_audio_transcription.failed")
    (error,) = [event["error"] for event in events if event["type"] == "error"]
    (done,) = [event["response"] for event in events if event["type"] == "response.done"]
    assert done["status"] == "failed"
    assert error["code"] == "internal_error"
    assert_generic_and_logged(error["message"], caplog)
    assert_generic_and_logged(events[-1]["error"]["message"], caplog)
    assert CUDA_DETAILS not in json.dumps(events)


async def test_a_session_core_bug_is_an_error_event_with_an_id(
    server: RunningServer, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(self: Session, payload: dict[str, Any], out: list[Any]) -> None:
        raise RuntimeError(CUDA_DETAILS)

    monkeypatch.setattr(Session, "_on_clear", broken)
    caplog.set_level(logging.ERROR)
    async with websockets.connect(f"{server.ws_url}/v1/realtime") as ws:
        await events_until(ws, "session.created")
        await ws.send(json.dumps({"type": "input_audio_buffer.clear"}))
        (error,) = await events_until(ws, "error")
    assert error["error"]["code"] == "internal_error" and error["error"]["type"] == "server_error"
    assert_generic_and_logged(error["error"]["message"], caplog)
