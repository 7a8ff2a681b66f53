"""The realtime session object: its defaults, how a `session.update` merges into it, and what makes it valid.

Pure functions over the GA session dict (the door renders beta names); `Session` holds the dict and applies them.
"""

from __future__ import annotations

import copy
from typing import Any

from omnivox.pipeline.audio import AudioFormat, audio_format
from omnivox.pipeline.context_window import TruncationError, TruncationPolicy
from omnivox.pipeline.echo_cancel import NOISE_REDUCTION_TYPES, CleanupSettings
from omnivox.pipeline.engines.base import InvalidSampling, SamplingParams, checked_sampling
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
MAX_OUTPUT_TOKENS = 4096
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


def valid_modalities(value: Any) -> bool:
    """A non-empty list of "audio" and "text" (compared, never hashed: a client's list may hold anything)."""
    return isinstance(value, list) and bool(value) and all(m in ("audio", "text") for m in value)


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


def validate_session(session: dict[str, Any], max_output_tokens: int = MAX_OUTPUT_TOKENS) -> None:
    """Refuse a merged session the server cannot honour, naming the offending field."""
    if not valid_modalities(session.get("output_modalities")):
        raise ProtocolError("output_modalities must be ['audio'] or ['text']", param="session.output_modalities")
    if not isinstance(session.get("instructions"), str):
        raise ProtocolError("instructions must be a string", param="session.instructions")
    audio = session.get("audio")
    if not isinstance(audio, dict) or not all(isinstance(audio.get(d), dict) for d in ("input", "output")):
        raise ProtocolError("audio must be an object with input and output objects", param="session.audio")
    for direction in ("input", "output"):
        fmt = audio[direction].get("format")
        param = f"session.audio.{direction}.format"
        if not isinstance(fmt, dict) or not isinstance(fmt.get("type"), str) or fmt["type"] not in FORMAT_TYPES:
            raise ProtocolError(f"{param} must be audio/pcm, audio/pcmu or audio/pcma", param=param)
        if fmt["type"] != "audio/pcm":
            continue
        rates = INPUT_PCM_RATES if direction == "input" else (24000,)
        if fmt.get("rate") is None:
            fmt["rate"] = 24000
        if fmt["rate"] not in rates:
            allowed = ", ".join(str(rate) for rate in rates)
            raise ProtocolError(f"{direction} audio/pcm rate must be one of {allowed} Hz", param=f"{param}.rate")
    _validate_cleanup(session["audio"]["input"])
    voice = session["audio"]["output"].get("voice")
    if not isinstance(voice, str) or not voice:
        raise ProtocolError("voice must be a non-empty string", param="session.audio.output.voice")
    if session.get("temperature") is None:
        raise ProtocolError("temperature must be a number in [0, 2]", param="session.temperature")
    response_sampling(session, "session", max_output_tokens)
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


def response_sampling(
    settings: dict[str, Any], where: str, max_output_tokens: int = MAX_OUTPUT_TOKENS
) -> SamplingParams:
    """The `temperature` and `max_output_tokens` of a session or response, through the engines' one check (a value
    that could make the sampler's probabilities NaN never reaches it); the error names the field as sent."""
    tokens = settings.get("max_output_tokens")
    try:
        return checked_sampling(
            temperature=settings.get("temperature"),
            max_tokens=None if tokens == "inf" else tokens,
            max_tokens_limit=max_output_tokens,
            names={"max_tokens": "max_output_tokens"},
        )
    except InvalidSampling as exc:
        message = f"{exc} or 'inf'" if exc.field == "max_output_tokens" else str(exc)
        raise ProtocolError(message, param=f"{where}.{exc.field}") from None
