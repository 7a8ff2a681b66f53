"""One owner of the model per GPU: a worker thread that advances every active generation step by step.

Sessions submit turns from the event loop; the worker thread admits at most `max_active` of them
(first come, first served), and each pass of its loop gives every active generation one step (or one
batched step for all of them, when the engine offers `step_batch`), so one long answer cannot starve
another caller. Deltas travel back to the event loop through per-request asyncio queues. Model code
never runs on the event loop, so the 20 ms audio deadlines of other sessions never wait on a GPU step.
A cancelled request is dropped before its next step and its caches are freed at once.

Background work (caller transcripts) never stands between a caller and the first audio of an answer: it is
admitted after waiting answers, and it is not stepped while an active answer has not yet produced audio.

A step that fails with an unexpected error is followed by the engine's device check: a CUDA error such as a
device-side assert breaks the context for every later call, so the worker then fails every request, refuses new
ones and reports the failure (`failure`, also its `health_problem`), which the health endpoints turn into "failed"
for a supervisor. A watchdog: if the thread dies, or a pass over the active generations runs for over
`stall_timeout_s` (a hung kernel or driver), `health_problem` says so, every waiting request fails with
`EngineUnhealthy` and new ones are refused, instead of hanging; a stalled worker whose pass ends is healthy again.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from omnivox.pipeline.engines.base import (
    AudioDelta,
    Delta,
    EngineBusy,
    EngineError,
    EngineOutOfMemory,
    EngineUnhealthy,
)
from omnivox.pipeline.internal_errors import INTERNAL_ERROR_CODE, report_internal_error

log = logging.getLogger(__name__)


class Generation(Protocol):
    """One request's incremental model loop, driven by the worker thread only."""

    @property
    def finished(self) -> bool:
        """True once the generation has produced its last delta."""

    def step(self) -> list[Delta]:
        """Advance by one decode step and return what it produced (possibly nothing)."""

    def close(self) -> None:
        """Free the request's caches; called exactly once, also after cancellation or failure."""


StepBatch = Callable[[Sequence[Generation]], list[list[Delta] | BaseException]]
"""Advance several generations in one batched step; returns, in the same order, each one's deltas or the exception
that failed it (a failure of one session's work must not fail the others)."""

_DONE = object()


@dataclass
class _Ticket:
    make_generation: Callable[[], Generation]
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[object]
    background: bool = False
    submitted: float = field(default_factory=time.perf_counter)
    cancelled: bool = False
    audible: bool = False
    """True once the request delivered audio: from then on background work may share the GPU with it."""
    generation: Generation | None = None

    def push(self, item: object) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the event loop is gone: nobody is listening any more
            self.cancelled = True


def _is_out_of_memory(exc: BaseException) -> bool:
    return type(exc).__name__ in {"OutOfMemoryError", "OutOfMemoryError_"} or "out of memory" in str(exc).lower()


