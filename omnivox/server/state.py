"""What all doors share: the configuration, the engine, the metrics and the session count."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

from omnivox.pipeline.echo_cancel import create_cleaner
from omnivox.pipeline.engines.base import Engine
from omnivox.pipeline.session import Session, SessionOptions
from omnivox.pipeline.session_limits import SessionLimits
from omnivox.pipeline.tts import TtsStage
from omnivox.pipeline.vad import create_vad
from omnivox.server.auth import origin_allowed
from omnivox.server.config import Config
from omnivox.server.lifecycle import Lifecycle
from omnivox.server.metrics import Metrics
from omnivox.server.runner import Emit, RunnerLimits, SessionRunner

log = logging.getLogger(__name__)


class SessionLimitReached(Exception):
    """`server.max_sessions` realtime sessions are open already."""


@dataclass
class ServerState:
    config: Config
    engine: Engine
    metrics: Metrics = field(default_factory=Metrics)
    sessions_open: int = 0
    speech_requests: int = 0
    """`POST /v1/audio/speech` requests in progress (`tts.workers` + `tts.max_queued_requests` at most)."""
    tts: TtsStage | None = None
    """The TTS stage of `POST /v1/audio/speech` (the same one the engine speaks with, if it speaks through one)."""
    lifecycle: Lifecycle = field(default_factory=Lifecycle)

    @property
    def model_name(self) -> str:
        return self.config.engine.served_model_name or self.engine.model_id

    def origin_allowed(self, headers: Mapping[str, str], door: str) -> bool:
        """A request from a page of another site carries that site's Origin: refused unless allowed (counted)."""
        server = self.config.server
        if origin_allowed(headers, server.allowed_origins, server.public_host):
            return True
        log.warning("%s: request from origin %.100r refused (server.allowed_origins)", door, headers.get("origin"))
        self.metrics.sessions_rejected.labels(door, "origin").inc()
        return False

    @property
    def model_names(self) -> list[str]:
        """The served name, the engine's model id and the configured aliases (what `/v1/models` lists)."""
        return list(dict.fromkeys([self.model_name, self.engine.model_id, *self.config.models.aliases]))

    def accepts_model(self, name: str | None) -> bool:
        """Every door decides the same way: any name unless `models.strict`, then only `model_names`."""
        return name is None or not self.config.models.strict or name in self.model_names

    @contextmanager
    def session_slot(self, door: str) -> Iterator[None]:
        """Hold one of the `max_sessions` slots for the life of a connection."""
        if self.sessions_open >= self.config.server.max_sessions:
            self.metrics.sessions_rejected.labels(door, "limit").inc()
            raise SessionLimitReached(f"server is at its limit of {self.config.server.max_sessions} sessions")
        self.sessions_open += 1
        self.metrics.sessions_total.labels(door).inc()
        self.metrics.sessions_active.labels(door).inc()
        try:
            yield
        finally:
            self.sessions_open -= 1
            self.metrics.sessions_active.labels(door).dec()

    def new_session(
        self,
        *,
        frame_ms: int | None = None,
        lead_ms: int | None = None,
        output_rate: int | None = None,
        server_playout: bool = False,
        defaults: dict | None = None,
        door: str = "realtime_ws",
    ) -> Session:
        """A session core configured from the server config, with the door's framing."""
        config = self.config
        session_defaults = config.session_defaults()
        if defaults:
            session_defaults = {**session_defaults, **defaults}
        options = SessionOptions(
            model=self.model_name,
            engine_rate=self.engine.native_rate,
            frame_ms=frame_ms or config.audio.frame_ms,
            lead_ms=config.audio.lead_ms if lead_ms is None else lead_ms,
            output_rate=output_rate,
            server_playout=server_playout,
            limits=session_limits(config),
            images=config.media.image_limits(),
            min_speech_ms=config.vad.min_speech_ms,
            text_follows_audio=getattr(self.engine, "text_follows_audio", False),
            min_interruption_ms=config.vad.min_interruption_ms,
            resume_after_ms=config.vad.resume_after_ms,
            echo_cancellation=getattr(config.audio.echo_cancellation, door),
            defaults=session_defaults,
            context_tokens=getattr(self.engine, "context_tokens", None),
            audio_tokens_per_second=getattr(self.engine, "audio_tokens_per_second", 25.0),
        )
        kind = config.vad.kind
        return Session(options, vad_factory=lambda: create_vad(kind), cleaner_factory=create_cleaner)

    def new_runner(self, session: Session, emit: Emit, door: str) -> SessionRunner:
        """The asyncio shell of `session`, bounded by the config and drained at shutdown."""
        bounds = self.config.session_limits
        limits = RunnerLimits(
            bounds.max_queued_events, bounds.max_queued_bytes, bounds.max_events_per_s, bounds.idle_timeout_s
        )
        return SessionRunner(
            session, self.engine, emit, door=door, metrics=self.metrics, limits=limits, lifecycle=self.lifecycle
        )


def session_limits(config: Config) -> SessionLimits:
    """The bounds of one realtime session, from the config sections that set them."""
    bounds, generation = config.session_limits, config.generation
    return SessionLimits(
        max_input_buffer_s=config.limits.max_input_buffer_s,
        max_items=bounds.max_items,
        max_audio_s=bounds.max_audio_s,
        max_item_chars=bounds.max_item_chars,
        max_item_parts=bounds.max_item_parts,
        max_instructions_chars=bounds.max_instructions_chars,
        max_session_bytes=bounds.max_session_bytes,
        max_transcriptions=bounds.max_transcriptions,
        max_output_tokens=generation.max_output_tokens,
        max_prompt_tokens=generation.max_prompt_tokens,
    )
