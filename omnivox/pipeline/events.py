"""Protocol values of the session core, and the two OpenAI Realtime dialects (GA and beta).

The core speaks one neutral dialect: GA event names and the GA session shape. Doors parse client
JSON into `ClientEvent` with `parse_client_event` (beta names and beta session fields are mapped to
GA here, once) and render `ServerEvent` back with `render_server_event` for the dialect the client
chose. Nothing in this module does I/O.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import numpy as np

from omnivox.pipeline.client_json import JsonRefused, load_client_json
from omnivox.pipeline.engines.base import Delta


class Dialect(Enum):
    GA = "ga"
    BETA = "beta"


# ---------------------------------------------------------------- core inputs


@dataclass(frozen=True)
class ClientEvent:
    """A parsed client event with its GA `type`; `payload` is the JSON object minus `type`/`event_id`."""

    type: str
    payload: dict[str, Any] = field(default_factory=dict)
    event_id: str | None = None


@dataclass(frozen=True)
class AudioIn:
    """Caller audio, mono float32 at 16 kHz, any length."""

    pcm: np.ndarray


@dataclass(frozen=True)
class Tick:
    """Time passes (the shell calls this at `Session.next_deadline()`)."""


@dataclass(frozen=True)
class EngineOutput:
    response_id: str
    delta: Delta


@dataclass(frozen=True)
class EngineDone:
    response_id: str


@dataclass(frozen=True)
class EngineFailed:
    response_id: str
    code: str
    message: str


@dataclass(frozen=True)
class PlayoutProgress:
    """A door that owns playout (WebRTC track, Twilio marks) reports what the caller has really heard."""

    item_id: str
    played_ms: float


@dataclass(frozen=True)
class TranscriptionDone:
    """The recogniser's text for a user audio item (`transcript` None when it failed: `error` says why)."""

    item_id: str
    transcript: str | None
    error: str | None = None


@dataclass(frozen=True)
class CallerAudioCleaned:
    """The caller-audio cleaner has finished what it was given: the core takes it (the shell sends this once the
    cleaner's thread is done, so the cleaned audio is heard at once, not one input later)."""


@dataclass(frozen=True)
class EndOfTurnPredicted:
    """The end-of-turn model's answer to `PredictEndOfTurn` (`probability` None when the model failed)."""

    check_id: int
    probability: float | None


SessionInput = (
    ClientEvent
    | AudioIn
    | Tick
    | EngineOutput
    | EngineDone
    | EngineFailed
    | PlayoutProgress
    | TranscriptionDone
    | EndOfTurnPredicted
    | CallerAudioCleaned
)


# ---------------------------------------------------------------- core outputs


@dataclass(frozen=True)
class ServerEvent:
    """A server event in the neutral (GA) dialect; the door adds `event_id` and renders the dialect."""

    type: str
    payload: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class AudioOut:
    """One paced output frame (mono float32 at the session's output rate) of a response's audio."""

    response_id: str
    item_id: str
    output_index: int
    content_index: int
    pcm: np.ndarray


@dataclass(frozen=True)
class StartResponse:
    """Instruction to the shell: run the engine on `request` and feed its deltas back tagged `response_id`."""

    response_id: str
    request: Any  # ResponseRequest; typed loosely to keep this module free of engine imports cycles


@dataclass(frozen=True)
class CancelResponse:
    """Instruction to the shell: cancel the engine task of `response_id` now."""

    response_id: str


@dataclass(frozen=True)
class ClearPlayout:
    """Instruction to a door that owns playout: drop everything queued for the caller (barge-in)."""

    response_id: str


@dataclass(frozen=True)
class TranscribeAudio:
    """Instruction to the shell: transcribe a committed user audio item (session transcription is on)."""

    item_id: str
    audio: np.ndarray
    language: str | None = None
    prompt: str = ""


@dataclass(frozen=True)
class PredictEndOfTurn:
    """Instruction to the shell (`semantic_vad`): ask the end-of-turn model whether the caller's turn so far
    (`audio`, 16 kHz) is complete, and feed back `EndOfTurnPredicted(check_id, ...)`."""

    check_id: int
    audio: np.ndarray


SessionOutput = (
    ServerEvent | AudioOut | StartResponse | CancelResponse | ClearPlayout | TranscribeAudio | PredictEndOfTurn
)


# ---------------------------------------------------------------- errors


class ProtocolError(Exception):
    """A client event that cannot be honoured: becomes an `error` event, the socket stays open."""

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        error_type: str = "invalid_request_error",
        event_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.param = param
        self.error_type = error_type
        self.event_id = event_id


MAX_ECHO_CHARS = 512
"""Error events quote client values (ids, types, names): never more than this of each field, whatever was sent."""


