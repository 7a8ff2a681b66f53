"""The HTTP doors end to end: the official `openai` SDK and raw SSE against a real server, plus engine doubles for
cancellation, refusals and mid-stream failures."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import numpy as np
import openai
import pytest

from omnivox.pipeline.audio import encode_audio_file, pcm16_to_float, synthesize_speech
from omnivox.pipeline.engines.base import (
    AudioDelta,
    AudioPart,
    Delta,
    EngineBusy,
    EngineError,
    ResponseRequest,
    TextDelta,
    TextPart,
)
from omnivox.pipeline.engines.scripted import ScriptedEngine
from omnivox.pipeline.media import AUDIO_CONTAINERS, AudioLimits, decode_audio
from omnivox.server.audio_chat_api import audio_chat_events
from omnivox.server.http_media import AudioCache
from omnivox.server.state import ServerState
from tests.server_helpers import RunningServer, running_server, scripted_config

REPLY = "Sure. The weather is sunny and warm today."
BODY_LIMIT = 512 * 1024


class RecordingEngine(ScriptedEngine):
    """The scripted engine, remembering the requests it answered."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.requests: list[ResponseRequest] = []

    def respond(self, request: ResponseRequest) -> AsyncIterator[Delta]:
        self.requests.append(request)
        return super().respond(request)


class EndlessEngine:
    """Speaks forever in 40 ms chunks, counting its steps; can refuse or fail on demand."""

    name = "endless"
    model_id = "endless-model"
    native_rate = 24_000

    def __init__(self) -> None:
        self.steps: list[float] = []
        self.is_ready = True
        self.refuse_with: EngineError | None = None
        self.fail_after_steps: int | None = None

    @property
    def ready(self) -> bool:
        return self.is_ready

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def respond(self, request: ResponseRequest) -> AsyncIterator[Delta]:
        if self.refuse_with is not None:
            raise self.refuse_with
        yield TextDelta("Counting")
        while True:
            self.steps.append(time.monotonic())
            if self.fail_after_steps is not None and len(self.steps) > self.fail_after_steps:
                raise EngineError("the accelerator caught fire")
            yield AudioDelta(np.full(960, 0.1, dtype=np.float32))
            await asyncio.sleep(0.01)


@pytest.fixture(scope="module")
def engine() -> RecordingEngine:
    return RecordingEngine(model="scripted", reply=REPLY, speed=20.0, first_audio_ms=10)


@pytest.fixture(scope="module")
def server(engine: RecordingEngine) -> Iterator[RunningServer]:
    config = scripted_config(engine={"served_model_name": "omni-test"}, limits={"max_http_body_bytes": BODY_LIMIT})
    with running_server(config, engine) as running:
        yield running


@pytest.fixture(scope="module")
def client(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.http_url}/v1", api_key="unused", max_retries=0, timeout=30)


@pytest.fixture(scope="module")
def reply_duration_s() -> float:
    return synthesize_speech(REPLY, 24_000, "en-us", 170).size / 24_000


def audio_request(**extra: Any) -> dict[str, Any]:
    return {
        "model": "omni-test",
        "modalities": ["text", "audio"],
        "audio": {"voice": "alloy", "format": "pcm16"},
        "messages": [{"role": "user", "content": "How is the weather?"}],
        **extra,
    }


def sse_payloads(lines: list[str]) -> list[Any]:
    """The `data:` payloads of an SSE body, `[DONE]` kept as the string."""
    payloads = []
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: ") :]
            payloads.append(data if data == "[DONE]" else json.loads(data))
    return payloads


def post_sse(server: RunningServer, path: str, body: dict[str, Any], **headers: str) -> tuple[int, list[Any]]:
    with httpx.stream("POST", f"{server.http_url}{path}", json=body, headers=headers, timeout=30) as response:
        lines = list(response.iter_lines())
    return response.status_code, sse_payloads(lines)


