"""The LLM stage of the cascade engine: a conversation in, text out as it streams.

A stage is a model that answers in text only (Phi-4-multimodal, any chat LLM). It says whether it hears audio and
sees images; the cascade engine transcribes the caller's audio first for a stage that does not hear, and leaves
images out for one that does not see. A stage yields `TextDelta`s, `ToolCallDelta`s for the function calls its model
makes (no text after the first), and a final `Usage`; the cascade speaks the text and passes everything else through
unchanged, after the speech of the text before it.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import AsyncIterator
from typing import Any, Protocol

import numpy as np

from omnivox.pipeline.engines.base import AudioPart, Delta, ImagePart, Message, ResponseRequest, TextPart


class LlmStage(Protocol):
    model_id: str
    hears_audio: bool
    """Caller audio may be sent to it as audio."""
    sees_images: bool

    @property
    def ready(self) -> bool: ...

    async def start(self) -> None: ...

    def stream(self, request: ResponseRequest) -> AsyncIterator[Delta | Any]:
        """The answer to `request` (its `output_audio` is False) as text deltas, then usage."""

    async def close(self) -> None: ...


class TranscriptCache:
    """Transcripts of caller clips while the clips live: every turn re-sends the conversation, and a stage that does
    not hear must not have the earlier turns transcribed again (the session keeps each turn's array)."""

    def __init__(self) -> None:
        self._entries: dict[int, tuple[weakref.ref[np.ndarray], str]] = {}
        self._lock = threading.Lock()

    def get(self, pcm: np.ndarray) -> str | None:
        with self._lock:
            entry = self._entries.get(id(pcm))
        return entry[1] if entry is not None and entry[0]() is pcm else None

    def put(self, pcm: np.ndarray, text: str) -> None:
        key = id(pcm)

        def forget(_: object) -> None:
            with self._lock:
                self._entries.pop(key, None)

        with self._lock:
            self._entries[key] = (weakref.ref(pcm, forget), text)

    def __len__(self) -> int:
        return len(self._entries)


def as_heard_by(message: Message, transcripts: dict[int, str], sees_images: bool) -> Message:
    """`message` with its audio replaced by the transcripts (keyed by `id` of the clip) and, for a stage that does
    not see, without its images."""
    parts = []
    for part in message.parts:
        if isinstance(part, AudioPart) and id(part.pcm) in transcripts:
            text = transcripts[id(part.pcm)]
            if text:
                parts.append(TextPart(text))
        elif isinstance(part, ImagePart) and not sees_images:
            continue
        else:
            parts.append(part)
    return Message(message.role, tuple(parts))
