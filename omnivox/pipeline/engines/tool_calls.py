"""Function calls in the Qwen (Hermes) text format, as the Qwen-Omni thinkers write them and read them back.

A call is a JSON object `{"name": ..., "arguments": {...}}` between `<tool_call>` and `</tool_call>`; the functions on
offer are listed as JSON between `<tools>` and `</tools>` in the system turn, and a result comes back in a user turn
between `<tool_response>` and `</tool_response>`. Qwen tokenizers hold `<tool_call>` as one token, so the engines know
at the very token that starts a call that nothing after it is speech.

`ToolCallParser` reads the streamed text: text before a call is the spoken answer, each complete call becomes a
`ToolCallDelta` (or one with `error` when its JSON is malformed), and nothing of a call's text is ever returned as
speech.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from omnivox.pipeline.engines.base import (
    Delta,
    FunctionTool,
    TextDelta,
    ToolCallDelta,
    ToolCallPart,
    ToolChoice,
    ToolResultPart,
)

CALL_START = "<tool_call>"
CALL_END = "</tool_call>"
RESULT_START = "<tool_response>"
RESULT_END = "</tool_response>"


def tool_specs(tools: Sequence[FunctionTool]) -> list[dict[str, Any]]:
    """The tools in OpenAI's chat shape, which chat templates and the Hermes `<tools>` block both use."""
    return [
        {
            "type": "function",
            "function": {"name": tool.name, "description": tool.description, "parameters": dict(tool.parameters)},
        }
        for tool in tools
    ]


def tools_system_text(tools: Sequence[FunctionTool], choice: ToolChoice) -> str:
    """The Hermes block that offers `tools` to the model, for models whose chat template has none."""
    listed = "\n".join(json.dumps(spec, ensure_ascii=False) for spec in tool_specs(tools))
    must = ""
    if choice.function:
        must = f"\nCall the function {choice.function} now."
    elif choice.mode == "required":
        must = "\nCall one of these functions now."
    return (
        "# Tools\n\nWhen a function below helps with the request, call it. The functions are listed as JSON "
        f"between the <tools></tools> tags:\n<tools>\n{listed}\n</tools>\n\nTo call a function, write a JSON "
        f'object with its name and arguments between {CALL_START}{CALL_END} tags:\n{CALL_START}\n{{"name": '
        f'<function-name>, "arguments": <args-json-object>}}\n{CALL_END}{must}'
    )


def call_text(call: ToolCallPart) -> str:
    """A call the assistant made, as the model writes it."""
    return (
        f'{CALL_START}\n{{"name": {json.dumps(call.name)}, "arguments": {arguments_value(call.arguments)}}}\n{CALL_END}'
    )


def arguments_value(arguments: str) -> str:
    """Arguments as JSON text: as given when they are JSON, else quoted (so the prompt stays valid JSON)."""
    try:
        json.loads(arguments)
    except ValueError:
        return json.dumps(arguments)
    return arguments


def result_text(result: ToolResultPart) -> str:
    return f"{RESULT_START}\n{result.output}\n{RESULT_END}"


def forced_call_prefix(choice: ToolChoice) -> str:
    """What a `required` (or named) tool choice makes the answer begin with: the start of a call."""
    if choice.function:
        return f'{CALL_START}\n{{"name": {json.dumps(choice.function)}, "arguments": '
    return CALL_START if choice.mode == "required" else ""


class ToolCallParser:
    """Splits a model's streamed text into speech and function calls (see the module docstring)."""

    def __init__(self) -> None:
        self._buffer = ""
        """Text not yet decided: speech that might be the start of `<tool_call>`, or a call not yet closed."""
        self._inside = False
        self._calls = 0
        self._started = False

    @property
    def in_call(self) -> bool:
        """A call has begun: the rest of the response's text is not speech."""
        return self._started

    def push(self, text: str) -> list[Delta]:
        deltas: list[Delta] = []
        self._buffer += text
        while True:
            if not self._inside:
                start = self._buffer.find(CALL_START)
                if start < 0:
                    keep = next(
                        (n for n in range(len(CALL_START) - 1, 0, -1) if self._buffer.endswith(CALL_START[:n])), 0
                    )
                    self._speech(self._buffer[: len(self._buffer) - keep], deltas)
                    self._buffer = self._buffer[len(self._buffer) - keep :]
                    return deltas
                self._speech(self._buffer[:start], deltas)
                self._buffer = self._buffer[start + len(CALL_START) :]
                self._inside = self._started = True
            end = self._buffer.find(CALL_END)
            if end < 0:
                return deltas
            deltas.append(self._parse(self._buffer[:end]))
            self._buffer, self._inside = self._buffer[end + len(CALL_END) :], False

    def finish(self) -> list[Delta]:
        """The end of the text: held speech is speech; an unterminated call is parsed as it stands."""
        rest, self._buffer = self._buffer, ""
        deltas: list[Delta] = []
        if self._inside:
            self._inside = False
            if rest.strip():
                deltas.append(self._parse(rest))
        else:
            self._speech(rest, deltas)
        return deltas

    def _speech(self, text: str, deltas: list[Delta]) -> None:
        """Text outside calls is speech until the first call; after it, the model's text is not spoken."""
        if text and not self._started:
            deltas.append(TextDelta(text))

    def _parse(self, body: str) -> ToolCallDelta:
        index = self._calls
        self._calls += 1
        try:
            value = json.loads(body)
        except ValueError as exc:
            return ToolCallDelta(index, arguments=body.strip(), error=f"the function call is not valid JSON: {exc}")
        if not isinstance(value, dict) or not isinstance(value.get("name"), str):
            return ToolCallDelta(index, arguments=body.strip(), error='the function call has no "name"')
        arguments = value.get("arguments", value.get("parameters", {}))
        text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
        return ToolCallDelta(index, name=value["name"], arguments=text)
