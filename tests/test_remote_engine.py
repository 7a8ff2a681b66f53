"""The remote engine against real engine hosts on loopback: another omnivox (through its chat door), and stand-ins
for vLLM-Omni and OpenAI's audio chat. What a front sees (deltas, errors, health) and what the host sees (the request,
its abort in the host's own metrics)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import numpy as np
import pytest

from omnivox.pipeline.audio import synthesize_speech
from omnivox.pipeline.engines.base import (
    AudioDelta,
    AudioPart,
    Delta,
    EngineBusy,
    EngineError,
    EngineNotReady,
    EngineOutOfMemory,
    Message,
    ResponseRequest,
    TextDelta,
    TextPart,
    Usage,
)
from omnivox.pipeline.engines.engine_hosts import EngineHost, HostPool
from omnivox.pipeline.engines.remote import RemoteEngine
from omnivox.pipeline.engines.scripted import ESPEAK_VOICES, ScriptedEngine
from omnivox.pipeline.media import AudioLimits, decode_audio_native
from omnivox.pipeline.recognisers import RemoteRecogniser
from tests.remote_helpers import WORDS, OpenAIStandIn, VllmOmniStandIn, free_port, remote_config
from tests.server_helpers import RunningServer, running_server, scripted_config, serving
from tests.test_http_api import EndlessEngine

REPLY = "Good morning, how can I help?"


class HostEngine(ScriptedEngine):
    """The host's scripted engine, remembering each request and each answer cancelled mid-way."""

    def __init__(self, **options: Any) -> None:
        super().__init__(reply=REPLY, speed=8.0, first_audio_ms=20, transcript="what time is it", **options)
        self.requests: list[ResponseRequest] = []
        self.cancelled_at: list[float] = []

    async def respond(self, request: ResponseRequest) -> AsyncIterator[Delta]:
        self.requests.append(request)
        try:
            async for delta in super().respond(request):
                yield delta
        except (asyncio.CancelledError, GeneratorExit):
            self.cancelled_at.append(time.monotonic())
            raise


@pytest.fixture(scope="module")
def host_engine() -> HostEngine:
    return HostEngine()


@pytest.fixture(scope="module")
def host(host_engine: HostEngine) -> Iterator[RunningServer]:
    with running_server(scripted_config(), host_engine) as running:
        yield running


@contextlib.asynccontextmanager
async def remote(*urls: str, **options: Any) -> AsyncIterator[RemoteEngine]:
    engine = RemoteEngine(options.pop("model", "scripted"), urls=list(urls), health_interval_s=0.2, **options)
    await engine.start()
    try:
        yield engine
    finally:
        await engine.close()


def turn(text: str = "hello", **changes: Any) -> ResponseRequest:
    return ResponseRequest(messages=(Message("user", (TextPart(text),)),), **changes)


async def answer(engine: RemoteEngine, request: ResponseRequest) -> tuple[str, np.ndarray, list[Usage]]:
    text, audio, usage = [], [], []
    async for delta in engine.respond(request):
        if isinstance(delta, TextDelta):
            text.append(delta.text)
        elif isinstance(delta, AudioDelta):
            audio.append(delta.pcm)
        else:
            usage.append(delta)
    return "".join(text), np.concatenate(audio) if audio else np.zeros(0, np.float32), usage


def host_responses(host: RunningServer, status: str) -> float:
    """The host's own count of chat responses that ended with `status`."""
    return host.state.metrics.responses.labels("http_chat", status)._value.get()


