"""The Twilio Media Streams door, end to end: calls placed by the `omnivox call` simulator and by a raw client."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import re
import time
import wave
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import numpy as np
import pytest
import websockets
from starlette.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from omnivox.pipeline.audio import float_to_pcm16, mulaw_encode, resample, synthesize_speech
from omnivox.pipeline.engines.base import Delta, ResponseRequest, TextPart
from omnivox.pipeline.engines.scripted import ESPEAK_VOICES, ScriptedEngine
from omnivox.server import telephony
from omnivox.server.app import create_app
from omnivox.server.phone_sim import CallOptions, CallResult, Utterance, format_report, run_call
from omnivox.server.telephony import FRAME_BYTES, parse_mark_name, twilio_signature
from tests.server_helpers import RunningServer, running_server, scripted_config

REPLY = "good morning how are you today"
VOICE = "ash"
WORDS_PER_MINUTE = 150


class RecordingEngine(ScriptedEngine):
    """The scripted engine, remembering each request and each answer cancelled mid-way."""

    def __init__(self) -> None:
        super().__init__(reply=REPLY, speed=2.0, words_per_minute=WORDS_PER_MINUTE)
        self.requests: list[ResponseRequest] = []
        self.cancelled = 0

    async def respond(self, request: ResponseRequest) -> AsyncIterator[Delta]:
        self.requests.append(request)
        try:
            async for delta in super().respond(request):
                yield delta
        except asyncio.CancelledError:
            self.cancelled += 1
            raise


@pytest.fixture(scope="module")
def engine() -> RecordingEngine:
    return RecordingEngine()


@pytest.fixture(scope="module")
def server(engine: RecordingEngine) -> Iterator[RunningServer]:
    with running_server(scripted_config(), engine) as running:
        yield running


def reply_seconds() -> float:
    return synthesize_speech(REPLY, 8000, ESPEAK_VOICES[VOICE], WORDS_PER_MINUTE).size / 8000


def call_options(server: RunningServer, *texts: str, **extra: Any) -> CallOptions:
    return CallOptions(
        url=f"{server.ws_url}/telephony/twilio",
        utterances=[Utterance.say(text) for text in texts],
        pause_s=0.2,
        agent_done_silence_s=0.6,
        turns_timeout_s=10,
        custom_parameters={"voice": VOICE},
        **extra,
    )


def assert_heard_whole_answers(result: CallResult) -> None:
    for turn in result.turns:
        assert turn.voice_to_voice_ms is not None, f"turn {turn.index} got no answer"
        assert turn.agent_heard_s == pytest.approx(reply_seconds(), abs=0.1)
        assert turn.underruns == [], f"turn {turn.index}: agent audio gaps {turn.gaps_ms} ms"


async def wait_until(condition: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


# ---------------------------------------------------------------- calls through the simulator


@pytest.mark.slow
async def test_two_turn_call_is_heard_whole_without_gaps(server: RunningServer, tmp_path: Path) -> None:
    record = tmp_path / "call.wav"
    result = await run_call(call_options(server, "hello there", "what time is it"), record)
    assert [turn.label for turn in result.turns] == ["hello there", "what time is it"]
    assert_heard_whole_answers(result)
    for turn in result.turns:
        assert 0 < turn.voice_to_voice_ms < 2000
        assert turn.barge_in_ms is None
    assert result.clears_s == []
    assert result.marks and not any(mark.by_clear for mark in result.marks)
    with wave.open(str(record)) as wav:
        assert (wav.getframerate(), wav.getnchannels()) == (8000, 2)
        assert wav.getnframes() == result.agent.size == result.caller.size
    assert "voice-to-voice ms: p50" in format_report(result)


@pytest.mark.slow
async def test_barge_in_clears_within_300_ms_and_truncates_at_the_echoed_mark(
    server: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="omnivox.server.telephony")
    options = call_options(server, "hello there", "stop, wait a second", barge_in_after_s=0.6)
    result = await run_call(options)
    first, second = result.turns
    assert second.barge_in_ms is not None and 0 < second.barge_in_ms <= 300
    assert first.agent_heard_s < reply_seconds() - 0.3, "the first answer was not cut short"
    assert second.agent_heard_s == pytest.approx(reply_seconds(), abs=0.1)
    assert second.underruns == []
    clear_s = result.clears_s[0]
    played = [parse_mark_name(m.name) for m in result.marks if not m.by_clear and m.at_s <= clear_s]
    truncated = [int(n) for n in re.findall(r"truncated at (\d+) ms", caplog.text)]
    assert len(truncated) == 1
    heard_positions = [ms for _, ms in played]
    # the mark echoed in the instant the clear was on its way may not have reached the server first
    racing = [m for m in result.marks if not m.by_clear and clear_s - 0.06 <= m.at_s <= clear_s]
    allowed = set(heard_positions[-2:]) if racing else {heard_positions[-1]}
    assert truncated[0] in allowed


@pytest.mark.slow
async def test_agent_speech_stays_intelligible_over_the_phone_line(server: RunningServer) -> None:
    from pocketsphinx import Decoder

    result = await run_call(call_options(server, "hello there"))
    (turn,) = result.turns
    start = int(turn.agent_start_s * 8000)
    answer = result.agent[start : start + int(turn.agent_heard_s * 8000) + 800]
    decoder = Decoder(samprate=16000, loglevel="FATAL")
    decoder.start_utt()
    decoder.process_raw(float_to_pcm16(resample(answer, 8000, 16000)), full_utt=True)
    decoder.end_utt()
    heard = set(decoder.hyp().hypstr.split()) if decoder.hyp() else set()
    words = REPLY.split()
    assert sum(word in heard for word in words) >= len(words) / 2, f"pocketsphinx heard {heard}"


# ---------------------------------------------------------------- a raw Twilio client: odd and hostile input

STREAM_SID = "MZ00000000000000000000000000000001"


def start_event(**custom: str) -> str:
    start = {
        "accountSid": "AC00000000000000000000000000000001",
        "streamSid": STREAM_SID,
        "callSid": "CA00000000000000000000000000000001",
        "tracks": ["inbound"],
        "customParameters": custom,
        "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
    }
    return json.dumps({"event": "start", "sequenceNumber": "1", "streamSid": STREAM_SID, "start": start})


def media_event(payload: str) -> str:
    return json.dumps({"event": "media", "streamSid": STREAM_SID, "media": {"track": "inbound", "payload": payload}})


async def say(ws: Any, text: str) -> None:
    """A caller utterance and the silence that ends the turn, sent faster than real time."""
    audio = np.concatenate([synthesize_speech(text, 8000), np.zeros(8000, np.float32)])
    data = mulaw_encode(audio)
    for start in range(0, len(data), FRAME_BYTES):
        await ws.send(media_event(base64.b64encode(data[start : start + FRAME_BYTES]).decode()))


async def first_media(ws: Any, timeout: float = 10.0) -> dict[str, Any]:
    async with asyncio.timeout(timeout):
        while True:
            message = json.loads(await ws.recv())
            if message["event"] == "media":
                return message


async def test_bad_input_is_ignored_and_the_call_still_works(server: RunningServer) -> None:
    silence = base64.b64encode(b"\xff" * FRAME_BYTES).decode()
    async with websockets.connect(f"{server.ws_url}/telephony/twilio") as ws:
        await ws.send(media_event(silence))  # before start
        await ws.send(json.dumps({"event": "dtmf", "dtmf": {"digit": "1"}}))  # before start
        await ws.send("this is not JSON")
        await ws.send("[1, 2, 3]")
        await ws.send(b"\x00\x01 binary")
        await ws.send(json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"}))
        await ws.send(start_event())
        await ws.send(json.dumps({"event": "ping"}))
        await ws.send(media_event("%%% not base64 %%%"))
        await ws.send(json.dumps({"event": "mark", "streamSid": STREAM_SID}))
        await ws.send(json.dumps({"event": "mark", "streamSid": STREAM_SID, "mark": {"name": "no-position"}}))
        await say(ws, "hello there")
        answer = await first_media(ws)
        assert answer["streamSid"] == STREAM_SID
        assert len(base64.b64decode(answer["media"]["payload"])) == FRAME_BYTES
        await ws.send(json.dumps({"event": "stop", "streamSid": STREAM_SID, "stop": {}}))
    await wait_until(lambda: server.state.sessions_open == 0)


async def test_stop_mid_answer_cancels_the_engine_and_call_settings_and_digits_reach_it(
    server: RunningServer, engine: RecordingEngine
) -> None:
    cancelled = engine.cancelled
    async with websockets.connect(f"{server.ws_url}/telephony/twilio") as ws:
        await ws.send(start_event(voice="ash", instructions="Answer in one sentence."))
        await ws.send(json.dumps({"event": "dtmf", "streamSid": STREAM_SID, "dtmf": {"digit": "5"}}))
        await say(ws, "hello there")
        await first_media(ws)
        await ws.send(json.dumps({"event": "stop", "streamSid": STREAM_SID, "stop": {}}))
        async with asyncio.timeout(5):
            await ws.wait_closed()
    await wait_until(lambda: engine.cancelled == cancelled + 1 and server.state.sessions_open == 0)
    request = engine.requests[-1]
    assert (request.voice, request.instructions) == ("ash", "Answer in one sentence.")
    user_text = [p.text for m in request.messages if m.role == "user" for p in m.parts if isinstance(p, TextPart)]
    assert "5" in user_text


async def test_dropped_socket_mid_answer_cancels_the_engine_and_frees_the_slot(
    server: RunningServer, engine: RecordingEngine
) -> None:
    cancelled = engine.cancelled
    ws = await websockets.connect(f"{server.ws_url}/telephony/twilio")
    await ws.send(start_event())
    await say(ws, "hello there")
    await first_media(ws)
    ws.transport.abort()
    await wait_until(lambda: engine.cancelled == cancelled + 1 and server.state.sessions_open == 0)


# ---------------------------------------------------------------- the TwiML webhook

INCOMING = "/telephony/twilio/incoming"
CALL_PARAMS = {"CallSid": "CA1234567890ABCDE", "From": "+14158675310", "To": "+18005551212"}


def webhook_client(**telephony: Any) -> TestClient:
    config = scripted_config(server={"public_host": "voice.example.com"}, telephony=telephony)
    return TestClient(create_app(config, ScriptedEngine()))


def test_incoming_call_is_connected_to_the_media_stream() -> None:
    app = create_app(scripted_config(), ScriptedEngine())
    response = TestClient(app).post(INCOMING, data=CALL_PARAMS, headers={"host": "agent.local:8000"})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/xml")
    assert '<Connect><Stream url="wss://agent.local:8000/telephony/twilio"/></Connect>' in response.text
    public = webhook_client().post(INCOMING, data=CALL_PARAMS)
    assert 'url="wss://voice.example.com/telephony/twilio"' in public.text


def test_twilio_signature_matches_twilios_published_example() -> None:
    params = {"CallSid": "CA1234567890ABCDE", "Caller": "+14158675310", "Digits": "1234"}
    params |= {"From": "+14158675310", "To": "+18005551212"}
    url = "https://mycompany.com/myapp.php?foo=1&bar=2"
    assert twilio_signature("12345", url, params) == "GvWf1cFY/Q7PnoempGyD5oXAezc="


def test_incoming_call_needs_a_valid_signature_when_a_token_is_set() -> None:
    client = webhook_client(twilio_auth_token="secret-token")
    signature = twilio_signature("secret-token", f"https://voice.example.com{INCOMING}", CALL_PARAMS)
    body = urlencode(CALL_PARAMS)
    form = {"content-type": "application/x-www-form-urlencoded"}
    signed = client.post(INCOMING, content=body, headers={**form, "x-twilio-signature": signature})
    assert signed.status_code == 200 and "<Stream" in signed.text
    assert client.post(INCOMING, content=body, headers=form).status_code == 403
    tampered = urlencode({**CALL_PARAMS, "From": "+15555550100"})
    assert client.post(INCOMING, content=tampered, headers={**form, "x-twilio-signature": signature}).status_code == 403


def test_with_api_keys_only_signed_twiml_carries_a_key_and_streams_need_it() -> None:
    config = scripted_config(
        server={"public_host": "voice.example.com", "api_keys": ["sk-phone"]},
        telephony={"twilio_auth_token": "secret-token"},
    )
    client = TestClient(create_app(config, ScriptedEngine()))
    signature = twilio_signature("secret-token", f"https://voice.example.com{INCOMING}", CALL_PARAMS)
    twiml = client.post(INCOMING, data=CALL_PARAMS, headers={"x-twilio-signature": signature}).text
    assert '<Parameter name="api_key" value="sk-phone"/>' in twiml
    for custom, expected_close in (({}, 1008), ({"api_key": "sk-wrong"}, 1008), ({"api_key": "sk-phone"}, 1000)):
        with client.websocket_connect("/telephony/twilio") as ws:
            ws.send_text(start_event(**custom))
            ws.send_text(json.dumps({"event": "stop", "streamSid": STREAM_SID, "stop": {}}))
            with pytest.raises(WebSocketDisconnect) as closed:
                ws.receive_text()
        assert closed.value.code == expected_close, custom


def test_a_connection_that_never_starts_is_dropped_and_frees_its_slot(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(telephony, "START_TIMEOUT_S", 0.2)
    app = create_app(scripted_config(), ScriptedEngine())
    with TestClient(app).websocket_connect("/telephony/twilio") as ws:
        ws.send_text(json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"}))
        with pytest.raises(WebSocketDisconnect):
            ws.receive_text()
    assert app.state.omnivox.sessions_open == 0
