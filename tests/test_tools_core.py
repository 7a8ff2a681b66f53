"""Function calling and the 2026 protocol fields in the session core, under a fake clock."""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
import pytest

from omnivox.pipeline.audio import float_to_pcm16
from omnivox.pipeline.engines.base import (
    AudioDelta,
    FunctionTool,
    TextDelta,
    TextPart,
    ToolCallDelta,
    ToolCallPart,
    ToolChoice,
    ToolResultPart,
)
from tests.core_helpers import CoreDriver, silence, tone
from tests.image_fixtures import png_image

WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
CALL_EVENTS = [
    "response.output_item.added",
    "conversation.item.added",
    "response.function_call_arguments.delta",
    "response.function_call_arguments.done",
    "response.output_item.done",
    "conversation.item.done",
]


def tool_session(**session: Any) -> CoreDriver:
    driver = CoreDriver.create(turn_detection=None)
    driver.send("session.update", session={"type": "realtime", "tools": [WEATHER], **session})
    assert driver.events[-1].type == "session.updated", driver.events[-1]
    return driver


def ask(driver: CoreDriver, text: str = "What is the weather in Paris?") -> None:
    item = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}
    driver.send("conversation.item.create", item=item)
    driver.send("response.create")


def since(driver: CoreDriver, event_type: str) -> list[str]:
    """The event types from the last `event_type` on."""
    types = driver.types()
    start = len(types) - 1 - types[::-1].index(event_type)
    return types[start:]


def test_session_tools_reach_the_engine_and_are_echoed() -> None:
    driver = tool_session(tool_choice="required", parallel_tool_calls=False)
    assert driver.events[-1].payload["session"]["tools"] == [WEATHER]
    ask(driver)
    request = driver.started[-1].request
    assert request.tools == (FunctionTool("get_weather", WEATHER["description"], WEATHER["parameters"]),)
    assert request.tool_choice == ToolChoice("required")
    assert request.parallel_tool_calls is False
    driver.send("response.cancel")
    driver.send("response.create", response={"tool_choice": {"type": "function", "name": "get_weather"}})
    assert driver.started[-1].request.tool_choice == ToolChoice("required", "get_weather")


@pytest.mark.parametrize(
    ("session", "param"),
    [
        ({"tools": [{"type": "function", "name": "bad name!"}]}, "session.tools[0].name"),
        ({"tools": [{"type": "mcp", "server_label": "x"}]}, "session.tools[0].type"),
        ({"tools": [WEATHER, WEATHER]}, "session.tools[1].name"),
        ({"tools": "get_weather"}, "session.tools"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "name": "other"}}, "session.tool_choice"),
        ({"tool_choice": "sometimes"}, "session.tool_choice"),
        ({"parallel_tool_calls": "yes"}, "session.parallel_tool_calls"),
        ({"truncation": {"type": "retention_ratio", "retention_ratio": 2}}, "session.truncation.retention_ratio"),
        ({"truncation": "sometimes"}, "session.truncation"),
    ],
)
def test_bad_tool_settings_are_refused_naming_the_field(session: dict[str, Any], param: str) -> None:
    driver = CoreDriver.create(turn_detection=None)
    driver.send("session.update", session={"type": "realtime", **session}, event_id="ev1")
    error = driver.events[-1].payload["error"]
    assert (error["param"], error["event_id"]) == (param, "ev1")
    assert driver.session.config["tools"] == []


def test_a_call_alone_is_announced_as_openai_does_and_enters_the_conversation() -> None:
    driver = tool_session()
    ask(driver)
    assert driver.types()[-1] == "response.created"  # no empty message is opened for a response that may call
    driver.engine(ToolCallDelta(0, name="get_weather", arguments='{"city": '))
    driver.engine(ToolCallDelta(0, arguments='"Paris"}'))
    assert driver.types()[-1] == "response.created"  # nothing is announced before the call is complete
    driver.engine_done()
    assert since(driver, "response.created")[1:] == [*CALL_EVENTS, "response.done"]
    added = driver.of_type("response.output_item.added")[-1].payload
    assert added["output_index"] == 0
    assert added["item"]["status"] == "in_progress" and added["item"]["arguments"] == ""
    done = driver.of_type("response.function_call_arguments.done")[-1].payload
    call_id = done["call_id"]
    assert call_id.startswith("call_") and done["name"] == "get_weather"
    assert done["arguments"] == '{"city": "Paris"}'
    item = driver.of_type("response.output_item.done")[-1].payload["item"]
    assert item == {
        "id": item["id"],
        "object": "realtime.item",
        "type": "function_call",
        "status": "completed",
        "call_id": call_id,
        "name": "get_weather",
        "arguments": '{"city": "Paris"}',
    }
    response = driver.of_type("response.done")[-1].payload["response"]
    assert (response["status"], response["output"]) == ("completed", [item])
    assert driver.session.conversation.items[-1].type == "function_call"


