"""Per-session bounds, attacked through a real server: what a client can make one session hold, echo or ask for."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import numpy as np
import pytest
import websockets

from omnivox.pipeline.audio import float_to_pcm16
from omnivox.pipeline.engines.scripted import ScriptedEngine
from tests.server_helpers import RunningServer, running_server, scripted_config
from tests.test_webrtc import Peer, loopback_ice  # noqa: F401 - loopback_ice is an autouse fixture

BUFFER_S = 5


@pytest.fixture(scope="module")
def server() -> Iterator[RunningServer]:
    config = scripted_config(limits={"max_input_buffer_s": BUFFER_S, "max_message_bytes": 4 * 1024 * 1024})
    with running_server(config) as running:
        yield running


@asynccontextmanager
async def realtime(server: RunningServer, **session: Any) -> AsyncIterator[Any]:
    """A Realtime WebSocket session with manual turns and `session` fields, `session.updated` already read."""
    async with websockets.connect(f"{server.ws_url}/v1/realtime", max_size=None) as ws:
        await next_event(ws, "session.created")
        update = {"type": "realtime", "audio": {"input": {"turn_detection": None}}, **session}
        await ws.send(json.dumps({"type": "session.update", "session": update}))
        await next_event(ws, "session.updated")
        yield ws


async def next_event(ws: Any, *types: str, timeout: float = 10) -> dict[str, Any]:
    async with asyncio.timeout(timeout):
        while True:
            event = json.loads(await ws.recv())
            if event["type"] in types:
                return event


async def send(ws: Any, event_type: str, **fields: Any) -> None:
    await ws.send(json.dumps({"type": event_type, **fields}))


def text_item(text: str, **extra: Any) -> dict[str, Any]:
    return {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}], **extra}


def pcm16_base64(seconds: float) -> str:
    return base64.b64encode(float_to_pcm16(np.full(int(seconds * 24_000), 0.1, np.float32))).decode()


async def test_unknown_session_keys_are_dropped_not_echoed(server: RunningServer) -> None:
    junk = "x" * 200_000
    async with realtime(server) as ws:
        update = {"type": "realtime", "junk": junk, "audio": {"input": {"bogus": junk}, "elsewhere": junk}}
        await send(ws, "session.update", session=update)
        raw = await asyncio.wait_for(ws.recv(), 10)
    event = json.loads(raw)
    assert event["type"] == "session.updated"
    assert "junk" not in event["session"] and "bogus" not in event["session"]["audio"]["input"]
    assert len(raw) < 10_000


async def test_a_session_object_past_its_bounds_is_refused(server: RunningServer) -> None:
    tools = [{"type": "function", "name": f"tool_{n}", "description": "d" * 3000, "parameters": {}} for n in range(100)]
    async with realtime(server) as ws:
        await send(ws, "session.update", session={"type": "realtime", "tools": tools})
        too_large = await next_event(ws, "error", "session.updated")
        await send(ws, "session.update", session={"type": "realtime", "instructions": "i" * 70_000})
        too_long = await next_event(ws, "error", "session.updated")
        await send(ws, "session.update", session={"type": "realtime", "instructions": "Be brief."})
        fine = await next_event(ws, "error", "session.updated")
    assert too_large["type"] == "error" and too_large["error"]["code"] == "session_too_large"
    assert too_long["type"] == "error" and too_long["error"]["code"] == "instructions_too_long"
    assert fine["type"] == "session.updated" and fine["session"]["instructions"] == "Be brief."


async def test_items_past_their_bounds_are_refused(server: RunningServer) -> None:
    many_parts = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "a"}] * 17}
    long_audio = {
        "type": "message",
        "role": "user",
        "content": [{"type": "input_audio", "audio": pcm16_base64(BUFFER_S + 1)}],
    }
    async with realtime(server) as ws:
        codes = []
        for item in (text_item("t" * 70_000), many_parts, long_audio, text_item("x", id="i" * 70_000)):
            await send(ws, "conversation.item.create", item=item)
            event = await next_event(ws, "error", "conversation.item.added")
            codes.append(event.get("error", {}).get("code"))
        await send(ws, "conversation.item.create", item=text_item("hello"))
        added = await next_event(ws, "error", "conversation.item.added")
    assert codes == ["item_too_large"] * 4
    assert added["type"] == "conversation.item.added"


async def test_the_conversation_keeps_its_newest_items_within_max_items(server: RunningServer) -> None:
    async with realtime(server) as ws:
        for n in range(1002):
            await send(ws, "conversation.item.create", item=text_item(f"turn {n}", id=f"item_{n}"))
        await send(ws, "conversation.item.retrieve", item_id="item_0")
        deleted = []
        async with asyncio.timeout(20):
            while (event := json.loads(await ws.recv()))["type"] not in ("error", "conversation.item.retrieved"):
                if event["type"] == "conversation.item.deleted":
                    deleted.append(event["item_id"])
    assert deleted == ["item_0", "item_1"]
    assert event["type"] == "error" and event["error"]["code"] == "item_retrieve_invalid_item_id"


async def test_manual_turns_refuse_audio_past_the_input_buffer_bound(server: RunningServer) -> None:
    async with realtime(server) as ws:
        await send(ws, "input_audio_buffer.append", audio=pcm16_base64(BUFFER_S - 1), event_id="first")
        await send(ws, "input_audio_buffer.append", audio=pcm16_base64(2), event_id="second")
        full = await next_event(ws, "error")
        await send(ws, "input_audio_buffer.commit")
        committed = await next_event(ws, "input_audio_buffer.committed", "error")
        await send(ws, "conversation.item.retrieve", item_id=committed["item_id"])
        item = await next_event(ws, "conversation.item.retrieved")
    assert full["error"]["code"] == "input_audio_buffer_full" and full["error"]["event_id"] == "second"
    assert committed["type"] == "input_audio_buffer.committed"
    assert item["item"]["content"][0]["type"] == "input_audio"


async def test_answer_length_and_metadata_are_bounded(server: RunningServer) -> None:
    async with realtime(server, output_modalities=["text"]) as ws:
        errors = []
        for response in (
            {"max_output_tokens": 10**9},
            {"max_output_tokens": "lots"},
            {"metadata": {f"k{n}": "v" * 600 for n in range(20)}},
        ):
            await send(ws, "response.create", response=response)
            errors.append(await next_event(ws, "error", "response.created"))
        await send(ws, "session.update", session={"type": "realtime", "max_output_tokens": 10**9})
        errors.append(await next_event(ws, "error", "session.updated"))
        await send(ws, "response.create", response={"max_output_tokens": 4096, "metadata": {"topic": "weather"}})
        done = await next_event(ws, "response.done", "error", timeout=20)
    assert [e["type"] for e in errors] == ["error"] * 4
    assert [e["error"]["param"] for e in errors] == [
        "response.max_output_tokens",
        "response.max_output_tokens",
        "response.metadata",
        "session.max_output_tokens",
    ]
    assert done["type"] == "response.done" and done["response"]["metadata"] == {"topic": "weather"}


async def test_a_prompt_over_the_token_budget_fails_the_response_clearly(server: RunningServer) -> None:
    async with realtime(server, output_modalities=["text"]) as ws:
        for n in range(3):  # 3 x 60 000 characters: about 45 000 tokens, over the 32 768 of the default budget
            await send(ws, "conversation.item.create", item=text_item(f"{n} " + "words " * 10_000))
            await next_event(ws, "conversation.item.done")
        await send(ws, "response.create")
        error = await next_event(ws, "error", "response.done", timeout=20)
        done = await next_event(ws, "response.done", timeout=20)
    assert error["type"] == "error" and error["error"]["code"] == "context_length_exceeded"
    assert done["response"]["status"] == "failed"


async def test_error_events_never_echo_more_than_a_bounded_quote(server: RunningServer) -> None:
    async with realtime(server) as ws:
        await ws.send(json.dumps({"type": "t" * 300_000, "event_id": "e" * 300_000}))
        raw = await asyncio.wait_for(ws.recv(), 10)
    assert json.loads(raw)["error"]["code"] == "unknown_event"
    assert len(raw) < 4000


class BlockedRecogniser(ScriptedEngine):
    """Transcriptions that wait until released, to see how many run at once."""

    def __init__(self) -> None:
        super().__init__(speed=20.0)
        self.release = asyncio.Event()
        self.running = 0

    async def transcribe(self, audio: np.ndarray, language: str | None = None, prompt: str = "") -> str:
        self.running += 1
        await self.release.wait()
        return "words"


async def test_transcriptions_in_flight_are_bounded_per_session() -> None:
    engine = BlockedRecogniser()
    with running_server(scripted_config(), engine) as server:
        transcription = {"input": {"transcription": {"model": "whisper-1"}, "turn_detection": None}}
        async with realtime(server, audio=transcription) as ws:
            for _ in range(6):
                await send(ws, "input_audio_buffer.append", audio=pcm16_base64(0.5))
                await send(ws, "input_audio_buffer.commit")
            failed = [await next_event(ws, "conversation.item.input_audio_transcription.failed") for _ in range(2)]
            assert engine.running == 4
            engine.release.set()
            done = "conversation.item.input_audio_transcription.completed"
            completed = [await next_event(ws, done) for _ in range(4)]
    assert [f["error"]["code"] for f in failed] == ["too_many_transcriptions"] * 2
    assert [c["transcript"] for c in completed] == ["words"] * 4


def test_chat_completions_bound_stop_strings_and_answer_length(server: RunningServer) -> None:
    url = f"{server.http_url}/v1/chat/completions"
    base = {"model": "scripted", "messages": [{"role": "user", "content": "hi"}]}
    cases = [
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"stop": "s" * 300}, "stop"),
        ({"max_tokens": 10**6}, "max_tokens"),
        ({"max_completion_tokens": 10**6}, "max_completion_tokens"),
    ]
    for extra, param in cases:
        response = httpx.post(url, json={**base, **extra}, timeout=20)
        assert response.status_code == 400, extra
        assert response.json()["error"]["param"] == param
    assert httpx.post(url, json={**base, "stop": ["a", "b"], "max_tokens": 100}, timeout=20).status_code == 200


def test_chat_completions_refuse_a_prompt_over_the_token_budget(server: RunningServer) -> None:
    messages = [{"role": "user", "content": "words " * 25_000} for _ in range(2)]
    response = httpx.post(
        f"{server.http_url}/v1/chat/completions", json={"model": "scripted", "messages": messages}, timeout=20
    )
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "context_length_exceeded"


@pytest.mark.slow
async def test_webrtc_data_channel_messages_past_their_bound_are_refused() -> None:
    with running_server(scripted_config(webrtc={"max_message_bytes": 16_384})) as server:
        peer = Peer()
        try:
            assert (await peer.connect(server)).status_code == 201
            await peer.wait_for("session.created")
            peer.send({"type": "conversation.item.create", "item": text_item("x" * 40_000), "event_id": "big"})
            peer.send({"type": "conversation.item.create", "item": text_item("small"), "event_id": "small"})
            error = await peer.wait_for("error")
            added = await peer.wait_for("conversation.item.added")
        finally:
            await peer.close()
    assert error["error"]["code"] == "message_too_large"
    assert added["item"]["content"][0]["text"] == "small"
