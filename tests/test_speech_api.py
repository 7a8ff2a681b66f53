"""`POST /v1/audio/speech` through a real server with the official `openai` SDK: streamed audio in every format,
spoken by the bundled Piper voice, recognisable, and every hostile value refused with an OpenAI error."""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence

import httpx
import numpy as np
import openai
import pytest

from omnivox.pipeline.audio import pcm16_to_float, resample
from omnivox.pipeline.engines.base import AudioDelta, TextDelta
from omnivox.pipeline.engines.scripted import ScriptedEngine
from omnivox.pipeline.media import AUDIO_CONTAINERS, AudioLimits, decode_audio_native
from omnivox.pipeline.recognisers import PocketsphinxRecogniser
from omnivox.pipeline.tts import RemoteSpeechSettings, TtsSettings, create_tts_stage
from omnivox.pipeline.tts.base import SpeechChunk
from omnivox.pipeline.tts.stage import TtsStage
from tests.server_helpers import RunningServer, running_server, scripted_config
from tests.test_tts import FakeBackend

SENTENCE = "The quick brown fox jumps over the lazy dog. It was a sunny day."
KEY = "sk-speech"


@pytest.fixture(scope="module")
def server() -> Iterator[RunningServer]:
    config = scripted_config(server={"api_keys": [KEY]}, tts={"max_input_chars": 300})
    with running_server(config) as running:
        yield running


@pytest.fixture(scope="module")
def client(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.http_url}/v1", api_key=KEY, max_retries=0)


def recognised(samples: np.ndarray, rate: int) -> set[str]:
    return set(PocketsphinxRecogniser().recognise(resample(samples, rate, 16_000)).split())


@pytest.mark.slow
def test_pcm_streams_as_it_is_made_and_is_recognisable(client: openai.OpenAI) -> None:
    started = time.monotonic()
    arrivals: list[tuple[float, int]] = []
    with client.audio.speech.with_streaming_response.create(
        model="tts-1", voice="alloy", input=SENTENCE, response_format="pcm"
    ) as response:
        assert response.headers["content-type"] == "audio/pcm"
        data = b""
        for piece in response.iter_bytes():
            data += piece
            arrivals.append((time.monotonic() - started, len(data)))
    samples = pcm16_to_float(data)
    seconds = samples.size / 24_000
    assert 3 < seconds < 8
    first_at, _ = arrivals[0]
    assert first_at < arrivals[-1][0], "the audio came in one piece, not streamed"
    assert {"fox", "dog"} <= recognised(samples, 24_000)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["wav", "mp3", "opus", "flac"])
def test_every_format_decodes_to_the_same_speech(client: openai.OpenAI, fmt: str) -> None:
    response = client.audio.speech.create(model="gpt-4o-mini-tts", voice="coral", input=SENTENCE, response_format=fmt)
    samples, rate = decode_audio_native(response.content, allowed=AUDIO_CONTAINERS, limits=AudioLimits(60))
    assert 3 < samples.size / rate < 8
    assert {"fox", "dog"} <= recognised(samples, rate)


@pytest.mark.slow
def test_sse_stream_format_sends_delta_events_then_done(server: RunningServer) -> None:
    body = {"model": "tts-1", "voice": "alloy", "input": "Hello there.", "response_format": "pcm"}
    body["stream_format"] = "sse"
    with httpx.stream(
        "POST", f"{server.http_url}/v1/audio/speech", json=body, headers={"Authorization": f"Bearer {KEY}"}
    ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[5:]) for line in response.iter_lines() if line.startswith("data:")]
    assert [e["type"] for e in events[:-1]] == ["speech.audio.delta"] * (len(events) - 1)
    assert events[-1]["type"] == "speech.audio.done"
    audio = b"".join(base64.b64decode(e["audio"]) for e in events[:-1])
    assert 0.5 < len(audio) / 48_000 < 3


def test_speed_changes_the_length(client: openai.OpenAI) -> None:
    lengths = [
        len(
            client.audio.speech.create(
                model="tts-1", voice="alloy", input="One two three four.", speed=speed, response_format="pcm"
            ).content
        )
        for speed in (1.0, 2.0)
    ]
    assert lengths[1] < 0.7 * lengths[0]


