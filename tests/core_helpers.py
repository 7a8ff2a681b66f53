"""Drive the sans-I/O session core with a fake clock: no sockets, no tasks, no sleeps."""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from omnivox.pipeline.audio import float_to_pcm16
from omnivox.pipeline.engines.base import AudioDelta, TextDelta
from omnivox.pipeline.events import (
    AudioIn,
    AudioOut,
    CancelResponse,
    ClearPlayout,
    ClientEvent,
    EndOfTurnPredicted,
    EngineDone,
    EngineOutput,
    PredictEndOfTurn,
    ServerEvent,
    SessionInput,
    SessionOutput,
    StartResponse,
    Tick,
)
from omnivox.pipeline.session import Session, SessionOptions

RATE_IN = 16_000


class EnergyVad:
    """Test double of a VAD: 'speech' is any 20 ms frame louder than -40 dBFS."""

    frame_samples = 320

    def probability(self, frame: np.ndarray) -> float:
        return 1.0 if float(np.sqrt(np.mean(frame**2))) > 0.01 else 0.0

    def reset(self) -> None:
        pass


def tone(seconds: float, rate: int = RATE_IN, amplitude: float = 0.3) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (amplitude * np.sin(2 * np.pi * 220 * t)).astype(np.float32)


def silence(seconds: float, rate: int = RATE_IN) -> np.ndarray:
    return np.zeros(int(seconds * rate), np.float32)


@dataclass
class CoreDriver:
    """A session plus a fake clock and a log of everything it emitted."""

    session: Session
    now: float = 0.0
    events: list[ServerEvent] = field(default_factory=list)
    audio: list[AudioOut] = field(default_factory=list)
    started: list[StartResponse] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)
    audio_times: list[float] = field(default_factory=list)
    predictions: list[PredictEndOfTurn] = field(default_factory=list)
    cleared: int = 0

    @classmethod
    def create(cls, turn_detection: dict[str, Any] | str | None = "server_vad", **options: Any) -> CoreDriver:
        defaults: dict[str, Any] = {}
        if turn_detection is None:
            defaults = {"audio": {"input": {"turn_detection": None}}}
        elif isinstance(turn_detection, dict):
            defaults = {"audio": {"input": {"turn_detection": turn_detection}}}
        session = Session(SessionOptions(defaults=defaults, **options), vad_factory=EnergyVad)
        driver = cls(session)
        driver.record(session.start(0.0))
        return driver

    def record(self, outputs: list[SessionOutput]) -> list[SessionOutput]:
        for output in outputs:
            if isinstance(output, ServerEvent):
                self.events.append(output)
            elif isinstance(output, AudioOut):
                self.audio.append(output)
                self.audio_times.append(self.now)
            elif isinstance(output, StartResponse):
                self.started.append(output)
            elif isinstance(output, CancelResponse):
                self.cancelled.append(output.response_id)
            elif isinstance(output, PredictEndOfTurn):
                self.predictions.append(output)
            elif isinstance(output, ClearPlayout):
                self.cleared += 1
        return outputs

    def predicted(self, probability: float | None, check_id: int | None = None) -> None:
        """The end-of-turn model answers the latest `PredictEndOfTurn` (or `check_id`)."""
        check = check_id if check_id is not None else self.predictions[-1].check_id
        self.handle(EndOfTurnPredicted(check, probability))

    def handle(self, item: SessionInput) -> list[SessionOutput]:
        """One input, then the steps of caller audio it left to analyse, as the runner does."""
        outputs = self.session.handle(item, self.now)
        while self.session.audio_pending:
            outputs += self.session.handle(Tick(), self.now)
        return self.record(outputs)

    def send(self, event_type: str, **payload: Any) -> list[SessionOutput]:
        event_id = payload.pop("event_id", None)
        return self.handle(ClientEvent(event_type, payload, event_id))

    def append_pcm24(self, samples: np.ndarray) -> list[SessionOutput]:
        return self.send("input_audio_buffer.append", audio=base64.b64encode(float_to_pcm16(samples)).decode())

    def stream_audio(self, samples: np.ndarray, chunk_s: float = 0.02) -> None:
        """Caller audio at 16 kHz in real-time chunks, advancing the clock and ticking the pacer."""
        step = int(chunk_s * RATE_IN)
        for start in range(0, samples.size, step):
            self.now += chunk_s
            self.handle(AudioIn(samples[start : start + step]))

    def engine(self, delta: Any, response_id: str | None = None) -> None:
        rid = response_id or self.started[-1].response_id
        self.record(self.session.handle(EngineOutput(rid, delta), self.now))

    def engine_done(self, response_id: str | None = None) -> None:
        rid = response_id or self.started[-1].response_id
        self.record(self.session.handle(EngineDone(rid), self.now))

    def speak(self, text: str, seconds: float, rate: int = 24_000) -> None:
        """Feed an engine answer: text first, then audio."""
        self.engine(TextDelta(text))
        self.engine(AudioDelta(tone(seconds, rate, 0.2)))

    def advance(self, seconds: float, step: float = 0.01) -> None:
        end = self.now + seconds
        while self.now < end - 1e-9:
            self.now = min(end, self.now + step)
            self.record(self.session.handle(Tick(), self.now))

    def types(self) -> list[str]:
        return [e.type for e in self.events]

    def of_type(self, event_type: str) -> list[ServerEvent]:
        return [e for e in self.events if e.type == event_type]
