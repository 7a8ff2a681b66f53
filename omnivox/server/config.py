"""Configuration: the embedded `configs/default.yaml`, a user file, `OMNIVOX_*` variables and CLI flags, in that
order of precedence (later wins). Every value is validated at start-up; a bad one stops the server with a
message naming its key."""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from omnivox.pipeline.media import AudioLimits, ImageLimits

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
    allowed_origins: list[str] = []
    metrics_require_key: bool = False
    public_host: str | None = None

    @field_validator("api_keys")
    @classmethod
    def _keys_not_blank(cls, keys: list[str]) -> list[str]:
        for key in keys:
            if not key.strip() or key != key.strip():
                raise ValueError("an API key must not be empty nor begin or end with whitespace")
        return keys


class EngineConfig(_Section):
    name: Literal["auto", "scripted", "qwen2.5-omni", "qwen3-omni", "cascade", "remote"] = "auto"
    model: str | None = None
    served_model_name: str | None = None
    url: str | None = None
    urls: list[str] = []
    api_key: str | None = None
    options: dict[str, dict[str, Any] | None] = {}
    fallback: dict[str, Any] = {}

    @field_validator("url")
    @classmethod
    def _url_is_http(cls, url: str | None) -> str | None:
        return None if url is None else _http_url(url)

    @field_validator("urls")
    @classmethod
    def _urls_are_http(cls, urls: list[str]) -> list[str]:
        return [_http_url(url) for url in urls]

    @model_validator(mode="after")
    def _remote_has_hosts_and_model(self) -> EngineConfig:
        if self.name == "remote":
            if not self.host_urls():
                raise ValueError("the remote engine needs engine.url or engine.urls (its engine hosts)")
            if not self.model:
                raise ValueError("the remote engine needs engine.model: the model name its engine hosts serve")
        return self

    def host_urls(self) -> list[str]:
        """`url` and `urls` together, each once."""
        return list(dict.fromkeys([*([self.url] if self.url else []), *self.urls]))

    def engine_options(self) -> dict[str, dict[str, Any] | None]:
        """Per-engine constructor options; the remote engine also gets the hosts and their API key."""
        options = dict(self.options)
        if self.name == "remote":
            options["remote"] = {**(options.get("remote") or {}), "urls": self.host_urls(), "api_key": self.api_key}
        return options


def _http_url(url: str) -> str:
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"engine host URLs start with http:// or https://, got {url!r}")
    return url


OPENAI_MODEL_NAMES = [
    "gpt-realtime",
    "gpt-realtime-mini",
    "gpt-realtime-2",
    "gpt-4o-realtime-preview",
    "gpt-4o-mini-realtime-preview",
    "gpt-audio",
    "gpt-audio-mini",
    "gpt-4o-audio-preview",
    "gpt-4o-mini-audio-preview",
    "whisper-1",
    "gpt-4o-transcribe",
    "gpt-4o-mini-transcribe",
]
"""The names OpenAI clients send to the realtime, chat-audio and transcription endpoints."""


class ModelsConfig(_Section):
    aliases: list[str] = OPENAI_MODEL_NAMES
    strict: bool = False


class RemoteSpeechConfig(_Section):
    url: str | None = None
    model: str = Field("tts-1", min_length=1)
    api_key: str | None = None
    default_voice: str = Field("alloy", min_length=1, max_length=64)
    pcm_rate: Literal[8000, 16000, 22050, 24000, 44100, 48000] = 24_000
    chars_per_second: float = Field(15.0, gt=0, le=100)
    connect_timeout_s: float = Field(2.0, gt=0)
    read_timeout_s: float = Field(30.0, gt=0)


class TtsConfig(_Section):
    backend: Literal["piper", "espeak", "remote"] = "piper"
    voices: dict[str, str] = {}
    default_voice: str | None = None
    piper_voices: dict[str, str] = Field(default_factory=lambda: {"joe": "bundled"}, min_length=1)
    piper_threads: int = Field(1, ge=1, le=64)
    workers: int = Field(2, ge=1, le=256)
    espeak_words_per_minute: int = Field(170, ge=80, le=450)
    remote: RemoteSpeechConfig = RemoteSpeechConfig()
    max_clause_chars: int = Field(150, ge=8, le=2000)
    min_soft_clause_chars: int = Field(24, ge=1, le=2000)
    max_input_chars: int = Field(4096, ge=1, le=1_000_000)
    max_queued_requests: int = Field(16, ge=0, le=100_000)


