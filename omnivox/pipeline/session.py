"""The session core: a sans-I/O state machine for one realtime conversation.

`Session.handle(input, now)` takes a client event, caller audio, a clock tick or an engine delta and
returns what should happen: server events, paced audio frames, and instructions to start or cancel
engine work. It never touches sockets, tasks or clocks, so a door is a thin shell around it and the
tests drive it with a fake clock. The session owns the conversation, turn detection, the single
active response and barge-in.
"""

from __future__ import annotations

import copy
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from omnivox.pipeline.audio import Framer, StreamResampler, audio_format
from omnivox.pipeline.client_items import MAX_APPEND_BYTES, parse_item
from omnivox.pipeline.conversation import Conversation, Item
from omnivox.pipeline.engines.base import (
    INPUT_RATE,
    AudioDelta,
    Message,
    ResponseRequest,
    SamplingParams,
    TextDelta,
    Usage,
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
from omnivox.pipeline.input_buffer import InputBuffer
from omnivox.pipeline.pacer import FramePacer
from omnivox.pipeline.pending_audio import PendingAudio
from omnivox.pipeline.responses import ActiveResponse
from omnivox.pipeline.session_config import (
    FORMAT_TYPES,
    default_session,
    merge_update,
    parse_turn_detection,
    validate_session,
)
from omnivox.pipeline.session_limits import (
    SessionLimits,
    base64_audio_seconds,
    check_item_size,
    check_max_output_tokens,
    check_metadata,
    check_response_instructions,
    check_session_size,
    items_to_evict,
    known_session_fields,
)
from omnivox.pipeline.turns import SpeechStarted, SpeechStopped, TurnDetector

if TYPE_CHECKING:
    from omnivox.pipeline.vad import Vad

log = logging.getLogger(__name__)

MIN_COMMIT_MS = 100
ANALYSIS_STEP_SAMPLES = INPUT_RATE
"""Caller audio fed to the buffer and the VAD per `handle` call at most; more waits for the next call, so that one
long append never holds the event loop (the shell calls again while `audio_pending`)."""


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
    limits: SessionLimits = field(default_factory=SessionLimits)
    min_speech_ms: int = 64
    defaults: dict[str, Any] = field(default_factory=dict)
    """Initial GA session fields (voice, instructions, turn_detection, formats) merged over the built-in ones."""


class Session:
    def __init__(
        self, options: SessionOptions, vad_factory: Callable[[], Vad] | None = None, session_id: str | None = None
    ) -> None:
        self.options = options
        self.id = session_id or f"sess_{secrets.token_hex(8)}"
        self._id_prefix = secrets.token_hex(3)
        self._counter = 0
        self.config = merge_update(default_session(options.model), options.defaults)
        self.config["id"] = self.id
        self._turns = parse_turn_detection(self.config["audio"]["input"]["turn_detection"], options.min_speech_ms)
        self.config["audio"]["input"]["turn_detection"] = self._turns.to_dict() if self._turns else None
        self.conversation = Conversation()
        self._vad_factory = vad_factory
        self._vad: Vad | None = None
        self._vad_framer: Framer | None = None
        self._vad_position = 0
        self._detector: TurnDetector | None = None
        self._pending = PendingAudio()
        self._event_id: str | None = None
        """The `event_id` of the client event being handled (appends carry it into `_pending`)."""
        self._input = InputBuffer(options.limits.max_input_buffer_s)
        self._transcribing: set[str] = set()
        self._turn_item_id: str | None = None
        self._turn_start = 0
        self._idle_since: int | None = None
        self._active: ActiveResponse | None = None
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
        return FORMAT_TYPES[self.config["audio"]["input"]["format"]["type"]]

    @property
    def output_format(self) -> str:
        return FORMAT_TYPES[self.config["audio"]["output"]["format"]["type"]]

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

    @property
    def audio_pending(self) -> bool:
        """Caller audio has been received but not yet analysed: call `handle(Tick(), now)` again (after awaiting the
        VAD's pending result, if any) to work through the next step of it."""
        return bool(self._pending)

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
                    self._analyse_pending(out, everything=True)  # a client event follows all the audio before it
                    self._on_client_event(event, out)
                case AudioIn():
                    self._pending.add_samples(event.pcm)
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
        self._analyse_pending(out)
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
        return int((self._input.total if samples is None else samples) * 1000 // INPUT_RATE)

    # ------------------------------------------------------------ client events

    def _on_client_event(self, event: ClientEvent, out: list[SessionOutput]) -> None:
        handler = self._client_handlers.get(event.type)
        if handler is None:
            raise ProtocolError(f"unknown event type '{event.type}'", code="unknown_event", param="type")
        self._event_id = event.event_id
        handler(event.payload, out)

    def _on_session_update(self, payload: dict[str, Any], out: list[SessionOutput]) -> None:
        update = payload.get("session")
        if not isinstance(update, dict):
            raise ProtocolError("session.update needs a 'session' object", param="session")
        if update.get("type", "realtime") != "realtime":
            raise ProtocolError(
                "only realtime sessions are supported", code="unsupported_session_type", param="session.type"
            )
        update, dropped = known_session_fields({k: v for k, v in update.items() if k not in ("id", "object")})
        if dropped:
            log.debug("%s: session.update keys ignored: %s", self.id, ", ".join(name[:40] for name in dropped[:8]))
        merged = merge_update(self.config, update)
        validate_session(merged)
        check_session_size(merged, self.options.limits)
        check_max_output_tokens(merged.get("max_output_tokens"), self.options.limits, "session.max_output_tokens")
        new_voice = merged["audio"]["output"].get("voice")
        if self._produced_audio and new_voice != self.config["audio"]["output"].get("voice"):
            raise ProtocolError(
                "the voice cannot change once the session has produced audio",
                code="cannot_update_voice",
                param="session.audio.output.voice",
            )
        turns = parse_turn_detection(merged["audio"]["input"].get("turn_detection"), self.options.min_speech_ms)
        merged["audio"]["input"]["turn_detection"] = turns.to_dict() if turns else None
        if turns != self._turns:
            self._turns = turns
            self._detector = None
            self._turn_item_id = None
        self.config = merged
        out.append(ServerEvent("session.updated", {"session": copy.deepcopy(self.config)}))

    def _on_append(self, payload: dict[str, Any], out: list[SessionOutput]) -> None:
        """Checked here, decoded and analysed step by step (`_analyse_pending`)."""
        data = payload.get("audio")
        if not isinstance(data, str):
            raise ProtocolError("audio must be a base64 string", code="invalid_audio", param="audio")
        if len(data) > MAX_APPEND_BYTES * 4 // 3 + 4:
            raise ProtocolError("audio chunk over the 15 MiB limit", code="audio_too_large", param="audio")
        fmt = audio_format(self.input_format)
        if len(data) % 4 or (len(data) * 3 // 4 - data[-2:].count("=")) % fmt.bytes_per_sample:
            raise ProtocolError(
                f"audio is not whole base64 {self.input_format} samples", code="invalid_audio", param="audio"
            )
        seconds = base64_audio_seconds(data, self.input_format)
        held = (self._input.total - self._input.start) / INPUT_RATE
        limit = self.options.limits.max_input_buffer_s
        if self._turns is None and held + seconds > limit:  # with turn detection the oldest audio is dropped
            raise ProtocolError(
                f"the input audio buffer would hold {held + seconds:.1f} s; at most {limit:g} s (commit or clear it)",
                code="input_audio_buffer_full",
                param="audio",
            )
        self._pending.add_base64(data, fmt, self._event_id)

    def _on_commit(self, payload: dict[str, Any], out: list[SessionOutput]) -> None:
        self._pending.flush_resampler()  # the turn is over: release the resampler's filter delay
        self._analyse_pending(out, everything=True)
        audio = self._input.take_all()
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
        self._input.empty()
        self._turn_item_id = None
        self._detector = None
        out.append(ServerEvent("input_audio_buffer.cleared"))

    def _on_item_create(self, payload: dict[str, Any], out: list[SessionOutput]) -> None:
        check_item_size(payload.get("item"), self.options.limits, self.input_format)
        item = parse_item(payload.get("item"), self.input_format, self._new_id)
        previous = payload.get("previous_item_id")
        if self.conversation.get(item.id) is not None:
            raise ProtocolError(f"an item with id '{item.id}' already exists", param="item.id")
        try:
            before = self.conversation.insert(item, previous)
        except KeyError:
            raise ProtocolError(f"previous_item_id '{previous}' does not exist", param="previous_item_id") from None
        self._announce_item(item, before, out)
        self._evict_over_limits(item, out)

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

    def _analyse_pending(self, out: list[SessionOutput], *, everything: bool = False) -> None:
        """Feed received caller audio to the buffer and the VAD: at most `ANALYSIS_STEP_SAMPLES` per call, and never a
        frame that would wait on the VAD's previous result (the shell awaits it off the event loop, then calls again);
        `everything` works through all of it now (before a client event, which must follow the audio sent before it)."""
        budget = ANALYSIS_STEP_SAMPLES
        while self._pending and (everything or budget > 0):
            room = self._vad_room()
            try:
                piece = self._pending.take(room or ANALYSIS_STEP_SAMPLES)
            except ProtocolError as exc:
                out.append(error_event(exc))
                continue
            if room and piece.size == room and not everything and getattr(self._vad, "pending", False):
                self._pending.unread(piece)  # this piece completes a frame: its VAD call would block
                return
            budget -= piece.size
            self._on_audio(piece, out)

    def _vad_room(self) -> int | None:
        """Samples that complete the VAD's next frame; None when no VAD runs (manual turns)."""
        if self._turns is None or self._vad_factory is None:
            return None
        if self._vad is None:
            self._vad = self._vad_factory()
            self._vad_framer = Framer(self._vad.frame_samples)
            self._vad_position = self._input.total
        assert self._vad_framer is not None
        return self._vad.frame_samples - self._vad_framer.pending

    def _on_audio(self, pcm: np.ndarray, out: list[SessionOutput]) -> None:
        """One piece of caller audio (`_analyse_pending` bounds it) into the buffer, the VAD and turn detection."""
        if not pcm.size:
            return
        room = self._vad_room()
        self._input.append(pcm)
        if room is None:
            return
        assert self._vad is not None
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
            self._input.drop_before(self._input.total - keep)
            self._check_idle(out)

    def _on_speech_started(self, turn: SpeechStarted, out: list[SessionOutput]) -> None:
        assert self._turns is not None
        self._idle_since = None
        self._turn_item_id = self._new_id("item")
        onset = int(turn.onset_ms * INPUT_RATE / 1000)
        self._turn_start = max(self._input.start, onset - self._turns.prefix_padding_ms * INPUT_RATE // 1000)
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
        audio = self._input.take(self._turn_start, min(end, self._input.total))
        self._commit_user_audio(item_id, audio, out)
        if self._turns.create_response:
            if self._active is None:
                self._start_response({}, out)
            else:
                log.info("%s: turn ended while response %s is active; not starting another", self.id, self._active.id)

    def _commit_user_audio(self, item_id: str, audio: np.ndarray, out: list[SessionOutput]) -> None:
        item = Item(item_id, "user", audio=audio.copy())
        before = self.conversation.insert(item)
        self._input.empty()
        out.append(ServerEvent("input_audio_buffer.committed", {"previous_item_id": before, "item_id": item_id}))
        self._announce_item(item, before, out)
        self._evict_over_limits(item, out)
        transcription = self.config["audio"]["input"].get("transcription")
        if not isinstance(transcription, dict):
            return
        if len(self._transcribing) >= self.options.limits.max_transcriptions:
            message = f"{len(self._transcribing)} transcriptions of this session are running already"
            out.append(self._transcription_failed(item, "too_many_transcriptions", message))
            return
        language = transcription.get("language") if isinstance(transcription.get("language"), str) else None
        prompt = transcription.get("prompt") if isinstance(transcription.get("prompt"), str) else ""
        self._transcribing.add(item_id)
        out.append(TranscribeAudio(item_id, item.audio, language, prompt))

    def _evict_over_limits(self, added: Item, out: list[SessionOutput]) -> None:
        """Keep the conversation within `max_items` and `max_audio_s` by deleting its oldest items."""
        keep = (added, self._active.item) if self._active is not None else (added,)
        for item in items_to_evict(self.conversation, self.options.limits, keep):
            self.conversation.delete(item.id)
            out.append(ServerEvent("conversation.item.deleted", {"item_id": item.id}))

    @staticmethod
    def _transcription_failed(item: Item, code: str, message: str | None) -> ServerEvent:
        error = {"type": "transcription_error", "code": code, "message": message}
        return ServerEvent(
            "conversation.item.input_audio_transcription.failed",
            {"item_id": item.id, "content_index": 0, "error": error},
        )

    def _on_transcription(self, event: TranscriptionDone, out: list[SessionOutput]) -> None:
        self._transcribing.discard(event.item_id)
        item = self.conversation.get(event.item_id)
        if item is None:
            return  # deleted meanwhile
        if event.transcript is None:
            out.append(self._transcription_failed(item, "transcription_failed", event.error))
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
        self._commit_user_audio(item_id, self._input.take_all(), out)
        self._start_response({}, out)

    # ------------------------------------------------------------ responses

    def _start_response(self, params: dict[str, Any], out: list[SessionOutput]) -> None:
        if self._active is not None:
            raise ProtocolError(
                f"conversation already has an active response ({self._active.id})",
                code="conversation_already_has_active_response",
            )
        modalities = params.get("output_modalities", self.config["output_modalities"])
        if not isinstance(modalities, list) or not modalities or not set(modalities) <= {"audio", "text"}:
            raise ProtocolError("output_modalities must be ['audio'] or ['text']", param="response.output_modalities")
        instructions = params.get("instructions", self.config["instructions"])
        if not isinstance(instructions, str):
            raise ProtocolError("instructions must be a string", param="response.instructions")
        limits = self.options.limits
        check_response_instructions(instructions, limits)
        max_tokens = check_max_output_tokens(
            params.get("max_output_tokens", self.config["max_output_tokens"]), limits, "response.max_output_tokens"
        )
        check_metadata(params.get("metadata"))
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
        conversation_id = "conv_" + self.id.removeprefix("sess_") if in_conversation else None
        response = ActiveResponse(
            response_id, item, conversation_id, output_audio, params.get("metadata"), pacer, resampler
        )
        self._active = response
        self._idle_since = None
        out.extend(response.opening_events())
        if in_conversation:
            before = self.conversation.insert(item)
            out.append(ServerEvent("conversation.item.added", {"previous_item_id": before, "item": item.to_json()}))
            self._evict_over_limits(item, out)
        out.append(response.content_part_added())
        request = ResponseRequest(
            messages=messages,
            instructions=instructions,
            voice=self.config["audio"]["output"]["voice"],
            output_audio=output_audio,
            sampling=SamplingParams(
                temperature=params.get("temperature", self.config["temperature"]),
                max_tokens=max_tokens,
            ),
            request_id=response_id,
            conversation_id=self.id,
            max_prompt_tokens=limits.max_prompt_tokens,
        )
        out.append(StartResponse(response_id, request))

    def _input_messages(self, items: Any) -> tuple[Message, ...]:
        if not isinstance(items, list):
            raise ProtocolError("response.input must be a list of items", param="response.input")
        if len(items) > self.options.limits.max_items:
            raise ProtocolError(
                f"response.input has {len(items)} items; at most {self.options.limits.max_items}",
                code="item_too_large",
                param="response.input",
            )
        messages: list[Message] = []
        for index, entry in enumerate(items):
            if isinstance(entry, dict) and entry.get("type") == "item_reference":
                item = self._existing_item(entry.get("id"))
            else:
                check_item_size(entry, self.options.limits, self.input_format, f"response.input[{index}]")
                item = parse_item(entry, self.input_format, self._new_id)
            message = item.to_message()
            if message is not None:
                messages.append(message)
        return tuple(messages)

    def _on_engine_delta(self, event: EngineOutput, out: list[SessionOutput]) -> None:
        response = self._active
        if response is None or response.id != event.response_id or response.engine_done:
            return  # a late delta of a cancelled or finished response: dropped
        delta = event.delta
        if isinstance(delta, TextDelta):
            if not delta.text:
                return
            response.item.text += delta.text
            out.append(response.text_delta(delta.text))
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
        self, response: ActiveResponse, status: str, details: dict[str, Any] | None, out: list[SessionOutput]
    ) -> None:
        item = response.item
        out.extend(response.closing_events(status))
        item_json = item.to_json()
        if response.in_conversation and self.conversation.get(item.id) is not None:
            index = self.conversation.items.index(item)
            before = self.conversation.items[index - 1].id if index > 0 else None
            out.append(ServerEvent("conversation.item.done", {"previous_item_id": before, "item": item_json}))
        out.append(ServerEvent("response.done", {"response": response.to_json(status, details, [item_json])}))
        self._active = None
        self._idle_since = self._input.total
