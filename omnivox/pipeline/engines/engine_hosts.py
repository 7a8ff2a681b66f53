"""Client-side balancing over a list of engine hosts: health checks, conversation stickiness, least outstanding.

A conversation sticks to the host that answered its first turn, because that host keeps its encoded prompt (prompt
reuse saves the prefill of everything already said). It moves only when that host is down; a new conversation goes
to the healthy host with the fewest requests in flight. Hosts are checked every `interval_s` with a GET on their
health path (omnivox `/healthz`, vLLM `/health`: 200 means ready); a host that refuses a connection is marked down at
once and comes back with its next good check. This is not a cluster manager: with one URL (a Kubernetes Service, any
L4 balancer) the pool has one host and the balancer spreads connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import httpx

from omnivox.pipeline.engines.base import EngineNotReady
from omnivox.pipeline.engines.openai_chat import describe, server_root

log = logging.getLogger(__name__)

Client = TypeVar("Client")
HostObserver = Callable[[str, bool, int], None]
"""Called with (url, healthy, outstanding) whenever one of them changes (metrics)."""


@dataclass
class EngineHost(Generic[Client]):
    url: str
    client: Client
    """What talks to this host (a `ChatClient`)."""
    healthy: bool = True
    outstanding: int = 0
    error: str | None = None
    checked_at: float | None = None

    def state(self) -> dict[str, Any]:
        return {"url": self.url, "healthy": self.healthy, "outstanding": self.outstanding, "error": self.error}


class HostPool(Generic[Client]):
    """Hosts, their health and the host each conversation sticks to."""

    def __init__(
        self,
        hosts: list[EngineHost[Client]],
        *,
        health_path: str | None,
        interval_s: float = 2.0,
        timeout_s: float = 1.0,
        max_conversations: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`health_path` None: no active checks (a host is down only after a failed connection, until
        `interval_s` has passed)."""
        if not hosts:
            raise ValueError("an engine host pool needs at least one host")
        self.hosts = hosts
        self.health_path = health_path
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.max_conversations = max_conversations
        self._clock = clock
        self._sticky: OrderedDict[str, EngineHost[Client]] = OrderedDict()
        self._next = 0
        self.observers: list[HostObserver] = []

    def _changed(self, host: EngineHost[Client]) -> None:
        for observe in self.observers:
            observe(host.url, host.healthy, host.outstanding)

    @property
    def any_healthy(self) -> bool:
        return any(host.healthy for host in self.hosts)

    def choose(self, conversation_id: str = "", exclude: frozenset[str] = frozenset()) -> EngineHost[Client]:
        """The conversation's host while it is healthy, else the healthy host with the fewest requests in flight
        (ties taken in turn); raises `EngineNotReady` when no host is left."""
        sticky = self._sticky.get(conversation_id) if conversation_id else None
        if sticky is not None and sticky.healthy and sticky.url not in exclude:
            self._sticky.move_to_end(conversation_id)
            return sticky
        candidates = [host for host in self.hosts if host.healthy and host.url not in exclude]
        if not candidates:
            reasons = "; ".join(f"{host.url}: {host.error or 'down'}" for host in self.hosts)
            raise EngineNotReady(f"no engine host is available ({reasons})")
        self._next += 1
        rotated = candidates[self._next % len(candidates) :] + candidates[: self._next % len(candidates)]
        host = min(rotated, key=lambda candidate: candidate.outstanding)
        if conversation_id:
            if sticky is not None:
                log.info(
                    "%s: moving from engine host %s (%s) to %s",
                    conversation_id,
                    sticky.url,
                    sticky.error or "excluded",
                    host.url,
                )
            self._sticky[conversation_id] = host
            self._sticky.move_to_end(conversation_id)
            while len(self._sticky) > self.max_conversations:
                self._sticky.popitem(last=False)
        return host

    @contextlib.contextmanager
    def in_flight(self, host: EngineHost[Client]) -> Iterator[None]:
        host.outstanding += 1
        self._changed(host)
        try:
            yield
        finally:
            host.outstanding -= 1
            self._changed(host)

    def forget(self, conversation_id: str) -> None:
        self._sticky.pop(conversation_id, None)

    def mark_down(self, host: EngineHost[Client], reason: str) -> None:
        """A request could not reach `host`: no new work goes there until a check says it is back."""
        if host.healthy:
            log.warning("engine host %s is down: %s", host.url, reason)
        host.healthy = False
        host.error = reason
        host.checked_at = self._clock()
        self._changed(host)

    async def check(self, http: httpx.AsyncClient, host: EngineHost[Client]) -> None:
        """One health check; without a health path, a host marked down is tried again after `interval_s`."""
        if self.health_path is None:
            if not host.healthy and self._clock() - (host.checked_at or 0.0) >= self.interval_s:
                self._set_health(host, True, None)
            return
        try:
            reply = await http.get(server_root(host.url) + self.health_path, timeout=self.timeout_s)
        except httpx.HTTPError as exc:
            self._set_health(host, False, f"health check failed: {describe(exc)}")
            return
        if reply.status_code == 200:
            self._set_health(host, True, None)
        else:
            self._set_health(host, False, f"health check answered {reply.status_code}: {reply.text[:120]}")

    async def check_all(self, http: httpx.AsyncClient) -> None:
        await asyncio.gather(*(self.check(http, host) for host in self.hosts))

    async def run(self, http: httpx.AsyncClient) -> None:
        """Check every host every `interval_s` until cancelled."""
        while True:
            await asyncio.sleep(self.interval_s)
            await self.check_all(http)

    def _set_health(self, host: EngineHost[Client], healthy: bool, error: str | None) -> None:
        if healthy and not host.healthy:
            log.info("engine host %s is back", host.url)
        elif not healthy and host.healthy:
            log.warning("engine host %s is down: %s", host.url, error)
        changed = host.healthy != healthy or host.checked_at is None
        host.healthy = healthy
        host.error = error
        host.checked_at = self._clock()
        if changed:
            self._changed(host)

    def state(self) -> list[dict[str, Any]]:
        return [host.state() for host in self.hosts]
