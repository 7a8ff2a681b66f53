"""The Hermes tool-call text format the Qwen engines read and write: the streamed parser and the prompt pieces."""

from __future__ import annotations

import json

import pytest

from omnivox.pipeline.engines.base import (
    FunctionTool,
    TextDelta,
    ToolCallDelta,
    ToolCallPart,
    ToolChoice,
    ToolResultPart,
)
from omnivox.pipeline.engines.tool_calls import (
    ToolCallParser,
    call_text,
    forced_call_prefix,
    result_text,
    tools_system_text,
)

CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def parse(pieces: list[str]) -> list[object]:
    parser = ToolCallParser()
    deltas = [delta for piece in pieces for delta in parser.push(piece)]
    return deltas + parser.finish()


def spoken(deltas: list[object]) -> str:
    return "".join(delta.text for delta in deltas if isinstance(delta, TextDelta))


def calls(deltas: list[object]) -> list[ToolCallDelta]:
    return [delta for delta in deltas if isinstance(delta, ToolCallDelta)]


@pytest.mark.parametrize("split", [1, 2, 3, 7, len(CALL)])
def test_text_before_a_call_is_speech_and_the_call_is_never_spoken(split: int) -> None:
    text = "Let me check. " + CALL + "\nIgnored after the call."
    deltas = parse([text[i : i + split] for i in range(0, len(text), split)])
    assert spoken(deltas) == "Let me check. "
    assert calls(deltas) == [ToolCallDelta(0, name="get_weather", arguments='{"city": "Paris"}')]


def test_speech_that_only_looks_like_a_call_is_released_once_it_is_not_one() -> None:
    parser = ToolCallParser()
    assert parser.push("a <tool") == [TextDelta("a ")]
    assert not parser.in_call
    assert parser.push("s are handy") == [TextDelta("<tools are handy")]
    assert parser.push(" <to") == [TextDelta(" ")]
    assert parser.finish() == [TextDelta("<to")]


def test_parallel_calls_are_numbered_in_order() -> None:
    second = CALL.replace("Paris", "Rome")
    deltas = parse([CALL, "\n", second])
    assert [(call.index, json.loads(call.arguments)["city"]) for call in calls(deltas)] == [(0, "Paris"), (1, "Rome")]
    assert spoken(deltas) == ""


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ('<tool_call>\n{"name": "get_weather", "arguments": {"city": </tool_call>', "not valid JSON"),
        ('<tool_call>\n{"arguments": {}}\n</tool_call>', 'no "name"'),
        ('<tool_call>\n["get_weather"]\n</tool_call>', 'no "name"'),
        ('<tool_call>\n{"name": "get_weather", "arguments": {"ci', "not valid JSON"),  # the answer ended inside
    ],
)
def test_a_malformed_call_is_an_error_carrying_its_text(text: str, reason: str) -> None:
    (call,) = calls(parse([text]))
    assert call.error is not None and reason in call.error
    assert call.arguments and call.arguments in text


def test_an_unterminated_but_complete_call_still_counts() -> None:
    (call,) = calls(parse([CALL.removesuffix("</tool_call>")]))
    assert (call.name, call.error) == ("get_weather", None)


def test_the_prompt_pieces_round_trip_through_the_parser() -> None:
    part = ToolCallPart("call_1", "get_weather", '{"city": "Paris"}')
    assert calls(parse([call_text(part)])) == [ToolCallDelta(0, name="get_weather", arguments='{"city": "Paris"}')]
    broken = ToolCallPart("call_2", "get_weather", "not json")
    assert json.loads(call_text(broken).split("\n")[1])["arguments"] == "not json"
    assert result_text(ToolResultPart("call_1", "21 degrees")) == "<tool_response>\n21 degrees\n</tool_response>"
    offer = tools_system_text([FunctionTool("get_weather", "Weather", {"type": "object"})], ToolChoice("required"))
    listed = offer.split("<tools>\n")[1].split("\n</tools>")[0]
    assert json.loads(listed)["function"]["name"] == "get_weather"
    assert "Call one of these functions now." in offer
    assert forced_call_prefix(ToolChoice("auto")) == ""
    assert forced_call_prefix(ToolChoice("required")) == "<tool_call>"
    assert forced_call_prefix(ToolChoice("required", "get_weather")).endswith('{"name": "get_weather", "arguments": ')
