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

from omnivox.pipeline.audio import AudioFormat, Framer, StreamResampler, audio_format
from omnivox.pipeline.caller_audio import STEP_SAMPLES, CallerAudio, CleanerFactory
from omnivox.pipeline.client_items import MAX_APPEND_BYTES, parse_item
from omnivox.pipeline.context_window import TruncationPolicy, window_start
from omnivox.pipeline.conversation import Conversation, Item
from omnivox.pipeline.echo_cancel import CallerAudioCleaner
from omnivox.pipeline.engines.base import (
    INPUT_RATE,
    AudioDelta,
    Message,
    ResponseRequest,
    TextDelta,
    ToolCallDelta,
    Usage,
)
from omnivox.pipeline.events import (
    AudioIn,
    AudioOut,
    CallerAudioCleaned,
    CancelResponse,
    ClearPlayout,
    ClientEvent,
    EndOfTurnPredicted,
    EngineDone,
    EngineFailed,
    EngineOutput,
    PlayoutProgress,
    PredictEndOfTurn,
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
from omnivox.pipeline.media import ImageLimits
from omnivox.pipeline.pacer import FramePacer
from omnivox.pipeline.responses import ActiveResponse, call_item, opening_json
from omnivox.pipeline.session_config import (
    FORMAT_TYPES,
    cleanup_settings,
    default_session,
    input_audio_format,
    merge_update,
    parse_turn_detection,
    response_sampling,
    valid_modalities,
    validate_session,
)
from omnivox.pipeline.session_limits import (
    SessionLimits,
    base64_audio_seconds,
    check_item_size,
    check_metadata,
    check_response_instructions,
    check_session_size,
    items_to_evict,
    known_session_fields,
)
from omnivox.pipeline.tools import AssembledCall, ToolSpecError, parse_tool_choice, parse_tools
from omnivox.pipeline.turn_policy import ECHO_TAIL_MS, SuspectedInterruption, Verdict
from omnivox.pipeline.turns import EndOfTurnCheck, SpeechStarted, SpeechStopped, TurnDetector, TurnEvent

if TYPE_CHECKING:
    from omnivox.pipeline.vad import Vad

log = logging.getLogger(__name__)

MIN_COMMIT_MS = 100
DEFAULT_ANSWER_TOKENS = 1024
"""Tokens kept free for the answer when the conversation is cut to fit the engine's context and the response
sets no `max_output_tokens`."""


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
    images: ImageLimits = field(default_factory=ImageLimits)
    """Bounds on the images of a conversation item (`media.*` in the config)."""
    min_speech_ms: int = 64
    text_follows_audio: bool = False
    """The engine releases each word just before the audio that begins it: truncation cuts the text exactly."""
    min_interruption_ms: int = 700
    """Default of `turn_detection.min_interruption_ms` (see `turn_policy`)."""
    resume_after_ms: int = 300
    """Silence after a suspected interruption that resumes the paused answer."""
    echo_cancellation: bool = False
    """Default of `audio.input.echo_cancellation` (the door's: on where the client does not cancel echo itself)."""
    defaults: dict[str, Any] = field(default_factory=dict)
    """Initial GA session fields (voice, instructions, turn_detection, formats) merged over the built-in ones."""
    context_tokens: int | None = None
    """The engine's context in tokens (None: unknown); the session's `truncation` keeps the conversation within."""
    audio_tokens_per_second: float = 25.0
    """What a second of caller audio costs the engine in tokens (Qwen2.5-Omni 25, Qwen3-Omni 12.5)."""


class Session:
    def __init__(
        self,
        options: SessionOptions,
        vad_factory: Callable[[], Vad] | None = None,
        session_id: str | None = None,
        cleaner_factory: CleanerFactory | None = None,
    ) -> None:
        self.options = options
        self.id = session_id or f"sess_{secrets.token_hex(8)}"
        self._id_prefix = secrets.token_hex(3)
        self._counter = 0
        self.config = merge_update(default_session(options.model), options.defaults)
        self.config["audio"]["input"].setdefault("echo_cancellation", options.echo_cancellation)
        self.config["id"] = self.id
        self._turns = self._parse_turns(self.config)
        self.config["audio"]["input"]["turn_detection"] = self._turns.to_dict() if self._turns else None
        self._audio = CallerAudio(cleanup_settings(self.config), cleaner_factory)
        self._suspected: SuspectedInterruption | None = None
        self._end_of_turn_checks = 0
        self._pending_check: int | None = None
        self._predicted: float | None = None
        self.false_interruptions = 0
        """Answers paused for speech that was too short to be an interruption, then resumed (for metrics)."""
        self.conversation = Conversation()
        self._vad_factory = vad_factory
        self._vad: Vad | None = None
        self._vad_framer: Framer | None = None
        self._vad_position = 0
        self._detector: TurnDetector | None = None
        self._event_id: str | None = None
        """The `event_id` of the client event being handled (appends carry it with their audio)."""
        self._input = InputBuffer(options.limits.max_input_buffer_s)
        self._transcribing: set[str] = set()
        self._turn_item_id: str | None = None
        self._turn_start = 0
        self._idle_since: int | None = None
        self._active: ActiveResponse | None = None
        self._window_item_id: str | None = None
        """The oldest item the model still sees once `truncation` has cut the conversation (None: all of it)."""
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
    def input_format(self) -> AudioFormat:
        """The caller's wire audio format, at the session's input rate."""
        return input_audio_format(self.config)

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
    def cleaner(self) -> CallerAudioCleaner | None:
        """The caller-audio cleaner (echo cancellation, noise reduction) once audio has started it."""
        return self._audio.cleaner

    @property
    def active_response_id(self) -> str | None:
        return self._active.id if self._active else None

    @property
    def audio_pending(self) -> bool:
        """Caller audio has been received but not yet analysed: call `handle(Tick(), now)` again (after awaiting the
        VAD's pending result, if any) to work through the next step of it."""
        return bool(self._audio)

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
                    self._audio.add_samples(event.pcm)
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
                case EndOfTurnPredicted():
                    self._on_end_of_turn_predicted(event, out)
                case CallerAudioCleaned():
                    self._audio.cleaned()
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
        validate_session(merged, self.options.limits.max_output_tokens)
        check_session_size(merged, self.options.limits)
        new_voice = merged["audio"]["output"].get("voice")
        if self._produced_audio and new_voice != self.config["audio"]["output"].get("voice"):
            raise ProtocolError(
                "the voice cannot change once the session has produced audio",
                code="cannot_update_voice",
                param="session.audio.output.voice",
            )
        turns = self._parse_turns(merged)
        merged["audio"]["input"]["turn_detection"] = turns.to_dict() if turns else None
        if turns != self._turns:
            self._turns = turns
            self._detector = None
            self._turn_item_id = None
        cleanup = cleanup_settings(merged)
        if cleanup != self._audio.cleanup:
            self._audio.change_cleanup(cleanup)
        self.config = merged
        out.append(ServerEvent("session.updated", {"session": copy.deepcopy(self.config)}))

    def _on_append(self, payload: dict[str, Any], out: list[SessionOutput]) -> None:
        """Checked here, decoded and analysed step by step (`_analyse_pending`)."""
        data = payload.get("audio")
        if not isinstance(data, str):
            raise ProtocolError("audio must be a base64 string", code="invalid_audio", param="audio")
        if len(data) > MAX_APPEND_BYTES * 4 // 3 + 4:
            raise ProtocolError("audio chunk over the 15 MiB limit", code="audio_too_large", param="audio")
        fmt = self.input_format
        if len(data) % 4 or (len(data) * 3 // 4 - data[-2:].count("=")) % fmt.bytes_per_sample:
            raise ProtocolError(f"audio is not whole base64 {fmt.name} samples", code="invalid_audio", param="audio")
        seconds = base64_audio_seconds(data, fmt)
        held = (self._input.total - self._input.start) / INPUT_RATE
        limit = self.options.limits.max_input_buffer_s
        if self._turns is None and held + seconds > limit:  # with turn detection the oldest audio is dropped
            raise ProtocolError(
                f"the input audio buffer would hold {held + seconds:.1f} s; at most {limit:g} s (commit or clear it)",
                code="input_audio_buffer_full",
                param="audio",
            )
        self._audio.add_base64(data, fmt, self._event_id)

    def _on_commit(self, payload: dict[str, Any], out: list[SessionOutput]) -> None:
        self._audio.end_turn()
        self._analyse_pending(out, everything=True)
        self._audio.flush_cleaner()
        self._analyse_pending(out, everything=True)
        audio = self._input.take_all()
        if audio.size * 1000 < MIN_COMMIT_MS * INPUT_RATE:
            raise ProtocolError(
                f"Error committing input audio buffer: buffer too small. Expected at least {MIN_COMMIT_MS}ms of "
                f"audio, but buffer only has {audio.size * 1000 / INPUT_RATE:.2f}ms of audio.",
                code="input_audio_buffer_commit_empty",
            )
        item_id = self._turn_item_id or self._new_id("item")
        self._turn_item_id = None
        self._detector = None
        self._commit_user_audio(item_id, audio, out)

    def _on_clear(self, payload: dict[str, Any], out: list[SessionOutput]) -> None:
        self._audio.discard()
        self._input.empty()
        self._turn_item_id = None
        self._detector = None
        out.append(ServerEvent("input_audio_buffer.cleared"))

    def _on_item_create(self, payload: dict[str, Any], out: list[SessionOutput]) -> None:
        check_item_size(payload.get("item"), self.options.limits, self.input_format)
        item = parse_item(payload.get("item"), self.input_format, self._new_id, self.options.images)
        previous = payload.get("previous_item_id")
        if self.conversation.get(item.id) is not None:
            raise ProtocolError(
                f"an item with id '{item.id}' already exists", code="item_create_duplicate_item_id", param="item.id"
            )
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
        item = self._existing_item(payload.get("item_id"), "item_retrieve_invalid_item_id")
        out.append(ServerEvent("conversation.item.retrieved", {"item": item.to_json()}))

    def _existing_item(self, item_id: Any, code: str) -> Item:
        """The item `item_id`, or the error OpenAI gives for that event (`code`: pipecat matches on it)."""
        item = self.conversation.get(item_id) if isinstance(item_id, str) else None
        if item is None:
            raise ProtocolError(f"item '{item_id}' does not exist", code=code, param="item_id")
        return item

    def _on_item_truncate(self, payload: dict[str, Any], out: list[SessionOutput]) -> None:
        item = self._existing_item(payload.get("item_id"), "item_truncate_invalid_item_id")
        if item.type != "message" or item.role != "assistant" or not item.has_audio:
            raise ProtocolError(
                "only assistant audio items can be truncated", code="invalid_item_type", param="item_id"
            )
        if payload.get("content_index", 0) != 0:
            raise ProtocolError("content_index must be 0", param="content_index")
        end_ms = payload.get("audio_end_ms")
        if isinstance(end_ms, bool) or not isinstance(end_ms, int) or end_ms < 0:
            raise ProtocolError("audio_end_ms must be a non-negative integer", param="audio_end_ms")
        # Frameworks compute audio_end_ms from their own playback clock: past what was sent is what was sent.
        self._truncate(item, min(float(end_ms), item.audio_sent_ms), out)

    def _truncate(self, item: Item, end_ms: float, out: list[SessionOutput]) -> None:
        item.heard_ms = end_ms if item.heard_ms is None else min(item.heard_ms, end_ms)
        out.append(
            ServerEvent(
                "conversation.item.truncated", {"item_id": item.id, "content_index": 0, "audio_end_ms": int(end_ms)}
            )
        )

    def _on_item_delete(self, payload: dict[str, Any], out: list[SessionOutput]) -> None:
        item = self._existing_item(payload.get("item_id"), "item_delete_invalid_item_id")
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
            # OpenAI's exact text: LiveKit recognises the benign cancel after a server-side cancel by it.
            raise ProtocolError("Cancellation failed: no active response found", code="response_cancel_not_active")
        self._cancel("client_cancelled", out)

    def _on_output_clear(self, payload: dict[str, Any], out: list[SessionOutput]) -> None:
        if self._active is not None:
            self._cancel("client_cancelled", out)
        else:
            out.append(ServerEvent("output_audio_buffer.cleared", {"response_id": None}))

    # ------------------------------------------------------------ caller audio and turns

    def _parse_turns(self, config: dict[str, Any]) -> Any:
        return parse_turn_detection(
            config["audio"]["input"].get("turn_detection"),
            self.options.min_speech_ms,
            min_interruption_ms=self.options.min_interruption_ms,
        )

    def _analyse_pending(self, out: list[SessionOutput], *, everything: bool = False) -> None:
        """Work through received caller audio (`CallerAudio`): at most `STEP_SAMPLES` per call, and never a VAD frame
        that would wait on the VAD's previous result (the shell awaits it off the event loop, then calls again);
        `everything` works through all of it now (before a client event, which must follow the audio sent before it)."""
        budget = STEP_SAMPLES
        while everything or budget > 0:
            room = self._vad_room()
            try:
                step = self._audio.next_step(room or STEP_SAMPLES, self._now)
            except ProtocolError as exc:
                out.append(error_event(exc))
                continue
            if step is None:
                return
            piece, cost = step
            if room and piece.size == room and not everything and getattr(self._vad, "pending", False):
                self._audio.unread(piece)  # this piece completes a frame: its VAD call would block
                return
            budget -= cost
            self._hear(piece, out)

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

    def _hear(self, pcm: np.ndarray, out: list[SessionOutput]) -> None:
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
            detector = self._detector
            turns = detector.update(self._vad.probability(frame), start_ms, frame_ms)
            if self._suspected is not None:
                self._judge_interruption(turns, out)
                continue
            for turn in turns:
                self._on_turn_event(turn, out)
            if self._pending_check is not None:
                self._end_turn_if_complete(out)
        if self._detector is not None and not self._detector.speaking:
            keep = (self._turns.prefix_padding_ms + self._turns.min_speech_ms + 500) * INPUT_RATE // 1000
            self._input.drop_before(self._input.total - keep)
            self._check_idle(out)

    def _on_turn_event(self, turn: TurnEvent, out: list[SessionOutput]) -> None:
        if isinstance(turn, SpeechStarted):
            self._on_speech_started(turn, out)
        elif isinstance(turn, SpeechStopped):
            self._on_speech_stopped(turn, out)
        else:
            self._on_end_of_turn_check(turn, out)

    def _on_speech_started(self, turn: SpeechStarted, out: list[SessionOutput]) -> None:
        assert self._turns is not None
        self._idle_since = None
        self._pending_check = None
        self._turn_item_id = self._new_id("item")
        onset = int(turn.onset_ms * INPUT_RATE / 1000)
        self._turn_start = max(self._input.start, onset - self._turns.prefix_padding_ms * INPUT_RATE // 1000)
        active, turns = self._active, self._turns
        if active is not None and active.pacer is not None and turns.interrupt_response and turns.min_interruption_ms:
            # an answer with audio pauses until the speech proves an interruption (`turn_policy`)
            # on a line with an echo, speech counts once what was in flight and its echo are over (from the newest
            # audio received: the cleaner may still hold some)
            echo = self._audio.echo_suspected
            in_flight_ms = self.options.lead_ms + ECHO_TAIL_MS if echo else 0
            counts_from = max(self._vad_position, self._audio.received) * 1000 / INPUT_RATE + in_flight_ms
            self._suspected = SuspectedInterruption(
                turn, turns.min_interruption_ms, self.options.resume_after_ms, counts_from
            )
            self._pause(active, out)
            return
        self._announce_speech_started(out)
        if self._active is not None and self._turns.interrupt_response:
            self._cancel("turn_detected", out)

    def _announce_speech_started(self, out: list[SessionOutput]) -> None:
        out.append(
            ServerEvent(
                "input_audio_buffer.speech_started",
                {"audio_start_ms": self._input_ms(self._turn_start), "item_id": self._turn_item_id},
            )
        )

    def _judge_interruption(self, turns: list[TurnEvent], out: list[SessionOutput]) -> None:
        """One VAD frame while the answer is paused for suspected speech: cancel it, resume it, or wait."""
        suspected, detector = self._suspected, self._detector
        assert suspected is not None and detector is not None
        stopped = any(isinstance(turn, SpeechStopped) for turn in turns)
        verdict = suspected.judge(detector, stopped)
        if self._active is None:  # the answer ended meanwhile (a client's response.cancel): an ordinary turn
            verdict = Verdict.INTERRUPTION
        if verdict is Verdict.UNDECIDED:
            return
        self._suspected = None
        if verdict is Verdict.INTERRUPTION:
            log.info(
                "%s: interruption confirmed after %.0f ms of speech (%.0f ms of audio not yet cleaned)",
                self.id,
                detector.speech_ms,
                (self._audio.received - self._input.total) * 1000 / INPUT_RATE,
            )
            self._announce_speech_started(out)
            if self._active is not None:
                self._cancel("turn_detected", out)
            for turn in turns:
                if isinstance(turn, SpeechStopped):
                    self._on_speech_stopped(turn, out)
            return
        log.info("%s: false interruption (%.0f ms of speech); resuming the answer", self.id, detector.speech_ms)
        self.false_interruptions += 1
        self._turn_item_id = None
        self._detector = TurnDetector(detector.config)
        self._input.drop_before(self._input.total)
        assert self._active is not None
        if self._active.pacer is not None:
            self._active.pacer.resume()

    def _on_end_of_turn_check(self, check: EndOfTurnCheck, out: list[SessionOutput]) -> None:
        """`semantic_vad`: a short silence; ask the model whether the turn up to it is complete."""
        self._end_of_turn_checks += 1
        self._pending_check, self._predicted = self._end_of_turn_checks, None
        silence_start = int(check.silence_start_ms * INPUT_RATE / 1000)
        out.append(PredictEndOfTurn(self._pending_check, self._input.take(self._turn_start, silence_start)))

    def _on_end_of_turn_predicted(self, event: EndOfTurnPredicted, out: list[SessionOutput]) -> None:
        if event.check_id != self._pending_check:
            return  # the caller spoke again meanwhile, or the turn ended another way
        log.debug("%s: end-of-turn model: P(complete) = %s", self.id, event.probability)
        if event.probability is None:
            self._pending_check = None  # no answer: the eagerness's longest silence ends the turn
            return
        self._predicted = event.probability
        self._end_turn_if_complete(out)

    def _end_turn_if_complete(self, out: list[SessionOutput]) -> None:
        """Once the silence has lasted `end_of_turn_check_ms` and the model has answered, its answer decides."""
        detector, turns = self._detector, self._turns
        if self._predicted is None or detector is None or turns is None:
            return
        if detector.silence_ms < turns.end_of_turn_check_ms:
            return
        self._pending_check = None
        if self._predicted >= turns.end_of_turn_threshold and (turn := detector.end_turn()) is not None:
            self._on_speech_stopped(turn, out)

    def _on_speech_stopped(self, turn: SpeechStopped, out: list[SessionOutput]) -> None:
        assert self._turns is not None and self._turn_item_id is not None
        self._pending_check = None
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
                f"Conversation already has an active response in progress: {self._active.id}. "
                "Wait until the response is finished before creating a new one.",
                code="conversation_already_has_active_response",
            )
        params = {key: value for key, value in params.items() if value is not None}  # null: not set
        config = self.config
        sampling = response_sampling({**config, **params}, "response")
        modalities = params.get("output_modalities", config["output_modalities"])
        if not valid_modalities(modalities):
            raise ProtocolError("output_modalities must be ['audio'] or ['text']", param="response.output_modalities")
        instructions = params.get("instructions", config["instructions"])
        if not isinstance(instructions, str):
            raise ProtocolError("instructions must be a string", param="response.instructions")
        try:
            tools = parse_tools(params.get("tools", config["tools"]), "response.tools")
            tool_choice = parse_tool_choice(
                params.get("tool_choice", config["tool_choice"]), tools, "response.tool_choice"
            )
        except ToolSpecError as exc:
            raise ProtocolError(exc.message, param=exc.param) from None
        parallel_tool_calls = params.get("parallel_tool_calls", config.get("parallel_tool_calls", True))
        if not isinstance(parallel_tool_calls, bool):
            raise ProtocolError("parallel_tool_calls must be a boolean", param="response.parallel_tool_calls")
        check_response_instructions(instructions, self.options.limits)
        check_metadata(params.get("metadata"))
        max_tokens = sampling.max_tokens
        in_conversation = params.get("conversation", "auto") != "none"
        messages = self._context_messages(max_tokens or DEFAULT_ANSWER_TOKENS) if in_conversation else ()
        if "input" in params:
            messages = self._input_messages(params["input"])
        voice = ((params.get("audio") or {}).get("output") or {}).get("voice") or config["audio"]["output"]["voice"]
        if not isinstance(voice, str):
            raise ProtocolError("voice must be a string", param="response.audio.output.voice")
        output_audio = "audio" in modalities
        pacer = resampler = None
        if output_audio:
            pacer = FramePacer(self.output_rate, self.options.frame_ms, self.options.lead_ms)
            resampler = StreamResampler(self.options.engine_rate, self.output_rate)
        response_id = self._new_id("resp")
        request = ResponseRequest(
            messages=messages,
            instructions=instructions,
            voice=voice,
            output_audio=output_audio,
            sampling=sampling,
            request_id=response_id,
            conversation_id=self.id,
            tools=tools,
            tool_choice=tool_choice,
            parallel_tool_calls=parallel_tool_calls,
            max_prompt_tokens=self.options.limits.max_prompt_tokens,
        )
        response = ActiveResponse(
            response_id,
            "conv_" + self.id.removeprefix("sess_") if in_conversation else None,
            output_audio,
            params.get("metadata"),
            pacer,
            resampler,
            tools=tools,
            parallel_tool_calls=request.parallel_tool_calls,
        )
        self._active = response
        self._idle_since = None
        out.append(response.created_event())
        if not request.tools_enabled:
            self._open_message(response, out)
        out.append(StartResponse(response_id, request))

    def _open_message(self, response: ActiveResponse, out: list[SessionOutput]) -> Item:
        """The response's message item: announced, entered in the conversation, its content part opened."""
        item = Item(self._new_id("item"), "assistant", status="in_progress", has_audio=response.output_audio)
        if self.options.text_follows_audio:
            item.text_marks = []
        response.item = item
        out.append(response.item_added(item))
        if response.in_conversation:
            before = self.conversation.insert(item)
            out.append(ServerEvent("conversation.item.added", {"previous_item_id": before, "item": item.to_json()}))
            self._evict_over_limits(item, out)
        out.append(response.content_part_added())
        return item

    def _context_messages(self, answer_tokens: int) -> tuple[Message, ...]:
        """The conversation the model sees, cut to the session's `truncation` when it outgrows the context."""
        items = self.conversation.items
        window = self.conversation.get(self._window_item_id) if self._window_item_id else None
        start = items.index(window) if window is not None else 0
        new_start = window_start(
            items,
            start,
            TruncationPolicy.parse(self.config.get("truncation")),
            context_tokens=self.options.context_tokens,
            answer_tokens=answer_tokens,
            audio_tokens_per_second=self.options.audio_tokens_per_second,
        )
        if new_start != start:
            log.info("%s: truncation: the model no longer sees the %d oldest items", self.id, new_start)
        self._window_item_id = items[new_start].id if new_start < len(items) else None
        return self.conversation.messages(new_start)

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
                item = self._existing_item(entry.get("id"), "item_retrieve_invalid_item_id")
            else:
                check_item_size(entry, self.options.limits, self.input_format, f"response.input[{index}]")
                item = parse_item(entry, self.input_format, self._new_id, self.options.images)
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
            if not delta.text or response.calls.started:
                return  # text after a call began is the call's, never speech
            item = response.item or self._open_message(response, out)
            item.text += delta.text
            if item.text_marks is not None:
                item.text_marks.append((response.engine_audio_ms, len(item.text)))
            out.append(response.text_delta(delta.text))
        elif isinstance(delta, AudioDelta):
            if response.pacer is None or response.resampler is None:
                return
            if response.item is None:
                if response.calls.started:
                    return  # no text was spoken before the call: nothing of it may be heard
                self._open_message(response, out)
            assert response.item is not None
            response.engine_audio_ms += delta.pcm.size * 1000 / self.options.engine_rate
            samples = response.resampler.process(delta.pcm)
            response.item.audio_generated_ms += samples.size * 1000 / response.pacer.rate
            response.pacer.push(samples)
            self._produced_audio = True
        elif isinstance(delta, ToolCallDelta):
            response.calls.add(delta)
        elif isinstance(delta, Usage):
            response.usage = delta

    def _on_engine_done(self, response_id: str, out: list[SessionOutput]) -> None:
        response = self._active
        if response is None or response.id != response_id:
            return
        response.engine_done = True
        if response.pacer is not None and response.resampler is not None and response.item is not None:
            tail = response.resampler.flush()
            response.item.audio_generated_ms += tail.size * 1000 / response.pacer.rate
            response.pacer.push(tail)
        if response.pacer is not None:
            response.pacer.finish()

    def _on_engine_failed(self, event: EngineFailed, out: list[SessionOutput]) -> None:
        response = self._active
        if response is None or response.id != event.response_id:
            return
        response.engine_done = True
        out.append(error_event(ProtocolError(event.message, code=event.code, error_type="server_error")))
        if response.pacer is not None:
            response.pacer.clear()
        error = {"type": "server_error", "code": event.code, "message": event.message}
        self._finish(response, "failed", {"type": "failed", "error": error}, out)

    def _on_playout(self, event: PlayoutProgress) -> None:
        item = self.conversation.get(event.item_id)
        if item is None and self._active is not None and self._active.item and self._active.item.id == event.item_id:
            item = self._active.item
        if item is not None:
            item.played_ms = max(item.played_ms or 0.0, event.played_ms)

    def _pump(self, out: list[SessionOutput]) -> None:
        """Release the paced frames that are due, and finish the response once all its audio is out."""
        response = self._active
        if response is None:
            return
        if response.pacer is not None and response.item is not None:
            for frame in response.pacer.pop_due(self._now):
                if not response.playout_started and self.options.server_playout:
                    out.append(ServerEvent("output_audio_buffer.started", {"response_id": response.id}))
                response.playout_started = True
                out.append(AudioOut(response.id, response.item.id, response.message_index, 0, frame))
                self._audio.far_end(frame, response.pacer.rate, self._now)
            response.item.audio_sent_ms = response.pacer.sent_ms
            if not response.pacer.drained:
                return
        if response.engine_done:
            self._finish(response, "completed", None, out)
            if self.options.server_playout and response.playout_started:
                out.append(ServerEvent("output_audio_buffer.stopped", {"response_id": response.id}))

    def _pause(self, response: ActiveResponse, out: list[SessionOutput]) -> None:
        """Stop the answer's audio now; a door that owns playout drops its queue, and the pacer rewinds to what the
        caller heard (on the WebSocket door the client's buffer is unknown: it resumes after what was sent)."""
        assert response.pacer is not None
        rewind = 0
        if self.options.server_playout:
            unheard_ms = response.pacer.sent_ms - (response.item.played_ms or 0.0)
            rewind = max(0, int(unheard_ms * response.pacer.rate / 1000))
            self._clear_playout(response, out)
        response.pacer.pause(rewind)
        response.item.audio_sent_ms = response.pacer.sent_ms

    def _clear_playout(self, response: ActiveResponse, out: list[SessionOutput]) -> None:
        """The door drops the audio it queued; the echo canceller's reference forgets it too."""
        out.append(ClearPlayout(response.id))
        self._audio.far_end_dropped()

    def _cancel(self, reason: str, out: list[SessionOutput]) -> None:
        response = self._active
        assert response is not None
        if not response.engine_done:
            out.append(CancelResponse(response.id))
            response.engine_done = True
        if response.pacer is not None:
            response.pacer.clear()
        if response.pacer is not None and response.item is not None:
            response.item.audio_sent_ms = response.pacer.sent_ms
            if self.options.server_playout:
                self._clear_playout(response, out)
                out.append(ServerEvent("output_audio_buffer.cleared", {"response_id": response.id}))
            heard = response.item.audio_sent_ms
            if self.options.server_playout:
                heard = min(heard, response.item.played_ms or 0.0)
            self._truncate(response.item, heard, out)
        self._finish(response, "cancelled", {"type": "cancelled", "reason": reason}, out)

    def _finish(
        self, response: ActiveResponse, status: str, details: dict[str, Any] | None, out: list[SessionOutput]
    ) -> None:
        """Close the message, announce the function calls of a completed response (never those of one cancelled
        before its end: a call the caller interrupted is not run), then `response.done`."""
        item = response.item
        if item is not None:
            out.extend(response.closing_events(status))
            if response.in_conversation and self.conversation.get(item.id) is not None:
                index = self.conversation.items.index(item)
                before = self.conversation.items[index - 1].id if index > 0 else None
                out.append(ServerEvent("conversation.item.done", {"previous_item_id": before, "item": item.to_json()}))
        failed: list[dict[str, Any]] = []
        if status == "completed" and response.calls.started:
            calls = response.calls.finish(response.tools, response.parallel_tool_calls)
            errors = [call for call in calls if call.error]
            if errors:
                log.warning("%s: response %s made an invalid function call: %s", self.id, response.id, errors[0].error)
                failed = [call_item(call, self._new_id("item")).to_json() for call in calls]
                error = {"type": "server_error", "code": "invalid_tool_call", "message": errors[0].error}
                status, details = "failed", {"type": "failed", "error": error}
            else:
                for call in calls:
                    self._announce_call(response, call, out)
        output = [entry.to_json() for entry in response.output] + failed
        out.append(ServerEvent("response.done", {"response": response.to_json(status, details, output)}))
        self._active = None
        self._idle_since = self._input.total

    def _announce_call(self, response: ActiveResponse, call: AssembledCall, out: list[SessionOutput]) -> None:
        """A function call the model made, as OpenAI announces one: added (in progress), its arguments, done."""
        item = call_item(call, self._new_id("item"))
        out.append(response.item_added(item))
        before = None
        if response.in_conversation:
            before = self.conversation.insert(item)
            out.append(ServerEvent("conversation.item.added", {"previous_item_id": before, "item": opening_json(item)}))
        out.extend(response.call_arguments_events(item))
        out.append(response.item_done(item))
        if response.in_conversation:
            out.append(ServerEvent("conversation.item.done", {"previous_item_id": before, "item": item.to_json()}))
            self._evict_over_limits(item, out)