@pytest.mark.parametrize(
    ("changes", "status", "param"),
    [
        ({"input": "x" * 301}, 400, "input"),
        ({"input": ""}, 400, "input"),
        ({"speed": 4.5}, 400, "speed"),
        ({"speed": 0.1}, 400, "speed"),
        ({"response_format": "aac"}, 400, "response_format"),
        ({"voice": "nobody-knows-me"}, 400, "voice"),
        ({"voice": "v" * 65}, 400, "voice"),
        ({"model": ""}, 400, "model"),
    ],
)
def test_hostile_values_get_openai_errors(
    server: RunningServer, changes: dict[str, object], status: int, param: str
) -> None:
    body = {"model": "tts-1", "voice": "alloy", "input": "Hello.", **changes}
    response = httpx.post(f"{server.http_url}/v1/audio/speech", json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert response.status_code == status
    assert response.json()["error"]["param"] == param


def test_the_api_key_is_checked_first(server: RunningServer) -> None:
    response = httpx.post(f"{server.http_url}/v1/audio/speech", content=b"{not json")
    assert response.status_code == 401


def test_a_body_far_over_the_input_limit_is_refused_before_it_is_read(server: RunningServer) -> None:
    body = json.dumps({"model": "tts-1", "voice": "alloy", "input": "x" * 100_000})
    response = httpx.post(
        f"{server.http_url}/v1/audio/speech",
        content=body,
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
    )
    assert response.status_code == 413


@pytest.mark.slow
async def test_one_omnivox_is_another_ones_tts_backend(server: RunningServer) -> None:
    """The remote speech backend reads this server's streamed pcm; the espeak-ng backend speaks too."""
    remote = TtsSettings(
        backend="remote", remote=RemoteSpeechSettings(url=f"{server.http_url}/v1", api_key=KEY, model="tts-1")
    )
    for settings in (remote, TtsSettings(backend="espeak")):
        stage = create_tts_stage(settings)
        await stage.start()
        try:

            async def text() -> AsyncIterator[str]:
                yield "The quick brown fox jumps "
                yield "over the lazy dog."

            deltas = [delta async for delta in stage.speak(text(), "alloy")]
        finally:
            await stage.close()
        spoken = "".join(d.text for d in deltas if isinstance(d, TextDelta))
        audio = np.concatenate([d.pcm for d in deltas if isinstance(d, AudioDelta)])
        assert spoken == "The quick brown fox jumps over the lazy dog."
        assert stage.rate == 24_000 and 1.5 < audio.size / stage.rate < 5
        if settings.backend == "remote":  # Piper's voice through the hop; pocketsphinx hardly knows espeak-ng's
            assert {"fox", "dog"} <= recognised(audio, stage.rate)


# ---------------------------------------------------------------------------------------------- how many at once


class GatedBackend(FakeBackend):
    """Holds every clause until `start_gate` opens, and the rest of a clause after its first chunk until `rest_gate`
    opens; at the speech door's rate, so the first chunk goes out as it is (no resampler delay)."""

    rate = 24_000

    def __init__(self) -> None:
        super().__init__()
        self.start_gate = threading.Event()
        self.rest_gate = threading.Event()

    async def synthesize(self, words: Sequence[str], voice: str, speed: float) -> AsyncIterator[SpeechChunk]:
        await until_set(self.start_gate)
        first = True
        async for chunk in super().synthesize(words, voice, speed):
            if not first:
                await until_set(self.rest_gate)
            first = False
            yield chunk


async def until_set(gate: threading.Event) -> None:
    while not gate.is_set():
        await asyncio.sleep(0.01)


async def eventually(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


@pytest.fixture
def gated() -> Iterator[tuple[RunningServer, GatedBackend]]:
    """A server whose TTS stage (one synthesis thread, one more request may wait) speaks only when told to."""
    backend = GatedBackend()
    config = scripted_config(tts={"workers": 1, "max_queued_requests": 1})
    with running_server(config, ScriptedEngine(tts=TtsStage(backend))) as server:
        yield server, backend


SPEECH = {"model": "tts-1", "voice": "alloy", "input": "Hello there, how are you?", "response_format": "pcm"}


async def test_speech_requests_beyond_the_queue_are_refused_busy_and_places_come_back(
    gated: tuple[RunningServer, GatedBackend],
) -> None:
    server, backend = gated
    async with httpx.AsyncClient(base_url=server.http_url, timeout=30) as client:
        held = [asyncio.create_task(client.post("/v1/audio/speech", json=SPEECH)) for _ in range(2)]
        await eventually(lambda: server.state.speech_requests == 2)
        refused = await client.post("/v1/audio/speech", json=SPEECH)
        assert refused.status_code == 429
        assert (refused.json()["error"]["code"], refused.json()["error"]["type"]) == ("server_busy", "rate_limit_error")
        backend.start_gate.set()
        backend.rest_gate.set()
        answers = await asyncio.gather(*held)
        assert [answer.status_code for answer in answers] == [200, 200]
        assert all(len(answer.content) / 48_000 > 0.15 for answer in answers)
        await eventually(lambda: server.state.speech_requests == 0)
        assert (await client.post("/v1/audio/speech", json=SPEECH)).status_code == 200
    metrics = httpx.get(f"{server.http_url}/metrics").text
    assert 'omnivox_protocol_errors_total{code="server_busy",door="http_speech"} 1.0' in metrics


async def test_a_client_that_leaves_mid_stream_gives_its_place_back(gated: tuple[RunningServer, GatedBackend]) -> None:
    server, backend = gated
    backend.start_gate.set()  # the first chunk of each clause comes, the rest never does
    async with httpx.AsyncClient(base_url=server.http_url, timeout=30) as client:
        for _ in range(3):  # more than the places: each is given back
            async with client.stream("POST", "/v1/audio/speech", json=SPEECH) as response:
                assert response.status_code == 200
                assert await anext(response.aiter_bytes())
            await eventually(lambda: server.state.speech_requests == 0)
