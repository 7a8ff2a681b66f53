"""A remote OpenAI-compatible `POST /v1/audio/speech` as a speech backend, read as streamed raw PCM.

Each clause is one request with `response_format: "pcm"` (16-bit mono at `pcm_rate`, 24 kHz in OpenAI's API), and its
audio is passed on as the bytes arrive. The server says nothing about word timing, so word starts are estimated from
a speaking rate (`chars_per_second`); a word whose estimate lies past the clause's real audio is released with its
end. Closing the stream (a cancelled response) closes the HTTP request.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

import httpx

from omnivox.pipeline.audio import pcm16_to_float
from omnivox.pipeline.tts.base import SpeechChunk, SpeechError, proportional_starts

SPEECH_PATH = "/v1/audio/speech"


class RemoteSpeechBackend:
    name = "remote"

    def __init__(
        self,
        url: str,
        *,
        model: str = "tts-1",
        api_key: str | None = None,
        default_voice: str = "alloy",
        pcm_rate: int = 24_000,
        chars_per_second: float = 15.0,
        connect_timeout_s: float = 2.0,
        read_timeout_s: float = 30.0,
    ) -> None:
        self.url = url.rstrip("/").removesuffix("/v1") + SPEECH_PATH
        self.model = model
        self.api_key = api_key
        self.default_voice = default_voice
        self.rate = pcm_rate
        self.chars_per_second = chars_per_second
        self.timeout = httpx.Timeout(read_timeout_s, connect=connect_timeout_s)
        self._http: httpx.AsyncClient | None = None

    def has_voice(self, voice: str) -> bool:
        """The server's voices are not known here: any short name is passed on."""
        return 0 < len(voice) <= 64

    async def start(self) -> None:
        self._http = httpx.AsyncClient(timeout=self.timeout)

    async def close(self) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    async def synthesize(self, words: Sequence[str], voice: str, speed: float) -> AsyncIterator[SpeechChunk]:
        if self._http is None:
            raise SpeechError("the remote speech backend is not started")
        text = " ".join(word for word in words if word)
        body = {"model": self.model, "input": text, "voice": voice, "response_format": "pcm", "speed": speed}
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        estimated = int(len(text) / (self.chars_per_second * speed) * self.rate)
        starts = proportional_starts(words, estimated)
        carry = b""
        try:
            async with self._http.stream("POST", self.url, json=body, headers=headers) as response:
                if response.status_code != 200:
                    detail = (await response.aread())[:300].decode(errors="replace")
                    raise SpeechError(f"speech server {self.url} answered {response.status_code}: {detail}")
                async for piece in response.aiter_bytes():
                    data = carry + piece
                    usable = len(data) - len(data) % 2
                    carry = data[usable:]
                    if usable:
                        yield SpeechChunk(pcm16_to_float(data[:usable]), starts)
                        starts = ()
        except httpx.HTTPError as exc:
            raise SpeechError(f"speech server {self.url} failed: {type(exc).__name__}: {exc}") from None
