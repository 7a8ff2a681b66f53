"""A stand-in for a text LLM server (vLLM serving Phi-4-multimodal, NIM, any OpenAI-compatible chat server): it
streams a fixed answer word by word, the first token after a fixed delay, and records what it was sent and which
streams the client closed early. `ToolLlmStandIn` calls a function instead, as vLLM's tool parser streams it."""

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

    @staticmethod
    def tokens(answer: str) -> list[str]:
        words = answer.split(" ")
        return [word if index == 0 else " " + word for index, word in enumerate(words)]

    async def chat(self, request: Request) -> StreamingResponse:
        self.requests.append(await request.json())
        return StreamingResponse(self.events(), media_type="text/event-stream")

    @staticmethod
    def chunk(delta: dict[str, Any] | None, finish: str | None = None, **extra: Any) -> str:
        choices = [{"index": 0, "delta": delta, "finish_reason": finish}] if delta is not None else []
        body = {"id": "chatcmpl-llm", "object": "chat.completion.chunk", "model": "phi-4", "choices": choices}
        return f"data: {json.dumps({**body, **extra})}\n\n"

    async def events(self, answer: str | None = None) -> AsyncIterator[str]:
        """`answer` (default: the stand-in's) word by word."""
        chunk = self.chunk
        tokens = self.tokens(answer or self.answer)
        finished = False
        try:
            yield chunk({"role": "assistant", "content": ""})
            await asyncio.sleep(self.first_token_s)
            for index, token in enumerate(tokens):
                if index == 0:
                    self.first_token_at.append(time.monotonic())
                else:
                    await asyncio.sleep(self.token_s)
                yield chunk({"content": token})
            yield chunk({}, "stop")
            usage = {"prompt_tokens": 12, "completion_tokens": len(tokens), "total_tokens": 0}
            yield chunk(None, usage=usage)
            yield "data: [DONE]\n\n"
            finished = True
        finally:
            if not finished:
                self.closed_early.append(time.monotonic())


class ToolLlmStandIn(TextLlmStandIn):
    """Calls `get_weather` when the request offers tools and the conversation ends with the caller (streamed in
    vLLM's shape: the call's id and name, then its arguments in pieces, `finish_reason: tool_calls`), and answers with
    `answer` filled from the result once it ends with one."""

    def __init__(self, answer: str = "It is {temperature} degrees in Paris.", **options: Any) -> None:
        super().__init__(answer, **options)

    async def chat(self, request: Request) -> StreamingResponse:
        body = await request.json()
        self.requests.append(body)
        last = body["messages"][-1]
        if last["role"] == "tool":
            answer = self.answer.format(**json.loads(last["content"]))
            return StreamingResponse(self.events(answer), media_type="text/event-stream")
        if body.get("tools"):
            return StreamingResponse(self.call(), media_type="text/event-stream")
        return StreamingResponse(self.events("I cannot look that up."), media_type="text/event-stream")

    async def call(self) -> AsyncIterator[str]:
        first = {"index": 0, "id": "chatcmpl-tool-1", "type": "function"}
        yield self.chunk({"role": "assistant", "content": ""})
        await asyncio.sleep(self.first_token_s)
        yield self.chunk({"tool_calls": [{**first, "function": {"name": "get_weather", "arguments": ""}}]})
        for piece in ('{"city": ', '"Paris"}'):
            yield self.chunk({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]})
        yield self.chunk({}, "tool_calls")
        yield self.chunk(None, usage={"prompt_tokens": 30, "completion_tokens": 9, "total_tokens": 39})
        yield "data: [DONE]\n\n"


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
