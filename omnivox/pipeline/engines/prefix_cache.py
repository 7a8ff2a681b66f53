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
from typing import Any

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

    def clear(self) -> None:
        """Drop every stored prompt (the GPU ran out of memory: stored prompts are the first thing to give up)."""
        with self._lock:
            self._entries.clear()

    def forget(self, conversation_id: str) -> None:
        """The conversation ended: free its KV now rather than when it would be evicted."""
        with self._lock:
            self._entries.pop(conversation_id, None)


@dataclass
class EncodedPrompt:
    """A thinker prefill over the part of the prompt that was not stored."""

    output: Any
    """The thinker's forward output over that part (logits, `past_key_values` for the whole prompt, and hidden
    states when asked for)."""
    reused: Prefix | None
    """The stored prompt it continued, or None when the prompt was encoded whole."""
    rope_delta: int
    ids: list[int]
    audio_keys: tuple[str, ...]

    @property
    def start(self) -> int:
        """Index of the first encoded token (the number of reused ones)."""
        return 0 if self.reused is None else len(self.reused.ids)

    def whole(self, new_talker_states: torch.Tensor | None) -> Prefix:
        """The whole prompt as encoded now, to store when the request ends: the reused talker states followed by
        those of the encoded part (`[..., prompt, hidden]`, whatever the engine keeps per position)."""
        states = new_talker_states
        if states is not None and self.reused is not None and self.reused.talker_states is not None:
            states = torch.cat([self.reused.talker_states, states], dim=1)
        return Prefix(self.ids, self.audio_keys, self.output.past_key_values, states)


def encode_prompt(
    thinker: Any,
    store: PrefixStore,
    conversation_id: str,
    inputs: dict[str, torch.Tensor],
    audio_keys: tuple[str, ...],
    *,
    talker_states: bool,
) -> EncodedPrompt:
    """The thinker prefill of a Qwen-Omni prompt, continuing the conversation's stored prompt when the new one starts
    with it: only the new part is encoded, at the positions the whole prompt gives it (audio stretches positions in
    TMRoPE). Prompts with images are encoded whole. `talker_states` asks for hidden states (the talker needs them)
    and refuses a stored prompt that has none."""
    ids = inputs["input_ids"][0].tolist()
    prefix = None
    if "pixel_values" not in inputs:
        prefix = store.take(conversation_id, ids, audio_keys)
    if prefix is not None and talker_states and prefix.talker_states is None:
        prefix = None
    if prefix is None:
        output = thinker(**inputs, use_cache=True, output_hidden_states=talker_states)
        return EncodedPrompt(output, None, int(thinker.model.rope_deltas.reshape(-1)[0]), ids, audio_keys)
    start, clips = len(prefix.ids), len(prefix.audio_keys)
    feature_mask = inputs.get("feature_attention_mask")
    positions, rope_deltas = thinker.model.get_rope_index(
        inputs["input_ids"],
        None,
        None,
        inputs["attention_mask"],
        False,
        None if feature_mask is None else feature_mask.sum(-1),
        None,
    )
    continuation = {
        "input_ids": inputs["input_ids"][:, start:],
        "attention_mask": inputs["attention_mask"],
        "position_ids": positions[:, :, start:],
    }
    if feature_mask is not None and clips < feature_mask.shape[0]:
        continuation["input_features"] = inputs["input_features"][clips:]
        continuation["feature_attention_mask"] = feature_mask[clips:]
    output = thinker(**continuation, past_key_values=prefix.cache, use_cache=True, output_hidden_states=talker_states)
    return EncodedPrompt(output, prefix, int(rope_deltas.reshape(-1)[0]), ids, audio_keys)


def keep_prompt(store: PrefixStore, conversation_id: str, prompt: Prefix) -> None:
    """Store a request's prompt when it ends, without the answer tokens its cache may have grown by (the next
    prompt holds the answer as it was heard)."""
    grown = prompt.cache.get_seq_length() - len(prompt.ids)
    if grown:
        prompt.cache.crop(-grown)
    store.put(conversation_id, prompt)
