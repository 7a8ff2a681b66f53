"""The session core: a sans-I/O state machine for one realtime conversation.

`Session.handle(input, now)` takes a client event, caller audio, a clock tick or an engine delta and
returns what should happen: server events, paced audio frames, and instructions to start or cancel
engine work. It never touches sockets, tasks or clocks, so a door is a thin shell around it and the
tests drive it with a fake clock. The session owns the conversation, turn detection, the single
active response and barge-in.
"""

from __future__ import annotations

import base64
import binascii
import copy
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from omnivox.pipeline.audio import Framer, StreamResampler, audio_format, resample
from omnivox.pipeline.conversation import Conversation, Item
from omnivox.pipeline.engines.base import (
    INPUT_RATE,
    AudioDelta,
    InvalidSampling,
    Message,
    ResponseRequest,
    SamplingParams,
    TextDelta,
    Usage,
    checked_sampling,
)
from omnivox.pipeline.events import (
    AudioIn,
    AudioOut,
    CancelResponse,
    ClearPlayout,
    ClientEvent,
    EngineDone,
    EngineFailed,
    EngineOutput,
    PlayoutProgress,
    ProtocolError,
    ServerEvent,
    SessionInput,
    SessionOutput,
    StartResponse,
    Tick,
    TranscribeAudio,
    TranscriptionDone,
    error_event,
)
from omnivox.pipeline.pacer import FramePacer
from omnivox.pipeline.turns import SpeechStarted, SpeechStopped, TurnDetectionConfig, TurnDetector

if TYPE_CHECKING:
    from omnivox.pipeline.vad import Vad

log = logging.getLogger(__name__)

MIN_COMMIT_MS = 100
_COMPACT_SAMPLES = INPUT_RATE
"""Audio dropped from the input buffer is freed once a second of it has piled up, not on every chunk."""
MAX_APPEND_BYTES = 15 * 1024 * 1024
MAX_OUTPUT_TOKENS = 4096
_FORMAT_TYPES = {"audio/pcm": "pcm16", "audio/pcmu": "g711_ulaw", "audio/pcma": "g711_alaw"}


@dataclass(frozen=True)
class SessionOptions:
    """Server-side settings of a session (from the config file and the door), not changeable by the client."""

    model: str = "qwen-omni"
    engine_rate: int = 24_000
    frame_ms: int = 40
    lead_ms: int = 200
    output_rate: int | None = None
    """Door override of the output rate (telephony: 8000); None follows the session's output format."""
    server_playout: bool = False
    """The door owns playout (WebRTC, telephony): emit `output_audio_buffer.*`, truncate at what was played."""
    max_input_buffer_s: float = 600.0
    min_speech_ms: int = 64
    defaults: dict[str, Any] = field(default_factory=dict)
    """Initial GA session fields (voice, instructions, turn_detection, formats) merged over the built-in ones."""


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


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Partial update: nested objects merge, except those a client always sends whole."""
    merged = dict(base)
    for key, value in update.items():
        whole = key in ("turn_detection", "format", "transcription", "noise_reduction")
        if isinstance(value, dict) and isinstance(merged.get(key), dict) and not whole:
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _response_sampling(settings: dict[str, Any], where: str) -> SamplingParams:
    """The `temperature` and `max_output_tokens` of a session or response, through the engines' one check (a value
    that could make the sampler's probabilities NaN never reaches it); the error names the field as sent."""
    tokens = settings.get("max_output_tokens")
    try:
        return checked_sampling(
            temperature=settings.get("temperature"),
            max_tokens=None if tokens == "inf" else tokens,
            max_tokens_limit=MAX_OUTPUT_TOKENS,
            names={"max_tokens": "max_output_tokens"},
        )
    except InvalidSampling as exc:
        message = f"{exc} or 'inf'" if exc.field == "max_output_tokens" else str(exc)
        raise ProtocolError(message, param=f"{where}.{exc.field}") from None


@dataclass
class _Response:
    id: str
    item: Item
    in_conversation: bool
    output_audio: bool
    metadata: Any
    pacer: FramePacer | None
    resampler: StreamResampler | None
    engine_done: bool = False
    usage: Usage | None = None
    playout_started: bool = False

    @property
    def modalities(self) -> list[str]:
        return ["audio"] if self.output_audio else ["text"]


