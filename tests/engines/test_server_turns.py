"""Full OpenAI-Realtime turns through the real server with the Qwen2.5-Omni engine (tiny random checkpoint).

The client is the official `openai` SDK; every event is validated with its models (the conformance `Wire`). The
engine's own objects are watched from the side to check what the wire cannot show: the codec codes behind the
audio and the conversation each request carried.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from omnivox.pipeline.engines.base import ResponseRequest, TextPart
from omnivox.pipeline.engines.qwen2_5_omni import Qwen25Generation, Qwen25OmniEngine, TurnPlan
from tests.audio_fixtures import chunks, encode, speech
from tests.server_helpers import RunningServer, running_server, scripted_config
from tests.test_conformance import Wire, connect, non_delta_types, pcm16_audio

pytestmark = pytest.mark.slow

SAMPLES_PER_CODE = 480
TRANSCRIBED = "conversation.item.input_audio_transcription.completed"
RESPONSE_SEQUENCE = [
    "response.created",
    "response.output_item.added",
    "conversation.item.added",
    "response.content_part.added",
    "response.output_audio.done",
    "response.output_audio_transcript.done",
    "response.content_part.done",
    "response.output_item.done",
    "conversation.item.done",
    "response.done",
]


class WatchedEngine(Qwen25OmniEngine):
    """Records every request the server sends and the generation of every spoken answer (for assertions only)."""

    def __init__(self, model: str, **options: Any) -> None:
        super().__init__(model, **options)
        self.requests: list[ResponseRequest] = []
        self.answers: list[Qwen25Generation] = []
        """Generations with audio output, in the order the worker started them (transcriptions are text-only)."""
        self._lock = threading.Lock()

    def prepare(self, request: ResponseRequest) -> TurnPlan:
        with self._lock:
            self.requests.append(request)
        return super().prepare(request)

    def make_generation(self, prepared: TurnPlan) -> Qwen25Generation:
        generation = super().make_generation(prepared)
        if prepared.output_audio:
            with self._lock:
                self.answers.append(generation)
        return generation


@pytest.fixture(scope="module")
def qwen_server(tiny_qwen2_5_dir: Path) -> Iterator[tuple[RunningServer, WatchedEngine]]:
    engine = WatchedEngine(str(tiny_qwen2_5_dir), device="cpu", max_text_tokens=12, max_audio_codes=60)
    with running_server(scripted_config(), engine) as server:
        yield server, engine


async def spoken_turn(wire: Wire, text: str) -> None:
    for piece in chunks(encode(speech(text)), 9_600):
        await wire.append(piece)
    await wire.send({"type": "input_audio_buffer.commit"})
    await wire.until("input_audio_buffer.committed")
    await wire.until("conversation.item.done")


def transcript_of(response: list[dict[str, Any]]) -> str:
    deltas = "".join(e["delta"] for e in response if e["type"] == "response.output_audio_transcript.delta")
    done = next(e for e in response if e["type"] == "response.output_audio_transcript.done")
    assert deltas == done["transcript"]
    return deltas


async def test_spoken_turns_stream_speech_and_the_next_request_carries_the_first_answer(
    qwen_server: tuple[RunningServer, WatchedEngine],
) -> None:
    server, engine = qwen_server
    transcription = {"model": "whisper-1", "language": "en", "prompt": "Paris weather"}
    async with connect(server) as wire:
        await wire.send(
            {
                "type": "session.update",
                "session": {"type": "realtime", "audio": {"input": {"transcription": transcription}}},
            }
        )
        await wire.until("session.updated")
        await wire.manual_mode()
        await spoken_turn(wire, "What is the weather like in Paris?")
        await wire.send({"type": "response.create"})
        first = await wire.until("response.done", timeout=60)
        first_generation = engine.answers[-1]
        await spoken_turn(wire, "And tomorrow?")
        await wire.send({"type": "response.create"})
        second = await wire.until("response.done", timeout=60)
        while len(transcribed := [e for e in wire.received if e["type"] == TRANSCRIBED]) < 2:
            await wire.until(TRANSCRIBED, timeout=60)

    assert all(isinstance(e["transcript"], str) for e in transcribed)
    recognitions = [r for r in engine.requests if not r.output_audio]
    assert len(recognitions) == 2
    assert all(
        "Paris weather" in "".join(p.text for p in r.messages[0].parts if isinstance(p, TextPart)) for r in recognitions
    )
    for response in (first, second):
        assert non_delta_types([e for e in response if e["type"] != TRANSCRIBED]) == RESPONSE_SEQUENCE
        assert response[-1]["response"]["status"] == "completed"
    audio = pcm16_audio(first, "response.output_audio.delta")
    assert audio and len(audio) % 2 == 0
    assert len(audio) // 2 == SAMPLES_PER_CODE * len(first_generation.codes)
    first_answer = transcript_of(first)
    assert first_answer
    transcript_of(second)

    answers = [r for r in engine.requests if r.output_audio]
    assert len(answers) == 2
    conversation = answers[0].conversation_id
    assert conversation and answers[1].conversation_id == conversation
    assert engine.prefixes.hits >= 1  # the second turn encoded only what the first prompt did not hold
    cached = [response[-1]["response"]["usage"]["input_token_details"]["cached_tokens"] for response in (first, second)]
    assert cached[0] == 0 and cached[1] > 0
    for _ in range(100):  # the session is over: its stored prompt is dropped
        if conversation not in engine.prefixes._entries:
            break
        await asyncio.sleep(0.02)
    assert conversation not in engine.prefixes._entries
    history = answers[1].messages
    assert [m.role for m in history] == ["user", "assistant", "user"]
    assistant_text = "".join(p.text for p in history[1].parts if isinstance(p, TextPart))
    assert assistant_text == first_answer


async def test_cancel_mid_answer_ends_the_response_and_nothing_follows(
    qwen_server: tuple[RunningServer, WatchedEngine],
) -> None:
    server, engine = qwen_server
    async with connect(server) as wire:
        await wire.manual_mode()
        await spoken_turn(wire, "Tell me a long story about the sea.")
        await wire.send({"type": "response.create"})
        started = await wire.until("response.output_audio.delta", timeout=60)
        await wire.send({"type": "response.cancel"})
        done = await wire.until("response.done", timeout=30)
        trailing = await wire.during(1.0)
    response_id = next(e for e in started if e["type"] == "response.created")["response"]["id"]
    assert done[-1]["response"]["status"] == "cancelled"
    assert not [e for e in trailing if e.get("response_id") == response_id]
    assert engine.answers[-1].finished
