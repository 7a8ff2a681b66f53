"""Noticing an HTTP client that goes away while a door is still waiting, before any byte of the answer was sent.

Starlette tells a handler about a disconnect only when it reads the request or sends the response. A door that waits
for an engine's first delta before its headers (so that refusals become HTTP statuses) would keep the engine working
for a client that left: an omnivox front cancelling a turn on barge-in closes its connection to the engine host at
once, and the host must stop then, not when the first audio is ready.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from typing import TypeVar

from starlette.requests import Request

Result = TypeVar("Result")


class ClientDisconnected(Exception):
    """The client closed the connection before the answer started."""


async def unless_disconnected(request: Request, work: Awaitable[Result]) -> Result:
    """Await `work`; if the client disconnects first, cancel it and raise `ClientDisconnected`.
    Call it only once the request body has been read (the next message is then the disconnect)."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait((task, watch), return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        watch.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watch
    if task.cancelled():
        raise ClientDisconnected
    return task.result()


async def _disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
