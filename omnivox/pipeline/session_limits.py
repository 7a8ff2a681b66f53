"""The bounds of one realtime session: what a client may make the server hold, echo or ask of the engine.

Every value a client sends is hostile: a session never keeps a key it does not know, never echoes more than
`max_session_bytes` of session object, and refuses (with an error naming the limit) items, instructions and answer
lengths past their bounds. The conversation itself stays bounded by deleting its oldest items, as a long call must go
on. Pure functions over the wire values; `Session` applies them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from omnivox.pipeline.audio import AudioFormat
from omnivox.pipeline.conversation import Conversation, Item
from omnivox.pipeline.engines.base import INPUT_RATE
from omnivox.pipeline.events import ProtocolError


@dataclass(frozen=True)
class SessionLimits:
    """Config `limits.max_input_buffer_s`, `session_limits.*` and `generation.*` as one session sees them."""

    max_input_buffer_s: float = 600.0
    max_items: int = 1000
    max_audio_s: float = 900.0
    max_item_chars: int = 65_536
    max_item_parts: int = 16
    max_instructions_chars: int = 65_536
    max_session_bytes: int = 262_144
    max_transcriptions: int = 4
    max_output_tokens: int = 4096
    max_prompt_tokens: int | None = 32_768


SESSION_KEYS = frozenset(
    {
        "type",
        "object",
        "id",
        "model",
        "audio",
        "include",
        "instructions",
        "max_output_tokens",
        "output_modalities",
        "parallel_tool_calls",
        "prompt",
        "reasoning",
        "temperature",
        "tool_choice",
        "tools",
        "tracing",
        "truncation",
    }
)
"""The GA session fields (OpenAI's `RealtimeSessionCreateRequest`, plus `temperature`); any other key is dropped."""
AUDIO_KEYS = {
    "input": frozenset({"echo_cancellation", "format", "noise_reduction", "transcription", "turn_detection"}),
    "output": frozenset({"format", "speed", "voice"}),
}


def known_session_fields(update: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """`update` without the keys the server does not know (they are never stored nor echoed), and their names."""
    dropped = [key for key in update if key not in SESSION_KEYS]
    known = {key: value for key, value in update.items() if key in SESSION_KEYS}
    audio = known.get("audio")
    if isinstance(audio, dict):
        dropped += [f"audio.{key}" for key in audio if key not in AUDIO_KEYS]
        audio = {key: value for key, value in audio.items() if key in AUDIO_KEYS}
        for direction, keys in AUDIO_KEYS.items():
            part = audio.get(direction)
            if isinstance(part, dict):
                dropped += [f"audio.{direction}.{key}" for key in part if key not in keys]
                audio[direction] = {key: value for key, value in part.items() if key in keys}
        known["audio"] = audio
    return known, dropped


def check_session_size(session: dict[str, Any], limits: SessionLimits) -> None:
    """Refuse a merged session whose instructions or other fields outgrow their bounds (it would be echoed whole)."""
    instructions = session.get("instructions")
    if isinstance(instructions, str) and len(instructions) > limits.max_instructions_chars:
        raise ProtocolError(
            f"instructions of {len(instructions)} characters; at most {limits.max_instructions_chars}",
            code="instructions_too_long",
            param="session.instructions",
        )
    rest = {key: value for key, value in session.items() if key != "instructions"}
    size = len(json.dumps(rest, separators=(",", ":")))
    if size > limits.max_session_bytes:
        raise ProtocolError(
            f"the session object is {size} bytes as JSON (instructions aside); at most {limits.max_session_bytes}",
            code="session_too_large",
            param="session",
        )


def check_response_instructions(instructions: Any, limits: SessionLimits) -> None:
    if isinstance(instructions, str) and len(instructions) > limits.max_instructions_chars:
        raise ProtocolError(
            f"instructions of {len(instructions)} characters; at most {limits.max_instructions_chars}",
            code="instructions_too_long",
            param="response.instructions",
        )


MAX_METADATA_PAIRS = 16
MAX_METADATA_KEY_CHARS = 64
MAX_METADATA_VALUE_CHARS = 512


def check_metadata(metadata: Any) -> None:
    """`response.metadata` is echoed in every response event: OpenAI's bounds (16 pairs of short strings)."""
    if metadata is None:
        return
    if (
        not isinstance(metadata, dict)
        or len(metadata) > MAX_METADATA_PAIRS
        or any(not isinstance(key, str) or len(key) > MAX_METADATA_KEY_CHARS for key in metadata)
        or any(not isinstance(value, str) or len(value) > MAX_METADATA_VALUE_CHARS for value in metadata.values())
    ):
        raise ProtocolError(
            f"metadata must be at most {MAX_METADATA_PAIRS} string pairs, keys of at most {MAX_METADATA_KEY_CHARS} "
            f"characters and values of at most {MAX_METADATA_VALUE_CHARS}",
            code="invalid_value",
            param="response.metadata",
        )


def _text_chars(value: Any, skip: frozenset[str]) -> int:
    """Characters of every string in a JSON value, except under the keys in `skip` (media bounded on their own)."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return sum(_text_chars(v, skip) for k, v in value.items() if k not in skip)
    if isinstance(value, list):
        return sum(_text_chars(v, skip) for v in value)
    return 0


_MEDIA_KEYS = frozenset({"audio", "image_url"})


def base64_audio_seconds(text: str, fmt: AudioFormat) -> float:
    """Seconds of audio a base64 string holds in `fmt`, known before decoding a byte of it."""
    decoded_bytes = len(text) * 3 // 4 - text[-2:].count("=")
    return decoded_bytes / fmt.bytes_per_sample / fmt.rate


def check_item_size(item: Any, limits: SessionLimits, input_format: AudioFormat, param: str = "item") -> None:
    """Refuse a client item past its bounds before anything in it is decoded."""
    if not isinstance(item, dict):
        return  # the item parser says what is wrong with it
    content = item.get("content")
    if isinstance(content, list) and len(content) > limits.max_item_parts:
        raise ProtocolError(
            f"the item has {len(content)} content parts; at most {limits.max_item_parts}",
            code="item_too_large",
            param=f"{param}.content",
        )
    chars = _text_chars(item, _MEDIA_KEYS)
    if chars > limits.max_item_chars:
        raise ProtocolError(
            f"the item holds {chars} characters of text; at most {limits.max_item_chars}",
            code="item_too_large",
            param=param,
        )
    if isinstance(content, list):
        audio = [p["audio"] for p in content if isinstance(p, dict) and isinstance(p.get("audio"), str)]
        seconds = sum(base64_audio_seconds(data, input_format) for data in audio)
        if seconds > limits.max_input_buffer_s:
            raise ProtocolError(
                f"the item holds {seconds:.1f} s of audio; at most {limits.max_input_buffer_s:g} s",
                code="item_too_large",
                param=f"{param}.content",
            )


def items_to_evict(conversation: Conversation, limits: SessionLimits, keep: tuple[Item, ...]) -> list[Item]:
    """The oldest items to delete so that the conversation holds at most `max_items` items and `max_audio_s` of
    caller audio (never one of `keep`: the item just added, the active response's)."""
    count = len(conversation.items)
    audio = sum(item.audio.size for item in conversation.items if item.audio is not None)
    max_audio = limits.max_audio_s * INPUT_RATE
    evicted: list[Item] = []
    for item in conversation.items:
        if count <= limits.max_items and audio <= max_audio:
            break
        if any(item is kept for kept in keep):
            continue
        evicted.append(item)
        count -= 1
        audio -= item.audio.size if item.audio is not None else 0
    return evicted
