"""Stand-ins for engine servers that are not omnivox: they replay the chunk shapes of vLLM-Omni and of OpenAI's
audio chat completions, and record the requests they were sent."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import httpx
import numpy as np
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from omnivox.pipeline.audio import encode_audio_file, float_to_pcm16
from omnivox.server.config import Config
from tests.server_helpers import scripted_config

RATE = 24_000
WORDS = ("Hello", " from", " the", " engine", " host.")


def answer_audio(seconds: float = 0.6) -> np.ndarray:
    """A tone the stand-ins speak (24 kHz)."""
    t = np.arange(int(seconds * RATE)) / RATE
    return (0.3 * np.sin(2 * np.pi * 330 * t)).astype(np.float32)


def remote_config(urls: list[str], model: str = "scripted", **remote: Any) -> Config:
    """A front whose engine is the remote engine over `urls`, with fast health checks."""
    options = {"health_interval_s": 0.2, "health_timeout_s": 0.5, **remote}
    return scripted_config(engine={"name": "remote", "model": model, "urls": urls, "options": {"remote": options}})


class StandIn:
    """An engine server double: `requests` holds every chat body it was sent."""

    def __init__(self, pieces: int = 3, delay_s: float = 0.0) -> None:
        self.requests: list[dict[str, Any]] = []
        self.audio = answer_audio()
        self.pieces = pieces
        self.delay_s = delay_s
        self.app = Starlette(
            routes=[
                Route("/v1/chat/completions", self.chat, methods=["POST"]),
                Route("/health", lambda _: Response(status_code=200)),
            ]
        )

    def audio_pieces(self) -> list[np.ndarray]:
        return np.array_split(self.audio, self.pieces)

    async def chat(self, request: Request) -> Response:
        body = await request.json()
        self.requests.append(body)
        return StreamingResponse(self.events(body), media_type="text/event-stream")

    async def events(self, body: dict[str, Any]) -> AsyncIterator[str]:
        for chunk in self.chunks(body):
            yield f"data: {json.dumps(chunk)}\n\n"
            await asyncio.sleep(self.delay_s)
        yield "data: [DONE]\n\n"

    def chunks(self, body: dict[str, Any]) -> list[dict[str, Any]]:
        raise NotImplementedError


def chunk(choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {
        "id": "chatcmpl-standin",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": "Qwen/Qwen2.5-Omni-7B",
        "choices": choices,
        **extra,
    }


def delta(content: str, finish_reason: str | None = None, role: bool = False) -> list[dict[str, Any]]:
    message = {"role": "assistant", "content": content} if role else {"content": content}
    return [{"index": 0, "delta": message, "logprobs": None, "finish_reason": finish_reason}]


class VllmOmniStandIn(StandIn):
    """vLLM-Omni's chat completions (2026 main): every chunk names its `modality`; audio chunks carry a base64 WAV
    file in `delta.content` with `usage`; `finish_reason` only on the last modality's last chunk; a usage chunk and
    `[DONE]` end the stream. `streamed` interleaves audio chunks with the text (Qwen3-Omni), `whole_at_end` sends
    the text, then all the audio as one chunk (its Qwen2.5-Omni), `json` answers `stream: false` style with one body
    (text and audio as separate choices)."""

    def __init__(self, mode: Literal["streamed", "whole_at_end", "json"] = "streamed", **options: Any) -> None:
        super().__init__(**options)
        self.mode = mode

    async def chat(self, request: Request) -> Response:
        if self.mode != "json":
            return await super().chat(request)
        body = await request.json()
        self.requests.append(body)
        wav = base64.b64encode(encode_audio_file(self.audio, RATE, "wav")).decode()
        audio = {"id": "audio-standin", "data": wav, "expires_at": int(time.time()) + 86400, "transcript": ""}
        return JSONResponse(
            {
                "id": "chatcmpl-standin",
                "object": "chat.completion",
                "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": "".join(WORDS)}, "finish_reason": "stop"},
                    {"index": 0, "message": {"role": "assistant", "audio": audio}, "finish_reason": "stop"},
                ],
                "usage": {"prompt_tokens": 40, "completion_tokens": 5, "total_tokens": 45},
            }
        )

    def chunks(self, body: dict[str, Any]) -> list[dict[str, Any]]:
        usage = {"prompt_tokens": 40, "completion_tokens": 0, "total_tokens": 40}
        text = [chunk(delta("", role=True), modality="text")]
        text += [chunk(delta(word), modality="text") for word in WORDS]
        pieces = [self.audio] if self.mode == "whole_at_end" else self.audio_pieces()
        audio = [
            chunk(
                delta(
                    base64.b64encode(encode_audio_file(piece, RATE, "wav")).decode(),
                    "stop" if index == len(pieces) - 1 else None,
                    role=True,
                ),
                modality="audio",
                usage=usage,
            )
            for index, piece in enumerate(pieces)
        ]
        if self.mode == "whole_at_end":
            ordered = [*text, *audio]
        else:  # the first words, then audio and words interleaved as the talker catches up
            ordered = [text[0], text[1], audio[0], text[2], audio[1], *text[3:], *audio[2:]]
        final_usage = {"prompt_tokens": 40, "completion_tokens": len(WORDS), "total_tokens": 45}
        return [*ordered, chunk([], usage=final_usage)]


class OpenAIStandIn(StandIn):
    """OpenAI's audio chat stream: `delta.audio` with an id, transcript pieces and PCM16 24 kHz data."""

    def chunks(self, body: dict[str, Any]) -> list[dict[str, Any]]:
        def audio(**fields: Any) -> list[dict[str, Any]]:
            return [{"index": 0, "delta": {"audio": {"id": "audio_standin", **fields}}, "finish_reason": None}]

        pcm = [base64.b64encode(float_to_pcm16(piece)).decode() for piece in self.audio_pieces()]
        usage = {"prompt_tokens": 30, "completion_tokens": 5, "prompt_tokens_details": {"cached_tokens": 3}}
        words = [chunk(audio(transcript=word)) for word in WORDS]
        return [
            chunk([{"index": 0, "delta": {"role": "assistant", "audio": {"id": "audio_standin", "transcript": ""}}}]),
            words[0],
            *[chunk(audio(data=data)) for data in pcm],
            *words[1:],
            chunk(audio(expires_at=int(time.time()) + 3600)),
            chunk([{"index": 0, "delta": {}, "finish_reason": "stop"}]),
            chunk([], usage=usage),
        ]


