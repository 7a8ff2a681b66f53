"""Configuration: the embedded `configs/default.yaml`, a user file, `OMNIVOX_*` variables and CLI flags, in that
order of precedence (later wins). Every value is validated at start-up; a bad one stops the server with a
message naming its key."""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

ENV_PREFIX = "OMNIVOX_"


class ConfigError(Exception):
    """The configuration cannot be used; the message names the offending key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ServerConfig(_Section):
    host: str = "0.0.0.0"
    port: int = Field(8000, ge=0, le=65535)
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    max_sessions: int = Field(100, ge=1)
    api_keys: list[str] = []
    public_host: str | None = None


class EngineConfig(_Section):
    name: Literal["auto", "scripted", "qwen2.5-omni", "qwen3-omni"] = "auto"
    model: str | None = None
    served_model_name: str | None = None
    options: dict[str, dict[str, Any] | None] = {}


class VadConfig(_Section):
    kind: Literal["silero", "webrtc"] = "silero"
    min_speech_ms: int = Field(64, ge=0, le=2000)


class TurnDetectionDefaults(_Section):
    type: Literal["server_vad", "semantic_vad"] = "server_vad"
    threshold: float = Field(0.5, ge=0, le=1)
    prefix_padding_ms: int = Field(300, ge=0)
    silence_duration_ms: int = Field(500, ge=0)
    create_response: bool = True
    interrupt_response: bool = True
    idle_timeout_ms: int | None = None
    eagerness: Literal["low", "medium", "high", "auto"] = "auto"


class SessionDefaults(_Section):
    instructions: str = ""
    voice: str = "alloy"
    output_modalities: list[Literal["audio", "text"]] = ["audio"]
    turn_detection: TurnDetectionDefaults | None = TurnDetectionDefaults()


class AudioConfig(_Section):
    frame_ms: Literal[20, 40] = 40
    lead_ms: int = Field(200, ge=0, le=5000)


class LimitsConfig(_Section):
    max_message_bytes: int = Field(15 * 1024 * 1024, ge=1024)
    max_input_buffer_s: float = Field(600, gt=0)
    max_http_body_bytes: int = Field(25 * 1024 * 1024, ge=1024)


class SessionLimitsConfig(_Section):
    max_items: int = Field(1000, ge=2)
    max_audio_s: float = Field(900, gt=0)
    max_item_chars: int = Field(65_536, ge=1)
    max_item_parts: int = Field(16, ge=1)
    max_instructions_chars: int = Field(65_536, ge=0)
    max_session_bytes: int = Field(262_144, ge=4096)
    max_transcriptions: int = Field(4, ge=1)
    max_queued_events: int = Field(256, ge=1)
    max_queued_bytes: int = Field(16 * 1024 * 1024, ge=1024)
    max_events_per_s: float | None = Field(250, gt=0)
    idle_timeout_s: float | None = Field(600, gt=0)


class GenerationLimitsConfig(_Section):
    max_output_tokens: int = Field(4096, ge=1)
    max_prompt_tokens: int = Field(32_768, ge=1)
    max_stop_strings: int = Field(4, ge=0)
    max_stop_chars: int = Field(256, ge=1)


class ConnectionsConfig(_Section):
    write_timeout_s: float = Field(10, gt=0)
    ws_max_queue: int = Field(4, ge=1)
    limit_concurrency: int | None = Field(1000, ge=1)
    drain_timeout_s: float = Field(20, ge=0)


class WebRtcConfig(_Section):
    ice_servers: list[dict[str, Any]] = []
    frame_ms: Literal[20] = 20
    lead_ms: int = Field(60, ge=0, le=1000)
    connect_timeout_s: float = Field(30.0, gt=0)
    max_message_bytes: int = Field(262_144, ge=1024)
    max_buffered_bytes: int = Field(1024 * 1024, ge=16_384)


class TelephonyConfig(_Section):
    frame_ms: Literal[20] = 20
    lead_ms: int = Field(100, ge=0, le=2000)
    dtmf_to_conversation: bool = True
    twilio_auth_token: str | None = None
    max_message_bytes: int = Field(65_536, ge=1024)
    max_pending_marks: int = Field(64, ge=1)


class HttpConfig(_Section):
    audio_cache_ttl_s: float = Field(3600, gt=0)
    audio_cache_max_items: int = Field(4096, ge=1)
    transcript_wait_ms: int = Field(1000, ge=0, le=60_000)


class Config(_Section):
    server: ServerConfig = ServerConfig()
    engine: EngineConfig = EngineConfig()
    vad: VadConfig = VadConfig()
    session: SessionDefaults = SessionDefaults()
    audio: AudioConfig = AudioConfig()
    limits: LimitsConfig = LimitsConfig()
    webrtc: WebRtcConfig = WebRtcConfig()
    telephony: TelephonyConfig = TelephonyConfig()
    http: HttpConfig = HttpConfig()
    session_limits: SessionLimitsConfig = SessionLimitsConfig()
    generation: GenerationLimitsConfig = GenerationLimitsConfig()
    connections: ConnectionsConfig = ConnectionsConfig()

    @model_validator(mode="after")
    def _queue_holds_a_message(self) -> Config:
        if self.session_limits.max_queued_bytes < self.limits.max_message_bytes:
            raise ValueError("session_limits.max_queued_bytes must be at least limits.max_message_bytes")
        return self

    def session_defaults(self) -> dict[str, Any]:
        """The GA session fields every new realtime session starts from."""
        defaults = self.session
        turns = defaults.turn_detection.model_dump(exclude_none=True) if defaults.turn_detection else None
        return {
            "instructions": defaults.instructions,
            "output_modalities": list(defaults.output_modalities),
            "audio": {"input": {"turn_detection": turns}, "output": {"voice": defaults.voice}},
        }


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _read_yaml(text: str, origin: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{origin}: not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{origin}: the top level must be a mapping of sections")
    return data


def _env_overrides(environ: dict[str, str]) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        path = [part.lower() for part in name[len(ENV_PREFIX) :].split("__")]
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        node = overrides
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return overrides


def default_config_text() -> str:
    return resources.files("omnivox").joinpath("configs/default.yaml").read_text()


def load_config(
    path: str | Path | None = None, overrides: dict[str, Any] | None = None, environ: dict[str, str] | None = None
) -> Config:
    """Defaults < file < environment < `overrides` (the CLI flags, as nested dicts)."""
    data = _read_yaml(default_config_text(), "configs/default.yaml")
    if path is not None:
        file = Path(path)
        if not file.is_file():
            raise ConfigError(f"config file {file} does not exist")
        data = _deep_merge(data, _read_yaml(file.read_text(), str(file)))
    data = _deep_merge(data, _env_overrides(dict(os.environ if environ is None else environ)))
    data = _deep_merge(data, overrides or {})
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors())
        raise ConfigError(f"invalid configuration: {problems}") from None