# ---------------------------------------------------------------------------------------------- chat completions


def test_models_lists_the_served_model_and_the_aliases(client: openai.OpenAI) -> None:
    names = [model.id for model in client.models.list()]
    assert names[:2] == ["omni-test", "scripted"]
    assert {"gpt-realtime", "gpt-4o-audio-preview", "whisper-1", "gpt-4o-transcribe"} <= set(names[2:])


def test_text_only_chat_non_streaming(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model="omni-test", messages=[{"role": "user", "content": "How is the weather?"}]
    )
    choice = completion.choices[0]
    assert choice.message.content == REPLY
    assert choice.message.audio is None
    assert choice.finish_reason == "stop"
    assert completion.usage.completion_tokens == len(REPLY.split())


def test_text_only_chat_streaming_with_usage(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="omni-test",
        messages=[{"role": "user", "content": "How is the weather?"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == REPLY
    assert [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(REPLY.split())


def test_a_stop_string_ends_the_reply_before_it(client: openai.OpenAI) -> None:
    stop = REPLY.split()[3]
    completion = client.chat.completions.create(
        model="omni-test", messages=[{"role": "user", "content": "How is the weather?"}], stop=[stop, "never said"]
    )
    assert completion.choices[0].message.content == REPLY[: REPLY.index(stop)].rstrip()


@pytest.mark.parametrize(
    ("audio_format", "tolerance_s"), [("wav", 0.05), ("pcm16", 0.05), ("flac", 0.05), ("mp3", 0.1), ("opus", 0.1)]
)
def test_audio_chat_non_streaming_returns_audio_and_its_transcript(
    client: openai.OpenAI, reply_duration_s: float, audio_format: str, tolerance_s: float
) -> None:
    completion = client.chat.completions.create(
        model="omni-test",
        modalities=["text", "audio"],
        audio={"voice": "alloy", "format": audio_format},
        messages=[{"role": "user", "content": "How is the weather?"}],
    )
    audio = completion.choices[0].message.audio
    assert audio.transcript == REPLY
    assert audio.id.startswith("audio_") and audio.expires_at > time.time()
    data = base64.b64decode(audio.data)
    rate = 24_000
    samples = (
        pcm16_to_float(data)
        if audio_format == "pcm16"
        else decode_audio(data, declared=None, allowed=AUDIO_CONTAINERS, limits=AudioLimits(60), out_rate=rate)
    )
    assert samples.size / rate == pytest.approx(reply_duration_s, abs=tolerance_s)
    assert np.abs(samples).max() > 0.1


def test_audio_chat_streaming_sends_id_and_transcript_then_pcm16(
    client: openai.OpenAI, reply_duration_s: float
) -> None:
    chunks = list(client.chat.completions.create(**audio_request(), stream=True))
    audio_deltas = [
        chunk.choices[0].delta.audio.model_dump(exclude_unset=True)
        for chunk in chunks
        if chunk.choices[0].delta.audio is not None
    ]
    assert audio_deltas[0]["id"].startswith("audio_") and "transcript" in audio_deltas[0]
    assert {delta["id"] for delta in audio_deltas} == {audio_deltas[0]["id"]}
    assert "".join(delta.get("transcript", "") for delta in audio_deltas) == REPLY
    first_data = next(index for index, delta in enumerate(audio_deltas) if "data" in delta)
    assert all("data" not in delta for delta in audio_deltas[:first_data])
    pcm = b"".join(base64.b64decode(delta["data"]) for delta in audio_deltas if "data" in delta)
    assert len(pcm) / 2 / 24_000 == pytest.approx(reply_duration_s, abs=0.05)
    assert audio_deltas[-1]["expires_at"] > time.time()
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_input_audio_turn_reaches_the_engine_at_16_khz(client: openai.OpenAI, engine: RecordingEngine) -> None:
    question = synthesize_speech("What is the weather like today?", 24_000)
    wav = encode_audio_file(question, 24_000, "wav")
    client.chat.completions.create(
        model="omni-test",
        messages=[
            {"role": "system", "content": "Be brief."},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Answer this:"},
                    {"type": "input_audio", "input_audio": {"data": base64.b64encode(wav).decode(), "format": "wav"}},
                ],
            },
        ],
        temperature=0.3,
        top_p=0.9,
        max_completion_tokens=77,
        seed=5,
        stop=["\n\n"],
    )
    request = engine.requests[-1]
    assert [message.role for message in request.messages] == ["system", "user"]
    text_part, audio_part = request.messages[1].parts
    assert text_part == TextPart("Answer this:")
    assert isinstance(audio_part, AudioPart)
    assert audio_part.pcm.size / 16_000 == pytest.approx(question.size / 24_000, abs=0.01)
    sampling = request.sampling
    assert (sampling.temperature, sampling.top_p, sampling.max_tokens, sampling.seed) == (0.3, 0.9, 77, 5)
    assert sampling.stop == ("\n\n",)
    assert request.output_audio is False


def test_multi_turn_refers_to_earlier_audio_by_id(client: openai.OpenAI, engine: RecordingEngine) -> None:
    first = client.chat.completions.create(**{**audio_request(), "audio": {"voice": "alloy", "format": "mp3"}})
    audio_id = first.choices[0].message.audio.id
    second = client.chat.completions.create(
        **audio_request(
            messages=[
                {"role": "user", "content": "How is the weather?"},
                {"role": "assistant", "audio": {"id": audio_id}},
                {"role": "user", "content": "And tomorrow?"},
            ]
        )
    )
    assert second.choices[0].message.audio.id != audio_id
    history = engine.requests[-1].messages
    assert [message.role for message in history] == ["user", "assistant", "user"]
    assert history[1].parts == (TextPart(REPLY),)
    with pytest.raises(openai.BadRequestError, match="unknown or expired audio id"):
        client.chat.completions.create(**audio_request(messages=[{"role": "assistant", "audio": {"id": "audio_nope"}}]))


def test_vllm_audio_url_reaches_the_engine(client: openai.OpenAI, engine: RecordingEngine) -> None:
    speech = synthesize_speech("Hello there", 16_000)
    url = "data:audio/flac;base64," + base64.b64encode(encode_audio_file(speech, 16_000, "flac")).decode()
    client.chat.completions.create(
        model="omni-test",
        messages=[{"role": "user", "content": [{"type": "audio_url", "audio_url": {"url": url}}]}],
    )
    (part,) = engine.requests[-1].messages[0].parts
    assert isinstance(part, AudioPart) and part.pcm.size == speech.size


# ---------------------------------------------------------------------------------------------- transcription


def test_transcription_of_espeak_speech(client: openai.OpenAI) -> None:
    question = synthesize_speech("what is the weather like today", 16_000, "en-us", 140)
    wav = encode_audio_file(question, 16_000, "wav")
    transcript = client.audio.transcriptions.create(model="omni-test", file=("question.wav", wav))
    assert "weather" in transcript.text
    text = client.audio.transcriptions.create(model="omni-test", file=("q.wav", wav), response_format="text")
    assert "weather" in text
    verbose = client.audio.transcriptions.create(
        model="omni-test", file=("q.wav", wav), response_format="verbose_json", language="en"
    )
    assert verbose.duration == pytest.approx(question.size / 16_000, abs=0.01) and "weather" in verbose.text


def test_transcription_refuses_undecodable_audio(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="not an audio file"):
        client.audio.transcriptions.create(model="omni-test", file=("noise.wav", b"definitely not audio"))


# ---------------------------------------------------------------------------------------------- audio-modalities door


def test_audio_modalities_stream_chunk_by_chunk(server: RunningServer, reply_duration_s: float) -> None:
    """Agora's direct audio output: data chunks as made, word subtitles as words complete, the whole transcript
    once after the audio (what the platform keeps as context), a finish chunk, [DONE]."""
    body = {**audio_request(), "model": "your-model-name", "stream": True}  # the name of Agora's own example
    status, payloads = post_sse(server, "/audio/chat/completions", body)
    assert status == 200
    assert payloads[-1] == "[DONE]"
    assert len({payload["id"] for payload in payloads[:-1]}) == 1
    deltas = [payload["choices"][0]["delta"] for payload in payloads[:-1]]
    assert deltas[0]["role"] == "assistant" and deltas[0]["audio"]["data"] == ""
    assert (deltas[-1], payloads[-2]["choices"][0]["finish_reason"]) == ({}, "stop")
    events = [delta["audio"] for delta in deltas[1:-1]]
    assert len({event["id"] for event in events}) == 1
    kinds = [next(key for key in event if key != "id") for event in events]
    assert kinds[-1] == "transcript" and kinds.count("transcript") == 1
    assert events[-1]["transcript"] == REPLY
    sizes = [len(base64.b64decode(event["data"], validate=True)) for event in events if "data" in event]
    assert all(size == 1280 for size in sizes[:-1]) and 0 < sizes[-1] <= 1280
    assert sum(sizes) / 2 / 16_000 == pytest.approx(reply_duration_s, abs=0.05)
    words = [word for event in events for word in event.get("words", [])]
    assert " ".join(word["text"] for word in words) == REPLY
    data_before_words = kinds[: kinds.index("words")].count("data")
    assert data_before_words < len(sizes) / 4  # subtitles stream with the audio, not after it
    ends = [0] + [word["end_ts"] for word in words]
    for word, previous_end in zip(words, ends, strict=False):
        assert word["start_ts"] >= previous_end and word["end_ts"] - word["start_ts"] == word["duration"] > 0
    assert words[-1]["end_ts"] == pytest.approx(reply_duration_s * 1000, rel=0.35)


def test_audio_modalities_requires_stream(server: RunningServer) -> None:
    response = httpx.post(f"{server.http_url}/audio/chat/completions", json={**audio_request(), "stream": False})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "stream"


# ---------------------------------------------------------------------------------------------- bad input


def test_unsupported_input_audio_format(client: openai.OpenAI) -> None:
    part = {"type": "input_audio", "input_audio": {"data": base64.b64encode(b"abcd").decode(), "format": "aiff"}}
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="omni-test", messages=[{"role": "user", "content": [part]}])
    assert caught.value.code == "unsupported_audio_format"


def test_corrupt_base64_audio(client: openai.OpenAI) -> None:
    part = {"type": "input_audio", "input_audio": {"data": "%%%not base64%%%", "format": "wav"}}
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="omni-test", messages=[{"role": "user", "content": [part]}])
    assert caught.value.code == "invalid_base64"


