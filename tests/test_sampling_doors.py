"""Sampling values through every door of a real server: out-of-range, non-finite or mistyped values get a clean
error event or HTTP 400 and the session or server keeps serving; integer and tiny temperatures are answered
(a tiny one is raised to the engine's smallest usable temperature)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from omnivox.pipeline.engines.base import MIN_TEMPERATURE
from tests.server_helpers import RunningServer, running_server, scripted_config
from tests.test_conformance import connect, text_item
from tests.test_http_api import RecordingEngine

REPLY = "Fine, thanks."


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[RunningServer, RecordingEngine]]:
    engine = RecordingEngine(reply=REPLY, speed=8.0, first_audio_ms=20)
    with running_server(scripted_config(), engine) as server:
        yield server, engine


async def test_realtime_response_create_and_session_update_check_sampling_and_the_session_goes_on(
    served: tuple[RunningServer, RecordingEngine],
) -> None:
    server, engine = served
    refused = [
        ({"temperature": 5}, "response.temperature"),
        ({"temperature": "hot"}, "response.temperature"),
        ({"temperature": float("nan")}, None),  # not JSON numbers: the whole event is refused when parsed
        ({"temperature": float("inf")}, None),
        ({"max_response_output_tokens": 0}, "response.max_output_tokens"),
        ({"max_response_output_tokens": 1.5}, "response.max_output_tokens"),
        ({"max_response_output_tokens": 5000}, "response.max_output_tokens"),
    ]
    async with connect(server, beta=True) as wire:
        await wire.manual_mode()
        await wire.send({"type": "conversation.item.create", "item": text_item("Hello")})
        for index, (params, param) in enumerate(refused):
            await wire.send({"type": "response.create", "event_id": f"evt_{index}", "response": params})
            error = (await wire.until("error"))[-1]["error"]
            assert (error["param"], error["event_id"], error["type"]) == (
                param,
                f"evt_{index}" if param else None,
                "invalid_request_error",
            )
        answered = len(engine.requests)
        statuses = []
        for params in ({"temperature": 1}, {"temperature": 1e-40}, {"temperature": 0}):
            await wire.send({"type": "response.create", "response": params})
            statuses.append((await wire.until("response.done", timeout=20))[-1]["response"]["status"])
        await wire.send({"type": "session.update", "session": {"temperature": float("nan")}, "event_id": "evt_nan"})
        nan_error = (await wire.until("error"))[-1]["error"]
        await wire.send({"type": "session.update", "session": {"temperature": 1e-40}})
        await wire.until("session.updated")
        await wire.send({"type": "response.create"})
        statuses.append((await wire.until("response.done", timeout=20))[-1]["response"]["status"])

    assert statuses == ["completed"] * 4
    assert nan_error["type"] == "invalid_request_error" and "NaN" in nan_error["message"]
    temperatures = [request.sampling.temperature for request in engine.requests[answered:]]
    assert temperatures == [1.0, MIN_TEMPERATURE, 0.0, MIN_TEMPERATURE]
    assert all(isinstance(value, float) for value in temperatures)


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/audio/chat/completions"])
def test_http_doors_check_sampling_and_keep_serving(served: tuple[RunningServer, RecordingEngine], path: str) -> None:
    server, engine = served
    body: dict[str, Any] = {"model": "scripted", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    refused = [
        ('"temperature": NaN', None),  # not JSON numbers: refused when the body is parsed
        ('"temperature": Infinity', None),
        ('"temperature": 2.5', "temperature"),
        ('"top_p": -Infinity', None),
        ('"top_p": 1.5', "top_p"),
        ('"max_tokens": 0', "max_tokens"),
    ]
    for extra, param in refused:
        raw = f'{{"model": "scripted", "stream": true, "messages": [{{"role": "user", "content": "hi"}}], {extra}}}'
        response = httpx.post(f"{server.http_url}{path}", content=raw, headers={"Content-Type": "application/json"})
        assert response.status_code == 400, extra
        assert response.json()["error"]["param"] == param
    answered = len(engine.requests)
    for temperature in (2, 1e-40):
        response = httpx.post(f"{server.http_url}{path}", json={**body, "temperature": temperature}, timeout=20)
        assert response.status_code == 200 and "[DONE]" in response.text

    assert [request.sampling.temperature for request in engine.requests[answered:]] == [2.0, MIN_TEMPERATURE]
