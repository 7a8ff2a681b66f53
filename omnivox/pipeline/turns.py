"""Turn detection with OpenAI `server_vad` semantics, driven by per-frame speech probabilities.

Pure and clock-free: time is the caller's input-audio position in milliseconds, so the same audio
always gives the same turns. `semantic_vad` uses the same detector, but as soon as a silence has
lasted `PREDICT_AFTER_MS` it asks the end-of-turn model whether the turn up to that silence is complete
(`EndOfTurnCheck`); once the silence has lasted `end_of_turn_check_ms` and the model said so, the session ends
the turn (`end_turn`), else the turn ends after the eagerness's longest silence (see `SEMANTIC_EAGERNESS`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any


@dataclass(frozen=True)
class Eagerness:
    threshold: float
    """The model's P(complete) at or above which the turn ends after `end_of_turn_check_ms` of silence."""
    max_silence_ms: int
    """The silence that ends the turn whatever the model said (OpenAI's longest waits are 8/4/2 s)."""


SEMANTIC_EAGERNESS = {
    "low": Eagerness(0.7, 3000),
    "medium": Eagerness(0.5, 1500),
    "auto": Eagerness(0.5, 1500),
    "high": Eagerness(0.3, 800),
}
"""`semantic_vad` eagerness: `high` answers soonest, `low` lets the caller take their time."""
END_OF_TURN_CHECK_MS = 150
"""Silence after which `semantic_vad` ends a turn the model called complete."""
PREDICT_AFTER_MS = 64
"""Silence after which the model is asked (its answer is ready by `END_OF_TURN_CHECK_MS`); shorter gaps between
words do not cost a model run."""


@dataclass(frozen=True)
class TurnDetectionConfig:
    """The session's `turn_detection` object, validated, with every default filled in."""

    type: str = "server_vad"
    threshold: float = 0.5
    prefix_padding_ms: int = 300
    silence_duration_ms: int = 500
    create_response: bool = True
    interrupt_response: bool = True
    idle_timeout_ms: int | None = None
    eagerness: str = "auto"
    min_speech_ms: int = 64
    """Speech shorter than this never starts a turn (guards against clicks and coughs interrupting the agent)."""
    end_of_turn_check_ms: int = END_OF_TURN_CHECK_MS
    end_of_turn_threshold: float = 1.0
    """`semantic_vad`: P(complete) that ends the turn at the check (1.0 for `server_vad`, which never asks)."""
    min_interruption_ms: int = 700
    """Speech over the agent's answer pauses it at once, but cancels it only once it lasts this long; shorter speech
    (a backchannel, a cough, a door, echo) resumes the answer where it paused. 0: cancel at once (OpenAI's way)."""

    @classmethod
    def from_dict(
        cls, data: dict[str, Any], min_speech_ms: int = 64, min_interruption_ms: int = 700
    ) -> TurnDetectionConfig:
        """Validate a client's object; missing keys take OpenAI's defaults. Raises ValueError naming the field."""
        kind = data.get("type") or "server_vad"
        if kind not in ("server_vad", "semantic_vad"):
            raise ValueError(f"turn_detection.type must be 'server_vad' or 'semantic_vad', got {kind!r}")
        config = cls(type=kind, min_speech_ms=min_speech_ms, min_interruption_ms=min_interruption_ms)
        numeric = {
            "threshold": (0.0, 1.0),
            "prefix_padding_ms": (0, 10_000),
            "silence_duration_ms": (0, 10_000),
            "min_interruption_ms": (0, 10_000),
        }
        updates: dict[str, Any] = {}
        for key, (low, high) in numeric.items():
            if data.get(key) is not None:
                value = data[key]
                if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
                    raise ValueError(f"turn_detection.{key} must be a number in [{low}, {high}], got {value!r}")
                updates[key] = value
        for key in ("create_response", "interrupt_response"):
            if data.get(key) is not None:
                if not isinstance(data[key], bool):
                    raise ValueError(f"turn_detection.{key} must be a boolean, got {data[key]!r}")
                updates[key] = data[key]
        idle = data.get("idle_timeout_ms")
        if idle is not None:
            if isinstance(idle, bool) or not isinstance(idle, int) or not 5_000 <= idle <= 30_000:
                raise ValueError(f"turn_detection.idle_timeout_ms must be an integer in [5000, 30000], got {idle!r}")
            updates["idle_timeout_ms"] = idle
        if kind == "semantic_vad":
            eagerness = data.get("eagerness") or "auto"
            if not isinstance(eagerness, str) or eagerness not in SEMANTIC_EAGERNESS:
                raise ValueError(f"turn_detection.eagerness must be one of {sorted(SEMANTIC_EAGERNESS)}")
            updates["eagerness"] = eagerness
            updates["silence_duration_ms"] = SEMANTIC_EAGERNESS[eagerness].max_silence_ms
            updates["end_of_turn_threshold"] = SEMANTIC_EAGERNESS[eagerness].threshold
        if "min_interruption_ms" in updates:
            updates["min_interruption_ms"] = int(updates["min_interruption_ms"])
        return replace(config, **updates)

    @property
    def semantic(self) -> bool:
        return self.type == "semantic_vad"

    def to_dict(self) -> dict[str, Any]:
        """The object as `session.updated` shows it."""
        common = {
            "type": self.type,
            "create_response": self.create_response,
            "interrupt_response": self.interrupt_response,
            "min_interruption_ms": self.min_interruption_ms,
        }
        if self.type == "semantic_vad":
            return {**common, "eagerness": self.eagerness}
        return {
            **common,
            "threshold": self.threshold,
            "prefix_padding_ms": self.prefix_padding_ms,
            "silence_duration_ms": self.silence_duration_ms,
            "idle_timeout_ms": self.idle_timeout_ms,
        }