class Session:
    def __init__(
        self, options: SessionOptions, vad_factory: Callable[[], Vad] | None = None, session_id: str | None = None
    ) -> None:
        self.options = options
        self.id = session_id or f"sess_{secrets.token_hex(8)}"
        self._id_prefix = secrets.token_hex(3)
        self._counter = 0
        self.config = _merge(default_session(options.model), options.defaults)
        self.config["id"] = self.id
        self._turns = self._turn_config(self.config["audio"]["input"]["turn_detection"])
        self.config["audio"]["input"]["turn_detection"] = self._turns.to_dict() if self._turns else None
        self.conversation = Conversation()
        self._vad_factory = vad_factory
        self._vad: Vad | None = None
        self._vad_framer: Framer | None = None
        self._vad_position = 0
        self._detector: TurnDetector | None = None
        self._append_resampler: StreamResampler | None = None
        self._append_format = ""
        self._buffer: list[np.ndarray] = []
        self._buffer_start = 0
        """Where the input buffer starts (in samples since the session began); older audio is gone."""
        self._held_start = 0
        """Where the audio held in `_buffer` starts: at or before `_buffer_start`, trimmed in steps of
        `_COMPACT_SAMPLES` so that listening does not copy the whole buffer on every chunk."""
        self._total_samples = 0
        self._turn_item_id: str | None = None
        self._turn_start = 0
        self._idle_since: int | None = None
        self._active: _Response | None = None
        self._produced_audio = False
        self._now = 0.0
        self._started = False
        self._client_handlers: dict[str, Callable[[dict[str, Any], list[SessionOutput]], None]] = {
            "session.update": self._on_session_update,
            "input_audio_buffer.append": self._on_append,
            "input_audio_buffer.commit": self._on_commit,
            "input_audio_buffer.clear": self._on_clear,
            "conversation.item.create": self._on_item_create,
            "conversation.item.retrieve": self._on_item_retrieve,
            "conversation.item.truncate": self._on_item_truncate,
            "conversation.item.delete": self._on_item_delete,
            "response.create": self._on_response_create,
            "response.cancel": self._on_response_cancel,
            "output_audio_buffer.clear": self._on_output_clear,
        }
        """Client event type -> handler, built once: an append arrives every 20 ms."""

    # ------------------------------------------------------------ public API

    @property
    def input_format(self) -> str:
        return _FORMAT_TYPES[self.config["audio"]["input"]["format"]["type"]]

    @property
    def output_format(self) -> str:
        return _FORMAT_TYPES[self.config["audio"]["output"]["format"]["type"]]

    @property
    def output_rate(self) -> int:
        return self.options.output_rate or audio_format(self.output_format).rate

    @property
    def vad(self) -> Vad | None:
        """The caller's voice activity detector, once audio has started it (a shell may await its pending results)."""
        return self._vad

    @property
    def active_response_id(self) -> str | None:
        return self._active.id if self._active else None

    def start(self, now: float) -> list[SessionOutput]:
        """The first events of a connection (`session.created`)."""
        self._now = now
        self._started = True
        return [ServerEvent("session.created", {"session": copy.deepcopy(self.config)})]

    def handle(self, event: SessionInput, now: float) -> list[SessionOutput]:
        self._now = max(self._now, now)
        out: list[SessionOutput] = []
        try:
            match event:
                case ClientEvent():
                    self._on_client_event(event, out)
                case AudioIn():
                    self._on_audio(event.pcm, out)
                case EngineOutput():
                    self._on_engine_delta(event, out)
                case EngineDone():
                    self._on_engine_done(event.response_id, out)
                case EngineFailed():
                    self._on_engine_failed(event, out)
                case PlayoutProgress():
                    self._on_playout(event)
                case TranscriptionDone():
                    self._on_transcription(event, out)
                case Tick():
                    pass
        except ProtocolError as exc:
            event_id = event.event_id if isinstance(event, ClientEvent) else None
            out.append(error_event(exc, event_id))
        self._pump(out)
        return out

    def next_deadline(self) -> float | None:
        """When `handle(Tick(), now)` should next be called, or None when nothing waits on time."""
        if self._active is None or self._active.pacer is None:
            return None
        due = self._active.pacer.next_due()
        return None if due is None else max(due, self._now)

    def close(self) -> list[SessionOutput]:
        """The connection is gone: cancel engine work, nothing more is sent."""
        if self._active is not None and not self._active.engine_done:
            response_id, self._active = self._active.id, None
            return [CancelResponse(response_id)]
        self._active = None
        return []

    # ------------------------------------------------------------ helpers

    def _new_id(self, prefix: str) -> str:
        self._counter += 1
        return f"{prefix}_{self._id_prefix}{self._counter:05d}"

    def _input_ms(self, samples: int | None = None) -> int:
        return int((self._total_samples if samples is None else samples) * 1000 // INPUT_RATE)

    def _turn_config(self, data: Any) -> TurnDetectionConfig | None:
        if data is None:
            return None
        if not isinstance(data, dict):
            raise ProtocolError("turn_detection must be an object or null", param="session.audio.input.turn_detection")
        try:
            return TurnDetectionConfig.from_dict(data, self.options.min_speech_ms)
        except ValueError as exc:
            raise ProtocolError(str(exc), param="session.audio.input.turn_detection") from None

    # ------------------------------------------------------------ client events

    def _on_client_event(self, event: ClientEvent, out: list[SessionOutput]) -> None:
        handler = self._client_handlers.get(event.type)
        if handler is None:
            raise ProtocolError(f"unknown event type '{event.type}'", code="unknown_event", param="type")
        handler(event.payload, out)

    def _on_session_update(self, payload: dict[str, Any], out: list[SessionOutput]) -> None:
        update = payload.get("session")
        if not isinstance(update, dict):
            raise ProtocolError("session.update needs a 'session' object", param="session")
        if update.get("type", "realtime") != "realtime":
            raise ProtocolError(
                "only realtime sessions are supported", code="unsupported_session_type", param="session.type"
            )
        update = {k: v for k, v in update.items() if k not in ("id", "object")}
        merged = _merge(self.config, update)
        self._validate(merged)
        new_voice = merged["audio"]["output"].get("voice")
        if self._produced_audio and new_voice != self.config["audio"]["output"].get("voice"):
            raise ProtocolError(
                "the voice cannot change once the session has produced audio",
                code="cannot_update_voice",
                param="session.audio.output.voice",
            )
        turns = self._turn_config(merged["audio"]["input"].get("turn_detection"))
        merged["audio"]["input"]["turn_detection"] = turns.to_dict() if turns else None
        if turns != self._turns:
            self._turns = turns
            self._detector = None
            self._turn_item_id = None
        self.config = merged
        out.append(ServerEvent("session.updated", {"session": copy.deepcopy(self.config)}))

    def _validate(self, session: dict[str, Any]) -> None:
        modalities = session.get("output_modalities")
        if not (isinstance(modalities, list) and modalities and set(modalities) <= {"audio", "text"}):
            raise ProtocolError("output_modalities must be ['audio'] or ['text']", param="session.output_modalities")
        if not isinstance(session.get("instructions"), str):
            raise ProtocolError("instructions must be a string", param="session.instructions")
        for direction in ("input", "output"):
            fmt = session.get("audio", {}).get(direction, {}).get("format")
            param = f"session.audio.{direction}.format"
            if not isinstance(fmt, dict) or fmt.get("type") not in _FORMAT_TYPES:
                raise ProtocolError(f"{param} must be audio/pcm, audio/pcmu or audio/pcma", param=param)
            if fmt["type"] == "audio/pcm" and fmt.setdefault("rate", 24000) != 24000:
                raise ProtocolError("audio/pcm is 24000 Hz only", param=f"{param}.rate")
        voice = session["audio"]["output"].get("voice")
        if not isinstance(voice, str) or not voice:
            raise ProtocolError("voice must be a non-empty string", param="session.audio.output.voice")
        if session.get("temperature") is None:
            raise ProtocolError("temperature must be a number in [0, 2]", param="session.temperature")
        _response_sampling(session, "session")

    def _decode_client_audio(self, data: Any, param: str) -> np.ndarray:
        """Base64 audio in the session's input format -> float32 at the format's rate."""
        if not isinstance(data, str):
            raise ProtocolError("audio must be a base64 string", code="invalid_audio", param=param)
        if len(data) > MAX_APPEND_BYTES * 4 // 3 + 4:
            raise ProtocolError("audio chunk over the 15 MiB limit", code="audio_too_large", param=param)
        try:  # strict mode accepts exactly what b64decode(validate=True) does, without its regex pass over the text
            raw = binascii.a2b_base64(data, strict_mode=True)
        except (binascii.Error, ValueError):
            raise ProtocolError("audio is not valid base64", code="invalid_audio", param=param) from None
        try:
            return audio_format(self.input_format).decode(raw)
        except ValueError as exc:
            raise ProtocolError(
                f"audio does not match {self.input_format}: {exc}", code="invalid_audio", param=param
            ) from None

    def _on_append(self, payload: dict[str, Any], out: list[SessionOutput]) -> None:
        samples = self._decode_client_audio(payload.get("audio"), "audio")
        fmt = audio_format(self.input_format)
        if self._append_resampler is None or self._append_format != fmt.name:
            self._append_resampler, self._append_format = StreamResampler(fmt.rate, INPUT_RATE), fmt.name
        self._on_audio(self._append_resampler.process(samples), out)

    def _on_commit(self, payload: dict[str, Any], out: list[SessionOutput]) -> None:
        if self._append_resampler is not None:  # the turn is over: release the resampler's filter delay
            self._on_audio(self._append_resampler.flush(), out)
            self._append_resampler = None
        audio = self._take_buffer(self._buffer_start, self._total_samples)
        if audio.size * 1000 < MIN_COMMIT_MS * INPUT_RATE:
            raise ProtocolError(
                f"buffer too small: {audio.size * 1000 // INPUT_RATE} ms of audio, at least {MIN_COMMIT_MS} ms needed",
                code="input_audio_buffer_commit_empty",
            )
        item_id = self._turn_item_id or self._new_id("item")
        self._turn_item_id = None
        self._detector = None
        self._commit_user_audio(item_id, audio, out)

    def _on_clear(self, payload: dict[str, Any], out: list[SessionOutput]) -> None:
        self._empty_buffer()
        self._turn_item_id = None
        self._detector = None
        out.append(ServerEvent("input_audio_buffer.cleared"))

    def _on_item_create(self, payload: dict[str, Any], out: list[SessionOutput]) -> None:
        item = self._parse_item(payload.get("item"))
        previous = payload.get("previous_item_id")
        if self.conversation.get(item.id) is not None:
            raise ProtocolError(f"an item with id '{item.id}' already exists", param="item.id")
        try:
            before = self.conversation.insert(item, previous)
        except KeyError:
            raise ProtocolError(f"previous_item_id '{previous}' does not exist", param="previous_item_id") from None
        self._announce_item(item, before, out)

    def _parse_item(self, data: Any) -> Item:
        if not isinstance(data, dict):
            raise ProtocolError("conversation.item.create needs an 'item' object", param="item")
        if data.get("type", "message") != "message":
            raise ProtocolError(f"item type '{data.get('type')}' is not supported (no tools)", param="item.type")
        role = data.get("role")
        if role not in ("user", "assistant", "system"):
            raise ProtocolError("item.role must be user, assistant or system", param="item.role")
        content = data.get("content")
        if not isinstance(content, list) or not content:
            raise ProtocolError("item.content must be a non-empty list", param="item.content")
        item_id = data.get("id") if isinstance(data.get("id"), str) else self._new_id("item")
        item = Item(item_id, role)
        texts: list[str] = []
        audio: list[np.ndarray] = []
        for index, part in enumerate(content):
            param = f"item.content[{index}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind in ("input_text", "text", "output_text"):
                if not isinstance(part.get("text"), str):
                    raise ProtocolError("text content needs a 'text' string", param=f"{param}.text")
                texts.append(part["text"])
            elif kind == "input_audio" and role == "user":
                samples = self._decode_client_audio(part.get("audio"), f"{param}.audio")
                audio.append(resample(samples, audio_format(self.input_format).rate, INPUT_RATE))
                if isinstance(part.get("transcript"), str):
                    item.transcript = part["transcript"]
            elif kind in ("output_audio", "audio") and role == "assistant":
                texts.append(part.get("transcript") or "")
            elif kind == "input_image" and role == "user":
                item.images.append(self._parse_image(part.get("image_url"), f"{param}.image_url"))
            else:
                raise ProtocolError(f"content type '{kind}' is not supported for role {role}", param=f"{param}.type")
        item.text = " ".join(t for t in texts if t)
        if audio:
            item.audio = np.concatenate(audio)
        return item

    @staticmethod
    def _parse_image(url: Any, param: str) -> tuple[bytes, str]:
        if not isinstance(url, str) or not url.startswith("data:") or ";base64," not in url:
            raise ProtocolError("image_url must be a base64 data URL", param=param)
        header, _, data = url.partition(";base64,")
        try:
            return base64.b64decode(data, validate=True), header[len("data:") :] or "image/png"
        except (binascii.Error, ValueError):
            raise ProtocolError("image_url is not valid base64", param=param) from None

    def _announce_item(self, item: Item, before: str | None, out: list[SessionOutput]) -> None:
        for kind in ("conversation.item.added", "conversation.item.done"):
            out.append(ServerEvent(kind, {"previous_item_id": before, "item": item.to_json()}))

    def _on_item_retrieve(self, payload: dict[str, Any], out: list[SessionOutput]) -> None:
        item = self._existing_item(payload.get("item_id"))
        out.append(ServerEvent("conversation.item.retrieved", {"item": item.to_json()}))

    def _existing_item(self, item_id: Any) -> Item:
        item = self.conversation.get(item_id) if isinstance(item_id, str) else None
        if item is None:
            raise ProtocolError(f"item '{item_id}' does not exist", code="item_not_found", param="item_id")
        return item

    def _on_item_truncate(self, payload: dict[str, Any], out: list[SessionOutput]) -> None:
        item = self._existing_item(payload.get("item_id"))
        if item.role != "assistant" or not item.has_audio:
            raise ProtocolError(
                "only assistant audio items can be truncated", code="invalid_item_type", param="item_id"
            )
        if payload.get("content_index", 0) != 0:
            raise ProtocolError("content_index must be 0", param="content_index")
        end_ms = payload.get("audio_end_ms")
        if isinstance(end_ms, bool) or not isinstance(end_ms, int) or end_ms < 0:
            raise ProtocolError("audio_end_ms must be a non-negative integer", param="audio_end_ms")
        if end_ms > item.audio_sent_ms + 1:
            raise ProtocolError(
                f"audio_end_ms {end_ms} is past the item's audio ({int(item.audio_sent_ms)} ms)",
                code="invalid_audio_end_ms",
                param="audio_end_ms",
            )
        self._truncate(item, float(end_ms), out)

    def _truncate(self, item: Item, end_ms: float, out: list[SessionOutput]) -> None:
        item.heard_ms = end_ms if item.heard_ms is None else min(item.heard_ms, end_ms)
        out.append(
            ServerEvent(
                "conversation.item.truncated", {"item_id": item.id, "content_index": 0, "audio_end_ms": int(end_ms)}
            )
        )

    def _on_item_delete(self, payload: dict[str, Any], out: list[SessionOutput]) -> None:
        item = self._existing_item(payload.get("item_id"))
        if self._active is not None and self._active.item is item:
            raise ProtocolError("cannot delete the item of the active response", param="item_id")
        self.conversation.delete(item.id)
        out.append(ServerEvent("conversation.item.deleted", {"item_id": item.id}))

    def _on_response_create(self, payload: dict[str, Any], out: list[SessionOutput]) -> None:
        params = payload.get("response") or {}
        if not isinstance(params, dict):
            raise ProtocolError("response must be an object", param="response")
        self._start_response(params, out)

    def _on_response_cancel(self, payload: dict[str, Any], out: list[SessionOutput]) -> None:
        wanted = payload.get("response_id")
        if self._active is None or (wanted is not None and wanted != self._active.id):
            raise ProtocolError("there is no active response to cancel", code="response_cancel_not_active")
        self._cancel("client_cancelled", out)

    def _on_output_clear(self, payload: dict[str, Any], out: list[SessionOutput]) -> None:
        if self._active is not None:
            self._cancel("client_cancelled", out)
        else:
            out.append(ServerEvent("output_audio_buffer.cleared", {"response_id": None}))

    # ------------------------------------------------------------ caller audio and turns

    def _on_audio(self, pcm: np.ndarray, out: list[SessionOutput]) -> None:
        if not pcm.size:
            return
        self._buffer.append(pcm.astype(np.float32, copy=False))
        self._total_samples += pcm.size
        limit = int(self.options.max_input_buffer_s * INPUT_RATE)
        if self._total_samples - self._buffer_start > limit:
            self._drop_buffer_before(self._total_samples - limit)
        if self._turns is None or self._vad_factory is None:
            return
        if self._vad is None:
            self._vad = self._vad_factory()
            self._vad_framer = Framer(self._vad.frame_samples)
            self._vad_position = self._total_samples - pcm.size
        if self._detector is None:
            self._detector = TurnDetector(self._turns)
        assert self._vad_framer is not None
        frame_ms = self._vad.frame_samples * 1000 / INPUT_RATE
        for frame in self._vad_framer.push(pcm):
            start_ms = self._vad_position * 1000 / INPUT_RATE
            self._vad_position += frame.size
            for turn in self._detector.update(self._vad.probability(frame), start_ms, frame_ms):
                if isinstance(turn, SpeechStarted):
                    self._on_speech_started(turn, out)
                else:
                    self._on_speech_stopped(turn, out)
        if not self._detector.speaking:
            keep = (self._turns.prefix_padding_ms + self._turns.min_speech_ms + 500) * INPUT_RATE // 1000
            self._drop_buffer_before(self._total_samples - keep)
            self._check_idle(out)

    def _empty_buffer(self) -> None:
        self._buffer, self._buffer_start, self._held_start = [], self._total_samples, self._total_samples

    def _drop_buffer_before(self, sample: int) -> None:
        if sample <= self._buffer_start:
            return
        self._buffer_start = sample
        if sample - self._held_start >= _COMPACT_SAMPLES:
            audio = self._take_buffer(sample, self._total_samples)
            self._buffer, self._held_start = ([audio] if audio.size else []), sample

    def _take_buffer(self, start: int, end: int) -> np.ndarray:
        """Samples [start, end) of the input buffer, clipped to what it still holds."""
        if not self._buffer:
            return np.zeros(0, np.float32)
        joined = np.concatenate(self._buffer) if len(self._buffer) > 1 else self._buffer[0]
        self._buffer = [joined]
        low = max(start, self._buffer_start) - self._held_start
        return joined[low : max(end, self._buffer_start) - self._held_start]

    def _on_speech_started(self, turn: SpeechStarted, out: list[SessionOutput]) -> None:
        assert self._turns is not None
        self._idle_since = None
        self._turn_item_id = self._new_id("item")
        onset = int(turn.onset_ms * INPUT_RATE / 1000)
        self._turn_start = max(self._buffer_start, onset - self._turns.prefix_padding_ms * INPUT_RATE // 1000)
        out.append(
            ServerEvent(
                "input_audio_buffer.speech_started",
                {"audio_start_ms": self._input_ms(self._turn_start), "item_id": self._turn_item_id},
            )
        )
        if self._active is not None and self._turns.interrupt_response:
            self._cancel("turn_detected", out)

    def _on_speech_stopped(self, turn: SpeechStopped, out: list[SessionOutput]) -> None:
        assert self._turns is not None and self._turn_item_id is not None
        end = int(turn.end_ms * INPUT_RATE / 1000) + INPUT_RATE // 10
        out.append(
            ServerEvent(
                "input_audio_buffer.speech_stopped", {"audio_end_ms": int(turn.end_ms), "item_id": self._turn_item_id}
            )
        )
        item_id, self._turn_item_id = self._turn_item_id, None
        audio = self._take_buffer(self._turn_start, min(end, self._total_samples))
        self._commit_user_audio(item_id, audio, out)
        if self._turns.create_response:
            if self._active is None:
                self._start_response({}, out)
            else:
                log.info("%s: turn ended while response %s is active; not starting another", self.id, self._active.id)

    def _commit_user_audio(self, item_id: str, audio: np.ndarray, out: list[SessionOutput]) -> None:
        item = Item(item_id, "user", audio=audio.copy())
        before = self.conversation.insert(item)
        self._empty_buffer()
        out.append(ServerEvent("input_audio_buffer.committed", {"previous_item_id": before, "item_id": item_id}))
        self._announce_item(item, before, out)
        transcription = self.config["audio"]["input"].get("transcription")
        if isinstance(transcription, dict):
            language = transcription.get("language") if isinstance(transcription.get("language"), str) else None
            prompt = transcription.get("prompt") if isinstance(transcription.get("prompt"), str) else ""
            out.append(TranscribeAudio(item_id, item.audio, language, prompt))

    def _on_transcription(self, event: TranscriptionDone, out: list[SessionOutput]) -> None:
        item = self.conversation.get(event.item_id)
        if item is None:
            return  # deleted meanwhile
        if event.transcript is None:
            out.append(
                ServerEvent(
                    "conversation.item.input_audio_transcription.failed",
                    {
                        "item_id": item.id,
                        "content_index": 0,
                        "error": {
                            "type": "transcription_error",
                            "code": "transcription_failed",
                            "message": event.error,
                        },
                    },
                )
            )
            return
        item.transcript = event.transcript
        seconds = round(item.audio.size / INPUT_RATE, 3) if item.audio is not None else 0.0
        out.append(
            ServerEvent(
                "conversation.item.input_audio_transcription.completed",
                {
                    "item_id": item.id,
                    "content_index": 0,
                    "transcript": event.transcript,
                    "usage": {"type": "duration", "seconds": seconds},
                },
            )
        )

    def _check_idle(self, out: list[SessionOutput]) -> None:
        turns = self._turns
        if turns is None or turns.idle_timeout_ms is None or self._idle_since is None or self._active is not None:
            return
        if self._input_ms() - self._input_ms(self._idle_since) < turns.idle_timeout_ms:
            return
        item_id = self._new_id("item")
        out.append(
            ServerEvent(
                "input_audio_buffer.timeout_triggered",
                {
                    "audio_start_ms": self._input_ms(self._idle_since),
                    "audio_end_ms": self._input_ms(),
                    "item_id": item_id,
                },
            )
        )
        self._idle_since = None
        self._commit_user_audio(item_id, self._take_buffer(self._buffer_start, self._total_samples), out)
        self._start_response({}, out)

    # ------------------------------------------------------------ responses

    def _start_response(self, params: dict[str, Any], out: list[SessionOutput]) -> None:
        if self._active is not None:
            raise ProtocolError(
                f"conversation already has an active response ({self._active.id})",
                code="conversation_already_has_active_response",
            )
        sampling = _response_sampling({**self.config, **params}, "response")
        modalities = params.get("output_modalities", self.config["output_modalities"])
        if not isinstance(modalities, list) or not modalities or not set(modalities) <= {"audio", "text"}:
            raise ProtocolError("output_modalities must be ['audio'] or ['text']", param="response.output_modalities")
        instructions = params.get("instructions", self.config["instructions"])
        if not isinstance(instructions, str):
            raise ProtocolError("instructions must be a string", param="response.instructions")
        in_conversation = params.get("conversation", "auto") != "none"
        messages = self.conversation.messages() if in_conversation else ()
        if "input" in params:
            messages = self._input_messages(params["input"])
        response_id = self._new_id("resp")
        item = Item(self._new_id("item"), "assistant", status="in_progress", has_audio="audio" in modalities)
        output_audio = "audio" in modalities
        pacer = resampler = None
        if output_audio:
            pacer = FramePacer(self.output_rate, self.options.frame_ms, self.options.lead_ms)
            resampler = StreamResampler(self.options.engine_rate, self.output_rate)
        response = _Response(response_id, item, in_conversation, output_audio, params.get("metadata"), pacer, resampler)
        self._active = response
        self._idle_since = None
        out.append(ServerEvent("response.created", {"response": self._response_json(response, "in_progress")}))
        out.append(
            ServerEvent(
                "response.output_item.added", {"response_id": response_id, "output_index": 0, "item": item.to_json()}
            )
        )
        if in_conversation:
            before = self.conversation.insert(item)
            out.append(ServerEvent("conversation.item.added", {"previous_item_id": before, "item": item.to_json()}))
        part = {"type": "audio", "transcript": ""} if output_audio else {"type": "text", "text": ""}
        out.append(ServerEvent("response.content_part.added", {**self._refs(response), "part": part}))
        request = ResponseRequest(
            messages=messages,
            instructions=instructions,
            voice=self.config["audio"]["output"]["voice"],
            output_audio=output_audio,
            sampling=sampling,
            request_id=response_id,
            conversation_id=self.id,
        )
        out.append(StartResponse(response_id, request))

    def _input_messages(self, items: Any) -> tuple[Message, ...]:
        if not isinstance(items, list):
            raise ProtocolError("response.input must be a list of items", param="response.input")
        messages: list[Message] = []
        for entry in items:
            if isinstance(entry, dict) and entry.get("type") == "item_reference":
                item = self._existing_item(entry.get("id"))
            else:
                item = self._parse_item(entry)
            message = item.to_message()
            if message is not None:
                messages.append(message)
        return tuple(messages)

    @staticmethod
    def _refs(response: _Response) -> dict[str, Any]:
        return {"response_id": response.id, "item_id": response.item.id, "output_index": 0, "content_index": 0}

    def _response_json(
        self,
        response: _Response,
        status: str,
        details: dict[str, Any] | None = None,
        output: list[dict[str, Any]] | None = None,
    ) -> dict[str, Any]:
        usage = None
        if response.usage is not None:
            usage = {
                "total_tokens": response.usage.input_tokens + response.usage.output_tokens,
                "input_tokens": response.usage.input_tokens,
                "output_tokens": response.usage.output_tokens,
                "input_token_details": {"cached_tokens": response.usage.cached_input_tokens},
            }
        return {
            "id": response.id,
            "object": "realtime.response",
            "status": status,
            "status_details": details,
            "output": output or [],
            "conversation_id": None if not response.in_conversation else "conv_" + self.id.removeprefix("sess_"),
            "output_modalities": response.modalities,
            "metadata": response.metadata,
            "usage": usage,
        }

    def _on_engine_delta(self, event: EngineOutput, out: list[SessionOutput]) -> None:
        response = self._active
        if response is None or response.id != event.response_id or response.engine_done:
            return  # a late delta of a cancelled or finished response: dropped
        delta = event.delta
        if isinstance(delta, TextDelta):
            if not delta.text:
                return
            response.item.text += delta.text
            kind = "response.output_audio_transcript.delta" if response.output_audio else "response.output_text.delta"
            out.append(ServerEvent(kind, {**self._refs(response), "delta": delta.text}))
        elif isinstance(delta, AudioDelta):
            if response.pacer is None or response.resampler is None:
                return
            samples = response.resampler.process(delta.pcm)
            response.item.audio_generated_ms += samples.size * 1000 / response.pacer.rate
            response.pacer.push(samples)
            self._produced_audio = True
        elif isinstance(delta, Usage):
            response.usage = delta

    def _on_engine_done(self, response_id: str, out: list[SessionOutput]) -> None:
        response = self._active
        if response is None or response.id != response_id:
            return
        response.engine_done = True
        if response.pacer is not None and response.resampler is not None:
            tail = response.resampler.flush()
            response.item.audio_generated_ms += tail.size * 1000 / response.pacer.rate
            response.pacer.push(tail)
            response.pacer.finish()

    def _on_engine_failed(self, event: EngineFailed, out: list[SessionOutput]) -> None:
        response = self._active
        if response is None or response.id != event.response_id:
            return
        response.engine_done = True
        out.append(error_event(ProtocolError(event.message, code=event.code, error_type="server_error")))
        if response.pacer is not None:
            response.pacer.clear()
        self._finish(response, "failed", {"type": "failed", "error": {"type": "server_error", "code": event.code}}, out)

    def _on_playout(self, event: PlayoutProgress) -> None:
        item = self.conversation.get(event.item_id)
        if item is None and self._active is not None and self._active.item.id == event.item_id:
            item = self._active.item
        if item is not None:
            item.played_ms = max(item.played_ms or 0.0, event.played_ms)

    def _pump(self, out: list[SessionOutput]) -> None:
        """Release the paced frames that are due, and finish the response once all its audio is out."""
        response = self._active
        if response is None:
            return
        if response.pacer is not None:
            for frame in response.pacer.pop_due(self._now):
                if not response.playout_started and self.options.server_playout:
                    out.append(ServerEvent("output_audio_buffer.started", {"response_id": response.id}))
                response.playout_started = True
                out.append(AudioOut(response.id, response.item.id, 0, 0, frame))
            response.item.audio_sent_ms = response.pacer.sent_ms
            if not response.pacer.drained:
                return
        if response.engine_done:
            self._finish(response, "completed", None, out)
            if self.options.server_playout and response.playout_started:
                out.append(ServerEvent("output_audio_buffer.stopped", {"response_id": response.id}))

    def _cancel(self, reason: str, out: list[SessionOutput]) -> None:
        response = self._active
        assert response is not None
        if not response.engine_done:
            out.append(CancelResponse(response.id))
            response.engine_done = True
        if response.pacer is not None:
            response.pacer.clear()
            response.item.audio_sent_ms = response.pacer.sent_ms
            if self.options.server_playout:
                out.append(ClearPlayout(response.id))
                out.append(ServerEvent("output_audio_buffer.cleared", {"response_id": response.id}))
            heard = response.item.audio_sent_ms
            if self.options.server_playout:
                heard = min(heard, response.item.played_ms or 0.0)
            self._truncate(response.item, heard, out)
        self._finish(response, "cancelled", {"type": "cancelled", "reason": reason}, out)

    def _finish(
        self, response: _Response, status: str, details: dict[str, Any] | None, out: list[SessionOutput]
    ) -> None:
        item, refs = response.item, self._refs(response)
        transcript = item.text
        if response.output_audio:
            out.append(ServerEvent("response.output_audio.done", refs))
            out.append(ServerEvent("response.output_audio_transcript.done", {**refs, "transcript": transcript}))
            part = {"type": "audio", "transcript": transcript}
        else:
            out.append(ServerEvent("response.output_text.done", {**refs, "text": transcript}))
            part = {"type": "text", "text": transcript}
        out.append(ServerEvent("response.content_part.done", {**refs, "part": part}))
        item.status = "completed" if status == "completed" else "incomplete"
        item_json = item.to_json()
        out.append(
            ServerEvent("response.output_item.done", {"response_id": response.id, "output_index": 0, "item": item_json})
        )
        if response.in_conversation and self.conversation.get(item.id) is not None:
            index = self.conversation.items.index(item)
            before = self.conversation.items[index - 1].id if index > 0 else None
            out.append(ServerEvent("conversation.item.done", {"previous_item_id": before, "item": item_json}))
        out.append(
            ServerEvent("response.done", {"response": self._response_json(response, status, details, [item_json])})
        )
        self._active = None
        self._idle_since = self._total_samples