async def eventually(condition: Any, timeout: float = 5.0) -> float:
    """Seconds until `condition()` held."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout, "timed out"
        await asyncio.sleep(0.005)
    return time.monotonic() - start


# ---------------------------------------------------------------- omnivox engine host


async def test_a_turn_through_the_host_speaks_what_the_engine_speaks(
    host: RunningServer, host_engine: HostEngine
) -> None:
    request = turn(instructions="Be brief.", conversation_id="sess_a", voice="echo")
    async with remote(host.http_url) as engine:
        assert engine.ready
        text, audio, usage = await answer(engine, request)
    assert text == REPLY
    spoken = synthesize_speech(REPLY, 24_000, ESPEAK_VOICES["echo"], 170)
    assert audio.size == spoken.size  # every sample, at the same rate
    assert np.abs(audio - spoken).max() < 2 / 32768  # PCM16 on the wire
    assert len(usage) == 1 and usage[0].output_tokens == len(REPLY.split())
    seen = host_engine.requests[-1]
    assert (seen.conversation_id, seen.instructions, seen.voice) == ("sess_a", "Be brief.", "echo")
    assert seen.messages == request.messages


async def test_caller_audio_reaches_the_host_at_16_khz(host: RunningServer, host_engine: HostEngine) -> None:
    caller = synthesize_speech("what is the weather", 16_000)
    request = ResponseRequest(messages=(Message("user", (AudioPart(caller),)),), output_audio=False)
    async with remote(host.http_url) as engine:
        text, audio, _ = await answer(engine, request)
        assert await engine.transcribe(caller) == "what time is it"
    assert text == REPLY and audio.size == 0
    (part,) = host_engine.requests[-1].messages[0].parts
    assert isinstance(part, AudioPart) and part.pcm.size == caller.size
    assert np.abs(part.pcm - caller).max() < 1 / 32768 + 1e-6


async def test_transcription_refusals_keep_their_kind() -> None:
    """The remote engine and the cascade share one remote recogniser; a busy server is busy, not a failure."""
    seen: list[httpx.Request] = []

    def refuse(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(429, json={"error": {"message": "queue full", "code": "server_busy"}})

    async with httpx.AsyncClient(transport=httpx.MockTransport(refuse)) as http:
        recogniser = RemoteRecogniser("http://asr:8000/v1/", model="whisper-1", api_key="sk-asr", http=http)
        with pytest.raises(EngineBusy, match="queue full"):
            await recogniser.transcribe(np.zeros(1_600, np.float32), "en")
        await recogniser.close()  # a shared client stays open
        assert not http.is_closed
    (request,) = seen
    assert str(request.url) == "http://asr:8000/v1/audio/transcriptions"
    assert request.headers["authorization"] == "Bearer sk-asr"
    assert b'name="language"\r\n\r\nen' in request.read()


async def test_cancelling_mid_answer_aborts_the_hosts_request(host: RunningServer, host_engine: HostEngine) -> None:
    cancelled_before = host_responses(host, "cancelled")
    async with remote(host.http_url) as engine:
        stream = engine.respond(turn())
        async for delta in stream:
            if isinstance(delta, AudioDelta):
                break
        closed_at = time.monotonic()
        await stream.aclose()
        waited = await eventually(lambda: host_responses(host, "cancelled") > cancelled_before)
    assert host_engine.cancelled_at[-1] - closed_at < 0.1
    assert waited < 0.2


async def test_cancelling_before_the_first_audio_aborts_the_hosts_request_at_once() -> None:
    """The host's chat door waits for the first delta before its headers; a front that leaves meanwhile (barge-in
    right after a turn) must stop the host's engine then, not when the first audio would be ready."""
    slow = HostEngine()
    slow.first_audio_ms = 3000
    with running_server(scripted_config(), slow) as slow_host:
        async with remote(slow_host.http_url) as engine:
            task = asyncio.create_task(answer(engine, turn()))
            await eventually(lambda: slow.requests)
            await asyncio.sleep(0.2)
            cancelled_at = time.monotonic()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await eventually(lambda: host_responses(slow_host, "cancelled") == 1, timeout=5)
    assert slow.cancelled_at[-1] - cancelled_at < 0.3


@pytest.mark.parametrize(
    "refusal",
    [
        EngineBusy("queue full"),
        EngineNotReady("still loading"),
        EngineOutOfMemory("no memory left"),
        EngineError("the model failed"),
    ],
)
async def test_host_refusals_reach_the_front_as_the_same_engine_error(refusal: EngineError) -> None:
    refusing = EndlessEngine()
    refusing.refuse_with = refusal
    with running_server(scripted_config(), refusing) as refusing_host:
        async with remote(refusing_host.http_url, model="endless-model") as engine:
            with pytest.raises(EngineError) as raised:
                await answer(engine, turn())
    assert type(raised.value) is type(refusal)
    assert str(refusal) in str(raised.value)


async def test_a_failure_mid_answer_ends_the_stream_with_its_kind() -> None:
    failing = EndlessEngine()
    failing.fail_after_steps = 3
    with running_server(scripted_config(), failing) as failing_host:
        async with remote(failing_host.http_url, model="endless-model") as engine:
            received: list[Delta] = []
            with pytest.raises(EngineError, match="caught fire"):
                async for delta in engine.respond(turn()):
                    received.append(delta)
    assert sum(isinstance(delta, AudioDelta) for delta in received) == 3


async def test_a_wrong_model_name_is_a_clear_failure() -> None:
    """A host that accepts only its own model names (`models.strict`) refuses another with a 404, which the front
    reports as such."""
    with running_server(scripted_config(models={"strict": True})) as strict_host:
        async with remote(strict_host.http_url, model="no-such-model") as engine:
            with pytest.raises(EngineError, match="404: the model 'no-such-model' does not exist"):
                await answer(engine, turn())


