"""What every HTTP door shares: OpenAI error objects, body parsing, auth/model/readiness checks, the engine
stream opened before any header is sent, and SSE.

Errors are OpenAI error objects: 400 invalid request, 401 missing or wrong key, 404 unknown model, 413 body over
`limits.max_http_body_bytes`, 429 engine busy, 501 no recogniser, 503 engine not ready. Once a stream has started,
an error is sent as `data: {"error": {...}}` and ends the stream (no `[DONE]`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from typing import Any, TypeVar

import anyio
from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from omnivox.pipeline.engines.base import (
    Delta,
    EngineBusy,
    EngineError,
    EngineNotReady,
    EngineOutOfMemory,
    PromptTooLong,
    ResponseRequest,
)
from omnivox.server.auth import is_authorized
from omnivox.server.backpressure import TimedSend, WriteTimeout, abort_connection
from omnivox.server.lifecycle import SHUTTING_DOWN
from omnivox.server.state import ServerState

log = logging.getLogger(__name__)


class ApiError(Exception):
    """A request the door refuses, rendered as an OpenAI error object with its HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        kind: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def engine_api_error(exc: EngineError) -> ApiError:
    """HTTP status of an engine failure: prompt over the budget 400, busy 429, not loaded or out of memory 503,
    anything else 500."""
    if isinstance(exc, PromptTooLong):
        return ApiError(400, str(exc), param="messages", code=exc.code)
    if isinstance(exc, EngineBusy):
        return ApiError(429, str(exc) or "the engine is busy; retry later", kind="rate_limit_error", code=exc.code)
    if isinstance(exc, EngineNotReady | EngineOutOfMemory):
        return ApiError(503, str(exc) or "the engine is not ready", kind="server_error", code=exc.code)
    return ApiError(500, str(exc) or "the engine failed", kind="server_error", code=exc.code)


def openai_errors(handler: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
    """Answer refused requests and unexpected failures with OpenAI error objects instead of bare 500 pages."""

    async def endpoint(request: Request) -> Response:
        try:
            return await handler(request)
        except ApiError as exc:
            return JSONResponse(exc.body(), status_code=exc.status)
        except EngineError as exc:
            error = engine_api_error(exc)
            log.warning("%s %s: engine error %s: %s", request.method, request.url.path, exc.code, exc)
            return JSONResponse(error.body(), status_code=error.status)
        except Exception:
            log.exception("%s %s failed", request.method, request.url.path)
            error = ApiError(500, "internal server error", kind="server_error", code="internal_error")
            return JSONResponse(error.body(), status_code=500)

    return endpoint


BodyModel = TypeVar("BodyModel", bound=BaseModel)


def parse_body(body: bytes, model: type[BodyModel]) -> BodyModel:
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}") from None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(part) for part in first["loc"]) or None
        raise ApiError(400, f"invalid request: {param or 'body'}: {first['msg']}", param=param) from None


# ---------------------------------------------------------------------------------------------- request checks


def check_auth(request: Request, state: ServerState) -> None:
    if not is_authorized(state.config.server.api_keys, request.headers):
        raise ApiError(401, "missing or invalid API key (send Authorization: Bearer <key>)", code="invalid_api_key")


def check_model(state: ServerState, model: str | None) -> None:
    served = served_model_names(state)
    if model is not None and model not in served:
        raise ApiError(
            404,
            f"the model {model!r} does not exist; this server serves {served[0]!r}",
            param="model",
            code="model_not_found",
        )


def served_model_names(state: ServerState) -> list[str]:
    return list(dict.fromkeys([state.model_name, state.engine.model_id]))


