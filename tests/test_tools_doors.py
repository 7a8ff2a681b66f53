"""Function calling end to end through a real server, with the official `openai` SDK (Realtime GA and beta, chat
completions) and the audio-modalities door. The scripted engine's tool rules turn the caller's words into calls and
the tool outputs into spoken answers."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from omnivox.pipeline.audio import pcm16_to_float
from tests.server_helpers import RunningServer, running_server, scripted_config
from tests.test_conformance import connect, text_item

WEATHER_TOOL = {
    "type": "function",
    "name": "get_weather",
    "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
CHAT_WEATHER_TOOL = {"type": "function", "function": {k: v for k, v in WEATHER_TOOL.items() if k != "type"}}
TOOL_RULES = [
    {
        "when": ["weather", "whether"],  # pocketsphinx hears espeak-ng's "weather" either way
        "call": "get_weather",
        "arguments": {"city": "Paris"},
        "answer": "It is {output[temperature]} degrees in {arguments[city]}.",
    },
    {"when": ["umbrella"], "call": "get_weather", "arguments": {"city": "Rome"}, "say": "Let me look that up."},
    {"when": ["broken"], "call": "get_weather", "arguments": '{"city": "Par'},
]
WEATHER_OUTPUT = json.dumps({"temperature": 21, "sky": "clear"})
ANSWER = "It is 21 degrees in Paris."


def tool_config(**sections: Any) -> Any:
    scripted = {"reply": "I can only talk about the weather.", "speed": 8.0, "first_audio_ms": 20, "tools": TOOL_RULES}
    return scripted_config(engine={"options": {"scripted": scripted}}, **sections)


@pytest.fixture(scope="module")
def server() -> Iterator[RunningServer]:
    with running_server(tool_config()) as running:
        yield running


@pytest.fixture(scope="module")
def client(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.http_url}/v1", api_key="unused", max_retries=0, timeout=30)


def types_of(events: list[dict[str, Any]]) -> list[str]:
    return [event["type"] for event in events if not event["type"].endswith(".delta")]


# ---------------------------------------------------------------------------------------------- Realtime


@pytest.mark.parametrize("beta", [False, True])
async def test_realtime_call_output_and_spoken_answer_with_the_sdk(server: RunningServer, beta: bool) -> None:
    """Every event passes the SDK's own models (`connect` checks), on both dialects."""
    async with connect(server, beta=beta) as wire:
        session: dict[str, Any] = {"tools": [WEATHER_TOOL], "tool_choice": "auto"}
        if beta:
            session["turn_detection"] = None
        else:
            session.update({"type": "realtime", "audio": {"input": {"turn_detection": None}}})
        await wire.send({"type": "session.update", "session": session})
        updated = (await wire.until("session.updated"))[-1]["session"]
        assert updated["tools"] == [WEATHER_TOOL]
        await wire.send({"type": "conversation.item.create", "item": text_item("What is the weather like today?")})
        await wire.send({"type": "response.create"})
        first = await wire.until("response.done")
        call_events = first[first.index(next(e for e in first if e["type"] == "response.created")) :]
        added = "conversation.item.created" if beta else "conversation.item.added"
        expected = ["response.created", "response.output_item.added", added]
        expected += ["response.function_call_arguments.done", "response.output_item.done"]
        expected += [] if beta else ["conversation.item.done"]
        assert types_of(call_events) == [*expected, "response.done"]
        delta = next(e for e in call_events if e["type"] == "response.function_call_arguments.delta")
        done = next(e for e in call_events if e["type"] == "response.function_call_arguments.done")
        assert (done["name"], json.loads(done["arguments"])) == ("get_weather", {"city": "Paris"})
        assert delta["call_id"] == done["call_id"] and delta["delta"] == done["arguments"]
        response = call_events[-1]["response"]
        assert response["status"] == "completed"
        assert [(item["type"], item["call_id"]) for item in response["output"]] == [("function_call", done["call_id"])]

        output = {"type": "function_call_output", "call_id": done["call_id"], "output": WEATHER_OUTPUT}
        await wire.send({"type": "conversation.item.create", "item": output})
        await wire.send({"type": "response.create"})
        answer = await wire.until("response.done")
    audio_type = "response.audio.delta" if beta else "response.output_audio.delta"
    transcript_type = "response.audio_transcript.done" if beta else "response.output_audio_transcript.done"
    assert next(e for e in answer if e["type"] == transcript_type)["transcript"] == ANSWER
    pcm = b"".join(base64.b64decode(e["delta"]) for e in answer if e["type"] == audio_type)
    assert pcm16_to_float(pcm).size / 24_000 > 1.0
    assert answer[-1]["response"]["status"] == "completed"


