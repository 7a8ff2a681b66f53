"""Request bodies of the HTTP doors (pydantic), shared by chat completions, the audio-modalities door and the
OpenAPI schema."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

INPUT_AUDIO_FORMATS = ("wav", "mp3", "flac", "ogg", "opus", "pcm16")
OUTPUT_AUDIO_FORMATS = ("pcm16", "wav", "mp3", "flac", "opus")
VOICES = ("alloy", "ash", "ballad", "coral", "echo", "sage", "shimmer", "verse", "marin", "cedar")
"""The OpenAI voice names every engine maps (the schema advertises these; engines may accept more)."""


class _Body(BaseModel):
    """Unknown fields are accepted and ignored, as OpenAI's SDKs send fields this server does not use."""

    model_config = ConfigDict(extra="allow")


class TextContent(_Body):
    type: Literal["text"]
    text: str


class InputAudio(_Body):
    data: str = Field(description="base64 audio file (or raw pcm16 24 kHz mono)")
    format: str = Field(description=f"one of {', '.join(INPUT_AUDIO_FORMATS)}")


class InputAudioContent(_Body):
    type: Literal["input_audio"]
    input_audio: InputAudio


class UrlReference(_Body):
    url: str = Field(description="a data: URL (remote URLs are not fetched)")


class ImageContent(_Body):
    type: Literal["image_url"]
    image_url: UrlReference


class AudioUrlContent(_Body):
    """vLLM-Omni's way to send audio: a data: URL."""

    type: Literal["audio_url"]
    audio_url: UrlReference


ContentPart = Annotated[TextContent | InputAudioContent | ImageContent | AudioUrlContent, Field(discriminator="type")]


class AudioReference(_Body):
    id: str


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    audio: AudioReference | None = Field(None, description="assistant turns: an earlier response's audio")


class AudioOutput(_Body):
    voice: str = Field("alloy", min_length=1, max_length=64)
    format: Literal["pcm16", "wav", "mp3", "flac", "opus"] = "pcm16"


class StreamOptions(_Body):
    include_usage: bool = False


class ChatCompletionRequest(_Body):
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    modalities: list[Literal["text", "audio"]] | None = None
    audio: AudioOutput | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)
    stop: str | list[str] | None = None
    prompt_cache_key: str | None = Field(
        None,
        max_length=256,
        description="the conversation this request continues: the engine keeps its encoded prompt under this key",
    )
    instructions: str | None = Field(
        None, description="an extension: instructions appended to the model's own system prompt (as Realtime's)"
    )


class AudioChatRequest(_Body):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    audio: AudioOutput | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)
