"""One response of a realtime session while it runs: its output items (the spoken or written message, and the
function calls the model makes), its paced audio, and the events that open and close them. The session decides when
a response starts, is cancelled or ends; this module renders what that looks like on the wire (GA names; the door
renders beta)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omnivox.pipeline.audio import StreamResampler
from omnivox.pipeline.conversation import Item
from omnivox.pipeline.engines.base import FunctionTool, Usage
from omnivox.pipeline.events import ServerEvent
from omnivox.pipeline.pacer import FramePacer
from omnivox.pipeline.tools import AssembledCall, CallAssembler


@dataclass
class ActiveResponse:
    id: str
    conversation_id: str | None
    """None for out-of-band responses (`conversation: "none"`): their items never enter the conversation."""
    output_audio: bool
    metadata: Any
    pacer: FramePacer | None
    resampler: StreamResampler | None
    tools: tuple[FunctionTool, ...] = ()
    parallel_tool_calls: bool = True
    item: Item | None = None
    """The message output item, once it is open (at once without tools; with tools, at the first text or audio, so
    that a response that only calls a function has no empty message)."""
    output: list[Item] = field(default_factory=list)
    """Every announced output item, in `output_index` order."""
    calls: CallAssembler = field(default_factory=CallAssembler)
    engine_done: bool = False
    engine_audio_ms: float = 0.0
    """Audio received from the engine, at its own rate (before resampling: the time base of text marks)."""
    usage: Usage | None = None
    playout_started: bool = False

    @property
    def in_conversation(self) -> bool:
        return self.conversation_id is not None

    @property
    def modalities(self) -> list[str]:
        return ["audio"] if self.output_audio else ["text"]

    @property
    def message_index(self) -> int:
        return self.output.index(self.item) if self.item is not None else 0

    def refs(self) -> dict[str, Any]:
        """The fields that place a delta event in this response's message item and its one content part."""
        assert self.item is not None
        return {"response_id": self.id, "item_id": self.item.id, "output_index": self.message_index, "content_index": 0}

    def to_json(
        self, status: str, details: dict[str, Any] | None = None, output: list[dict[str, Any]] | None = None
    ) -> dict[str, Any]:
        """The `realtime.response` object."""
        usage = None
        if self.usage is not None:
            usage = {
                "total_tokens": self.usage.input_tokens + self.usage.output_tokens,
                "input_tokens": self.usage.input_tokens,
                "output_tokens": self.usage.output_tokens,
                "input_token_details": {"cached_tokens": self.usage.cached_input_tokens},
            }
        return {
            "id": self.id,
            "object": "realtime.response",
            "status": status,
            "status_details": details,
            "output": output or [],
            "conversation_id": self.conversation_id,
            "output_modalities": self.modalities,
            "metadata": self.metadata,
            "usage": usage,
        }

    def created_event(self) -> ServerEvent:
        return ServerEvent("response.created", {"response": self.to_json("in_progress")})

    def item_added(self, item: Item) -> ServerEvent:
        """A new output item (the message or a call) takes the next `output_index`."""
        self.output.append(item)
        return ServerEvent(
            "response.output_item.added",
            {"response_id": self.id, "output_index": len(self.output) - 1, "item": opening_json(item)},
        )

    def item_done(self, item: Item) -> ServerEvent:
        return ServerEvent(
            "response.output_item.done",
            {"response_id": self.id, "output_index": self.output.index(item), "item": item.to_json()},
        )

    def content_part_added(self) -> ServerEvent:
        part = {"type": "audio", "transcript": ""} if self.output_audio else {"type": "text", "text": ""}
        return ServerEvent("response.content_part.added", {**self.refs(), "part": part})

    def text_delta(self, text: str) -> ServerEvent:
        kind = "response.output_audio_transcript.delta" if self.output_audio else "response.output_text.delta"
        return ServerEvent(kind, {**self.refs(), "delta": text})

    def closing_events(self, status: str) -> list[ServerEvent]:
        """The message's content `done` events and its output item's, once the item's final status is known."""
        item, refs = self.item, self.refs()
        assert item is not None
        transcript = item.text
        events: list[ServerEvent] = []
        if self.output_audio:
            events.append(ServerEvent("response.output_audio.done", refs))
            events.append(ServerEvent("response.output_audio_transcript.done", {**refs, "transcript": transcript}))
            part = {"type": "audio", "transcript": transcript}
        else:
            events.append(ServerEvent("response.output_text.done", {**refs, "text": transcript}))
            part = {"type": "text", "text": transcript}
        events.append(ServerEvent("response.content_part.done", {**refs, "part": part}))
        item.status = "completed" if status == "completed" else "incomplete"
        events.append(self.item_done(item))
        return events

    def call_arguments_events(self, item: Item) -> list[ServerEvent]:
        """A complete call's arguments: one `delta` with all of them (they are complete before a call is announced,
        so that no call the caller interrupted is ever run), then `done`."""
        refs = {"response_id": self.id, "item_id": item.id, "output_index": self.output.index(item)}
        return [
            ServerEvent(
                "response.function_call_arguments.delta", {**refs, "call_id": item.call_id, "delta": item.arguments}
            ),
            ServerEvent(
                "response.function_call_arguments.done",
                {**refs, "call_id": item.call_id, "name": item.name, "arguments": item.arguments},
            ),
        ]


def opening_json(item: Item) -> dict[str, Any]:
    """An output item as it is first announced: a call is `in_progress` with no arguments yet, as OpenAI announces
    it (clients such as openai-agents run a call whenever they see it `completed`, so it must not be twice)."""
    if item.type == "function_call":
        return {**item.to_json(), "status": "in_progress", "arguments": ""}
    return item.to_json()


def call_item(call: AssembledCall, item_id: str) -> Item:
    """The conversation item of a call the model made (`completed`, or `incomplete` when it failed)."""
    return Item(
        item_id,
        "assistant",
        status="incomplete" if call.error else "completed",
        type="function_call",
        call_id=call.call_id,
        name=call.name,
        arguments=call.arguments,
    )