async def test_realtime_spoken_words_before_the_call_then_the_call(server: RunningServer) -> None:
    async with connect(server) as wire:
        session = {"type": "realtime", "tools": [WEATHER_TOOL], "audio": {"input": {"turn_detection": None}}}
        await wire.send({"type": "session.update", "session": session})
        await wire.until("session.updated")
        await wire.send({"type": "conversation.item.create", "item": text_item("Do I need an umbrella?")})
        await wire.send({"type": "response.create"})
        events = await wire.until("response.done")
    types = types_of(events)
    assert types.index("response.output_audio.done") < types.index("response.function_call_arguments.done")
    response = events[-1]["response"]
    assert [item["type"] for item in response["output"]] == ["message", "function_call"]
    assert response["output"][0]["content"][0]["transcript"] == "Let me look that up."
    assert json.loads(response["output"][1]["arguments"]) == {"city": "Rome"}


async def test_realtime_malformed_call_fails_the_response_and_nothing_is_spoken(server: RunningServer) -> None:
    async with connect(server) as wire:
        session = {"type": "realtime", "tools": [WEATHER_TOOL], "audio": {"input": {"turn_detection": None}}}
        await wire.send({"type": "session.update", "session": session})
        await wire.until("session.updated")
        await wire.send({"type": "conversation.item.create", "item": text_item("Is the parser broken?")})
        await wire.send({"type": "response.create"})
        events = await wire.until("response.done")
        await wire.send({"type": "conversation.item.retrieve", "item_id": "missing"})
        error = (await wire.until("error"))[-1]["error"]
    assert types_of(events)[-2:] == ["response.created", "response.done"]
    response = events[-1]["response"]
    assert (response["status"], response["status_details"]["error"]["code"]) == ("failed", "invalid_tool_call")
    assert response["output"][0]["status"] == "incomplete"
    assert error["code"] == "item_retrieve_invalid_item_id"  # the session goes on


# ---------------------------------------------------------------------------------------------- chat completions


def test_chat_stream_of_tool_calls_is_parsed_by_the_sdk(client: openai.OpenAI) -> None:
    messages: list[Any] = [{"role": "user", "content": "What is the weather like today?"}]
    with client.chat.completions.stream(model="gpt-4o", messages=messages, tools=[CHAT_WEATHER_TOOL]) as stream:
        completion = stream.get_final_completion()
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.id.startswith("call_") and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    assert not choice.message.content

    messages += [
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": WEATHER_OUTPUT},
    ]
    answer = client.chat.completions.create(model="gpt-4o", messages=messages, tools=[CHAT_WEATHER_TOOL])
    assert (answer.choices[0].message.content, answer.choices[0].finish_reason) == (ANSWER, "stop")


def test_chat_with_audio_streams_the_spoken_part_then_the_call(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="gpt-4o-audio-preview",
        modalities=["text", "audio"],
        audio={"voice": "alloy", "format": "pcm16"},
        messages=[{"role": "user", "content": "Do I need an umbrella?"}],
        tools=[CHAT_WEATHER_TOOL],
        stream=True,
    )
    chunks = [chunk.model_dump() for chunk in stream]
    deltas = [chunk["choices"][0]["delta"] for chunk in chunks if chunk["choices"]]
    transcript = "".join((delta.get("audio") or {}).get("transcript") or "" for delta in deltas)
    pcm = b"".join(base64.b64decode((delta.get("audio") or {}).get("data") or "") for delta in deltas)
    calls = [call for delta in deltas for call in delta.get("tool_calls") or []]
    assert transcript == "Let me look that up."
    assert pcm16_to_float(pcm).size / 24_000 > 0.8
    assert calls[0]["function"]["name"] == "get_weather"
    assert json.loads("".join(call["function"]["arguments"] for call in calls)) == {"city": "Rome"}
    first_call = next(i for i, delta in enumerate(deltas) if delta.get("tool_calls"))
    assert not any((delta.get("audio") or {}).get("data") for delta in deltas[first_call:])
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_chat_non_streaming_tool_calls_and_tool_choice_none(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "What is the weather like today?"}]
    completion = client.chat.completions.create(model="x", messages=messages, tools=[CHAT_WEATHER_TOOL])
    message = completion.choices[0].message
    assert completion.choices[0].finish_reason == "tool_calls" and message.content is None
    assert json.loads(message.tool_calls[0].function.arguments) == {"city": "Paris"}
    plain = client.chat.completions.create(model="x", messages=messages, tools=[CHAT_WEATHER_TOOL], tool_choice="none")
    assert plain.choices[0].message.tool_calls is None
    assert plain.choices[0].message.content == "I can only talk about the weather."


