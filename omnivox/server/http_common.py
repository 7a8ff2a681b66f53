"""What every HTTP door shares: OpenAI error objects, body parsing, auth/model/readiness checks, the engine
stream opened before any header is sent, and SSE.

Errors are OpenAI error objects: 400 invalid request, 401 missing or wrong key, 403 a browser origin not allowed, 404
unknown model, 413 body over `limits.max_http_body_bytes`, 415 a JSON door's body not sent as `application/json`, 429
engine busy, 501 no recogniser, 503 engine not ready. Once a stream has started, an error is sent as
`data: {"error": {...}}` and ends the stream (no `[DONE]`).
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
from starlette.datastructures import FormData
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from omnivox.pipeline.client_json import JsonRefused, load_client_json
from omnivox.pipeline.engines.base import (
    Delta,
    EngineBusy,
    EngineError,
    EngineNotReady,
    EngineOutOfMemory,
    EngineUnhealthy,
    InvalidRequest,
    PromptTooLong,
    ResponseRequest,
    engine_health_problem,
)
from omnivox.pipeline.internal_errors import INTERNAL_ERROR_CODE, report_internal_error
from omnivox.server.auth import is_authorized
from omnivox.server.backpressure import TimedSend, WriteTimeout, abort_connection
from omnivox.server.disconnect import ClientDisconnected, unless_disconnected
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
    """HTTP status of an engine failure: busy 429, not loaded or out of memory 503, the request's own fault (a prompt
    over the budget included) 400, anything else 500."""
    if isinstance(exc, PromptTooLong):
        return ApiError(400, str(exc), param="messages", code=exc.code)
    if isinstance(exc, EngineBusy):
        return ApiError(429, str(exc) or "the engine is busy; retry later", kind="rate_limit_error", code=exc.code)
    if isinstance(exc, EngineNotReady | EngineOutOfMemory):
        return ApiError(503, str(exc) or "the engine is not ready", kind="server_error", code=exc.code)
    if isinstance(exc, InvalidRequest):
        return ApiError(400, str(exc), code=exc.code)
    return ApiError(500, str(exc) or "the engine failed", kind="server_error", code=exc.code)


def internal_api_error(context: str, exc: BaseException) -> ApiError:
    """A 500 whose message carries only an error id; the details are logged under it."""
    message = report_internal_error(log, context, exc)
    return ApiError(500, message, kind="server_error", code=INTERNAL_ERROR_CODE)


def openai_errors(handler: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
    """Answer refused requests and unexpected failures with OpenAI error objects instead of bare 500 pages."""

    async def endpoint(request: Request) -> Response:
        try:
            return await handler(request)
        except ApiError as exc:
            return JSONResponse(exc.body(), status_code=exc.status)
        except ClientDisconnected:
            return Response(status_code=499)  # nobody is listening any more
        except EngineError as exc:
            error = engine_api_error(exc)
            log.warning("%s %s: engine error %s: %s", request.method, request.url.path, exc.code, exc)
            return JSONResponse(error.body(), status_code=error.status)
        except Exception as exc:
            error = internal_api_error(f"{request.method} {request.url.path} failed", exc)
            return JSONResponse(error.body(), status_code=500)

    return endpoint


BodyModel = TypeVar("BodyModel", bound=BaseModel)


async def read_json_body(
    request: Request, state: ServerState, model: type[BodyModel], limit: int | None = None
) -> BodyModel:
    """A JSON door's body: JSON by its content type (a browser posts `text/plain` across sites without asking, never
    `application/json`), at most `limit` bytes (default `limits.max_http_body_bytes`), parsed within
    `limits.max_json_depth`."""
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type != "application/json":
        raise ApiError(
            415, "send the body as JSON with Content-Type: application/json", code="unsupported_content_type"
        )
    limits = state.config.limits
    body = await read_body(request, limits.max_http_body_bytes if limit is None else limit)
    return parse_body(body, model, limits.max_json_depth)


def parse_body(body: bytes, model: type[BodyModel], max_depth: int) -> BodyModel:
    try:
        data = load_client_json(body, max_depth)
    except JsonRefused as exc:
        raise ApiError(400, f"the request body is refused: {exc}", code="invalid_json") from None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(part) for part in first["loc"]) or None
        raise ApiError(400, f"invalid request: {param or 'body'}: {first['msg']}", param=param) from None


# ---------------------------------------------------------------------------------------------- request checks


def check_auth(request: Request, state: ServerState) -> None:
    """The caller's origin (browsers) and key, before any work."""
    if not state.origin_allowed(request.headers, request.url.path):
        raise ApiError(403, "this origin is not allowed (server.allowed_origins)", code="origin_not_allowed")
    if not is_authorized(state.config.server.api_keys, request.headers):
        raise ApiError(401, "missing or invalid API key (send Authorization: Bearer <key>)", code="invalid_api_key")