def test_the_output_is_part_of_the_next_turn_and_the_answer_speaks_it() -> None:
    driver = tool_session()
    ask(driver)
    driver.engine(ToolCallDelta(0, name="get_weather", arguments='{"city": "Paris"}', call_id="call_engine1"))
    driver.engine_done()
    output = {"type": "function_call_output", "call_id": "call_engine1", "output": '{"temperature": 21}'}
    driver.send("conversation.item.create", item=output)
    added = driver.of_type("conversation.item.added")[-1].payload["item"]
    assert (added["type"], added["call_id"], added["output"]) == (
        "function_call_output",
        "call_engine1",
        output["output"],
    )
    driver.send("response.create")
    messages = driver.started[-1].request.messages
    assert [m.role for m in messages] == ["user", "assistant", "tool"]
    assert messages[1].parts == (ToolCallPart("call_engine1", "get_weather", '{"city": "Paris"}'),)
    assert messages[2].parts == (ToolResultPart("call_engine1", '{"temperature": 21}', "get_weather"),)
    driver.speak("It is 21 degrees in Paris.", 1.0)
    driver.engine_done()
    driver.advance(2.0)
    response = driver.of_type("response.done")[-1].payload["response"]
    assert response["status"] == "completed"
    assert response["output"][0]["content"] == [{"type": "output_audio", "transcript": "It is 21 degrees in Paris."}]
    assert len(driver.audio) == 25  # 1 s in 40 ms frames


def test_spoken_words_before_a_call_are_heard_and_the_call_follows_the_message() -> None:
    driver = tool_session()
    ask(driver)
    driver.speak("Let me check.", 0.8)
    driver.engine(ToolCallDelta(0, name="get_weather", arguments='{"city": "Paris"}'))
    driver.engine(TextDelta("<tool_call> never shown"))  # text after a call began is the call's
    driver.engine(AudioDelta(tone(0.2, 24_000)))  # audio of the words before the call may still come
    driver.engine_done()
    assert "response.function_call_arguments.done" not in driver.types()  # the message is still playing
    driver.advance(2.0)
    types = since(driver, "response.created")
    message_done = types.index("conversation.item.done")
    assert types[message_done + 1 : message_done + 7] == CALL_EVENTS
    assert types[-1] == "response.done"
    response = driver.of_type("response.done")[-1].payload["response"]
    assert [item["type"] for item in response["output"]] == ["message", "function_call"]
    assert response["output"][0]["content"][0]["transcript"] == "Let me check."
    assert driver.of_type("response.output_item.added")[-1].payload["output_index"] == 1
    assert len(driver.audio) == 25  # the whole second of speech before the call was played


def test_a_call_the_caller_interrupted_is_never_announced_nor_run() -> None:
    driver = CoreDriver.create()
    driver.send("session.update", session={"type": "realtime", "tools": [WEATHER]})
    driver.stream_audio(np.concatenate([tone(0.6), silence(0.8)]))
    driver.speak("Let me check the weather for you.", 2.0)
    driver.engine(ToolCallDelta(0, name="get_weather", arguments='{"city": "Paris"}'))
    driver.engine_done()
    driver.advance(0.3)
    driver.stream_audio(tone(1.0))  # the caller talks over the preamble (longer than a backchannel)
    response = driver.of_type("response.done")[-1].payload["response"]
    assert response["status"] == "cancelled"
    assert [item["type"] for item in response["output"]] == ["message"]
    assert "response.function_call_arguments.done" not in driver.types()
    assert all(item.type == "message" for item in driver.session.conversation.items)