def check_ready(state: ServerState) -> None:
    if not state.engine.ready:
        raise ApiError(503, "the engine is still loading; retry shortly", kind="server_error", code="engine_not_ready")


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, refused with 413 as soon as it exceeds `limit` bytes."""
    declared = request.headers.get("content-length", "")
    too_large = ApiError(413, f"the request body exceeds {limit} bytes", code="request_too_large")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


async def open_engine_stream(state: ServerState, request: ResponseRequest) -> AsyncIterator[Delta]:
    """Start the engine and wait for its first delta, so that refusals (busy, not ready) become HTTP statuses
    before any header is sent; returns the whole stream, first delta included."""
    check_ready(state)
    stream = state.engine.respond(request)
    try:
        first = await anext(stream)
    except StopAsyncIteration:
        return stream  # finished already: iterating it yields nothing
    except BaseException:
        await stream.aclose()
        raise
    return _prepend(first, stream)


async def _prepend(first: Delta, rest: AsyncIterator[Delta]) -> AsyncIterator[Delta]:
    async with aclosing(rest):
        yield first
        async for delta in rest:
            yield delta


# ---------------------------------------------------------------------------------------------- SSE


def sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


SSE_DONE = "data: [DONE]\n\n"


class EventStream(StreamingResponse):
    """An SSE response that stops its producer (and so the engine) the moment the client disconnects, whatever
    ASGI spec version the server speaks (Starlette only listens for disconnects below 2.4).

    A reader that stalls is dropped after `connections.write_timeout_s` without taking data; at shutdown a stream
    still running when the drain time is up ends with a `server_shutting_down` error event."""

    def __init__(self, events: AsyncIterator[str]) -> None:
        super().__init__(
            events,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        state: ServerState = scope["app"].state.omnivox
        timed = TimedSend(send, state.config.connections.write_timeout_s)
        cut = False
        async with anyio.create_task_group() as group:

            async def produce() -> None:
                try:
                    await self.stream_response(timed)
                except WriteTimeout as exc:
                    log.warning("%s: dropping a stalled SSE reader: %s", scope.get("path"), exc)
                    if abort_connection(scope):
                        await asyncio.sleep(0)  # uvicorn hears of the lost connection before the app returns
                group.cancel_scope.cancel()

            def shut_down() -> None:
                nonlocal cut
                cut = True
                group.cancel_scope.cancel()

            with state.lifecycle.stream(shut_down):
                group.start_soon(produce)
                await self.listen_for_disconnect(receive)
                group.cancel_scope.cancel()
        await _close_iterator(self.body_iterator)  # a producer stopped while sending leaves it open: free the engine
        if cut and not timed.timed_out:
            error = ApiError(503, "the server is shutting down", kind="server_error", code=SHUTTING_DOWN)
            with contextlib.suppress(Exception):
                await timed({"type": "http.response.body", "body": sse(error.body()).encode(), "more_body": True})
                await timed({"type": "http.response.body", "body": b"", "more_body": False})


async def _close_iterator(iterator: object) -> None:
    aclose = getattr(iterator, "aclose", None)
    if aclose is not None:
        with contextlib.suppress(Exception):
            await aclose()


def stream_error(exc: BaseException, door: str, state: ServerState) -> str:
    """The terminal `data: {"error": ...}` event of a stream that failed after its headers were sent."""
    if isinstance(exc, EngineError):
        log.warning("%s: engine error mid-stream %s: %s", door, exc.code, exc)
        error = engine_api_error(exc)
    else:
        log.error("%s: stream failed", door, exc_info=exc)
        error = ApiError(500, "internal server error", kind="server_error", code="internal_error")
    state.metrics.protocol_errors.labels(door, str(error.code)).inc()
    return sse(error.body())


class ResponseTracker:
    """First-audio latency and final status of one response, for the metrics."""

    def __init__(self, state: ServerState, door: str) -> None:
        self.state = state
        self.door = door
        self.started = time.monotonic()
        self.first_audio_seen = False
        self.status = "cancelled"

    def audio(self) -> None:
        if not self.first_audio_seen:
            self.first_audio_seen = True
            self.state.metrics.first_audio.labels(self.door).observe(time.monotonic() - self.started)

    def finish(self) -> None:
        self.state.metrics.responses.labels(self.door, self.status).inc()