def _clip(text: str | None) -> str | None:
    return text if text is None or len(text) <= MAX_ECHO_CHARS else text[:MAX_ECHO_CHARS] + "..."


def error_event(exc: ProtocolError, event_id: str | None = None) -> ServerEvent:
    return ServerEvent(
        "error",
        {
            "error": {
                "type": exc.error_type,
                "code": exc.code,
                "message": _clip(exc.message),
                "param": _clip(exc.param),
                "event_id": _clip(event_id if event_id is not None else exc.event_id),
            }
        },
    )


# ---------------------------------------------------------------- dialects

CLIENT_EVENT_TYPES = frozenset(
    {
        "session.update",
        "input_audio_buffer.append",
        "input_audio_buffer.commit",
        "input_audio_buffer.clear",
        "conversation.item.create",
        "conversation.item.retrieve",
        "conversation.item.truncate",
        "conversation.item.delete",
        "response.create",
        "response.cancel",
        "output_audio_buffer.clear",
    }
)

_GA_TO_BETA_EVENT = {
    "response.output_audio.delta": "response.audio.delta",
    "response.output_audio.done": "response.audio.done",
    "response.output_audio_transcript.delta": "response.audio_transcript.delta",
    "response.output_audio_transcript.done": "response.audio_transcript.done",
    "response.output_text.delta": "response.text.delta",
    "response.output_text.done": "response.text.done",
    "conversation.item.added": "conversation.item.created",
}
_BETA_ONLY_DROPPED = frozenset({"conversation.item.done"})

_BETA_FORMATS = {"pcm16": "audio/pcm", "g711_ulaw": "audio/pcmu", "g711_alaw": "audio/pcma"}
_GA_FORMATS = {v: k for k, v in _BETA_FORMATS.items()}
_CONTENT_GA_TO_BETA = {"output_audio": "audio", "output_text": "text"}
_CONTENT_BETA_TO_GA = {"audio": "output_audio", "text": "output_text"}


def parse_client_event(
    raw: str | bytes, dialect: Dialect, *, max_depth: int, beta_pcm16_rate: int = 24000
) -> ClientEvent:
    """JSON text -> `ClientEvent` in the neutral dialect; raises `ProtocolError` for anything malformed (including
    non-finite numbers, integers beyond 64 bits and nesting deeper than `max_depth`).

    `beta_pcm16_rate` is the input rate a beta client means by `pcm16` (OpenAI's is 24000; Qwen's own realtime
    service uses the name for 16 kHz)."""
    try:
        data = load_client_json(raw, max_depth)
    except JsonRefused as exc:
        raise ProtocolError(str(exc), code="invalid_json") from None
    if not isinstance(data, dict):
        raise ProtocolError("an event must be a JSON object", code="invalid_event")
    event_id = data.get("event_id")
    event_id = event_id if isinstance(event_id, str) else None
    event_type = data.get("type")
    if not isinstance(event_type, str):
        raise ProtocolError("missing string field 'type'", code="invalid_event", param="type", event_id=event_id)
    if event_type not in CLIENT_EVENT_TYPES:
        raise ProtocolError(f"unknown event type '{event_type}'", code="unknown_event", param="type", event_id=event_id)
    payload = {k: v for k, v in data.items() if k not in ("type", "event_id")}
    if dialect is Dialect.BETA:
        payload = _payload_from_beta(event_type, payload, beta_pcm16_rate)
    return ClientEvent(event_type, payload, event_id)


def _payload_from_beta(event_type: str, payload: dict[str, Any], pcm16_rate: int) -> dict[str, Any]:
    if event_type == "session.update" and isinstance(payload.get("session"), dict):
        return {**payload, "session": session_from_beta(payload["session"], pcm16_rate)}
    if event_type == "response.create" and isinstance(payload.get("response"), dict):
        response = dict(payload["response"])
        if "modalities" in response:
            response["output_modalities"] = _modalities_from_beta(response.pop("modalities"))
        if "max_response_output_tokens" in response:
            response["max_output_tokens"] = response.pop("max_response_output_tokens")
        if "voice" in response:
            response["audio"] = {"output": {"voice": response.pop("voice")}}
        return {**payload, "response": response}
    if event_type == "conversation.item.create" and isinstance(payload.get("item"), dict):
        return {**payload, "item": _item_content_types(payload["item"], _CONTENT_BETA_TO_GA)}
    return payload


def _modalities_from_beta(modalities: Any) -> Any:
    if isinstance(modalities, list):
        return ["audio"] if "audio" in modalities else [m for m in modalities if m == "text"]
    return modalities


