"""The realtime session object: its defaults, how a `session.update` merges into it, and what makes it valid.

Pure functions over the GA session dict (the door renders beta names); `Session` holds the dict and applies them.
"""

from __future__ import annotations

import copy
from typing import Any

from omnivox.pipeline.audio import AudioFormat, audio_format
from omnivox.pipeline.context_window import TruncationError, TruncationPolicy
from omnivox.pipeline.events import ProtocolError
from omnivox.pipeline.tools import ToolSpecError, parse_tool_choice, parse_tools
from omnivox.pipeline.turns import TurnDetectionConfig

FORMAT_TYPES = {"audio/pcm": "pcm16", "audio/pcmu": "g711_ulaw", "audio/pcma": "g711_alaw"}
"""GA audio format type -> the internal format name of `pipeline.audio`."""
INPUT_PCM_RATES = (8000, 16000, 24000, 48000)
"""Rates accepted for `audio/pcm` input (OpenAI's is 24000; 16000 is what the engines hear, so it is never
resampled). Output `audio/pcm` is 24000 Hz, as OpenAI clients expect."""
_SENT_WHOLE = ("turn_detection", "format", "transcription", "noise_reduction", "truncation", "prompt", "reasoning")
"""Nested objects a client always sends whole: an update replaces them instead of merging into them."""
_NULL_IS_A_VALUE = frozenset({"turn_detection", "transcription", "noise_reduction", "prompt", "tracing"})
"""Fields where `null` means "off"; for every other optional field `null` means "not set" (LiveKit sends
`"instructions": null`), so an update leaves it as it was."""


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
        "truncation": "auto",
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
    """Partial update: nested objects merge, except those a client always sends whole; `null` leaves a field as
    it was, except where it means "off" (`_NULL_IS_A_VALUE`)."""
    merged = dict(base)
    for key, value in update.items():
        if value is None and key not in _NULL_IS_A_VALUE:
            continue
        if isinstance(value, dict) and isinstance(merged.get(key), dict) and key not in _SENT_WHOLE:
            merged[key] = merge_update(merged[key], value)
        else:
            try:
                merged[key] = copy.deepcopy(value)
            except RecursionError:
                raise ProtocolError(f"{key} is nested too deeply", param=f"session.{key}") from None
    return merged


def parse_turn_detection(data: Any, min_speech_ms: int) -> TurnDetectionConfig | None:
    """The session's `turn_detection` object, validated (None: manual commits)."""
    if data is None:
        return None
    if not isinstance(data, dict):
        raise ProtocolError("turn_detection must be an object or null", param="session.audio.input.turn_detection")
    try:
        return TurnDetectionConfig.from_dict(data, min_speech_ms)
    except ValueError as exc:
        raise ProtocolError(str(exc), param="session.audio.input.turn_detection") from None


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
        if fmt["type"] != "audio/pcm":
            continue
        rates = INPUT_PCM_RATES if direction == "input" else (24000,)
        if fmt.get("rate") is None:
            fmt["rate"] = 24000
        if fmt["rate"] not in rates:
            allowed = ", ".join(str(rate) for rate in rates)
            raise ProtocolError(f"{direction} audio/pcm rate must be one of {allowed} Hz", param=f"{param}.rate")
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
    validate_tools(session, "session")
    try:
        TruncationPolicy.parse(session.get("truncation"), "session.truncation")
    except TruncationError as exc:
        raise ProtocolError(str(exc), param=exc.param) from None
    for key, kind in (("reasoning", dict), ("prompt", dict), ("include", list)):
        if session.get(key) is not None and not isinstance(session[key], kind):
            raise ProtocolError(f"{key} must be {'an object' if kind is dict else 'a list'}", param=f"session.{key}")


def validate_tools(fields: dict[str, Any], prefix: str) -> None:
    """`tools`, `tool_choice` and `parallel_tool_calls` of a session or a response, checked where present."""
    try:
        tools = parse_tools(fields.get("tools"), f"{prefix}.tools")
        parse_tool_choice(fields.get("tool_choice"), tools, f"{prefix}.tool_choice")
    except ToolSpecError as exc:
        raise ProtocolError(exc.message, param=exc.param) from None
    if not isinstance(fields.get("parallel_tool_calls", True), bool):
        raise ProtocolError("parallel_tool_calls must be a boolean", param=f"{prefix}.parallel_tool_calls")


def input_audio_format(session: dict[str, Any]) -> AudioFormat:
    """The wire format of the caller's audio, at the session's input rate."""
    fmt = session["audio"]["input"]["format"]
    wire = audio_format(FORMAT_TYPES[fmt["type"]])
    return AudioFormat(wire.name, fmt["rate"], wire.bytes_per_sample) if fmt["type"] == "audio/pcm" else wire
