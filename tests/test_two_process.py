"""An engine host and a front as two real processes (`omnivox serve --engine scripted` and `omnivox serve --engine
remote`), with Realtime WebSocket, telephony and chat-completion turns through them, barge-in included. The host's
own metrics show the answers the front cancelled. A front with two worker processes shares one port and one view of
its metrics."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import time
from collections.abc import Iterator

import openai
import psutil
import pytest
import websockets

from omnivox.pipeline.audio import synthesize_speech
from omnivox.pipeline.engines.scripted import ESPEAK_VOICES
from omnivox.server.phone_sim import CallOptions, Utterance, run_call
from tests.audio_fixtures import Microphone, silence, speech
from tests.remote_helpers import ServerProcess, serve_process
from tests.test_conformance import connect

pytestmark = pytest.mark.slow

REPLY = "Let me tell you about the weather this week. It will be sunny on Monday and rainy on Tuesday."
WORDS_PER_MINUTE = 170


@pytest.fixture(scope="module")
def host() -> Iterator[ServerProcess]:
    env = {"OMNIVOX_ENGINE__OPTIONS__SCRIPTED__REPLY": REPLY, "OMNIVOX_ENGINE__OPTIONS__SCRIPTED__SPEED": "2.0"}
    with serve_process("--engine", "scripted", env=env) as running:
        yield running


@pytest.fixture(scope="module")
def front(host: ServerProcess) -> Iterator[ServerProcess]:
    env = {"OMNIVOX_ENGINE__OPTIONS__REMOTE__HEALTH_INTERVAL_S": "0.5"}
    with serve_process("--engine", "remote", "--model", "scripted", "--engine-url", host.http_url, env=env) as running:
        yield running


def cancelled_on_host(host: ServerProcess) -> float:
    return host.metric("omnivox_responses_total", door="http_chat", status="cancelled")


async def until_host_cancelled(host: ServerProcess, before: float, timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while await asyncio.to_thread(cancelled_on_host, host) <= before:
        assert time.monotonic() < deadline, "the engine host never saw the answer cancelled"
        await asyncio.sleep(0.05)


async def test_realtime_turns_with_barge_in_through_the_engine_host(front: ServerProcess, host: ServerProcess) -> None:
    before = cancelled_on_host(host)
    async with connect(front) as wire:
        microphone = Microphone(wire.append)
        streaming = asyncio.create_task(microphone.run())
        try:
            microphone.say(silence(0.3))
            microphone.say(speech("What will the weather be like this week?"))
            while (event := await wire.next(20))["type"] != "response.output_audio.delta":
                pass
            first_response = event["response_id"]
            await asyncio.sleep(1.0)
            microphone.say(speech("Wait, what about tomorrow?"))
            while (event := await wire.next(10))["type"] != "response.done":
                pass
            assert event["response"]["id"] == first_response
            assert event["response"]["status_details"] == {"type": "cancelled", "reason": "turn_detected"}
            await until_host_cancelled(host, before)
            while (event := await wire.next(30))["type"] != "response.done":
                pass
            assert event["response"]["status"] == "completed"
            transcript = event["response"]["output"][0]["content"][0]["transcript"]
            assert transcript == REPLY
        finally:
            streaming.cancel()
    spoken = [
        e for e in wire.received if e["type"] == "response.output_audio.delta" and e["response_id"] != first_response
    ]
    seconds = sum(len(base64.b64decode(e["delta"])) for e in spoken) / 2 / 24_000
    assert seconds == pytest.approx(
        synthesize_speech(REPLY, 24_000, ESPEAK_VOICES["alloy"], WORDS_PER_MINUTE).size / 24_000, abs=0.05
    )


async def test_a_phone_call_with_barge_in_through_the_engine_host(front: ServerProcess, host: ServerProcess) -> None:
    before = cancelled_on_host(host)
    options = CallOptions(
        url=f"{front.ws_url}/telephony/twilio",
        utterances=[Utterance.say("hello there"), Utterance.say("stop, wait a second")],
        pause_s=0.2,
        barge_in_after_s=0.8,
        agent_done_silence_s=0.6,
        turns_timeout_s=20,
    )
    result = await run_call(options)
    first, second = result.turns
    assert first.voice_to_voice_ms is not None and second.voice_to_voice_ms is not None
    assert second.barge_in_ms is not None and 0 < second.barge_in_ms <= 400
    assert result.clears_s
    await until_host_cancelled(host, before)


async def test_chat_completions_through_the_engine_host(front: ServerProcess) -> None:
    client = openai.AsyncOpenAI(base_url=f"{front.http_url}/v1", api_key="unused", max_retries=0)
    stream = await client.chat.completions.create(
        model="scripted",
        modalities=["text", "audio"],
        audio={"voice": "alloy", "format": "pcm16"},
        messages=[{"role": "user", "content": "How is the weather?"}],
        stream=True,
    )
    transcript, pcm = [], b""
    async for chunk in stream:
        audio = dict(chunk.choices[0].delta.audio or {}) if chunk.choices else {}
        transcript.append(audio.get("transcript") or "")
        pcm += base64.b64decode(audio.get("data") or "")
    await client.close()
    assert "".join(transcript) == REPLY
    spoken = synthesize_speech(REPLY, 24_000, ESPEAK_VOICES["alloy"], WORDS_PER_MINUTE)
    assert len(pcm) // 2 == pytest.approx(spoken.size, abs=24)


async def test_two_front_workers_share_the_port_and_their_metrics(host: ServerProcess) -> None:
    front_args = ("--engine", "remote", "--model", "scripted", "--engine-url", host.http_url, "--workers", "2")
    with serve_process(*front_args) as front:
        workers = psutil.Process(front.process.pid).children(recursive=True)
        async with contextlib.AsyncExitStack() as stack:
            opened = 0
            deadline = time.monotonic() + 60
            # connections go to whichever worker accepts first (one may still be starting): open them until both
            # workers hold some
            while opened < 10 or sum(holds_connections(worker, front.port) for worker in workers) < 2:
                assert time.monotonic() < deadline, "the second worker never took a connection"
                ws = await stack.enter_async_context(websockets.connect(f"{front.ws_url}/v1/realtime?model=scripted"))
                assert json.loads(await ws.recv())["type"] == "session.created"
                opened += 1
                await asyncio.sleep(0.05)
            for _ in range(4):  # whichever worker answers the scrape, it counts every worker's sessions
                assert await asyncio.to_thread(front.metric, "omnivox_sessions_active", door="realtime_ws") == opened
        assert await asyncio.to_thread(front.metric, "omnivox_sessions_total", door="realtime_ws") == opened


def holds_connections(process: psutil.Process, port: int) -> bool:
    return any(c.laddr.port == port and c.status == psutil.CONN_ESTABLISHED for c in process.net_connections())