def test_oversized_body_is_413(server: RunningServer) -> None:
    wav = base64.b64encode(bytes(BODY_LIMIT)).decode()
    part = {"type": "input_audio", "input_audio": {"data": wav, "format": "wav"}}
    body = {"model": "omni-test", "messages": [{"role": "user", "content": [part]}]}
    response = httpx.post(f"{server.http_url}/v1/chat/completions", json=body)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"


def test_any_model_name_is_accepted_by_default(client: openai.OpenAI) -> None:
    for model in ("scripted", "gpt-4o-audio-preview", "my-favourite-model"):
        completion = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}])
        assert completion.choices[0].message.content == REPLY


def test_strict_model_names_accept_the_aliases_only_on_every_door() -> None:
    """With `models.strict` the served name and the aliases pass on every door, other names are a clear 404, and
    the audio-modalities door still takes any name (its format says the name only identifies)."""
    config = scripted_config(engine={"served_model_name": "omni-test"}, models={"strict": True})
    with running_server(config) as strict:
        client = openai.OpenAI(base_url=f"{strict.http_url}/v1", api_key="unused", max_retries=0)
        message = [{"role": "user", "content": "hi"}]
        with pytest.raises(openai.NotFoundError, match="'gpt-4o' does not exist; this server serves 'omni-test'"):
            client.chat.completions.create(model="gpt-4o", messages=message)
        assert client.chat.completions.create(model="gpt-audio", messages=message).choices[0].message.content
        wav = encode_audio_file(synthesize_speech("what is the weather", 16_000), 16_000, "wav")
        for model in ("whisper-1", "gpt-4o-transcribe"):
            assert client.audio.transcriptions.create(model=model, file=("q.wav", wav)).text is not None
        with pytest.raises(openai.NotFoundError):
            client.audio.transcriptions.create(model="whisper-2", file=("q.wav", wav))
        status, payloads = post_sse(
            strict, "/audio/chat/completions", {**audio_request(), "model": "x", "stream": True}
        )
        assert (status, payloads[-1]) == (200, "[DONE]")


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"audio": None}, "audio"),
        ({"stream": True, "audio": {"voice": "alloy", "format": "wav"}}, "audio.format"),
        ({"messages": []}, "messages"),
        ({"temperature": 7}, "temperature"),
    ],
)
def test_invalid_chat_requests_name_the_parameter(server: RunningServer, extra: dict[str, Any], param: str) -> None:
    response = httpx.post(f"{server.http_url}/v1/chat/completions", json={**audio_request(), **extra})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == param