async def test_a_down_host_shows_in_healthz_and_is_used_once_it_is_up() -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    chat = {"model": "scripted", "messages": [{"role": "user", "content": "hello"}]}
    async with httpx.AsyncClient(timeout=10) as client:
        with running_server(remote_config([url])) as front:
            health = await client.get(f"{front.http_url}/healthz")
            assert health.status_code == 503
            body = health.json()
            assert body["status"] == "unavailable"
            (state,) = body["engine_hosts"]
            assert state["url"] == url and state["healthy"] is False and "ConnectError" in state["error"]
            metrics = (await client.get(f"{front.http_url}/metrics")).text
            assert f'omnivox_engine_host_up{{url="{url}"}} 0.0' in metrics
            refused = await client.post(f"{front.http_url}/v1/chat/completions", json=chat)
            assert refused.status_code == 503 and refused.json()["error"]["code"] == "engine_not_ready"

            async def healthz() -> int:
                return (await client.get(f"{front.http_url}/healthz")).status_code

            with running_server(scripted_config(), HostEngine(), port=port):
                while await healthz() != 200:
                    await asyncio.sleep(0.05)
                answered = await client.post(f"{front.http_url}/v1/chat/completions", json=chat)
                assert answered.json()["choices"][0]["message"]["content"] == REPLY
                metrics = (await client.get(f"{front.http_url}/metrics")).text
                assert f'omnivox_engine_host_up{{url="{url}"}} 1.0' in metrics
            while await healthz() != 503:
                await asyncio.sleep(0.05)


# ---------------------------------------------------------------- several hosts


async def test_conversations_stick_to_their_host_and_move_only_when_it_fails() -> None:
    engines = [HostEngine(), HostEngine()]
    stacks = [contextlib.ExitStack(), contextlib.ExitStack()]
    try:
        hosts = [
            stack.enter_context(running_server(scripted_config(), engine))
            for stack, engine in zip(stacks, engines, strict=True)
        ]
        async with remote(*(h.http_url for h in hosts)) as engine:
            for _ in range(3):
                await answer(engine, turn(conversation_id="first"))
            first = next(index for index, e in enumerate(engines) if e.requests)
            other = 1 - first
            assert len(engines[first].requests) == 3
            # while the first conversation has a turn in flight, a new one goes to the idle host
            busy = engine.respond(turn(conversation_id="first"))
            await anext(busy)
            await answer(engine, turn(conversation_id="second"))
            assert len(engines[other].requests) == 1
            await busy.aclose()
            # the first conversation's host goes away: its next turn is answered by the other host
            await asyncio.to_thread(stacks[first].close)
            text, _, _ = await answer(engine, turn(conversation_id="first"))
            assert text == REPLY and len(engines[other].requests) == 2
            assert engine.health()["engine_hosts"][first]["healthy"] is False
            await answer(engine, turn(conversation_id="first"))
            assert len(engines[other].requests) == 3
    finally:
        for stack in stacks:
            stack.close()


def pool_of(*outstanding: int, healthy: tuple[bool, ...] = ()) -> HostPool[None]:
    hosts = [EngineHost(f"http://h{index}", None, outstanding=count) for index, count in enumerate(outstanding)]
    for host, up in zip(hosts, healthy, strict=False):
        host.healthy = up
    return HostPool(hosts, health_path="/healthz")


def test_new_conversations_go_to_the_least_busy_healthy_host() -> None:
    pool = pool_of(3, 1, 0, healthy=(True, True, False))
    assert pool.choose("a").url == "http://h1"
    assert pool.choose("a").url == "http://h1"  # sticky, even when another host frees up
    pool.hosts[0].outstanding = 0
    assert pool.choose("a").url == "http://h1"
    assert pool.choose("b").url == "http://h0"
    pool.mark_down(pool.hosts[1], "connection refused")
    assert pool.choose("a").url == "http://h0"
    pool.hosts[0].healthy = False
    with pytest.raises(EngineNotReady, match=r"http://h1: connection refused"):
        pool.choose("a")


def test_ties_are_taken_in_turn_and_exclusions_are_respected() -> None:
    pool = pool_of(0, 0)
    chosen = {pool.choose().url for _ in range(4)}
    assert chosen == {"http://h0", "http://h1"}
    assert pool.choose("c", exclude=frozenset({"http://h0"})).url == "http://h1"
    with pytest.raises(EngineNotReady):
        pool.choose("c", exclude=frozenset({"http://h0", "http://h1"}))


