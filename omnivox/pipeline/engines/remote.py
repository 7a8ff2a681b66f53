"""The `remote` engine: answers by streaming chat completions with audio from engine hosts.

An engine host is another omnivox (`omnivox serve --engine qwen2.5-omni` on a GPU machine, through its own chat
door), vLLM-Omni, or an OpenAI-compatible audio chat server (see `openai_chat` for the dialects). The front keeps
the doors, session cores and VAD; the host keeps the model. With several hosts (`engine.urls`), `engine_hosts`
keeps each conversation on the host that holds its stored prompt and sends new ones to the least busy host.

Every turn sends the conversation as the caller heard it. A request that cannot reach its host before anything was
received goes to the next healthy host; a failure after that fails the response. Cancelling the response closes its
HTTP stream, so the host aborts the generation. Caller transcripts (Realtime `input_audio_transcription`) come from
the host's `/v1/audio/transcriptions`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping
from typing import Any

import httpx
import numpy as np

from omnivox.pipeline.audio import StreamResampler
from omnivox.pipeline.engines.base import (
    AudioDelta,
    Delta,
    EngineNotReady,
    ResponseRequest,
    TextDelta,
    ToolCallDelta,
    Usage,
)
from omnivox.pipeline.engines.engine_hosts import EngineHost, HostObserver, HostPool
from omnivox.pipeline.engines.openai_chat import (
    AudioEncodings,
    ChatAudio,
    ChatClient,
    ChatOptions,
    ChatText,
    ChatUsage,
    Dialect,
    HostUnreachable,
    Timeouts,
)
from omnivox.pipeline.recognisers import RemoteRecogniser

log = logging.getLogger(__name__)
logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per health check and per turn

HEALTH_PATHS: dict[str, str | None] = {"omnivox": "/healthz", "vllm-omni": "/health", "openai": None}
"""Where each kind of host says it is ready; OpenAI-compatible services have no standard path."""


class RemoteEngine:
    """Speaks through engine hosts; no model in this process."""

    name = "remote"
    native_rate = 24_000

    def __init__(
        self,
        model: str,
        *,
        urls: list[str],
        api_key: str | None = None,
        dialect: Dialect = "omnivox",
        connect_timeout_s: float = 2.0,
        read_timeout_s: float = 60.0,
        health_path: str | None = "default",
        health_interval_s: float = 2.0,
        health_timeout_s: float = 1.0,
        system_prompt: str = "",
        voices: Mapping[str, str] | None = None,
        transcription_model: str | None = None,
        extra_body: Mapping[str, Any] | None = None,
    ) -> None:
        """`health_path` "default" picks the dialect's (`/healthz`, `/health`, none for `openai`); None turns
        active checks off. `transcription_model` is the model named to the host's transcription endpoint (default:
        `model`)."""
        if not urls:
            raise ValueError("the remote engine needs engine.url or engine.urls")
        for value, label in ((connect_timeout_s, "connect_timeout_s"), (read_timeout_s, "read_timeout_s")):
            if value <= 0:
                raise ValueError(f"remote {label} must be positive")
        if health_interval_s <= 0 or health_timeout_s <= 0:
            raise ValueError("remote health_interval_s and health_timeout_s must be positive")
        self.model_id = model
        self.dialect = dialect
        self.api_key = api_key
        self.transcription_model = transcription_model or model
        self.options = ChatOptions(
            model=model,
            dialect=dialect,
            system_prompt=system_prompt,
            voices=dict(voices or {}),
            extra_body=dict(extra_body or {}),
        )
        self.timeouts = Timeouts(connect_s=connect_timeout_s, read_s=read_timeout_s)
        self._urls = list(dict.fromkeys(urls))
        self._health_path = HEALTH_PATHS[dialect] if health_path == "default" else health_path
        self._health_interval_s = health_interval_s
        self._health_timeout_s = health_timeout_s
        self._http: httpx.AsyncClient | None = None
        self._pool: HostPool[ChatClient] | None = None
        self._checks: asyncio.Task[None] | None = None
        self._observers: list[HostObserver] = []
        self._recognisers: dict[str, RemoteRecogniser] = {}

    @property
    def ready(self) -> bool:
        return self._pool is not None and self._pool.any_healthy

    async def start(self) -> None:
        """Check every host once (a host that is down does not stop the start: it is used once it answers)."""
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
        self._http = httpx.AsyncClient(limits=limits, trust_env=False)
        encodings = AudioEncodings()  # a conversation's clips, encoded once whichever host it goes to
        hosts = [
            EngineHost(
                url,
                ChatClient(
                    self._http, url, self.options, api_key=self.api_key, timeouts=self.timeouts, encodings=encodings
                ),
            )
            for url in self._urls
        ]
        self._recognisers = {
            url: RemoteRecogniser(
                url,
                model=self.transcription_model,
                api_key=self.api_key,
                timeout_s=self.timeouts.read_s,
                connect_timeout_s=self.timeouts.connect_s,
                http=self._http,
            )
            for url in self._urls
        }
        self._pool = HostPool(
            hosts,
            health_path=self._health_path,
            interval_s=self._health_interval_s,
            timeout_s=self._health_timeout_s,
        )
        self._pool.observers.extend(self._observers)
        await self._pool.check_all(self._http)
        for host in hosts:
            if not host.healthy:
                log.warning("engine host %s is not ready yet: %s", host.url, host.error)
        self._checks = asyncio.create_task(self._pool.run(self._http), name="engine-host-checks")

    async def close(self) -> None:
        if self._checks is not None:
            self._checks.cancel()
            await asyncio.gather(self._checks, return_exceptions=True)
            self._checks = None
        if self._http is not None:
            await self._http.aclose()
            self._http = None
        self._pool = None

    def watch_hosts(self, observer: HostObserver) -> None:
        """Call `observer(url, healthy, outstanding)` whenever a host's health or load changes (metrics)."""
        self._observers.append(observer)
        if self._pool is not None:
            self._pool.observers.append(observer)

    def health(self) -> dict[str, Any]:
        """What `/healthz` shows about the engine hosts."""
        return {"engine_hosts": self._pool.state() if self._pool is not None else []}

    def forget_conversation(self, conversation_id: str) -> None:
        if self._pool is not None:
            self._pool.forget(conversation_id)

    def _started_pool(self) -> HostPool[ChatClient]:
        if self._pool is None:
            raise EngineNotReady("the remote engine is not started")
        return self._pool

    async def respond(self, request: ResponseRequest) -> AsyncIterator[Delta]:
        pool = self._started_pool()
        body: bytes | None = None
        tried: set[str] = set()
        while True:
            host = pool.choose(request.conversation_id, frozenset(tried))
            if body is None:
                body = await host.client.encode(request)
            try:
                with pool.in_flight(host):
                    async for delta in self._deltas(host.client.stream_body(body)):
                        yield delta
                return
            except HostUnreachable as exc:  # raised before anything arrived: the next host may answer
                pool.mark_down(host, str(exc))
                tried.add(host.url)
                log.info("%s: engine host %s unreachable, trying another", request.request_id, host.url)

    async def _deltas(self, events: AsyncIterator[Any]) -> AsyncIterator[Delta]:
        """Chat events as engine deltas: audio at the native rate, function calls as they are, one `Usage` at the
        end."""
        resampler: StreamResampler | None = None
        usage: Usage | None = None
        async for event in events:
            if isinstance(event, ChatText):
                yield TextDelta(event.text)
            elif isinstance(event, ToolCallDelta):
                yield event
            elif isinstance(event, ChatAudio):
                if resampler is None or resampler.in_rate != event.rate:
                    if resampler is not None and (tail := resampler.flush()).size:
                        yield AudioDelta(tail)
                    resampler = StreamResampler(event.rate, self.native_rate)
                pcm = resampler.process(event.pcm)
                if pcm.size:
                    yield AudioDelta(pcm)
            elif isinstance(event, ChatUsage):
                usage = event.usage
        if resampler is not None and (tail := resampler.flush()).size:
            yield AudioDelta(tail)
        if usage is not None:
            yield usage

    async def transcribe(self, audio: np.ndarray, language: str | None = None, prompt: str = "") -> str:
        """The host's `/v1/audio/transcriptions` (the least busy host: no conversation is involved)."""
        pool = self._started_pool()
        host = pool.choose()
        try:
            with pool.in_flight(host):
                return await self._recognisers[host.url].transcribe(audio, language, prompt)
        except HostUnreachable as exc:
            pool.mark_down(host, str(exc))
            raise