@dataclass(frozen=True)
class SpeechStarted:
    onset_ms: float
    """First speech frame (the event's `audio_start_ms` subtracts the prefix padding)."""


@dataclass(frozen=True)
class SpeechStopped:
    end_ms: float
    """End of the last speech frame before the silence window."""


@dataclass(frozen=True)
class EndOfTurnCheck:
    """`semantic_vad`: the caller has been silent `PREDICT_AFTER_MS`; ask the model whether the turn is over."""

    silence_start_ms: float


TurnEvent = SpeechStarted | SpeechStopped | EndOfTurnCheck


class TurnDetector:
    """Hysteresis over VAD probabilities: speech starts after `min_speech_ms` above `threshold`, stops after
    `silence_duration_ms` below `threshold - 0.15` (the silero recommendation for the negative threshold)."""

    def __init__(self, config: TurnDetectionConfig) -> None:
        self.config = config
        self.speaking = False
        self._run_start: float | None = None
        self._silence_start: float | None = None
        self._checked = False
        self._last_frame_end = 0.0

    @property
    def speech_ms(self) -> float:
        """How long the current speech has lasted up to its last voiced frame (0 when not speaking), pauses within it
        included."""
        return self.speech_ms_since(0.0)

    def speech_ms_since(self, since_ms: float) -> float:
        """`speech_ms`, counting only from `since_ms` (input-audio position)."""
        if not self.speaking or self._run_start is None:
            return 0.0
        end = self._silence_start if self._silence_start is not None else self._last_frame_end
        return max(0.0, end - max(self._run_start, since_ms))

    @property
    def silence_ms(self) -> float:
        """How long the caller has been silent within the current turn (0 while speech goes on)."""
        return self._last_frame_end - self._silence_start if self._silence_start is not None else 0.0

    def end_turn(self) -> SpeechStopped | None:
        """End the turn now (the end-of-turn model said it is complete), if the caller is still silent."""
        if not self.speaking or self._silence_start is None:
            return None
        self.speaking, self._run_start = False, None
        return SpeechStopped(self._silence_start)

    def update(self, probability: float, frame_start_ms: float, frame_ms: float) -> list[TurnEvent]:
        threshold = self.config.threshold
        frame_end = frame_start_ms + frame_ms
        self._last_frame_end = frame_end
        if not self.speaking:
            if probability >= threshold:
                if self._run_start is None:
                    self._run_start = frame_start_ms
                if frame_end - self._run_start >= self.config.min_speech_ms:
                    self.speaking, self._silence_start = True, None
                    return [SpeechStarted(self._run_start)]
            else:
                self._run_start = None
            return []
        if probability >= max(threshold - 0.15, 0.01):
            self._silence_start = None
            return []
        if self._silence_start is None:
            self._silence_start, self._checked = frame_start_ms, False
        silent = frame_end - self._silence_start
        if silent >= self.config.silence_duration_ms:
            self.speaking, self._run_start = False, None
            return [SpeechStopped(self._silence_start)]
        if self.config.semantic and not self._checked and silent >= PREDICT_AFTER_MS:
            self._checked = True
            return [EndOfTurnCheck(self._silence_start)]
        return []
