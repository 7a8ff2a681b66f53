"""Function calling through the engines that answer from another server, end to end with the official `openai` SDK:
a front with the remote engine in front of an omnivox engine host (the scripted engine's tool rules), and the cascade
engine over a stand-in LLM server that streams a call as vLLM does. The Realtime client gets the function call,
returns its output, and hears the answer made from it."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from omnivox.pipeline.audio import pcm16_to_float
from tests.cascade_helpers import ToolLlmStandIn, cascade_config, llm_server
from tests.remote_helpers import remote_config
from tests.server_helpers import RunningServer, running_server
from tests.test_conformance import connect, text_item
from tests.test_tools_doors import ANSWER, CHAT_WEATHER_TOOL, WEATHER_OUTPUT, WEATHER_TOOL, tool_config


async def call_and_answer(server: RunningServer) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A typed question that makes the agent call `get_weather`, the call's output sent back, the spoken answer:
    (the `function_call_arguments.done` event, the events of the answer)."""
    async with connect(server) as wire:
        session = {"type": "realtime", "tools": [WEATHER_TOOL], "audio": {"input": {"turn_detection": None}}}
        await wire.send({"type": "session.update", "session": session})
        await wire.until("session.updated")
        await wire.send({"type": "conversation.item.create", "item": text_item("What is the weather like today?")})
        await wire.send({"type": "response.create"})
        first = await wire.until("response.done", timeout=30)
        response = first[-1]["response"]
        assert response["status"] == "completed", response
        assert [item["type"] for item in response["output"]] == ["function_call"]
        done = next(e for e in first if e["type"] == "response.function_call_arguments.done")
        assert not [e for e in first if e["type"] == "response.output_audio.delta"]  # the call is never spoken
        output = {"type": "function_call_output", "call_id": done["call_id"], "output": WEATHER_OUTPUT}
        await wire.send({"type": "conversation.item.create", "item": output})
        await wire.send({"type": "response.create"})
        answer = await wire.until("response.done", timeout=30)
    return done, answer


def spoken(answer: list[dict[str, Any]]) -> tuple[str, float]:
    """The answer's transcript and seconds of audio."""
    transcript = next(e for e in answer if e["type"] == "response.output_audio_transcript.done")["transcript"]
    pcm = b"".join(base64.b64decode(e["delta"]) for e in answer if e["type"] == "response.output_audio.delta")
    return transcript, pcm16_to_float(pcm).size / 24_000


# ---------------------------------------------------------------------------------------------- remote engine


@pytest.fixture(scope="module")
def front() -> Iterator[RunningServer]:
    """A front (`engine.name: remote`) in front of an engine host whose scripted engine calls `get_weather`."""
    with running_server(tool_config()) as host, running_server(remote_config([host.http_url])) as running:
        yield running


async def test_remote_engine_realtime_call_output_and_spoken_answer(front: RunningServer) -> None:
    done, answer = await call_and_answer(front)
    assert (done["name"], json.loads(done["arguments"])) == ("get_weather", {"city": "Paris"})
    assert done["call_id"].startswith("call_")
    transcript, seconds = spoken(answer)
    assert transcript == ANSWER and seconds > 1.0
    assert answer[-1]["response"]["status"] == "completed"


def test_remote_engine_chat_tool_calls_parsed_by_the_sdk(front: RunningServer) -> None:
    client = openai.OpenAI(base_url=f"{front.http_url}/v1", api_key="unused", max_retries=0, timeout=30)
    question = {"role": "user", "content": "Do I need an umbrella?"}
    first = client.chat.completions.create(
        model="scripted", messages=[question], tools=[CHAT_WEATHER_TOOL], tool_choice="required"
    )
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls or []
    assert (call.function.name, json.loads(call.function.arguments)) == ("get_weather", {"city": "Rome"})
    result = {"role": "tool", "tool_call_id": call.id, "content": WEATHER_OUTPUT}
    second = client.chat.completions.create(
        model="scripted", messages=[question, choice.message.model_dump(exclude_none=True), result]
    )
    # the host's answer reads the output and the call's arguments, both sent back through the front
    assert second.choices[0].message.content == "It is 21 degrees in Rome."


# ---------------------------------------------------------------------------------------------- cascade engine


@pytest.fixture(scope="module")
def llm() -> ToolLlmStandIn:
    return ToolLlmStandIn()


@pytest.fixture(scope="module")
def cascade(llm: ToolLlmStandIn) -> Iterator[RunningServer]:
    with llm_server(llm) as url, running_server(cascade_config(url)) as running:
        yield running


async def test_cascade_realtime_call_output_and_spoken_answer(cascade: RunningServer, llm: ToolLlmStandIn) -> None:
    done, answer = await call_and_answer(cascade)
    assert done["call_id"] == "chatcmpl-tool-1"  # the LLM server's own id
    assert (done["name"], json.loads(done["arguments"])) == ("get_weather", {"city": "Paris"})
    transcript, seconds = spoken(answer)
    assert transcript == "It is 21 degrees in Paris." and seconds > 1.0
    asked, told = llm.requests[-2:]
    assert asked["tools"] == [CHAT_WEATHER_TOOL] and asked["tool_choice"] == "auto"
    assert told["messages"][-2:] == [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "chatcmpl-tool-1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "chatcmpl-tool-1", "content": WEATHER_OUTPUT},
    ]