class GpuWorker:
    """Runs generations for all sessions on one thread with fair, interleaved (or batched) steps."""

    def __init__(
        self,
        name: str,
        *,
        max_active: int = 4,
        max_queued: int = 16,
        step_batch: StepBatch | None = None,
        on_out_of_memory: Callable[[], None] | None = None,
        device_check: Callable[[], str | None] | None = None,
        stall_timeout_s: float = 30.0,
    ) -> None:
        if stall_timeout_s <= 0:
            raise ValueError("stall_timeout_s must be positive")
        self.name = name
        self.max_active = max_active
        self.max_queued = max_queued
        self.stall_timeout_s = stall_timeout_s
        self._step_batch = step_batch
        self._on_out_of_memory = on_out_of_memory
        self._device_check = device_check
        self.failure: str | None = None
        """Why the device can no longer run anything (set once, never cleared: only a restart recovers)."""
        self._pending: deque[_Ticket] = deque()
        self._active: list[_Ticket] = []
        self._wake = threading.Condition()
        self._closed = False
        self._pass_started: float | None = None
        """When the pass now running started (None between passes): a pass that never ends is a stall."""
        self._thread = threading.Thread(target=self._run_guarded, name=f"omnivox-{name}", daemon=True)
        self._thread.start()
        self.steps_run = 0

    @property
    def load(self) -> tuple[int, int]:
        """(active generations, queued requests), for metrics and health."""
        with self._wake:
            return len(self._active), len(self._pending)

    @property
    def health_problem(self) -> str | None:
        """None while the worker serves; otherwise why it cannot: the device failed, its thread died, or one pass
        over the active generations has been running for over `stall_timeout_s`."""
        if self._closed:
            return None
        if self.failure is not None:
            return f"the GPU failed and the server must be restarted: {self.failure}"
        if not self._thread.is_alive():
            return f"the {self.name} worker thread has died"
        started = self._pass_started
        if started is not None and (stalled_s := time.perf_counter() - started) > self.stall_timeout_s:
            return f"the {self.name} worker has made no progress for {stalled_s:.0f} s"
        return None

    async def stream(
        self, make_generation: Callable[[], Generation], *, background: bool = False
    ) -> AsyncIterator[Delta]:
        """Submit a request and yield its deltas; closing the iterator cancels the work. `background` requests yield
        to answers that have not started speaking yet."""
        loop = asyncio.get_running_loop()
        ticket = _Ticket(make_generation, loop, asyncio.Queue(), background)
        if (problem := self.health_problem) is not None:
            raise EngineUnhealthy(problem)
        with self._wake:
            if self._closed:
                raise EngineError("the engine is shutting down")
            if len(self._pending) >= self.max_queued:
                raise EngineBusy(f"server busy: {len(self._pending)} requests queued, retry shortly")
            self._pending.append(ticket)
            self._wake.notify()
        watch_s = min(1.0, self.stall_timeout_s / 4)
        try:
            while True:
                try:
                    async with asyncio.timeout(watch_s):
                        item = await ticket.queue.get()
                except TimeoutError:
                    if (problem := self.health_problem) is not None:
                        raise EngineUnhealthy(problem) from None
                    continue
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item  # type: ignore[misc]
        finally:
            with self._wake:
                ticket.cancelled = True
                if ticket in self._pending:  # not admitted yet: its place in the queue is free at once
                    self._pending.remove(ticket)
                self._wake.notify()

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join(timeout=10)

    def _run_guarded(self) -> None:
        try:
            self._run()
        except BaseException:  # logged here, once: health_problem tells clients and /healthz
            log.critical("%s: the worker thread died; the engine cannot serve any more", self.name, exc_info=True)

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._closed and not self._pending and not self._active:
                    self._wake.wait()
                if self._closed:
                    self._drain_on_close()
                    return
                for ticket in [t for t in self._active if t.cancelled]:
                    self._retire(ticket)
                while self._pending and len(self._active) < self.max_active:
                    ticket = self._next_pending()
                    if not ticket.cancelled:
                        self._active.append(ticket)
                waiting_for_audio = any(not t.background and not t.audible for t in self._active)
                runnable = [t for t in self._active if not (t.background and waiting_for_audio)]
                self._pass_started = time.perf_counter()
            self._advance(runnable)
            self._pass_started = None

    def _next_pending(self) -> _Ticket:
        """The oldest waiting answer, else the oldest background request."""
        ticket = next((t for t in self._pending if not t.background), self._pending[0])
        self._pending.remove(ticket)
        return ticket

    def _advance(self, tickets: list[_Ticket]) -> None:
        runnable = []
        for ticket in tickets:
            started = ticket.generation is not None or self._guard(
                ticket, lambda t=ticket: setattr(t, "generation", t.make_generation())
            )
            if started:
                runnable.append(ticket)
        if self._step_batch is not None and len(runnable) > 1:
            self._advance_batched(runnable)
        else:
            for ticket in runnable:
                if not ticket.cancelled:
                    self._guard(ticket, lambda t=ticket: self._deliver(t, t.generation.step()))  # type: ignore[union-attr]
        self.steps_run += 1

    def _advance_batched(self, tickets: list[_Ticket]) -> None:
        live = [t for t in tickets if not t.cancelled]
        try:
            results = self._step_batch([t.generation for t in live])  # type: ignore[misc]
        except Exception as exc:  # the batching itself broke: every session in it hears about it
            results = [exc] * len(live)
        for ticket, result in zip(live, results, strict=True):
            self._guard(ticket, lambda t=ticket, r=result: self._deliver_result(t, r))

    def _deliver_result(self, ticket: _Ticket, result: list[Delta] | BaseException) -> None:
        if isinstance(result, BaseException):
            raise result
        self._deliver(ticket, result)

    def _deliver(self, ticket: _Ticket, deltas: list[Delta]) -> None:
        for delta in deltas:
            ticket.push(delta)
            ticket.audible = ticket.audible or isinstance(delta, AudioDelta)
        if ticket.generation is not None and ticket.generation.finished:
            ticket.push(_DONE)
            self._retire(ticket)

    def _guard(self, ticket: _Ticket, action: Callable[[], None]) -> bool:
        try:
            action()
            return True
        except Exception as exc:
            if _is_out_of_memory(exc):
                log.warning("%s: out of memory in a request; freeing it", self.name)
                error: BaseException = EngineOutOfMemory("the GPU ran out of memory for this request, retry shortly")
            elif isinstance(exc, EngineError):
                error = exc
            else:
                error = EngineError(report_internal_error(log, f"{self.name}: generation failed", exc))
                error.code = INTERNAL_ERROR_CODE
                self._check_device()
            self._retire(ticket)
            if _is_out_of_memory(exc) and self._on_out_of_memory is not None:
                self._on_out_of_memory()  # before the client hears of it: a retry then finds the memory free
            ticket.push(error)
            return False

    def _check_device(self) -> None:
        """After an unexpected error: if the device no longer works, fail every request and refuse new ones."""
        if self.failure is not None or self._device_check is None:
            return
        failure = self._device_check()
        if failure is None:
            return
        log.critical("%s: the device failed and cannot recover; restart the process: %s", self.name, failure)
        with self._wake:
            self.failure = failure
            tickets = [*self._active, *self._pending]
            self._pending.clear()
        problem = self.health_problem
        for ticket in tickets:
            self._retire(ticket)
            ticket.push(EngineUnhealthy(problem or "the GPU failed"))

    def _retire(self, ticket: _Ticket) -> None:
        ticket.cancelled = True
        if ticket.generation is not None:
            generation, ticket.generation = ticket.generation, None
            try:
                generation.close()
            except Exception:
                log.exception("%s: closing a generation failed", self.name)
        with self._wake:
            if ticket in self._active:
                self._active.remove(ticket)

    def _drain_on_close(self) -> None:
        for ticket in [*self._active, *self._pending]:
            ticket.push(EngineError("the engine is shutting down"))
            ticket.cancelled = True
            if ticket.generation is not None:
                ticket.generation.close()
                ticket.generation = None
        self._active.clear()
        self._pending.clear()
