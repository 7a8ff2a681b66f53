"""The realtime session object: its defaults, how a `session.update` merges into it, and what makes it valid.

Pure functions over the GA session dict (the door renders beta names); `Session` holds the dict and applies them.
"""

from __future__ import annotations

import copy
from typing import Any

from omnivox.pipeline.echo_cancel import NOISE_REDUCTION_TYPES, CleanupSettings
from omnivox.pipeline.events import ProtocolError
from omnivox.pipeline.turns import TurnDetectionConfig

FORMAT_TYPES = {"audio/pcm": "pcm16", "audio/pcmu": "g711_ulaw", "audio/pcma": "g711_alaw"}
"""GA audio format type -> the internal format name of `pipeline.audio`."""
_SENT_WHOLE = ("turn_detection", "format", "transcription", "noise_reduction")
"""Nested objects a client always sends whole: an update replaces them instead of merging into them."""


def default_session(model: str) -> dict[str, Any]:
    return {
        "type": "realtime",
        "object": "realtime.session",
        "model": model,
        "output_modalities": ["audio"],
        "instructions": "",
        "tools": [],
        "tool_choice": "auto",
        "temperature": 0.8,
        "max_output_tokens": "inf",
        "audio": {
            "input": {
                "format": {"type": "audio/pcm", "rate": 24000},
                "transcription": None,
                "noise_reduction": None,
                "turn_detection": TurnDetectionConfig().to_dict(),
            },
            "output": {"format": {"type": "audio/pcm", "rate": 24000}, "voice": "alloy", "speed": 1.0},
        },
    }


def merge_update(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Partial update: nested objects merge, except those a client always sends whole."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict) and key not in _SENT_WHOLE:
            merged[key] = merge_update(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def parse_turn_detection(
    data: Any, min_speech_ms: int, *, min_interruption_ms: int = 700
) -> TurnDetectionConfig | None:
    """The session's `turn_detection` object, validated (None: manual commits)."""
    if data is None:
        return None
    if not isinstance(data, dict):
        raise ProtocolError("turn_detection must be an object or null", param="session.audio.input.turn_detection")
    try:
        return TurnDetectionConfig.from_dict(data, min_speech_ms, min_interruption_ms)
    except ValueError as exc:
        raise ProtocolError(str(exc), param="session.audio.input.turn_detection") from None


def cleanup_settings(session: dict[str, Any]) -> CleanupSettings:
    """The caller-audio cleanup a (validated) session asks for."""
    audio_input = session["audio"]["input"]
    noise = audio_input.get("noise_reduction")
    return CleanupSettings(
        echo_cancellation=bool(audio_input.get("echo_cancellation")),
        noise_reduction=noise["type"] if isinstance(noise, dict) else None,
    )


def _validate_cleanup(audio_input: dict[str, Any]) -> None:
    echo = audio_input.get("echo_cancellation", False)
    if not isinstance(echo, bool):
        raise ProtocolError("echo_cancellation must be true or false", param="session.audio.input.echo_cancellation")
    noise = audio_input.get("noise_reduction")
    if noise is not None and (not isinstance(noise, dict) or noise.get("type") not in NOISE_REDUCTION_TYPES):
        raise ProtocolError(
            'noise_reduction must be null or {"type": "near_field" | "far_field"}',
            param="session.audio.input.noise_reduction",
        )


def validate_session(session: dict[str, Any]) -> None:
    """Refuse a merged session the server cannot honour, naming the offending field."""
    modalities = session.get("output_modalities")
    if not (isinstance(modalities, list) and modalities and set(modalities) <= {"audio", "text"}):
        raise ProtocolError("output_modalities must be ['audio'] or ['text']", param="session.output_modalities")
    if not isinstance(session.get("instructions"), str):
        raise ProtocolError("instructions must be a string", param="session.instructions")
    for direction in ("input", "output"):
        fmt = session.get("audio", {}).get(direction, {}).get("format")
        param = f"session.audio.{direction}.format"
        if not isinstance(fmt, dict) or fmt.get("type") not in FORMAT_TYPES:
            raise ProtocolError(f"{param} must be audio/pcm, audio/pcmu or audio/pcma", param=param)
        if fmt["type"] == "audio/pcm" and fmt.setdefault("rate", 24000) != 24000:
            raise ProtocolError("audio/pcm is 24000 Hz only", param=f"{param}.rate")
    _validate_cleanup(session["audio"]["input"])
    voice = session["audio"]["output"].get("voice")
    if not isinstance(voice, str) or not voice:
        raise ProtocolError("voice must be a non-empty string", param="session.audio.output.voice")
    tokens = session.get("max_output_tokens")
    if tokens != "inf" and (isinstance(tokens, bool) or not isinstance(tokens, int) or not 1 <= tokens <= 4096):
        raise ProtocolError(
            "max_output_tokens must be an integer in [1, 4096] or 'inf'", param="session.max_output_tokens"
        )
    temperature = session.get("temperature")
    if isinstance(temperature, bool) or not isinstance(temperature, int | float) or not 0 <= temperature <= 2:
        raise ProtocolError("temperature must be a number in [0, 2]", param="session.temperature")