def test_chat_malformed_call_is_an_error_and_bad_tools_a_400(client: openai.OpenAI, server: RunningServer) -> None:
    messages = [{"role": "user", "content": "Is the parser broken?"}]
    with pytest.raises(openai.InternalServerError, match="invalid function call"):
        client.chat.completions.create(model="x", messages=messages, tools=[CHAT_WEATHER_TOOL])
    body = {"model": "x", "messages": messages, "tools": [CHAT_WEATHER_TOOL], "stream": True}
    with httpx.stream("POST", f"{server.http_url}/v1/chat/completions", json=body, timeout=30) as response:
        lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert json.loads(lines[-1][6:])["error"]["code"] == "invalid_tool_call"
    with pytest.raises(openai.BadRequestError, match="tool_choice"):
        client.chat.completions.create(
            model="x",
            messages=messages,
            tools=[CHAT_WEATHER_TOOL],
            tool_choice={"type": "function", "function": {"name": "nope"}},
        )


def test_audio_modalities_door_passes_tools_through(server: RunningServer) -> None:
    body = {
        "model": "your-model-name",
        "messages": [{"role": "user", "content": "What is the weather like today?"}],
        "tools": [CHAT_WEATHER_TOOL],
        "stream": True,
    }
    with httpx.stream("POST", f"{server.http_url}/audio/chat/completions", json=body, timeout=30) as response:
        payloads = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
    calls = [call for payload in payloads for call in payload["choices"][0]["delta"].get("tool_calls", [])]
    assert calls[0]["id"].startswith("call_") and calls[0]["function"]["name"] == "get_weather"
    assert json.loads("".join(call["function"]["arguments"] for call in calls)) == {"city": "Paris"}
    assert payloads[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert not any(payload["choices"][0]["delta"].get("audio", {}).get("data") for payload in payloads)
    call_id = calls[0]["id"]
    function = {"name": "get_weather", "arguments": "".join(call["function"]["arguments"] for call in calls)}
    body["messages"] += [
        {"role": "assistant", "tool_calls": [{"id": call_id, "type": "function", "function": function}]},
        {"role": "tool", "tool_call_id": call_id, "content": WEATHER_OUTPUT},
    ]
    with httpx.stream("POST", f"{server.http_url}/audio/chat/completions", json=body, timeout=30) as response:
        payloads = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
    transcripts = [
        p["choices"][0]["delta"]["audio"]["transcript"]
        for p in payloads
        if "transcript" in p["choices"][0]["delta"].get("audio", {})
    ]
    assert transcripts == [ANSWER]
    assert payloads[-1]["choices"][0]["finish_reason"] == "stop"


def test_tool_calls_are_counted_by_outcome(client: openai.OpenAI, server: RunningServer) -> None:
    def counted(outcome: str) -> float:
        text = httpx.get(f"{server.http_url}/metrics").text
        line = f'omnivox_tool_calls_total{{door="http_chat",outcome="{outcome}"}} '
        return next((float(row[len(line) :]) for row in text.splitlines() if row.startswith(line)), 0.0)

    before = counted("completed"), counted("invalid")
    ask = [{"role": "user", "content": "What is the weather like today?"}]
    client.chat.completions.create(model="x", messages=ask, tools=[CHAT_WEATHER_TOOL])
    with pytest.raises(openai.InternalServerError):
        broken = [{"role": "user", "content": "Is the parser broken?"}]
        client.chat.completions.create(model="x", messages=broken, tools=[CHAT_WEATHER_TOOL])
    assert (counted("completed"), counted("invalid")) == (before[0] + 1, before[1] + 1)