def test_body_that_is_not_json(server: RunningServer) -> None:
    response = httpx.post(
        f"{server.http_url}/v1/chat/completions", content=b"{nope", headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_api_keys_are_required_when_configured() -> None:
    config = scripted_config(server={"api_keys": ["sk-right"]})
    with running_server(config) as keyed:
        body = {**audio_request(model="scripted"), "stream": True}
        for path in ("/audio/chat/completions", "/v1/chat/completions"):
            assert httpx.post(f"{keyed.http_url}{path}", json=body).status_code == 401
            wrong = httpx.post(f"{keyed.http_url}{path}", json=body, headers={"Authorization": "Bearer sk-wrong"})
            assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
        status, payloads = post_sse(keyed, "/audio/chat/completions", body, Authorization="Bearer sk-right")
        assert status == 200 and payloads[-1] == "[DONE]"
        assert httpx.get(f"{keyed.http_url}/v1/models").status_code == 401


# ---------------------------------------------------------------------------------------------- engine doubles


@pytest.fixture
def endless() -> Iterator[tuple[RunningServer, EndlessEngine]]:
    engine = EndlessEngine()
    with running_server(scripted_config(), engine) as running:
        yield running, engine


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/audio/chat/completions"])
async def test_client_disconnect_cancels_the_engine(endless: tuple[RunningServer, EndlessEngine], path: str) -> None:
    server, engine = endless
    body = json.dumps({**audio_request(model="endless-model"), "stream": True}).encode()
    reader, writer = await asyncio.open_connection(server.host, server.port)
    writer.write(
        f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    received = b""
    async with asyncio.timeout(10):
        while received.count(b"data:") < 5:
            received += await reader.read(65536)
    writer.close()
    await writer.wait_closed()
    disconnected = time.monotonic()
    await asyncio.sleep(0.6)
    assert engine.steps, "the engine never ran"
    assert max(engine.steps) < disconnected + 0.2


def test_engine_refusals_become_status_codes(endless: tuple[RunningServer, EndlessEngine]) -> None:
    server, engine = endless
    url = f"{server.http_url}/v1/chat/completions"
    body = audio_request(model="endless-model")
    engine.refuse_with = EngineBusy("queue full")
    busy = httpx.post(url, json=body)
    assert busy.status_code == 429 and busy.json()["error"]["code"] == "server_busy"
    engine.refuse_with = None
    engine.is_ready = False
    loading = httpx.post(url, json=body)
    assert loading.status_code == 503 and loading.json()["error"]["code"] == "engine_not_ready"


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/audio/chat/completions"])
def test_engine_failure_mid_stream_is_an_error_event(endless: tuple[RunningServer, EndlessEngine], path: str) -> None:
    server, engine = endless
    engine.fail_after_steps = 3
    status, payloads = post_sse(server, path, {**audio_request(model="endless-model"), "stream": True})
    assert status == 200
    assert payloads[-1]["error"]["message"] == "the accelerator caught fire"
    assert payloads[-1]["error"]["type"] == "server_error"
    assert "[DONE]" not in payloads


def test_transcription_without_a_recogniser_is_501(endless: tuple[RunningServer, EndlessEngine]) -> None:
    server, _ = endless
    wav = encode_audio_file(np.zeros(1600, np.float32), 16_000, "wav")
    response = httpx.post(
        f"{server.http_url}/v1/audio/transcriptions",
        files={"file": ("a.wav", wav)},
        data={"model": "endless-model"},
    )
    assert response.status_code == 501
    assert "cannot transcribe" in response.json()["error"]["message"]


# ---------------------------------------------------------------------------------------------- units


def test_audio_cache_forgets_the_oldest_and_the_expired() -> None:
    now = [1000.0]
    cache = AudioCache(max_items=2, ttl_s=60, clock=lambda: now[0])
    cache.put("a", "first")
    now[0] += 30
    cache.put("b", "second")
    now[0] += 10
    cache.put("c", "third")
    assert cache.get("a") is None and cache.get("b").transcript == "second"
    now[0] += 55
    assert cache.get("b") is None and cache.get("c").transcript == "third"


async def test_words_are_timed_where_their_text_arrives_in_the_audio() -> None:
    """A word starts when its text arrived in the audio (or when the previous word ended), lasts by its letters."""

    async def speech() -> AsyncIterator[Delta]:
        yield TextDelta("Hi there")
        yield AudioDelta(np.zeros(24_000, np.float32))  # 1 s
        yield TextDelta(" friend,")
        yield AudioDelta(np.zeros(12_000, np.float32))
        yield TextDelta(" bye")

    state = ServerState(config=scripted_config(), engine=ScriptedEngine())
    events = [event async for event in audio_chat_events(state, AudioCache(4, 60), "msg", speech())]
    deltas = [sse_payloads(event.splitlines())[0] for event in events[:-1]]
    audio = [payload["choices"][0]["delta"].get("audio", {}) for payload in deltas]
    words = [word for event in audio for word in event.get("words", [])]
    assert [w["text"] for w in words] == ["Hi", "there", "friend,", "bye"]
    # audio made so far counts what left the resampler: it holds back a few ms of filter delay
    assert [w["start_ts"] for w in words] == pytest.approx([0, 133, 1000, 1500], abs=25)
    assert words[1]["duration"] == 333 and words[-1]["duration"] == 200  # 15 letters a second
    assert [event["transcript"] for event in audio if "transcript" in event] == ["Hi there friend, bye"]
    assert events[-1] == "data: [DONE]\n\n"


def test_pcm16_input_audio_is_read_at_24_khz(client: openai.OpenAI, engine: RecordingEngine) -> None:
    tone = (0.2 * np.sin(np.arange(24_000) / 24_000 * 2 * np.pi * 440)).astype(np.float32)
    pcm = encode_audio_file(tone, 24_000, "pcm16")
    part = {"type": "input_audio", "input_audio": {"data": base64.b64encode(pcm).decode(), "format": "pcm16"}}
    client.chat.completions.create(model="omni-test", messages=[{"role": "user", "content": [part]}])
    (audio_part,) = engine.requests[-1].messages[0].parts
    assert audio_part.pcm.size == 16_000
    assert np.abs(audio_part.pcm).max() == pytest.approx(0.2, abs=0.01)
