"""Speech recognisers for engines whose model does not transcribe: pocketsphinx on the CPU (offline English, ships
its model), or a remote OpenAI-compatible `POST /v1/audio/transcriptions`. Both take 16 kHz float audio."""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import threading
from concurrent.futures import BrokenExecutor, ProcessPoolExecutor
from typing import Any, Protocol

import httpx
import numpy as np

from omnivox.pipeline.audio import encode_audio_file, float_to_pcm16
from omnivox.pipeline.engines.base import INPUT_RATE, EngineError
from omnivox.pipeline.engines.openai_chat import HostUnreachable, describe, error_from_response, server_root

log = logging.getLogger(__name__)

TRANSCRIPTIONS_PATH = "/v1/audio/transcriptions"


class Recogniser(Protocol):
    async def transcribe(self, audio: np.ndarray, language: str | None = None, prompt: str = "") -> str: ...

    async def close(self) -> None: ...


_decoder: Any = None
"""This process's pocketsphinx decoder, made on its first job (it loads its English model)."""
_decoder_lock = threading.Lock()


def _recognise(pcm16: bytes) -> str:
    """16 kHz PCM16 -> the best hypothesis ("" when nothing was recognised); in a worker process, or in this one for
    offline tools."""
    global _decoder
    with _decoder_lock:
        if _decoder is None:
            from pocketsphinx import Decoder  # ships its English model; loaded on first use only

            _decoder = Decoder(samprate=INPUT_RATE, loglevel="FATAL")
        _decoder.start_utt()
        _decoder.process_raw(pcm16, full_utt=True)
        _decoder.end_utt()
        hypothesis = _decoder.hyp()
    return hypothesis.hypstr if hypothesis is not None else ""


class PocketsphinxRecogniser:
    """Offline English in `processes` worker processes, started on first use; jobs beyond them wait in line.

    pocketsphinx decodes while holding the GIL: run in a thread, one caller turn froze the event loop for 0.8-0.9 s,
    delaying every session's events and opening gaps in audio already playing. A worker process (spawned, so it
    shares no locks with the server's threads) decodes instead; the event loop only waits on a future."""

    def __init__(self, processes: int = 1) -> None:
        if processes < 1:
            raise ValueError("recogniser processes must be >= 1")
        self.processes = processes
        self._pool: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()

    async def transcribe(self, audio: np.ndarray, language: str | None = None, prompt: str = "") -> str:
        pool = self._executor()
        try:
            return await asyncio.get_running_loop().run_in_executor(pool, _recognise, float_to_pcm16(audio))
        except BrokenExecutor:
            log.warning("the recogniser process died; starting a new one for the next transcription")
            self._forget(pool)
            raise

    @staticmethod
    def recognise(audio: np.ndarray) -> str:
        """In this process, blocking: for offline tools (tests, benchmarks), never on a server's event loop."""
        return _recognise(float_to_pcm16(audio))

    def _executor(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._pool is None:
                context = multiprocessing.get_context("spawn")
                self._pool = ProcessPoolExecutor(self.processes, mp_context=context)
            return self._pool

    def _forget(self, pool: ProcessPoolExecutor) -> None:
        with self._lock:
            if self._pool is pool:
                self._pool = None
        pool.shutdown(wait=False, cancel_futures=True)

    async def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)


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
