"""The conversation a session holds: items in order, what each contains, and what the caller heard.

Assistant items remember the text and how much audio was generated, sent and heard. After a
truncation (barge-in or `conversation.item.truncate`) the model sees only the heard part next turn:
the audio up to `audio_end_ms` and the matching prefix of the transcript. Function calls the model made and the
outputs the client returned for them are items too, and the model sees them on later turns.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from omnivox.pipeline.engines.base import (
    INPUT_RATE,
    AudioPart,
    ImagePart,
    Message,
    Part,
    TextPart,
    ToolCallPart,
    ToolResultPart,
)

MAX_SPOKEN_CHARS_PER_SECOND = 20.0
"""Upper bound of speaking rate used to cap the heard transcript when text runs ahead of audio."""


ItemType = Literal["message", "function_call", "function_call_output"]


@dataclass
class Item:
    id: str
    role: Literal["user", "assistant", "system", "tool"]
    """Function calls are the assistant's, their outputs the tool's (neither carries a role on the wire)."""
    status: str = "completed"
    type: ItemType = "message"
    call_id: str = ""
    """Function calls and outputs: which call."""
    name: str = ""
    """Function calls: the function."""
    arguments: str = ""
    """Function calls: the JSON arguments."""
    output: str = ""
    """Function call outputs: what the function returned."""
    text: str = ""
    audio: np.ndarray | None = None
    """User audio at 16 kHz (what the engine hears)."""
    images: list[tuple[bytes, str]] = field(default_factory=list)
    has_audio: bool = False
    """Assistant items: the content is audio with a transcript (otherwise text)."""
    audio_generated_ms: float = 0.0
    audio_sent_ms: float = 0.0
    heard_ms: float | None = None
    """None until truncated: everything generated counts as heard."""
    played_ms: float | None = None
    """What a door that owns playout reported as really played."""
    transcript: str | None = None
    """User audio transcript, when transcription is on."""
    text_marks: list[tuple[float, int]] | None = None
    """For engines that release each word with the audio that begins it: per text delta, the engine's audio before it
    (ms) and the text's length after it. Truncation then keeps exactly the words whose audio had begun."""

    def heard_text(self) -> str:
        """The part of the assistant's text the caller heard, cut at a word boundary."""
        if self.heard_ms is None or not self.has_audio:
            return self.text
        if self.audio_generated_ms <= 0 or self.heard_ms <= 0:
            return ""
        if self.text_marks is not None:
            heard = max((chars for at_ms, chars in self.text_marks if at_ms < self.heard_ms), default=0)
            return self.text[:heard].rstrip()
        share = min(1.0, self.heard_ms / self.audio_generated_ms)
        cut = min(round(len(self.text) * share), int(self.heard_ms / 1000 * MAX_SPOKEN_CHARS_PER_SECOND))
        if cut >= len(self.text):
            return self.text
        head = self.text[:cut]
        boundary = head.rfind(" ")
        return head[:boundary].rstrip() if boundary > 0 else ""

    def to_json(self) -> dict[str, Any]:
        """The `realtime.item` object (GA content types; the door renders beta)."""
        head = {"id": self.id, "object": "realtime.item", "type": self.type, "status": self.status}
        if self.type == "function_call":
            return {**head, "call_id": self.call_id, "name": self.name, "arguments": self.arguments}
        if self.type == "function_call_output":
            return {**head, "call_id": self.call_id, "output": self.output}
        content: list[dict[str, Any]]
        if self.role == "assistant":
            if self.has_audio:
                content = (
                    [{"type": "output_audio", "transcript": self.heard_text()}]
                    if self.status != "in_progress" or self.text
                    else []
                )
            else:
                content = (
                    [{"type": "output_text", "text": self.text}] if self.text or self.status != "in_progress" else []
                )
        else:
            content = []
            if self.audio is not None:
                content.append({"type": "input_audio", "transcript": self.transcript})
            if self.text:
                content.append({"type": "input_text", "text": self.text})
            content.extend({"type": "input_image"} for _ in self.images)
        return {**head, "role": self.role, "content": content}

    def to_message(self) -> Message | None:
        if self.type == "function_call":
            return Message("assistant", (ToolCallPart(self.call_id, self.name, self.arguments),))
        if self.type == "function_call_output":
            return Message("tool", (ToolResultPart(self.call_id, self.output),))
        parts: list[Part] = []
        if self.role == "assistant":
            text = self.heard_text()
            if text:
                parts.append(TextPart(text))
        else:
            if self.audio is not None and self.audio.size:
                parts.append(AudioPart(self.audio))
            if self.text:
                parts.append(TextPart(self.text))
            parts.extend(ImagePart(data, mime) for data, mime in self.images)
        return Message(self.role, tuple(parts)) if parts else None


class Conversation:
    def __init__(self) -> None:
        self.items: list[Item] = []

    def get(self, item_id: str) -> Item | None:
        return next((item for item in self.items if item.id == item_id), None)

    def last_id(self) -> str | None:
        return self.items[-1].id if self.items else None

    def insert(self, item: Item, previous_item_id: str | None = None) -> str | None:
        """Append (or insert after `previous_item_id`); returns the id of the item now before it."""
        if previous_item_id is None or previous_item_id == self.last_id():
            before = self.last_id()
            self.items.append(item)
            return before
        if previous_item_id == "root":
            self.items.insert(0, item)
            return None
        index = next((i for i, it in enumerate(self.items) if it.id == previous_item_id), None)
        if index is None:
            raise KeyError(previous_item_id)
        self.items.insert(index + 1, item)
        return previous_item_id

    def delete(self, item_id: str) -> bool:
        item = self.get(item_id)
        if item is None:
            return False
        self.items.remove(item)
        return True

    def messages(self, start: int = 0) -> tuple[Message, ...]:
        """The conversation from item `start` on, as the model should see it: user turns, assistant turns as heard,
        the function calls of an assistant turn in that turn's message, and the outputs of calls it holds (an output
        whose call was deleted is left out, so the model never sees a result of a call it did not make)."""
        items = self.items[start:]
        calls = {item.call_id: item.name for item in items if item.type == "function_call"}
        messages: list[Message] = []
        for item in items:
            if item.type == "function_call_output":
                if item.call_id in calls:
                    messages.append(Message("tool", (ToolResultPart(item.call_id, item.output, calls[item.call_id]),)))
                continue
            message = item.to_message()
            if message is None:
                continue
            if item.type == "function_call" and messages and messages[-1].role == "assistant":
                message = Message("assistant", messages.pop().parts + message.parts)
            messages.append(message)
        return tuple(messages)

    def audio_seconds(self) -> float:
        return sum(item.audio.size / INPUT_RATE for item in self.items if item.audio is not None)