def check_model(state: ServerState, model: str | None) -> None:
    """404 for a name the server does not accept (only with `models.strict`)."""
    if not state.accepts_model(model):
        raise ApiError(
            404,
            f"the model {model!r} does not exist; this server serves {state.model_name!r} (and its aliases)",
            param="model",
            code="model_not_found",
        )


def check_ready(state: ServerState) -> None:
    if not state.engine.ready:
        raise ApiError(503, "the engine is still loading; retry shortly", kind="server_error", code="engine_not_ready")
    if (problem := engine_health_problem(state.engine)) is not None:
        raise ApiError(503, problem, kind="server_error", code=EngineUnhealthy.code)


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


async def read_form(
    request: Request, limit: int, *, max_files: int, max_fields: int, max_field_bytes: int = 64 * 1024
) -> FormData:
    """A multipart body of at most `limit` bytes in all (Starlette bounds only its text fields), parsed."""
    body = await read_body(request, limit)

    async def replay() -> AsyncIterator[bytes]:
        yield body

    parser = MultiPartParser(
        request.headers, replay(), max_files=max_files, max_fields=max_fields, max_part_size=max_field_bytes
    )
    try:
        return await parser.parse()
    except MultiPartException as exc:
        raise ApiError(400, f"malformed multipart body: {exc.message}") from None


async def open_engine_stream(
    state: ServerState, request: ResponseRequest, http_request: Request, door: str
) -> AsyncIterator[Delta]:
    """Start the engine and wait for its first delta, so that refusals (busy, not ready) become HTTP statuses
    before any header is sent; returns the whole stream, first delta included. A client that leaves meanwhile
    cancels the engine work at once."""
    check_ready(state)
    stream = state.engine.respond(request)
    try:
        first = await unless_disconnected(http_request, anext(stream))
    except StopAsyncIteration:
        return stream  # finished already: iterating it yields nothing
    except ClientDisconnected:
        await stream.aclose()
        log.info("%s: %s: the client left before the first delta; cancelled", door, request.request_id)
        state.metrics.responses.labels(door, "cancelled").inc()
        raise
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
    """An SSE (or other streamed) response that stops its producer (and so the engine) the moment the client
    disconnects, whatever ASGI spec version the server speaks (Starlette only listens for disconnects below 2.4).

    A reader that stalls is dropped after `connections.write_timeout_s` without taking data; at shutdown an SSE
    stream still running when the drain time is up ends with a `server_shutting_down` error event."""

    def __init__(
        self,
        events: AsyncIterator[Any],
        media_type: str = "text/event-stream",
        on_close: Callable[[], None] | None = None,
    ) -> None:
        """`on_close` runs once the response is over, however it ended (even when the client left before the
        producer started, which then never runs its own clean-up)."""
        super().__init__(
            events,
            media_type=media_type,
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self._stream(scope, receive, send)
        finally:
            if self.on_close is not None:
                self.on_close()

    async def _stream(self, scope: Scope, receive: Receive, send: Send) -> None:
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
        if cut and not timed.timed_out and self.media_type == "text/event-stream":
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
    elif isinstance(exc, ApiError):
        log.warning("%s: stream ended by %s: %s", door, exc.code, exc.message)
        error = exc
    else:
        error = internal_api_error(f"{door}: stream failed", exc)
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
