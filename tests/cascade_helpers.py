"""A stand-in for a text LLM server (vLLM serving Phi-4-multimodal, NIM, any OpenAI-compatible chat server): it
streams a fixed answer word by word, the first token after a fixed delay, and records what it was sent and which
streams the client closed early."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.routing import Route

from omnivox.server.config import Config
from tests.server_helpers import scripted_config, serving


class TextLlmStandIn:
    def __init__(self, answer: str, *, first_token_s: float = 0.05, token_s: float = 0.01) -> None:
        self.answer = answer
        self.first_token_s = first_token_s
        self.token_s = token_s
        self.requests: list[dict[str, Any]] = []
        self.first_token_at: list[float] = []
        self.closed_early: list[float] = []
        """When each stream the client went away from ended (monotonic)."""
        self.app = Starlette(routes=[Route("/v1/chat/completions", self.chat, methods=["POST"])])

    def tokens(self) -> list[str]:
        words = self.answer.split(" ")
        return [word if index == 0 else " " + word for index, word in enumerate(words)]

    async def chat(self, request: Request) -> StreamingResponse:
        self.requests.append(await request.json())
        return StreamingResponse(self.events(), media_type="text/event-stream")

    async def events(self) -> AsyncIterator[str]:
        def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> str:
            choices = [{"index": 0, "delta": delta, "finish_reason": finish}] if delta is not None else []
            body = {"id": "chatcmpl-llm", "object": "chat.completion.chunk", "model": "phi-4", "choices": choices}
            return f"data: {json.dumps({**body, **extra})}\n\n"

        finished = False
        try:
            yield chunk({"role": "assistant", "content": ""})
            await asyncio.sleep(self.first_token_s)
            for index, token in enumerate(self.tokens()):
                if index == 0:
                    self.first_token_at.append(time.monotonic())
                else:
                    await asyncio.sleep(self.token_s)
                yield chunk({"content": token})
            yield chunk({}, "stop")
            usage = {"prompt_tokens": 12, "completion_tokens": len(self.tokens()), "total_tokens": 0}
            yield chunk(None, usage=usage)  # type: ignore[arg-type]
            yield "data: [DONE]\n\n"
            finished = True
        finally:
            if not finished:
                self.closed_early.append(time.monotonic())


@contextmanager
def llm_server(stand_in: TextLlmStandIn) -> Iterator[str]:
    """The stand-in on a loopback port; yields its base URL (with /v1, as clients are configured)."""
    with serving(stand_in.app) as port:
        yield f"http://127.0.0.1:{port}/v1"


def cascade_config(llm_url: str, **sections: dict[str, Any]) -> Config:
    """The default config with the cascade engine over a remote LLM at `llm_url` and the bundled Piper voice."""
    llm = {"kind": "remote", "remote": {"url": llm_url, "audio": "input_audio"}}
    engine = {"name": "cascade", "model": "microsoft/Phi-4-multimodal-instruct"}
    engine["options"] = {"cascade": {"llm": llm, "recogniser": {"kind": "pocketsphinx"}}}  # type: ignore[assignment]
    return scripted_config(engine=engine, **sections)
