"""Function tools as clients declare them, shared by the session core, the HTTP doors and the engines.

A Realtime session declares a tool flat (`{"type": "function", "name", "description", "parameters"}`), a chat
completion nests it (`{"type": "function", "function": {...}}`); both become `FunctionTool`s here, and `tool_choice`
(`auto`, `none`, `required` or a named function, flat or nested) becomes a `ToolChoice`. Everything is hostile input:
a bad value raises `ToolSpecError` naming its field, which each door renders in its own error shape.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass
from typing import Any

from omnivox.pipeline.engines.base import FunctionTool, ToolCallDelta, ToolChoice

MAX_TOOLS = 128
"""OpenAI's limit of tools per request."""
MAX_TOOL_SPEC_CHARS = 64 * 1024
"""One tool's description plus parameters schema, as JSON: the prompt pays for every character of it."""
MAX_ARGUMENTS_CHARS = 256 * 1024
"""A function call's arguments, as the model or a client states them."""
MAX_OUTPUT_CHARS = 1024 * 1024
"""A function call's output, as a client returns it."""
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
"""OpenAI's rule for function names."""


class ToolSpecError(ValueError):
    """A tool declaration, tool choice or call that cannot be used; `param` names the field."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


def parse_tools(data: Any, param: str = "tools") -> tuple[FunctionTool, ...]:
    """A `tools` list (flat Realtime or nested chat shape) -> `FunctionTool`s; `None` is no tools."""
    if data is None:
        return ()
    if not isinstance(data, list):
        raise ToolSpecError(f"{param} must be a list of function tools", param)
    if len(data) > MAX_TOOLS:
        raise ToolSpecError(f"{param} holds {len(data)} tools; at most {MAX_TOOLS} are allowed", param)
    tools: list[FunctionTool] = []
    for index, entry in enumerate(data):
        tool = _parse_tool(entry, f"{param}[{index}]")
        if any(known.name == tool.name for known in tools):
            raise ToolSpecError(f"tool name {tool.name!r} is declared twice", f"{param}[{index}].name")
        tools.append(tool)
    return tuple(tools)


def _parse_tool(entry: Any, param: str) -> FunctionTool:
    if not isinstance(entry, dict):
        raise ToolSpecError(f"{param} must be an object", param)
    if entry.get("type", "function") != "function":
        raise ToolSpecError(f"{param}: only function tools are supported, not {entry.get('type')!r}", f"{param}.type")
    spec = entry.get("function") if isinstance(entry.get("function"), dict) else entry
    name = spec.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise ToolSpecError(f"{param}.name must be 1-64 letters, digits, '_' or '-'", f"{param}.name")
    description = spec.get("description")
    if description is None:
        description = ""
    if not isinstance(description, str):
        raise ToolSpecError(f"{param}.description must be a string", f"{param}.description")
    parameters = spec.get("parameters")
    if parameters is None:
        parameters = {}
    if not isinstance(parameters, dict):
        raise ToolSpecError(f"{param}.parameters must be a JSON schema object", f"{param}.parameters")
    try:
        size = len(description) + len(json.dumps(parameters))
    except (ValueError, TypeError, RecursionError):
        raise ToolSpecError(f"{param}.parameters is not a JSON schema", f"{param}.parameters") from None
    if size > MAX_TOOL_SPEC_CHARS:
        raise ToolSpecError(f"{param} is over {MAX_TOOL_SPEC_CHARS} characters", param)
    return FunctionTool(name, description, parameters)


def parse_tool_choice(data: Any, tools: tuple[FunctionTool, ...], param: str = "tool_choice") -> ToolChoice:
    """`auto` | `none` | `required` | a named function (`{"type": "function", "name"}`, or nested under
    `function`); `None` is `auto`. A named function must be one of `tools`."""
    if data is None:
        return ToolChoice()
    if data in ("auto", "none", "required"):
        return ToolChoice(data)
    if isinstance(data, dict) and data.get("type") == "function":
        spec = data.get("function") if isinstance(data.get("function"), dict) else data
        name = spec.get("name")
        if not isinstance(name, str) or not any(tool.name == name for tool in tools):
            raise ToolSpecError(f"{param} names {name!r}, which is not one of the declared tools", param)
        return ToolChoice("required", name)
    raise ToolSpecError(f"{param} must be auto, none, required or {{type: function, name}}", param)


def arguments_error(arguments: str) -> str | None:
    """Why `arguments` are not a function call's arguments (a JSON object), or None when they are."""
    if len(arguments) > MAX_ARGUMENTS_CHARS:
        return f"the arguments are over {MAX_ARGUMENTS_CHARS} characters"
    try:
        value = json.loads(arguments)
    except (ValueError, RecursionError) as exc:
        return f"the arguments are not valid JSON: {exc}"
    if not isinstance(value, dict):
        return "the arguments are not a JSON object"
    return None


def new_call_id() -> str:
    """An id for a call the model made, in OpenAI's `call_` form."""
    return f"call_{secrets.token_urlsafe(12)}"


@dataclass
class AssembledCall:
    """One function call put together from an engine's `ToolCallDelta` pieces."""

    index: int
    call_id: str = ""
    name: str = ""
    arguments: str = ""
    error: str | None = None


class CallAssembler:
    """Collects the `ToolCallDelta` pieces of one response into whole calls, and checks them once the response
    is complete: a call must name a declared tool and carry a JSON object as arguments, or it fails."""

    def __init__(self) -> None:
        self._calls: dict[int, AssembledCall] = {}

    @property
    def started(self) -> bool:
        """The model has begun a call: the rest of its text is the call's, not speech."""
        return bool(self._calls)

    def add(self, delta: ToolCallDelta) -> AssembledCall:
        call = self._calls.setdefault(delta.index, AssembledCall(delta.index))
        call.call_id = call.call_id or delta.call_id
        call.name = call.name or delta.name
        if len(call.arguments) + len(delta.arguments) > MAX_ARGUMENTS_CHARS:
            call.error = call.error or f"the arguments are over {MAX_ARGUMENTS_CHARS} characters"
        else:
            call.arguments += delta.arguments
        call.error = call.error or delta.error
        return call

    def finish(self, tools: tuple[FunctionTool, ...], parallel: bool = True) -> list[AssembledCall]:
        """The calls in order (only the first when `parallel` is False), each with its call id and its verdict."""
        calls = [self._calls[index] for index in sorted(self._calls)][: None if parallel else 1]
        for call in calls:
            call.call_id = call.call_id or new_call_id()
            if not call.arguments.strip():
                call.arguments = "{}"
            if call.error is None and not any(tool.name == call.name for tool in tools):
                call.error = f"the model called {call.name!r}, which is not a declared tool"
            call.error = call.error or arguments_error(call.arguments)
        return calls
