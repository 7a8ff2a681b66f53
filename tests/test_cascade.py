"""The cascade engine: an LLM stage that answers in text and the TTS stage that speaks it.

The core's exact truncation for engines whose words come with their audio; the engine over a fake LLM stage (what
an LLM that does not hear or see gets); and end to end through a real server with the bundled Piper voice and a
stand-in LLM server on loopback: a Realtime turn, a chat completion, a phone call, and a barge-in whose next turn
carries exactly the words whose audio the caller was sent.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator, Iterator
from typing import Any

import numpy as np
import openai
import pytest

from omnivox.pipeline.audio import float_to_pcm16, resample
from omnivox.pipeline.engines import create_engine
from omnivox.pipeline.engines.base import (
    AudioDelta,
    AudioPart,
    Delta,
    ImagePart,
    Message,
    ResponseRequest,
    TextDelta,
    TextPart,
    ToolCallDelta,
    Usage,
)
from omnivox.pipeline.engines.cascade import CascadeEngine, LlmRecogniser
from omnivox.pipeline.engines.llm_remote import RemoteLlmStage
from omnivox.pipeline.recognisers import PocketsphinxRecogniser
from omnivox.pipeline.tts.stage import TtsStage
from omnivox.server.app import create_tts
from omnivox.server.config import load_config
from tests.audio_fixtures import Microphone, silence, speech
from tests.cascade_helpers import TextLlmStandIn, cascade_config, llm_server
from tests.core_helpers import CoreDriver, tone
from tests.server_helpers import RunningServer, phone_turn, running_server
from tests.test_conformance import Wire, connect
from tests.test_tts import FakeBackend

ANSWER = "Sure, the weather will be sunny and warm today. Tomorrow brings clouds and a little rain."
LONG_ANSWER = (
    "Let me tell you about the weather this week. On Monday it will be sunny and warm, and on Tuesday clouds come "
    "in from the west. By Wednesday we expect heavy rain across the whole region, and Thursday stays grey and cold. "
    "Friday finally brings the sun back, just in time for the weekend."
)


# ---------------------------------------------------------------------------------------------- the core


def test_words_released_with_their_audio_are_truncated_exactly() -> None:
    driver = CoreDriver.create(text_follows_audio=True)
    driver.stream_audio(np.concatenate([silence(0.5, 16_000), tone(0.8), silence(0.7, 16_000)]))
    words = [f"{'' if i == 0 else ' '}word{i}" for i in range(20)]
    for word in words:  # each word begins 300 ms after the one before it
        driver.engine(TextDelta(word))
        driver.engine(AudioDelta(tone(0.3, 24_000)))
    driver.stream_audio(silence(1.0, 16_000))  # one second of the answer plays
    driver.stream_audio(tone(1.0))  # an interruption (longer than a backchannel)
    truncated = driver.of_type("conversation.item.truncated")[-1].payload["audio_end_ms"]
    heard = driver.session.conversation.items[1].heard_text()
    begun = [word for index, word in enumerate(words) if index * 300 < truncated]
    assert heard == "".join(begun)
    assert 3 <= len(begun) < len(words)


# ---------------------------------------------------------------------------------------------- the engine


class FakeLlm:
    """An LLM stage that answers with fixed tokens (text, or any other delta) and remembers what it was asked."""

    model_id = "fake-llm"

    def __init__(self, tokens: list[str | Delta], *, hears_audio: bool = True, sees_images: bool = True) -> None:
        self.tokens = tokens
        self.hears_audio = hears_audio
        self.sees_images = sees_images
        self.requests: list[ResponseRequest] = []
        self.ready = True

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def stream(self, request: ResponseRequest) -> AsyncIterator[Delta]:
        self.requests.append(request)
        for token in self.tokens:
            await asyncio.sleep(0)
            yield TextDelta(token) if isinstance(token, str) else token
        yield Usage(input_tokens=5, output_tokens=len(self.tokens))


class CountingRecogniser:
    def __init__(self) -> None:
        self.calls = 0

    async def transcribe(self, audio: np.ndarray, language: str | None = None, prompt: str = "") -> str:
        self.calls += 1
        return f"clip of {audio.size} samples"

    async def close(self) -> None:
        pass


def fake_cascade(llm: FakeLlm, recogniser: CountingRecogniser | None = None) -> CascadeEngine:
    return CascadeEngine(
        "fake-llm", tts=TtsStage(FakeBackend()), llm=llm, recogniser=recogniser or CountingRecogniser()
    )


async def test_the_answer_is_spoken_with_its_words_and_usage_comes_last() -> None:
    engine = fake_cascade(FakeLlm(["Hello", " there.", " How", " are", " you?"]))
    request = ResponseRequest(messages=(Message("user", (TextPart("hi"),)),), output_audio=True)
    deltas = [delta async for delta in engine.respond(request)]
    assert "".join(d.text for d in deltas if isinstance(d, TextDelta)) == "Hello there. How are you?"
    assert sum(d.pcm.size for d in deltas if isinstance(d, AudioDelta)) == 5 * 1000
    assert isinstance(deltas[-1], Usage)
    assert engine.llm.requests[0].output_audio is False


async def test_a_call_passes_through_after_the_words_before_it_are_spoken() -> None:
    call = ToolCallDelta(0, name="get_weather", arguments='{"city": "Paris"}', call_id="call_1")
    engine = fake_cascade(FakeLlm(["Let", " me", " check", call]))
    request = ResponseRequest(messages=(Message("user", (TextPart("weather?"),)),), output_audio=True)
    deltas = [delta async for delta in engine.respond(request)]
    at = deltas.index(call)
    assert "".join(d.text for d in deltas[:at] if isinstance(d, TextDelta)) == "Let me check"
    assert sum(d.pcm.size for d in deltas[:at] if isinstance(d, AudioDelta)) == 3 * 1000
    assert deltas[at + 1 :] == [Usage(input_tokens=5, output_tokens=4)]


async def test_text_only_responses_are_the_llm_stream_untouched() -> None:
    engine = fake_cascade(FakeLlm(["Just", " text"]))
    request = ResponseRequest(messages=(Message("user", (TextPart("hi"),)),), output_audio=False)
    deltas = [delta async for delta in engine.respond(request)]
    assert deltas == [TextDelta("Just"), TextDelta(" text"), Usage(input_tokens=5, output_tokens=2)]


async def test_an_llm_that_does_not_hear_gets_each_clip_transcribed_once_and_no_images() -> None:
    llm = FakeLlm(["Ok."], hears_audio=False, sees_images=False)
    recogniser = CountingRecogniser()
    engine = fake_cascade(llm, recogniser)
    first, second = np.zeros(1600, np.float32), np.zeros(3200, np.float32)
    turn_1 = Message("user", (AudioPart(first), ImagePart(b"png", "image/png")))
    request = ResponseRequest(messages=(turn_1,), output_audio=False)
    [d async for d in engine.respond(request)]
    turn_2 = Message("user", (AudioPart(second), TextPart("and this")))
    request = ResponseRequest(messages=(turn_1, Message("assistant", (TextPart("Ok."),)), turn_2), output_audio=False)
    [d async for d in engine.respond(request)]
    assert recogniser.calls == 2, "the first turn's clip was transcribed again"
    sent = llm.requests[-1].messages
    assert sent[0].parts == (TextPart("clip of 1600 samples"),)
    assert sent[2].parts == (TextPart("clip of 3200 samples"), TextPart("and this"))


def cascade_from_config(llm: dict[str, Any]) -> Any:
    config = load_config(
        overrides={"engine": {"name": "cascade", "model": "m", "options": {"cascade": {"llm": llm}}}}, environ={}
    )
    options = config.engine.engine_options()
    return create_engine("cascade", "m", options, tts=create_tts(config))


def test_the_default_options_build_either_llm_stage() -> None:
    remote = cascade_from_config({"remote": {"url": "http://llm:8000/v1"}})
    assert isinstance(remote.llm, RemoteLlmStage) and remote.llm.hears_audio
    assert isinstance(remote.recogniser, LlmRecogniser)
    local = cascade_from_config({"kind": "phi4-mm", "phi4-mm": {"device": "cpu"}})
    assert type(local.llm).__name__ == "Phi4MmStage"
    deaf = cascade_from_config({"remote": {"url": "http://llm:8000", "audio": "none"}})
    assert isinstance(deaf.recogniser, PocketsphinxRecogniser)
    with pytest.raises(ValueError, match=r"llm\.remote\.url"):
        cascade_from_config({})
    with pytest.raises(ValueError, match="unknown keys"):
        cascade_from_config({"url": "http://llm:8000"})


# ---------------------------------------------------------------------------------------------- end to end


class RecordingCascade:
    """Keeps the deltas the cascade engine yielded per response (what the session core was given)."""

    def __init__(self, inner: CascadeEngine) -> None:
        self.inner = inner
        self.name, self.model_id = inner.name, inner.model_id
        self.text_follows_audio = True
        self.tts = inner.tts
        self.responses: list[list[Delta]] = []

    @property
    def native_rate(self) -> int:
        return self.inner.native_rate

    @property
    def ready(self) -> bool:
        return self.inner.ready

    async def start(self) -> None:
        await self.inner.start()

    async def close(self) -> None:
        await self.inner.close()

    async def transcribe(self, audio: np.ndarray, language: str | None = None, prompt: str = "") -> str:
        return await self.inner.transcribe(audio, language, prompt)

    async def respond(self, request: ResponseRequest) -> AsyncIterator[Delta]:
        kept: list[Delta] = []
        self.responses.append(kept)
        async for delta in self.inner.respond(request):
            kept.append(delta)
            yield delta


@pytest.fixture(scope="module")
def stand_in() -> TextLlmStandIn:
    return TextLlmStandIn(ANSWER)


@pytest.fixture(scope="module")
def cascade(stand_in: TextLlmStandIn) -> Iterator[RunningServer]:
    with llm_server(stand_in) as url, running_server(cascade_config(url)) as server:
        yield server


async def audio_turn(wire: Wire, text: str) -> None:
    pcm = float_to_pcm16(np.concatenate([speech(text), silence(0.3)]))
    await wire.send({"type": "input_audio_buffer.append", "audio": base64.b64encode(pcm).decode()})
    await wire.send({"type": "input_audio_buffer.commit"})


@pytest.mark.slow
async def test_a_realtime_turn_hears_the_caller_and_speaks_the_llm_answer(
    cascade: RunningServer, stand_in: TextLlmStandIn
) -> None:
    async with connect(cascade) as wire:
        await wire.manual_mode()
        await wire.send({"type": "session.update", "session": {"type": "realtime", "instructions": "Be brief."}})
        await audio_turn(wire, "What is the weather like today?")
        await wire.send({"type": "response.create"})
        done = (await wire.until("response.done", timeout=30))[-1]
    assert done["response"]["status"] == "completed"
    transcript = next(e for e in wire.received if e["type"] == "response.output_audio_transcript.done")["transcript"]
    assert transcript == ANSWER
    audio = b"".join(base64.b64decode(e["delta"]) for e in wire.received if e["type"] == "response.output_audio.delta")
    heard = PocketsphinxRecogniser().recognise(resample(np.frombuffer(audio, "<i2") / 32768.0, 24_000, 16_000))
    assert {"weather", "sunny", "rain"} & set(heard.split()), f"pocketsphinx heard {heard!r}"
    body = stand_in.requests[-1]
    assert body["model"] == "microsoft/Phi-4-multimodal-instruct" and body["stream"] is True
    assert body["messages"][0] == {"role": "system", "content": "Be brief."}
    (part,) = body["messages"][1]["content"]
    assert part["type"] == "input_audio" and part["input_audio"]["format"] == "wav"


@pytest.mark.slow
def test_a_chat_completion_streams_the_spoken_answer(cascade: RunningServer, stand_in: TextLlmStandIn) -> None:
    client = openai.OpenAI(base_url=f"{cascade.http_url}/v1", api_key="none", max_retries=0)
    stream = client.chat.completions.create(
        model="microsoft/Phi-4-multimodal-instruct",
        messages=[{"role": "user", "content": "What is the weather like?"}],
        modalities=["text", "audio"],
        audio={"voice": "alloy", "format": "pcm16"},
        stream=True,
    )
    transcript, audio = "", b""
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.audio is not None:
            piece = chunk.choices[0].delta.audio.model_dump(exclude_unset=True)
            transcript += piece.get("transcript", "")
            audio += base64.b64decode(piece.get("data", ""))
    assert transcript == ANSWER
    assert 3.0 < len(audio) / 48_000 < 10.0
    assert stand_in.requests[-1]["messages"][-1]["content"] == [{"type": "text", "text": "What is the weather like?"}]


@pytest.mark.slow
async def test_a_phone_call_hears_the_llm_answer_in_the_piper_voice(cascade: RunningServer) -> None:
    turn, heard = await phone_turn(cascade, "what is the weather like today", turns_timeout_s=30)
    assert turn.voice_to_voice_ms is not None and turn.underruns == []
    assert {"weather", "sunny", "warm", "tomorrow", "rain"} & heard, f"pocketsphinx heard {heard}"


@pytest.mark.slow
async def test_barge_in_closes_the_llm_stream_and_the_next_turn_carries_exactly_the_words_sent() -> None:
    stand_in = TextLlmStandIn(LONG_ANSWER, first_token_s=0.05, token_s=0.1)
    with llm_server(stand_in) as url:
        config = cascade_config(url)
        cascade = CascadeEngine(
            config.engine.model,
            tts=create_tts(config),
            llm={"kind": "remote", "remote": {"url": url}},
            recogniser=CountingRecogniser(),
        )
        engine = RecordingCascade(cascade)
        with running_server(config, engine) as server:
            async with connect(server) as wire:
                microphone = Microphone(wire.append)
                streaming = asyncio.create_task(microphone.run())
                try:
                    microphone.say(silence(0.5))
                    microphone.say(speech("What will the weather be like this week?"))
                    first = (await wire.until("response.output_audio.delta", timeout=30))[-1]
                    await asyncio.sleep(1.0)
                    microphone.say(speech("Wait, stop. What about tomorrow?"))
                    events = await wire.until("response.done", timeout=10)
                    onset = microphone.onsets[-1]
                    done = events[-1]
                    truncated = next(e for e in wire.received if e["type"] == "conversation.item.truncated")
                    await wire.until("response.created", timeout=20)
                    await wire.until("response.done", timeout=30)
                finally:
                    streaming.cancel()
    assert done["response"]["id"] == first["response_id"] and done["response"]["status"] == "cancelled"
    assert stand_in.closed_early and stand_in.closed_early[0] - onset < 1.0, "the LLM stream was not closed"
    # what the caller was sent: the words whose audio began before the truncation point, in the engine's own time
    end_ms = truncated["audio_end_ms"]
    engine_ms, sent_text = 0.0, ""
    for delta in engine.responses[0]:
        if isinstance(delta, AudioDelta):
            engine_ms += delta.pcm.size * 1000 / engine.native_rate
        elif isinstance(delta, TextDelta) and engine_ms < end_ms:
            sent_text += delta.text
    assert 0 < len(sent_text) < len(LONG_ANSWER)
    assistant = next(m for m in stand_in.requests[1]["messages"] if m["role"] == "assistant")
    assert assistant == {"role": "assistant", "content": sent_text.rstrip()}
    assert LONG_ANSWER.startswith(assistant["content"])
