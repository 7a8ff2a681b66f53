"""Protocol gaps third-party clients hit, through a real server: 16 kHz caller audio on the Realtime door (GA
`audio/pcm` with a rate, and the beta `pcm16` name at the configured rate) and model names on the Realtime door."""

from __future__ import annotations

import json
from typing import Any

import pytest
import websockets

from tests.audio_fixtures import b64, caller_audio, encode, stream_realtime
from tests.server_helpers import RunningServer, running_server, scripted_config


async def speech_turn(server: RunningServer, session_update: dict[str, Any], beta: bool, rate: int) -> dict[str, Any]:
    """Speech at `rate` streamed in real time with server VAD; returns the VAD's events and the true speech span."""
    caller = caller_audio([0.5, "What is the weather like today?", 1.0], rate=rate)
    headers = {"OpenAI-Beta": "realtime=v1"} if beta else {}
    url = f"{server.ws_url}/v1/realtime?model=gpt-realtime"
    events: dict[str, Any] = {}
    async with websockets.connect(url, additional_headers=headers) as ws:
        events["created"] = json.loads(await ws.recv())
        await ws.send(json.dumps({"type": "session.update", "session": session_update}))

        async def send(chunk: bytes) -> None:
            await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": b64(chunk)}))

        while (event := json.loads(await ws.recv()))["type"] != "session.updated":
            assert event["type"] != "error", event
        events["updated"] = event
        # stream_realtime paces 24 kHz chunks: at rate/24000 the same bytes are real time at `rate`
        await stream_realtime(send, encode(caller.samples), speed=rate / 24_000)
        while "speech_stopped" not in events:
            event = json.loads(await ws.recv())
            assert event["type"] != "error", event
            if event["type"].startswith("input_audio_buffer.speech_"):
                events[event["type"].rsplit(".", 1)[1]] = event
    events["span_ms"] = caller.speech_spans_ms[0]
    return events


@pytest.mark.slow
@pytest.mark.parametrize("beta", [False, True], ids=["ga-audio-pcm-16000", "beta-pcm16-at-16000"])
async def test_16_khz_caller_audio_is_heard_at_its_own_rate(beta: bool) -> None:
    """The VAD's speech times match the true speech of 16 kHz audio: read as 24 kHz they would be 1.5x off."""
    config = scripted_config(audio={"beta_pcm16_input_rate": 16000})
    if beta:
        update: dict[str, Any] = {"input_audio_format": "pcm16", "turn_detection": {"type": "server_vad"}}
    else:
        update = {"type": "realtime", "audio": {"input": {"format": {"type": "audio/pcm", "rate": 16000}}}}
    with running_server(config) as server:
        events = await speech_turn(server, update, beta, 16_000)
    start_ms, end_ms = events["span_ms"]
    assert events["speech_started"]["audio_start_ms"] == pytest.approx(start_ms - 300, abs=120)  # prefix padding 300 ms
    assert events["speech_stopped"]["audio_end_ms"] == pytest.approx(end_ms, abs=150)
    if beta:
        assert events["updated"]["session"]["input_audio_format"] == "pcm16"
    else:
        assert events["updated"]["session"]["audio"]["input"]["format"] == {"type": "audio/pcm", "rate": 16000}


async def test_strict_model_names_on_the_realtime_door() -> None:
    with running_server(scripted_config(models={"strict": True})) as server:
        async with websockets.connect(f"{server.ws_url}/v1/realtime?model=gpt-realtime") as ws:
            assert json.loads(await ws.recv())["type"] == "session.created"
        async with websockets.connect(f"{server.ws_url}/v1/realtime?model=gpt-5-turbo") as ws:
            refused = json.loads(await ws.recv())
            with pytest.raises(websockets.ConnectionClosed):
                await ws.recv()
    assert refused["error"]["code"] == "model_not_found"
    assert ws.close_code == 1008
