"""Text to speech: the TTS stage (`stage.py`) over one speech backend (Piper, espeak-ng or a remote
`/v1/audio/speech`), built from the `tts` settings. Nothing is loaded until the stage starts."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

from omnivox.pipeline.tts.base import SpeechBackend
from omnivox.pipeline.tts.stage import TtsStage

Backend = Literal["piper", "espeak", "remote"]


@dataclass(frozen=True)
class RemoteSpeechSettings:
    url: str | None = None
    model: str = "tts-1"
    api_key: str | None = None
    default_voice: str = "alloy"
    pcm_rate: int = 24_000
    chars_per_second: float = 15.0
    connect_timeout_s: float = 2.0
    read_timeout_s: float = 30.0


@dataclass(frozen=True)
class TtsSettings:
    """The `tts` section of the configuration (see `configs/default.yaml` for each key)."""

    backend: Backend = "piper"
    voices: dict[str, str] = field(default_factory=dict)
    default_voice: str | None = None
    piper_voices: dict[str, str] = field(default_factory=lambda: {"joe": "bundled"})
    piper_threads: int = 1
    workers: int = 2
    espeak_words_per_minute: int = 170
    remote: RemoteSpeechSettings = field(default_factory=RemoteSpeechSettings)
    max_clause_chars: int = 150
    min_soft_clause_chars: int = 24

    @classmethod
    def from_mapping(cls, values: dict[str, Any]) -> TtsSettings:
        remote = RemoteSpeechSettings(**(values.get("remote") or {}))
        return cls(**{**values, "remote": remote})


def create_backend(settings: TtsSettings) -> SpeechBackend:
    executor = ThreadPoolExecutor(max_workers=settings.workers, thread_name_prefix="tts")
    if settings.backend == "piper":
        from omnivox.pipeline.tts.piper import PiperBackend

        default = settings.default_voice or next(iter(settings.piper_voices), "")
        return PiperBackend(settings.piper_voices, default, executor, threads=settings.piper_threads)
    if settings.backend == "espeak":
        from omnivox.pipeline.tts.espeak import EspeakBackend

        backend = EspeakBackend(executor, words_per_minute=settings.espeak_words_per_minute)
        if settings.default_voice:
            backend.default_voice = settings.default_voice
        return backend
    from omnivox.pipeline.tts.remote import RemoteSpeechBackend

    remote = settings.remote
    if not remote.url:
        raise ValueError("tts.remote.url is required when tts.backend is remote")
    return RemoteSpeechBackend(
        remote.url,
        model=remote.model,
        api_key=remote.api_key,
        default_voice=settings.default_voice or remote.default_voice,
        pcm_rate=remote.pcm_rate,
        chars_per_second=remote.chars_per_second,
        connect_timeout_s=remote.connect_timeout_s,
        read_timeout_s=remote.read_timeout_s,
    )


def create_tts_stage(settings: TtsSettings) -> TtsStage:
    return TtsStage(
        create_backend(settings),
        voices=settings.voices,
        max_clause_chars=settings.max_clause_chars,
        min_soft_clause_chars=settings.min_soft_clause_chars,
    )


__all__ = ["TtsSettings", "TtsStage", "create_tts_stage"]
