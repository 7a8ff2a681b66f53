"""Speech recognisers for engines whose model does not transcribe: pocketsphinx on the CPU (offline English, ships
its model), or a remote OpenAI-compatible `POST /v1/audio/transcriptions`. Both take 16 kHz float audio."""

from __future__ import annotations

import asyncio
import threading
from typing import Any, Protocol

import httpx
import numpy as np

from omnivox.pipeline.audio import encode_audio_file, float_to_pcm16
from omnivox.pipeline.engines.base import INPUT_RATE, EngineError
from omnivox.pipeline.engines.openai_chat import HostUnreachable, describe, error_from_response, server_root

TRANSCRIPTIONS_PATH = "/v1/audio/transcriptions"


class Recogniser(Protocol):
    async def transcribe(self, audio: np.ndarray, language: str | None = None, prompt: str = "") -> str: ...

    async def close(self) -> None: ...


class PocketsphinxRecogniser:
    """Offline English; one decoder, loaded on first use, used by one thread at a time."""

    def __init__(self) -> None:
        self._decoder: Any = None
        self._lock = threading.Lock()

    async def transcribe(self, audio: np.ndarray, language: str | None = None, prompt: str = "") -> str:
        return await asyncio.to_thread(self.recognise, audio)

    def recognise(self, audio: np.ndarray) -> str:
        with self._lock:
            if self._decoder is None:
                from pocketsphinx import Decoder  # ships its English model; loaded on first use only

                self._decoder = Decoder(samprate=INPUT_RATE, loglevel="FATAL")
            decoder = self._decoder
            decoder.start_utt()
            decoder.process_raw(float_to_pcm16(audio), full_utt=True)
            decoder.end_utt()
            hypothesis = decoder.hyp()
        return hypothesis.hypstr if hypothesis is not None else ""

    async def close(self) -> None:
        pass


class RemoteRecogniser:
    """A remote transcription endpoint (OpenAI, vLLM serving Whisper, another omnivox: the remote engine's hosts).

    Refusals keep their kind as the chat client's do (429 busy, 503 not ready, ...); a server that cannot be reached
    raises `HostUnreachable`. `http` shares a client (the remote engine's), which `close` then leaves open."""

    def __init__(
        self,
        url: str,
        *,
        model: str = "whisper-1",
        api_key: str | None = None,
        timeout_s: float = 30.0,
        connect_timeout_s: float = 2.0,
        http: httpx.AsyncClient | None = None,
    ) -> None:
        self.root = server_root(url)
        self.url = self.root + TRANSCRIPTIONS_PATH
        self.model = model
        self.api_key = api_key
        self.timeout = httpx.Timeout(timeout_s, connect=connect_timeout_s)
        self._owns_http = http is None
        self._http = http or httpx.AsyncClient(trust_env=False)

    async def transcribe(self, audio: np.ndarray, language: str | None = None, prompt: str = "") -> str:
        wav = await asyncio.to_thread(encode_audio_file, audio, INPUT_RATE, "wav")
        fields = {"model": self.model, "response_format": "json"}
        if language:
            fields["language"] = language
        if prompt:
            fields["prompt"] = prompt
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        try:
            response = await self._http.post(
                self.url,
                data=fields,
                files={"file": ("turn.wav", wav, "audio/wav")},
                headers=headers,
                timeout=self.timeout,
            )
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            raise HostUnreachable(f"transcription server {self.root} unreachable: {describe(exc)}") from None
        except httpx.HTTPError as exc:
            raise EngineError(f"transcription by {self.root} failed: {describe(exc)}") from None
        if response.status_code != 200:
            raise error_from_response(response.status_code, response.content)
        try:
            text = response.json()["text"]
        except (ValueError, KeyError, TypeError):
            raise EngineError(f"{self.root} answered the transcription without a text") from None
        return text if isinstance(text, str) else ""

    async def close(self) -> None:
        if self._owns_http:
            await self._http.aclose()
