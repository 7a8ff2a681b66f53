"""Function calling on the HTTP doors, in OpenAI's chat shape: the request's `tools` for the engine, and the
engine's calls as `delta.tool_calls` pieces (streamed) or `message.tool_calls` (whole), with
`finish_reason: "tool_calls"`.

As on the Realtime door, text that follows the start of a call belongs to the call and is never sent as the
answer, and a call that is not a declared tool with JSON-object arguments fails the completion
(`invalid_tool_call`), since a client must never run it.
"""

from __future__ import annotations

from typing import Any

from omnivox.pipeline.engines.base import FunctionTool, ToolCallDelta, ToolChoice
from omnivox.pipeline.tools import (
    AssembledCall,
    CallAssembler,
    ToolSpecError,
    new_call_id,
    parse_tool_choice,
    parse_tools,
)
from omnivox.server.http_bodies import ToolFields
from omnivox.server.http_common import ApiError
from omnivox.server.metrics import Metrics


def request_tools(body: ToolFields) -> tuple[tuple[FunctionTool, ...], ToolChoice, bool]:
    """(tools, tool_choice, parallel_tool_calls) of a request, or a 400 naming the bad field."""
    try:
        tools = parse_tools(body.tools)
        choice = parse_tool_choice(body.tool_choice, tools)
    except ToolSpecError as exc:
        raise ApiError(400, f"invalid request: {exc.message}", param=exc.param) from None
    return tools, choice, body.parallel_tool_calls is not False


class ChatToolCalls:
    """The function calls of one completion, as the engine's `ToolCallDelta` pieces arrive."""

    def __init__(
        self, tools: tuple[FunctionTool, ...], parallel: bool, metrics: Metrics | None = None, door: str = ""
    ) -> None:
        self._tools = tools
        self._parallel = parallel
        self._metrics = metrics
        self._door = door
        self._assembler = CallAssembler()
        self._positions: dict[int, int] = {}
        """engine index -> the call's `index` in `delta.tool_calls` (0, 1, ... in order of appearance)."""
        self._streamed: dict[int, str] = {}
        """engine index -> the arguments sent so far."""

    @property
    def started(self) -> bool:
        """A call has begun: the engine's text from here on is the call's, not the answer."""
        return self._assembler.started

    def piece(self, delta: ToolCallDelta) -> dict[str, Any] | None:
        """The `delta.tool_calls` entry for one piece (the first of a call carries its id and name), or None."""
        if not self._parallel and self._positions and delta.index not in self._positions:
            return None  # parallel_tool_calls: false keeps the first call only
        first = delta.index not in self._positions
        position = self._positions.setdefault(delta.index, len(self._positions))
        call = self._assembler.add(delta)
        self._streamed[delta.index] = self._streamed.get(delta.index, "") + delta.arguments
        if first:
            call.call_id = call.call_id or new_call_id()
            function = {"name": call.name, "arguments": delta.arguments}
            return {"index": position, "id": call.call_id, "type": "function", "function": function}
        return {"index": position, "function": {"arguments": delta.arguments}} if delta.arguments else None

    def finish(self) -> tuple[list[AssembledCall], list[dict[str, Any]]]:
        """The complete calls, and the last pieces to stream (`{}` for a call that streamed no arguments); a call
        that cannot be run fails the completion."""
        calls = self._assembler.finish(self._tools, self._parallel)
        invalid = any(call.error for call in calls)
        if self._metrics is not None:
            for _ in calls:
                self._metrics.tool_calls.labels(self._door, "invalid" if invalid else "completed").inc()
        for call in calls:
            if call.error:
                raise ApiError(
                    500,
                    f"the model made an invalid function call: {call.error}",
                    kind="server_error",
                    code="invalid_tool_call",
                )
        tail = [
            {"index": self._positions[call.index], "function": {"arguments": call.arguments}}
            for call in calls
            if not self._streamed.get(call.index)
        ]
        return calls, tail


def message_tool_calls(calls: list[AssembledCall]) -> list[dict[str, Any]]:
    """`message.tool_calls` of a whole completion."""
    return [
        {"id": call.call_id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}
        for call in calls
    ]