def session_from_beta(session: dict[str, Any], pcm16_rate: int = 24000) -> dict[str, Any]:
    """Beta session fields -> the GA session shape (a partial update stays partial); input `pcm16` is at
    `pcm16_rate`."""
    out: dict[str, Any] = {}
    audio_in: dict[str, Any] = {}
    audio_out: dict[str, Any] = {}
    for key, value in session.items():
        if key == "modalities":
            out["output_modalities"] = _modalities_from_beta(value)
        elif key == "input_audio_format":
            audio_in["format"] = _format_to_ga(value, pcm16_rate)
        elif key == "output_audio_format":
            audio_out["format"] = _format_to_ga(value, 24000)
        elif key == "turn_detection":
            audio_in["turn_detection"] = value
        elif key == "input_audio_transcription":
            audio_in["transcription"] = value
        elif key == "input_audio_noise_reduction":
            audio_in["noise_reduction"] = value
        elif key == "input_audio_echo_cancellation":
            audio_in["echo_cancellation"] = value
        elif key == "voice":
            audio_out["voice"] = value
        elif key == "speed":
            audio_out["speed"] = value
        elif key == "max_response_output_tokens":
            out["max_output_tokens"] = value
        else:
            out[key] = value
    if audio_in or audio_out:
        out["audio"] = {**({"input": audio_in} if audio_in else {}), **({"output": audio_out} if audio_out else {})}
    return out


def session_to_beta(session: dict[str, Any]) -> dict[str, Any]:
    """The full GA session object -> the beta session object."""
    audio = session.get("audio", {})
    audio_in, audio_out = audio.get("input", {}), audio.get("output", {})
    modalities = session.get("output_modalities", ["audio"])
    return {
        "id": session.get("id"),
        "object": "realtime.session",
        "model": session.get("model"),
        "modalities": ["text", "audio"] if "audio" in modalities else ["text"],
        "instructions": session.get("instructions", ""),
        "voice": audio_out.get("voice"),
        "input_audio_format": _format_to_beta(audio_in.get("format")),
        "output_audio_format": _format_to_beta(audio_out.get("format")),
        "input_audio_transcription": audio_in.get("transcription"),
        "input_audio_noise_reduction": audio_in.get("noise_reduction"),
        "input_audio_echo_cancellation": audio_in.get("echo_cancellation", False),
        "turn_detection": audio_in.get("turn_detection"),
        "tools": session.get("tools", []),
        "tool_choice": session.get("tool_choice", "auto"),
        "temperature": session.get("temperature", 0.8),
        "max_response_output_tokens": session.get("max_output_tokens", "inf"),
    }


def _format_to_ga(value: Any, pcm16_rate: int) -> Any:
    if isinstance(value, str) and value in _BETA_FORMATS:
        ga = {"type": _BETA_FORMATS[value]}
        if value == "pcm16":
            ga["rate"] = pcm16_rate
        return ga
    return value


def _format_to_beta(value: Any) -> Any:
    if isinstance(value, dict):
        return _GA_FORMATS.get(value.get("type"), value.get("type"))
    return value


def _item_content_types(item: dict[str, Any], mapping: dict[str, str]) -> dict[str, Any]:
    content = item.get("content")
    if not isinstance(content, list) or item.get("role") != "assistant":
        return item
    parts = [
        {**part, "type": mapping.get(part.get("type"), part.get("type"))} if isinstance(part, dict) else part
        for part in content
    ]
    return {**item, "content": parts}


def render_server_event(event: ServerEvent, dialect: Dialect, event_id: str) -> dict[str, Any] | None:
    """Neutral `ServerEvent` -> the JSON object for `dialect`; `None` when that dialect has no such event."""
    if dialect is Dialect.GA:
        return {"type": event.type, "event_id": event_id, **event.payload}
    if event.type in _BETA_ONLY_DROPPED:
        return None
    payload = copy.copy(event.payload)
    if isinstance(payload.get("session"), dict):
        payload["session"] = session_to_beta(payload["session"])
    if isinstance(payload.get("item"), dict):
        payload["item"] = _item_content_types(payload["item"], _CONTENT_GA_TO_BETA)
    if isinstance(payload.get("response"), dict):
        response = dict(payload["response"])
        if "output_modalities" in response:
            response["modalities"] = ["text", "audio"] if "audio" in response.pop("output_modalities") else ["text"]
        response["output"] = [
            _item_content_types(item, _CONTENT_GA_TO_BETA) if isinstance(item, dict) else item
            for item in response.get("output", [])
        ]
        payload["response"] = response
    return {"type": _GA_TO_BETA_EVENT.get(event.type, event.type), "event_id": event_id, **payload}