def test_the_sticky_table_is_bounded_and_forgets() -> None:
    pool = pool_of(0, 0)
    pool.max_conversations = 2
    for name in ("a", "b", "c"):
        pool.choose(name)
    assert list(pool._sticky) == ["b", "c"]
    pool.forget("b")
    assert list(pool._sticky) == ["c"]


async def test_health_checks_follow_the_hosts_answers() -> None:
    answers = {"http://h0/healthz": 200, "http://h1/healthz": 503}
    changes: list[tuple[str, bool, int]] = []

    def health(request: httpx.Request) -> httpx.Response:
        status = answers.get(str(request.url))
        if status is None:
            raise httpx.ConnectError("refused", request=request)
        return httpx.Response(status, text="loading")

    pool = pool_of(0, 0, 0)
    pool.observers.append(lambda *change: changes.append(change))
    async with httpx.AsyncClient(transport=httpx.MockTransport(health)) as http:
        await pool.check_all(http)
    assert [host.healthy for host in pool.hosts] == [True, False, False]
    assert pool.hosts[1].error == "health check answered 503: loading"
    assert "ConnectError" in (pool.hosts[2].error or "")
    assert sorted(changes) == [("http://h0", True, 0), ("http://h1", False, 0), ("http://h2", False, 0)]


# ---------------------------------------------------------------- vLLM-Omni and OpenAI dialects


@pytest.mark.parametrize("mode", ["streamed", "whole_at_end", "json"])
async def test_vllm_omni_answers_are_read_streamed_and_whole(mode: str) -> None:
    stand_in = VllmOmniStandIn(mode)
    caller = synthesize_speech("hello", 16_000)
    request = ResponseRequest(
        messages=(Message("user", (AudioPart(caller),)),), instructions="Be brief.", voice="echo", conversation_id="s"
    )
    with serving(stand_in.app) as port:
        options = {"system_prompt": "You are Qwen.", "voices": {"echo": "Ethan"}}
        async with remote(
            f"http://127.0.0.1:{port}/v1", model="Qwen/Qwen2.5-Omni-7B", dialect="vllm-omni", **options
        ) as engine:
            assert engine.ready  # its /health answered
            text, audio, usage = await answer(engine, request)
    assert text == "".join(WORDS)
    assert audio.size == stand_in.audio.size
    np.testing.assert_allclose(audio, stand_in.audio, atol=2 / 32768)
    assert usage[-1].input_tokens == 40
    (body,) = stand_in.requests
    assert body["model"] == "Qwen/Qwen2.5-Omni-7B" and body["voice"] == "Ethan"
    assert body["modalities"] == ["text", "audio"]
    assert body["messages"][0] == {"role": "system", "content": "You are Qwen.\n\nBe brief."}
    (part,) = body["messages"][1]["content"]
    samples, rate = decode_audio_native(
        base64.b64decode(part["audio_url"]["url"].split(",", 1)[1]), allowed=("wav",), limits=AudioLimits(60)
    )
    assert (rate, samples.size) == (16_000, caller.size)


async def test_openai_audio_chat_is_read_from_delta_audio() -> None:
    stand_in = OpenAIStandIn()
    with serving(stand_in.app) as port:
        async with remote(f"http://127.0.0.1:{port}/v1", model="gpt-4o-audio-preview", dialect="openai") as engine:
            text, audio, usage = await answer(engine, turn("hi", instructions="Be brief.", voice="coral"))
    assert text == "".join(WORDS) and audio.size == stand_in.audio.size
    assert usage == [Usage(30, 5, 3)]
    (body,) = stand_in.requests
    assert body["audio"] == {"voice": "coral", "format": "pcm16"}
    assert body["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "hi"}]},
    ]


async def test_a_slow_stand_in_is_cancelled_by_closing_the_connection() -> None:
    stand_in = OpenAIStandIn(pieces=50, delay_s=0.05)
    disconnected: list[float] = []
    original = stand_in.events

    async def watched(body: dict[str, Any]) -> AsyncIterator[str]:
        try:
            async for event in original(body):
                yield event
        except (asyncio.CancelledError, GeneratorExit):
            disconnected.append(time.monotonic())
            raise

    stand_in.events = watched  # type: ignore[method-assign]
    with serving(stand_in.app) as port:
        async with remote(f"http://127.0.0.1:{port}", model="m", dialect="openai") as engine:
            stream = engine.respond(turn())
            async for delta in stream:
                if isinstance(delta, AudioDelta):
                    break
            closed_at = time.monotonic()
            await stream.aclose()
            await eventually(lambda: disconnected)
    assert disconnected[0] - closed_at < 0.15
