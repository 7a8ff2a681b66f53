"""Turn detection with OpenAI `server_vad` semantics, driven by per-frame speech probabilities.

Pure and clock-free: time is the caller's input-audio position in milliseconds, so the same audio
always gives the same turns. `semantic_vad` is accepted and mapped onto the same detector with a
silence window chosen by `eagerness` (see `SEMANTIC_SILENCE_MS`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

SEMANTIC_SILENCE_MS = {"low": 1500, "medium": 800, "auto": 800, "high": 400}
"""`semantic_vad` eagerness -> end-of-turn silence window (OpenAI's max waits are 8/4/2 s; we end turns on silence)."""


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

    @classmethod
    def from_dict(cls, data: dict[str, Any], min_speech_ms: int = 64) -> TurnDetectionConfig:
        """Validate a client's object; missing keys take OpenAI's defaults. Raises ValueError naming the field."""
        kind = data.get("type") or "server_vad"
        if kind not in ("server_vad", "semantic_vad"):
            raise ValueError(f"turn_detection.type must be 'server_vad' or 'semantic_vad', got {kind!r}")
        config = cls(type=kind, min_speech_ms=min_speech_ms)
        numeric = {"threshold": (0.0, 1.0), "prefix_padding_ms": (0, 10_000), "silence_duration_ms": (0, 10_000)}
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
            if not isinstance(eagerness, str) or eagerness not in SEMANTIC_SILENCE_MS:
                raise ValueError(f"turn_detection.eagerness must be one of {sorted(SEMANTIC_SILENCE_MS)}")
            updates["eagerness"] = eagerness
            updates["silence_duration_ms"] = SEMANTIC_SILENCE_MS[eagerness]
        return replace(config, **updates)

    def to_dict(self) -> dict[str, Any]:
        """The object as `session.updated` shows it."""
        common = {
            "type": self.type,
            "create_response": self.create_response,
            "interrupt_response": self.interrupt_response,
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


TurnEvent = SpeechStarted | SpeechStopped


class TurnDetector:
    """Hysteresis over VAD probabilities: speech starts after `min_speech_ms` above `threshold`, stops after
    `silence_duration_ms` below `threshold - 0.15` (the silero recommendation for the negative threshold)."""

    def __init__(self, config: TurnDetectionConfig) -> None:
        self.config = config
        self.speaking = False
        self._run_start: float | None = None
        self._silence_start: float | None = None

    def update(self, probability: float, frame_start_ms: float, frame_ms: float) -> list[TurnEvent]:
        threshold = self.config.threshold
        frame_end = frame_start_ms + frame_ms
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
            self._silence_start = frame_start_ms
        if frame_end - self._silence_start >= self.config.silence_duration_ms:
            self.speaking, self._run_start = False, None
            return [SpeechStopped(self._silence_start)]
        return []
