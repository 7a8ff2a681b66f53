"""One response of a realtime session while it runs: its output item, its paced audio, and the events that open and
close it. The session decides when a response starts, is cancelled or ends; this module renders what that looks
like on the wire (GA names; the door renders beta)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from omnivox.pipeline.audio import StreamResampler
from omnivox.pipeline.conversation import Item
from omnivox.pipeline.engines.base import Usage
from omnivox.pipeline.events import ServerEvent
from omnivox.pipeline.pacer import FramePacer


@dataclass
class ActiveResponse:
    id: str
    item: Item
    conversation_id: str | None
    """None for out-of-band responses (`conversation: "none"`): their item never enters the conversation."""
    output_audio: bool
    metadata: Any
    pacer: FramePacer | None
    resampler: StreamResampler | None
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

    def refs(self) -> dict[str, Any]:
        """The fields that place a delta event in this response's one output item and content part."""
        return {"response_id": self.id, "item_id": self.item.id, "output_index": 0, "content_index": 0}

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

    def opening_events(self) -> list[ServerEvent]:
        """`response.created` and the output item's `added`; the content part follows the conversation's item."""
        return [
            ServerEvent("response.created", {"response": self.to_json("in_progress")}),
            ServerEvent(
                "response.output_item.added", {"response_id": self.id, "output_index": 0, "item": self.item.to_json()}
            ),
        ]

    def content_part_added(self) -> ServerEvent:
        part = {"type": "audio", "transcript": ""} if self.output_audio else {"type": "text", "text": ""}
        return ServerEvent("response.content_part.added", {**self.refs(), "part": part})

    def text_delta(self, text: str) -> ServerEvent:
        kind = "response.output_audio_transcript.delta" if self.output_audio else "response.output_text.delta"
        return ServerEvent(kind, {**self.refs(), "delta": text})

    def closing_events(self, status: str) -> list[ServerEvent]:
        """The content's `done` events and the output item's, once the item's final status is known."""
        item, refs = self.item, self.refs()
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
        events.append(
            ServerEvent(
                "response.output_item.done", {"response_id": self.id, "output_index": 0, "item": item.to_json()}
            )
        )
        return events
