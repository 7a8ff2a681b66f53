"""Shutdown without cutting anyone off mid-sentence, and the uvicorn settings every way of serving shares.

On SIGTERM (or Ctrl+C) `DrainingServer` stops accepting connections, then drains: every realtime session ends as
soon as it has no response in flight (WebSocket and telephony close with 1001 "going away", WebRTC calls are hung up)
and SSE answers run to their end, for at most `connections.drain_timeout_s`; whatever is still running then is told
to go (an SSE stream gets a `server_shutting_down` error event). Only then does uvicorn's own shutdown run. Requests
that arrive on a kept-alive connection meanwhile get 503 `server_shutting_down`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import sys
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import uvicorn
from starlette.applications import Starlette
from starlette.types import Receive, Scope, Send

from omnivox.server.backpressure import remember_transport
from omnivox.server.config import Config

if TYPE_CHECKING:
    from omnivox.server.runner import SessionRunner

log = logging.getLogger(__name__)

GOING_AWAY = 1001
TRY_AGAIN_LATER = 1013
SHUTTING_DOWN = "server_shutting_down"
CUT_GRACE_S = 2.0
"""After the drain time, how long told sessions and streams get to close before uvicorn's shutdown goes on."""


class Lifecycle:
    """The live realtime sessions and SSE streams of one app, so that a shutdown can drain them."""

    def __init__(self) -> None:
        self.draining = False
        self.runners: set[SessionRunner] = set()
        self._streams: set[Callable[[], None]] = set()

    @contextlib.contextmanager
    def stream(self, cut: Callable[[], None]) -> Iterator[None]:
        """An SSE answer in flight; `cut()` ends it if it is still running when the drain time is up."""
        self._streams.add(cut)
        try:
            yield
        finally:
            self._streams.discard(cut)

    @property
    def busy(self) -> bool:
        return bool(self.runners or self._streams)

    async def drain(self, timeout_s: float) -> None:
        """End every session once it is idle and let streams finish, within `timeout_s`; then cut the rest."""
        self.draining = True
        log.info(
            "draining: %d realtime sessions, %d streams; answers in flight get up to %g s",
            len(self.runners),
            len(self._streams),
            timeout_s,
        )
        for runner in list(self.runners):
            runner.drain()
        if not await self._wait_idle(timeout_s):
            log.warning(
                "drain time is up: ending %d sessions and %d streams mid-answer", len(self.runners), len(self._streams)
            )
            for runner in list(self.runners):
                runner.stop("shutdown")
            for cut in list(self._streams):
                cut()
            await self._wait_idle(CUT_GRACE_S)

    async def _wait_idle(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while self.busy:
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.05)
        return True


class GuardedApp(Starlette):
    """The app with a guard in front of everything (middleware would only see a wrapped `send`): it keeps each
    connection's transport where `backpressure.abort_connection` finds it, refuses new work while draining, and
    holds WebSocket connections to `max_websockets` (uvicorn's `limit_concurrency` lets every upgrade through)."""

    def __init__(self, *args: Any, lifecycle: Lifecycle, max_websockets: int | None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lifecycle = lifecycle
        self.max_websockets = max_websockets
        self.websockets = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await super().__call__(scope, receive, send)
            return
        remember_transport(scope, send)
        if self.lifecycle.draining:
            await _refuse(scope, send)
            return
        if scope["type"] == "http":
            await super().__call__(scope, receive, send)
            return
        if self.max_websockets is not None and self.websockets >= self.max_websockets:
            await send({"type": "websocket.close", "code": TRY_AGAIN_LATER, "reason": "too many connections"})
            return
        self.websockets += 1
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.websockets -= 1


async def _refuse(scope: Scope, send: Send) -> None:
    if scope["type"] == "websocket":
        await send({"type": "websocket.close", "code": GOING_AWAY, "reason": "server shutting down"})
        return
    error = {"message": "the server is shutting down", "type": "server_error", "param": None, "code": SHUTTING_DOWN}
    body = json.dumps({"error": error}).encode()
    headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
    await send({"type": "http.response.start", "status": 503, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class DrainingServer(uvicorn.Server):
    """uvicorn's server with a drain step between closing the listening sockets and closing the connections
    (uvicorn alone would close every WebSocket with 1012 at once, mid-answer)."""

    def __init__(self, config: uvicorn.Config, lifecycle: Lifecycle, drain_timeout_s: float) -> None:
        super().__init__(config)
        self.lifecycle = lifecycle
        self.drain_timeout_s = drain_timeout_s

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for server in self.servers:
            server.close()
        if not self.force_exit:
            await self.lifecycle.drain(self.drain_timeout_s)
        await super().shutdown(sockets)


def uvicorn_settings(config: Config) -> dict[str, Any]:
    """The uvicorn options that bound connections, shared by `omnivox serve` and the test servers."""
    connections = config.connections
    return {
        "ws": "websockets",
        "ws_max_size": config.limits.max_message_bytes + (1 << 20),  # past the limit by a little: an error event
        "ws_max_queue": connections.ws_max_queue,
        "ws_per_message_deflate": False,
        "limit_concurrency": connections.limit_concurrency,
        "timeout_graceful_shutdown": connections.drain_timeout_s + CUT_GRACE_S + 3,
        "loop": "uvloop" if sys.platform != "win32" else "asyncio",
    }
