"""The no-GPU default: `auto` falls back to the scripted engine, which speaks with the bundled Piper voice and answers
with what it recognised of the caller, so a first run on a laptop is a real conversation loop."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest

from omnivox.pipeline.engines import cuda_available
from omnivox.server.config import load_config
from tests.server_helpers import RunningServer, phone_turn, running_server

pytestmark = pytest.mark.skipif(cuda_available(), reason="auto serves Qwen-Omni where a GPU exists")


@pytest.fixture(scope="module")
def demo() -> Iterator[RunningServer]:
    config = load_config(overrides={"server": {"log_level": "warning"}}, environ={})
    assert config.engine.name == "auto"
    with running_server(config) as server:
        yield server


def test_auto_without_a_gpu_serves_the_scripted_demo_with_the_piper_voice(demo: RunningServer) -> None:
    engine = demo.state.engine
    assert engine.name == "scripted" and engine.echo
    assert engine.tts is demo.state.tts and engine.tts.backend.name == "piper"
    assert engine.native_rate == 22_050


def test_a_typed_question_is_answered_with_what_was_heard(demo: RunningServer) -> None:
    client = openai.OpenAI(base_url=f"{demo.http_url}/v1", api_key="none", max_retries=0)
    completion = client.chat.completions.create(
        model=demo.state.model_name,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        modalities=["text", "audio"],
        audio={"voice": "alloy", "format": "wav"},
    )
    message = completion.choices[0].message
    assert message.audio.transcript.startswith("You said: What is the capital of France.")
    assert len(message.audio.data) > 10_000


@pytest.mark.slow
async def test_a_phone_caller_hears_their_own_words_in_the_piper_voice(demo: RunningServer) -> None:
    turn, heard = await phone_turn(demo, "what is the weather like today", turns_timeout_s=20)
    assert turn.agent_start_s is not None, "the demo did not answer"
    assert {"said", "weather"} <= heard, f"pocketsphinx heard {heard!r}"