def test_a_malformed_call_fails_the_response_and_is_neither_spoken_nor_remembered() -> None:
    driver = tool_session()
    ask(driver)
    driver.engine(ToolCallDelta(0, arguments='{"name": "get_weather", "arguments": {', error="not valid JSON"))
    driver.engine_done()
    assert since(driver, "response.created")[1:] == ["response.done"]
    response = driver.of_type("response.done")[-1].payload["response"]
    assert response["status"] == "failed"
    assert response["status_details"]["error"]["code"] == "invalid_tool_call"
    assert [(item["type"], item["status"]) for item in response["output"]] == [("function_call", "incomplete")]
    assert [item.type for item in driver.session.conversation.items] == ["message"]
    assert driver.audio == []


@pytest.mark.parametrize(
    ("delta", "reason"),
    [
        (ToolCallDelta(0, name="get_time", arguments="{}"), "not a declared tool"),
        (ToolCallDelta(0, name="get_weather", arguments="[1, 2]"), "not a JSON object"),
        (ToolCallDelta(0, name="get_weather", arguments='{"city": "Par'), "not valid JSON"),
    ],
)
def test_calls_are_checked_before_they_are_announced(delta: ToolCallDelta, reason: str) -> None:
    driver = tool_session()
    ask(driver)
    driver.engine(delta)
    driver.engine_done()
    response = driver.of_type("response.done")[-1].payload["response"]
    assert response["status"] == "failed"
    assert reason in response["status_details"]["error"]["message"]


def test_parallel_calls_keep_their_order_and_only_the_first_without_parallel_tool_calls() -> None:
    for parallel, expected in ((True, ["Paris", "Rome"]), (False, ["Paris"])):
        driver = tool_session(parallel_tool_calls=parallel)
        ask(driver)
        driver.engine(ToolCallDelta(1, name="get_weather", arguments='{"city": "Rome"}'))
        driver.engine(ToolCallDelta(0, name="get_weather", arguments='{"city": "Paris"}'))
        driver.engine_done()
        output = driver.of_type("response.done")[-1].payload["response"]["output"]
        assert [item["arguments"][10:-2] for item in output] == expected
        assert [e.payload["output_index"] for e in driver.of_type("response.output_item.added")] == list(
            range(len(expected))
        )


def test_tool_choice_none_opens_the_message_at_once() -> None:
    driver = tool_session(tool_choice="none")
    ask(driver)
    assert not driver.started[-1].request.tools_enabled
    assert since(driver, "response.created")[1:4] == [
        "response.output_item.added",
        "conversation.item.added",
        "response.content_part.added",
    ]