@dataclass
class ServerProcess:
    """An `omnivox serve` subprocess (stdout and stderr in `log`)."""

    process: subprocess.Popen[str]
    port: int
    log: Path

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def metric(self, name: str, **labels: str) -> float:
        """The value of one sample of the server's `/metrics` (0 when absent)."""
        wanted = name + ("{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}" if labels else "")
        for line in httpx.get(f"{self.http_url}/metrics", timeout=5).text.splitlines():
            sample, _, value = line.rpartition(" ")
            if sample == wanted or (not labels and sample == name):
                return float(value)
        return 0.0


@contextmanager
def serve_process(*args: str, env: dict[str, str] | None = None, startup_s: float = 90) -> Iterator[ServerProcess]:
    """`omnivox serve --host 127.0.0.1 --port <free> *args` until the block ends; waits for a 200 `/healthz`."""
    port = free_port()
    log = Path(tempfile.mkstemp(prefix="omnivox-serve-", suffix=".log")[1])
    environ = {k: v for k, v in os.environ.items() if not k.startswith("OMNIVOX_")}
    environ.update({"OMNIVOX_SERVER__LOG_LEVEL": "warning", **(env or {})})
    with log.open("w") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "omnivox.server.cli", "serve", "--host", "127.0.0.1", "--port", str(port), *args],
            env=environ,
            stdout=output,
            stderr=subprocess.STDOUT,
            text=True,
        )
    server = ServerProcess(process, port, log)
    try:
        deadline = time.monotonic() + startup_s
        while True:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{server.http_url}/healthz", timeout=1).status_code == 200:
                    break
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"omnivox serve {' '.join(args)} did not come up:\n{log.read_text()}")
            time.sleep(0.1)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.unlink(missing_ok=True)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
