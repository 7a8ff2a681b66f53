"""Turn taking through real server doors (Realtime WebSocket and Twilio telephony), real models (silero, Smart Turn,
WebRTC AEC3), callers streaming espeak-ng speech in real time; the agent's own voice is played back into the caller's
microphone where a test says so (`tests/echo_caller.py`)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import numpy as np
import pytest

from omnivox.pipeline.audio import synthesize_speech
from omnivox.pipeline.engines.scripted import ESPEAK_VOICES, ScriptedEngine
from omnivox.pipeline.turns import SEMANTIC_EAGERNESS
from omnivox.server.config import Config
from tests.echo_caller import RATE, Echo, EchoCaller, TwilioEchoCaller, voice
from tests.server_helpers import RunningServer, running_server, scripted_config

pytestmark = pytest.mark.slow

REPLY = "Sure. On Monday it will be sunny and warm, and on Tuesday clouds come in from the west with some rain."
QUESTION = "Tell me about the weather this week."
MAX_STOP_MS = 250


@pytest.fixture(scope="module")
def server() -> Iterator[RunningServer]:
    with running_server(scripted_config(), ScriptedEngine(reply=REPLY)) as running:
        yield running


def spoken_seconds() -> float:
    """The whole answer as the scripted engine speaks it."""
    words_per_minute = ScriptedEngine(reply=REPLY).words_per_minute
    return synthesize_speech(REPLY, RATE, ESPEAK_VOICES["alloy"], words_per_minute).size / RATE


def reply_seconds(caller: EchoCaller) -> float:
    deltas = [e for _, e in caller.events if e["type"] == "response.output_audio.delta"]
    return sum(len(e["delta"]) * 3 // 4 for e in deltas) / 2 / RATE


async def ask(caller: EchoCaller) -> tuple[float, str]:
    await asyncio.sleep(0.3)
    caller.say(voice(QUESTION, "en-us", 170))
    at, first = await caller.wait_for("response.output_audio.delta", timeout=20)
    return at, first["response_id"]


async def answer_status(caller: EchoCaller, after: float) -> str:
    _, done = await caller.wait_for("response.done", timeout=30, after=after)
    return done["response"]["status"]


# ---------------------------------------------------------------- semantic_vad


async def turn_end_ms(server: RunningServer, turn_detection: dict, speech: list[np.ndarray]) -> tuple[float, int]:
    """Caller's end of speech -> `speech_stopped`, and how many turns the speech became (no answers in between)."""
    session = {"audio": {"input": {"turn_detection": {**turn_detection, "create_response": False}}}}
    async with EchoCaller(server.ws_url, session, noise_dbfs=-60.0) as caller:
        await asyncio.sleep(0.3)
        for part in speech:
            caller.say(part)
        stopped_at, _ = await caller.wait_for("input_audio_buffer.speech_stopped", timeout=20)
        while caller.saying:
            await asyncio.sleep(0.05)
        await asyncio.sleep(SEMANTIC_EAGERNESS["auto"].max_silence_ms / 1000 + 0.5)
        return (stopped_at - caller.ends[-1]) * 1000, len(caller.of_type("input_audio_buffer.speech_stopped"))


async def test_semantic_vad_answers_a_complete_question_sooner_and_waits_through_a_mid_sentence_pause(
    server: RunningServer,
) -> None:
    question = voice("Can you tell me about the weather in Paris tomorrow?", "en-us", 170)
    semantic_ms, turns = await turn_end_ms(server, {"type": "semantic_vad"}, [question])
    longest = SEMANTIC_EAGERNESS["auto"].max_silence_ms
    assert turns == 1
    assert semantic_ms < longest - 500, "the model did not end a complete question early"
    server_vad_ms, _ = await turn_end_ms(server, {"type": "server_vad"}, [question])
    # sooner than server_vad too on an idle machine; the model's ~85 ms of CPU can take 3x that on a loaded one
    print(f"\nend of speech -> speech_stopped: semantic_vad {semantic_ms:.0f} ms, server_vad {server_vad_ms:.0f} ms")
    assert server.state.metrics.end_of_turn_seconds._sum.get() > 0  # the real model answered

    first = voice("I would like to book a table for, uhm,", "en-us", 140)
    rest = voice("four people tonight.", "en-us", 140)
    pause = np.zeros(int(0.9 * RATE), np.float32)
    _, turns = await turn_end_ms(server, {"type": "semantic_vad"}, [first, pause, rest])
    assert turns == 1, "semantic_vad cut the caller at a 900 ms mid-sentence pause"
    _, turns = await turn_end_ms(server, {"type": "server_vad"}, [first, pause, rest])
    assert turns == 2, "server_vad should cut there (500 ms of silence): the case proves nothing"


# ---------------------------------------------------------------- echo


def paused(caller: EchoCaller, response_id: str) -> bool:
    """Did the answer's audio stop arriving for a while (a pause for suspected speech), past its first 200 ms lead?"""
    arrivals = [
        at for at, e in caller.events if e["type"] == "response.output_audio.delta" and e["response_id"] == response_id
    ]
    return bool(np.diff(arrivals).max() >= 0.25)