def test_function_items_from_the_client_and_their_errors() -> None:
    driver = CoreDriver.create(turn_detection=None)
    call = {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": "{}"}
    driver.send("conversation.item.create", item=call)
    assert driver.events[-1].payload["item"]["type"] == "function_call"
    driver.send("conversation.item.create", item={"type": "function_call_output", "call_id": "call_1", "output": 7})
    assert driver.events[-1].payload["error"]["param"] == "item.output"
    driver.send("conversation.item.create", item={"type": "function_call_output", "output": "x"})
    assert driver.events[-1].payload["error"]["param"] == "item.call_id"
    orphan = {"type": "function_call_output", "call_id": "call_gone", "output": "12"}
    driver.send("conversation.item.create", item=orphan)
    driver.send("response.create")
    assert [m.role for m in driver.started[-1].request.messages] == ["assistant"]  # an orphan output is left out
    item_id = driver.session.conversation.items[0].id
    driver.send("conversation.item.truncate", item_id=item_id, content_index=0, audio_end_ms=0)
    assert driver.events[-1].payload["error"]["code"] == "invalid_item_type"


def test_null_means_not_set_in_response_create_and_session_update() -> None:
    driver = CoreDriver.create(turn_detection=None)
    driver.send("session.update", session={"type": "realtime", "instructions": "Be brief.", "temperature": 0.6})
    driver.send(
        "session.update",
        session={
            "type": "realtime",
            "instructions": None,
            "temperature": None,
            "max_output_tokens": None,
            "output_modalities": None,
            "tool_choice": None,
            "tools": None,
            "audio": {"input": {"format": None}, "output": {"voice": None, "format": None}},
        },
    )
    assert driver.events[-1].type == "session.updated", driver.events[-1]
    session = driver.events[-1].payload["session"]
    assert (session["instructions"], session["temperature"], session["audio"]["output"]["voice"]) == (
        "Be brief.",
        0.6,
        "alloy",
    )
    driver.send("session.update", session={"type": "realtime", "audio": {"input": {"turn_detection": None}}})
    assert driver.session.config["audio"]["input"]["turn_detection"] is None  # here null means "off"
    ask(driver)
    driver.send("response.cancel")
    driver.send(
        "response.create",
        response={"instructions": None, "output_modalities": None, "input": None, "tools": None, "metadata": None},
    )
    assert driver.events[-1].type != "error", driver.events[-1]
    assert driver.started[-1].request.instructions == "Be brief."


OPENAI_MESSAGES = {
    "response_cancel_not_active": "Cancellation failed: no active response found",
    "conversation_already_has_active_response": (
        "Conversation already has an active response in progress: {response_id}. "
        "Wait until the response is finished before creating a new one."
    ),
    "input_audio_buffer_commit_empty": (
        "Error committing input audio buffer: buffer too small. Expected at least 100ms of audio, but buffer only "
        "has 40.00ms of audio."
    ),
}
"""OpenAI's exact error texts where clients match on them: LiveKit ignores the first by its prefix, OpenAI's own
clients and several agent frameworks recognise the second by its prefix."""


def test_openai_error_messages_that_clients_match_on() -> None:
    driver = CoreDriver.create(turn_detection=None)
    driver.send("response.cancel")
    errors = [driver.events[-1].payload["error"]]
    driver.send("response.create")
    response_id = driver.started[-1].response_id
    driver.send("response.create")
    errors.append(driver.events[-1].payload["error"])
    driver.send("response.cancel")
    driver.append_pcm24(tone(0.04, 24_000))
    driver.send("input_audio_buffer.commit")
    errors.append(driver.events[-1].payload["error"])
    expected = {code: text.format(response_id=response_id) for code, text in OPENAI_MESSAGES.items()}
    assert {error["code"]: error["message"] for error in errors} == expected
    driver.send("conversation.item.retrieve", item_id="item_x")
    assert driver.events[-1].payload["error"]["code"] == "item_retrieve_invalid_item_id"  # pipecat matches it


def test_truncate_at_zero_before_the_first_frame_and_past_what_was_sent() -> None:
    driver = CoreDriver.create(turn_detection=None)
    ask(driver, "Hello")
    item_id = driver.of_type("response.output_item.added")[-1].payload["item"]["id"]
    driver.send("conversation.item.truncate", item_id=item_id, content_index=0, audio_end_ms=0)
    assert driver.events[-1].payload == {"item_id": item_id, "content_index": 0, "audio_end_ms": 0}
    driver.speak("Hello there, general Kenobi.", 1.0)
    driver.advance(0.3)  # 200 ms lead + 300 ms: half a second sent
    sent = int(driver.session.conversation.get(item_id).audio_sent_ms)
    assert 400 <= sent <= 600
    driver.send("conversation.item.truncate", item_id=item_id, content_index=0, audio_end_ms=90_000)
    assert driver.events[-1].payload == {"item_id": item_id, "content_index": 0, "audio_end_ms": sent}
    driver.send("response.cancel")
    assert driver.session.conversation.get(item_id).heard_text() == ""


@pytest.mark.parametrize("rate", [8000, 16000, 24000, 48000])
def test_pcm_input_at_any_supported_rate(rate: int) -> None:
    driver = CoreDriver.create(turn_detection=None)
    fmt = {"type": "audio/pcm", "rate": rate}
    driver.send("session.update", session={"type": "realtime", "audio": {"input": {"format": fmt}}})
    assert driver.events[-1].payload["session"]["audio"]["input"]["format"] == fmt
    t = np.arange(rate) / rate
    speech = (0.3 * np.sin(2 * np.pi * 300 * t)).astype(np.float32)
    for start in range(0, rate, rate // 50):  # 1 s in 20 ms appends
        driver.send(
            "input_audio_buffer.append",
            audio=base64.b64encode(float_to_pcm16(speech[start : start + rate // 50])).decode(),
        )
    driver.send("input_audio_buffer.commit")
    heard = driver.session.conversation.items[-1].audio
    assert abs(heard.size - 16_000) <= 16  # one second at the engines' 16 kHz
    middle = heard[4000:12000]
    assert abs(float(np.sqrt(np.mean(middle**2))) - 0.3 / np.sqrt(2)) < 0.02


@pytest.mark.parametrize(("direction", "rate"), [("input", 22050), ("output", 16000)])
def test_pcm_rates_that_are_refused(direction: str, rate: int) -> None:
    driver = CoreDriver.create(turn_detection=None)
    fmt = {"type": "audio/pcm", "rate": rate}
    driver.send("session.update", session={"type": "realtime", "audio": {direction: {"format": fmt}}})
    assert driver.events[-1].payload["error"]["param"] == f"session.audio.{direction}.format.rate"


def test_retention_ratio_drops_the_oldest_turns_and_keeps_calls_with_their_outputs() -> None:
    driver = tool_session(
        truncation={"type": "retention_ratio", "retention_ratio": 0.5, "token_limits": {"post_instructions": 200}}
    )
    for turn in range(8):
        ask(driver, f"Question number {turn}: " + "x" * 60)  # about 30 tokens a question
        if turn == 1:
            driver.engine(ToolCallDelta(0, name="get_weather", arguments='{"city": "Paris"}', call_id=f"call_{turn}"))
            driver.engine_done()
            output = {"type": "function_call_output", "call_id": f"call_{turn}", "output": "sunny"}
            driver.send("conversation.item.create", item=output)
            continue
        driver.engine(TextDelta(f"Answer {turn}."))
        driver.engine_done()
        driver.advance(1.0)
    firsts = [request.request.messages[0] for request in driver.started]
    first_questions = [m.parts[0].text.split(":")[0] for m in firsts]
    assert first_questions[:4] == ["Question number 0"] * 4  # nothing dropped while it fits
    # then the oldest turns went (the call and its output with them) down to half the limit, so the next turns
    # continue the same prompt until the next cut
    assert first_questions[4:] == ["Question number 3"] * 4
    for started in driver.started:
        roles = [m.role for m in started.request.messages]
        assert roles[0] == "user"
        assert ("tool" in roles) == any(isinstance(p, ToolCallPart) for m in started.request.messages for p in m.parts)


def test_truncation_disabled_and_auto_without_a_known_context_keep_everything() -> None:
    for truncation in ("disabled", "auto"):
        driver = CoreDriver.create(turn_detection=None)
        driver.send("session.update", session={"type": "realtime", "truncation": truncation})
        for _turn in range(5):
            ask(driver, "y" * 4000)
            driver.engine(TextDelta("ok"))
            driver.engine_done()
            driver.advance(0.5)
        assert len(driver.started[-1].request.messages) == 9
        assert driver.started[-1].request.messages[0].parts == (TextPart("y" * 4000),)


def test_fields_of_2026_are_accepted() -> None:
    """Accepted, echoed in the session, and (except truncation) without effect: see the README's table."""
    driver = CoreDriver.create(turn_detection=None)
    fields = {
        "reasoning": {"effort": "low"},
        "prompt": {"id": "pmpt_123", "version": "2", "variables": {"city": "Paris"}},
        "include": ["item.input_audio_transcription.logprobs"],
        "tracing": "auto",
        "truncation": {"type": "retention_ratio", "retention_ratio": 0.8},
    }
    driver.send("session.update", session={"type": "realtime", **fields})
    session = driver.events[-1].payload["session"]
    assert {key: session[key] for key in fields} == fields
    picture = png_image(8, 8)
    image = {"type": "input_image", "image_url": "data:image/png;base64," + base64.b64encode(picture).decode()}
    driver.send("conversation.item.create", item={"type": "message", "role": "user", "content": [image]})
    driver.send("response.create", response={"reasoning": {"effort": "high"}, "prompt": {"id": "pmpt_1"}})
    assert "error" not in driver.types()
    assert driver.started[-1].request.messages[0].parts[0].data == picture
    driver.send("session.update", session={"type": "realtime", "reasoning": "deep"})
    assert driver.events[-1].payload["error"]["param"] == "session.reasoning"


def test_hostile_tool_declarations_are_refused_not_crashed_on() -> None:
    driver = CoreDriver.create(turn_detection=None)
    deep: dict[str, Any] = {}
    node = deep
    for _ in range(600):  # what JSON can carry (its parser stops near 1000 levels), past what deepcopy can
        node["x"] = {}
        node = node["x"]
    huge = {"type": "function", "name": "big", "description": "x" * 70_000}
    for tools, param in (
        ([{"type": "function", "name": "deep", "parameters": deep}], "session.tools"),
        ([huge], "session.tools[0]"),
        ([{"type": "function", "name": f"t{i}"} for i in range(129)], "session.tools"),
    ):
        driver.send("session.update", session={"type": "realtime", "tools": tools})
        assert driver.events[-1].payload["error"]["param"] == param
