"""The remote LLM stage: any OpenAI-compatible streaming chat completions server (vLLM serving
`microsoft/Phi-4-multimodal-instruct`, NVIDIA NIM, a hosted API), through the chat client the remote engine uses.

Caller audio goes as an `input_audio` or `audio_url` part (`audio`), or, for a model that does not hear (`audio:
none`), as the text the cascade's recogniser made of it. Images go as `image_url` data URLs unless `images` is off.
Instructions go as a leading system message after `system_prompt`; sampling parameters, tools (OpenAI's `tools`,
`tool_choice`, `parallel_tool_calls`, calls and results in the history) and `extra_body` pass through. The stream is
read as text and function calls (`delta.tool_calls`; the text after a call is the call's and never arrives here);
closing it (barge-in) closes the HTTP request, which the server sees as an abort.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Any, Literal

import httpx

from omnivox.pipeline.engines.base import Delta, EngineNotReady, ResponseRequest, TextDelta, ToolCallDelta
from omnivox.pipeline.engines.openai_chat import (
    ChatClient,
    ChatOptions,
    ChatText,
    ChatUsage,
    Dialect,
    Timeouts,
)


class RemoteLlmStage:
    def __init__(
        self,
        model: str,
        *,
        url: str,
        api_key: str | None = None,
        dialect: Dialect = "openai",
        audio: Literal["input_audio", "audio_url", "none"] = "input_audio",
        images: bool = True,
        system_prompt: str = "",
        extra_body: Mapping[str, Any] | None = None,
        connect_timeout_s: float = 2.0,
        read_timeout_s: float = 60.0,
    ) -> None:
        if audio not in ("input_audio", "audio_url", "none"):
            raise ValueError(f"cascade llm audio must be input_audio, audio_url or none, got {audio!r}")
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"cascade llm url must start with http:// or https://, got {url!r}")
        self.model_id = model
        self.url = url
        self.api_key = api_key
        self.hears_audio = audio != "none"
        self.sees_images = images
        self.options = ChatOptions(
            model=model,
            dialect=dialect,
            system_prompt=system_prompt,
            audio_part=None if audio == "none" else audio,
            extra_body=dict(extra_body or {}),
        )
        self.timeouts = Timeouts(connect_s=connect_timeout_s, read_s=read_timeout_s)
        self._http: httpx.AsyncClient | None = None
        self._client: ChatClient | None = None

    @property
    def ready(self) -> bool:
        return self._client is not None

    async def start(self) -> None:
        self._http = httpx.AsyncClient(trust_env=False)
        self._client = ChatClient(self._http, self.url, self.options, api_key=self.api_key, timeouts=self.timeouts)

    async def close(self) -> None:
        if self._http is not None:
            await self._http.aclose()
        self._http = self._client = None

    async def stream(self, request: ResponseRequest) -> AsyncIterator[Delta]:
        if self._client is None:
            raise EngineNotReady("the cascade's LLM stage is not started")
        async for event in self._client.stream(request):
            if isinstance(event, ChatText):
                yield TextDelta(event.text)
            elif isinstance(event, ToolCallDelta):
                yield event
            elif isinstance(event, ChatUsage):
                yield event.usage