@pytest.mark.parametrize("cancellation", [True, False])
async def test_the_agents_own_echo_interrupts_it_only_without_echo_cancellation(
    server: RunningServer, cancellation: bool
) -> None:
    session = {"audio": {"input": {"echo_cancellation": cancellation}}}
    async with EchoCaller(server.ws_url, session, echo=Echo(150, -6), noise_dbfs=-50.0) as caller:
        started, response_id = await ask(caller)
        status = await answer_status(caller, started)
    interrupted = status == "cancelled" or paused(caller, response_id)
    if cancellation:
        assert status == "completed" and not interrupted, "the agent interrupted itself on its own echo"
        assert reply_seconds(caller) == pytest.approx(spoken_seconds(), abs=0.05)
    else:
        assert interrupted, "without cancellation the echo must interrupt (else this test proves nothing)"


def telephony_config(echo_cancellation: bool) -> Config:
    return scripted_config(audio={"echo_cancellation": {"telephony": echo_cancellation}})


async def phone_call_with_echo(cancellation: bool) -> tuple[TwilioEchoCaller, float]:
    """A call whose line returns the agent's voice 100 ms late, 6 dB down; the caller asks and stays silent."""
    with running_server(telephony_config(cancellation), ScriptedEngine(reply=REPLY)) as phone_server:
        async with TwilioEchoCaller(phone_server.ws_url, echo=Echo(100, -6), noise_dbfs=-50.0) as caller:
            await asyncio.sleep(0.3)
            caller.say(voice(QUESTION, "en-us", 170))
            await caller.wait_for("twilio.media", timeout=20)
            await asyncio.sleep(spoken_seconds() + 2.0)
        return caller, phone_server.state.metrics.barge_ins.labels("telephony")._value.get()


async def test_echo_on_a_phone_line_stops_the_agent_only_without_echo_cancellation() -> None:
    cancelled, cancelled_barge_ins = await phone_call_with_echo(True)
    raw, raw_barge_ins = await phone_call_with_echo(False)
    print(
        f"\nphone line echo: with cancellation {len(cancelled.clears)} pauses, {cancelled_barge_ins:.0f} barge-ins; "
        f"without {len(raw.clears)} pauses, {raw_barge_ins:.0f} barge-ins"
    )
    assert cancelled_barge_ins == 0, "the agent cancelled its answer on its own echo"
    assert cancelled.received_seconds() >= spoken_seconds() - 0.05, "the caller did not hear the whole answer"
    assert len(raw.clears) + raw_barge_ins >= 2, "without cancellation the echo must stop the agent"
    assert len(cancelled.clears) < len(raw.clears)


# ---------------------------------------------------------------- false and real interruptions


@pytest.mark.parametrize("kind", ["backchannel", "door"])
async def test_a_backchannel_or_a_noise_pauses_the_answer_which_resumes_whole(server: RunningServer, kind: str) -> None:
    if kind == "backchannel":
        sound = voice("yeah", "en-gb", 160)
    else:
        rng = np.random.default_rng(1)
        length = int(0.25 * RATE)
        sound = (0.5 * rng.normal(0, 1, length) * np.exp(-np.arange(length) / (0.05 * RATE))).astype(np.float32)
    async with EchoCaller(server.ws_url, noise_dbfs=-55.0) as caller:
        started, _ = await ask(caller)
        await asyncio.sleep(max(0.0, started + 1.2 - time.monotonic()))
        caller.say(sound)
        status = await answer_status(caller, started)
        full = reply_seconds(caller)
    onset = caller.onsets[-1]
    arrivals = [at for at, e in caller.events if e["type"] == "response.output_audio.delta" and at > onset]
    gaps = np.diff(arrivals)
    assert status == "completed"
    assert not caller.of_type("input_audio_buffer.speech_started")[1:], "the client was told of a turn"
    assert full == pytest.approx(spoken_seconds(), abs=0.05), "part of the answer was lost"
    if kind == "backchannel":
        assert gaps.max() >= 0.25, "the answer should pause while the caller made a sound"


async def test_a_real_barge_in_over_echo_stops_the_agent_within_250_ms(server: RunningServer) -> None:
    async with EchoCaller(server.ws_url, echo=Echo(150, -10), noise_dbfs=-50.0) as caller:
        started, response_id = await ask(caller)
        await asyncio.sleep(max(0.0, started + 1.5 - time.monotonic()))
        caller.say(voice("Wait, stop, I have another question about that.", "en-us+f3", 160))
        _, done = await caller.wait_for("response.done", timeout=20, after=started)
    onset = caller.onsets[-1]
    deltas = [
        at for at, e in caller.events if e["type"] == "response.output_audio.delta" and e["response_id"] == response_id
    ]
    stopped_ms = (max(deltas) - onset) * 1000
    print(f"\nbarge-in over echo: last agent audio {stopped_ms:.0f} ms after the caller's onset")
    assert done["response"]["status_details"] == {"type": "cancelled", "reason": "turn_detected"}
    assert -100 < stopped_ms <= MAX_STOP_MS
