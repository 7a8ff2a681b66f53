"""Writes to clients that may stop reading: every send has a deadline, and a client past it is dropped.

A socket whose peer does not read fills up, and then each send waits forever: the session would hang on to its slot,
its queues and its engine work. `TimedSend` gives each send `connections.write_timeout_s`; past it the door ends the
session and aborts the connection (a graceful close would wait on the same full socket).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.types import Scope

log = logging.getLogger(__name__)

TRANSPORT_KEY = "omnivox.transport"
"""Where `remember_transport` keeps the connection's transport in the ASGI scope."""


class WriteTimeout(Exception):
    """The client took no data for the write timeout (or let too much pile up): it is dropped."""


class TimedSend:
    """Wraps a send coroutine function so that each call must finish within `timeout_s`, else `WriteTimeout`."""

    def __init__(self, send: Callable[..., Awaitable[Any]], timeout_s: float) -> None:
        self._send = send
        self.timeout_s = timeout_s
        self.timed_out = False

    async def __call__(self, *args: Any) -> None:
        if self.timed_out:
            raise WriteTimeout("the client stopped reading")
        try:
            async with asyncio.timeout(self.timeout_s):
                await self._send(*args)
        except TimeoutError:
            self.timed_out = True
            raise WriteTimeout(f"the client took no data for {self.timeout_s:g} s") from None


def remember_transport(scope: Scope, send: Callable[..., Any]) -> None:
    """Keep the connection's transport in the scope, for `abort_connection`. ASGI hides it; uvicorn's send is a method
    of its protocol object, which holds it (other servers: nothing is kept and the door closes gracefully). uvloop's
    transports are not `asyncio.BaseTransport` subclasses: any object that can `abort()` will do."""
    transport = getattr(getattr(send, "__self__", None), "transport", None)
    if callable(getattr(transport, "abort", None)):
        scope[TRANSPORT_KEY] = transport


def abort_connection(scope: Scope) -> bool:
    """Drop the connection at once, buffered data and all; False when its transport is unknown."""
    transport = scope.get(TRANSPORT_KEY)
    if transport is None:
        return False
    transport.abort()
    return True