class VadConfig(_Section):
    kind: Literal["silero", "webrtc"] = "silero"
    min_speech_ms: int = Field(64, ge=0, le=2000)
    min_interruption_ms: int = Field(700, ge=0, le=10_000)
    resume_after_ms: int = Field(300, ge=20, le=5000)
    smart_turn_model: str | None = None


class EchoCancellationDefaults(_Section):
    realtime_ws: bool = True
    webrtc: bool = False
    telephony: bool = False


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
    noise_reduction: Literal["near_field", "far_field"] | None = None


class AudioConfig(_Section):
    frame_ms: Literal[20, 40] = 40
    lead_ms: int = Field(200, ge=0, le=5000)
    beta_pcm16_input_rate: Literal[8000, 16000, 24000, 48000] = 24000
    echo_cancellation: EchoCancellationDefaults = EchoCancellationDefaults()


class LimitsConfig(_Section):
    max_message_bytes: int = Field(15 * 1024 * 1024, ge=1024)
    max_input_buffer_s: float = Field(600, gt=0)
    max_http_body_bytes: int = Field(25 * 1024 * 1024, ge=1024)
    max_json_depth: int = Field(64, ge=4, le=512)


class MediaConfig(_Section):
    """Client audio files and images (HTTP doors; images also on the realtime doors)."""

    max_audio_s: float = Field(600, gt=0)
    min_sample_rate: int = Field(8000, ge=1)
    max_sample_rate: int = Field(192_000, ge=1)
    max_channels: int = Field(8, ge=1, le=64)
    max_parts: int = Field(32, ge=1)
    max_images: int = Field(8, ge=0)
    max_image_bytes: int = Field(10 * 1024 * 1024, ge=1024)
    max_image_pixels: int = Field(16 * 1024 * 1024, ge=1)

    @model_validator(mode="after")
    def _rates_in_order(self) -> MediaConfig:
        if self.min_sample_rate > self.max_sample_rate:
            raise ValueError("min_sample_rate must not exceed max_sample_rate")
        return self

    def audio_limits(self, max_seconds: float) -> AudioLimits:
        return AudioLimits(max_seconds, self.min_sample_rate, self.max_sample_rate, self.max_channels)

    def image_limits(self) -> ImageLimits:
        return ImageLimits(self.max_image_bytes, self.max_image_pixels, self.max_images)


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


class Config(_Section):
    server: ServerConfig = ServerConfig()
    engine: EngineConfig = EngineConfig()
    models: ModelsConfig = ModelsConfig()
    vad: VadConfig = VadConfig()
    session: SessionDefaults = SessionDefaults()
    audio: AudioConfig = AudioConfig()
    limits: LimitsConfig = LimitsConfig()
    media: MediaConfig = MediaConfig()
    webrtc: WebRtcConfig = WebRtcConfig()
    telephony: TelephonyConfig = TelephonyConfig()
    http: HttpConfig = HttpConfig()
    tts: TtsConfig = TtsConfig()
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
        noise = {"type": defaults.noise_reduction} if defaults.noise_reduction else None
        return {
            "instructions": defaults.instructions,
            "output_modalities": list(defaults.output_modalities),
            "audio": {
                "input": {"turn_detection": turns, "noise_reduction": noise},
                "output": {"voice": defaults.voice},
            },
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


API_KEYS_VARIABLE = f"{ENV_PREFIX}SERVER__API_KEYS"


def _refuse_empty_keys_variable(environ: dict[str, str]) -> None:
    """`OMNIVOX_SERVER__API_KEYS="[$KEY]"` with `KEY` unset must not start an open server."""
    raw = environ.get(API_KEYS_VARIABLE)
    if raw is None:
        return
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        return  # the validation of server.api_keys names the problem
    if value in (None, "", []):
        raise ConfigError(f"{API_KEYS_VARIABLE} is set but holds no key ({raw!r}); unset it to run without API keys")


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
    environ = dict(os.environ if environ is None else environ)
    _refuse_empty_keys_variable(environ)
    data = _deep_merge(data, _env_overrides(environ))
    data = _deep_merge(data, overrides or {})
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors())
        raise ConfigError(f"invalid configuration: {problems}") from None
