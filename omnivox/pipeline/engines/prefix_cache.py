"""The thinker's KV of each conversation's last prompt, kept so that the next turn prefills only what is new.

A voice conversation grows by one assistant answer and one user turn at a time, and every turn's prompt starts with
the previous turn's prompt (system prompt, earlier turns, `<|im_start|>assistant\\n`). Re-encoding all of it costs a
prefill that grows with the conversation; reusing it costs memory (7B: about 57 KB of KV per token). An entry is
used only when the new prompt's token ids start with the stored ids and its audio clips start with the same audio
(by content digest), so a truncated, edited or deleted turn simply misses and the prompt is encoded in full.

Entries are owned by one generation at a time: `take` removes the entry (the prefill extends it in place) and the
generation `put`s the grown prompt back when it ends. The store keeps at most `capacity` conversations, dropping the
least recently used.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch
from transformers import Cache


@dataclass
class Prefix:
    """A prompt the thinker has already encoded."""

    ids: list[int]
    audio_keys: tuple[str, ...]
    cache: Cache
    """The thinker's KV for exactly `ids`."""
    talker_states: torch.Tensor | None
    """`[1, len(ids), hidden]`: what the talker prefill reads for each prompt position (None if never computed)."""


class PrefixStore:
    """Per-conversation `Prefix`es, least recently used dropped beyond `capacity` (0 keeps nothing)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[str, Prefix] = OrderedDict()
        self._lock = threading.Lock()  # `forget` comes from the event loop, the rest from the GPU worker
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def take(self, conversation_id: str, ids: list[int], audio_keys: tuple[str, ...]) -> Prefix | None:
        """The conversation's prefix if `ids`/`audio_keys` continue it, removed from the store; else None."""
        if not conversation_id or not self.capacity:
            return None
        with self._lock:
            prefix = self._entries.pop(conversation_id, None)
        usable = (
            prefix is not None
            and len(prefix.ids) < len(ids)
            and ids[: len(prefix.ids)] == prefix.ids
            and audio_keys[: len(prefix.audio_keys)] == prefix.audio_keys
        )
        if usable:
            self.hits += 1
            return prefix
        self.misses += 1
        return None

    def put(self, conversation_id: str, prefix: Prefix) -> None:
        if not conversation_id or not self.capacity:
            return
        with self._lock:
            self._entries[conversation_id] = prefix
            self._entries.move_to_end(conversation_id)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)

    def forget(self, conversation_id: str) -> None:
        """The conversation ended: free its KV now rather than when it would be evicted."""
        with self._lock:
            self._entries.pop(conversation_id, None)
