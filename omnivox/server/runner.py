"""The asyncio shell around one `Session`: every door uses it, so every door behaves the same.

One task pumps inputs and time through the core (so the core is only ever touched by one task),
and one task per response iterates the engine and feeds its deltas back as inputs. The door
supplies `emit`, which turns the core's outputs into bytes on its transport.

The runner is where one session meets the others on the event loop, so it keeps each session within bounds: client
input waits in a bounded queue (a door awaits `put`, so a client that floods stops being read), the pump hands the
loop back after every input and every step of a long append, and a session ends on its own when the client is idle,
when its writes time out, or when the server drains for shutdown (`end_reason` tells the door which).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from omnivox.pipeline.echo_cancel import ApmCleaner
from omnivox.pipeline.end_of_turn import EndOfTurnBatcher, EndOfTurnPredictor
from omnivox.pipeline.engines.base import (
    Engine,
    EngineError,
    EngineNotReady,
    ResponseRequest,
    forget_conversation,
)
from omnivox.pipeline.events import (
    AudioIn,
    AudioOut,
    CallerAudioCleaned,
    CancelResponse,
    ClientEvent,
    EndOfTurnPredicted,
    EngineDone,
    EngineFailed,
    EngineOutput,
    PredictEndOfTurn,
    ProtocolError,
    ServerEvent,
    SessionInput,
    SessionOutput,
    StartResponse,
    Tick,
    TranscribeAudio,
    TranscriptionDone,
    error_event,
)
from omnivox.pipeline.internal_errors import INTERNAL_ERROR_CODE, report_internal_error
from omnivox.pipeline.session import Session
from omnivox.pipeline.vad import BatchedSileroVad
from omnivox.server.backpressure import WriteTimeout
from omnivox.server.metrics import Metrics

if TYPE_CHECKING:
    from omnivox.server.lifecycle import Lifecycle

log = logging.getLogger(__name__)

Emit = Callable[[SessionOutput], Awaitable[None]]
_WAKE = object()
"""Queued to wake the pump without an input (a drain began)."""


@dataclass(frozen=True)
class RunnerLimits:
    """Config `session_limits.max_queued_events`, `max_queued_bytes`, `max_events_per_s` and `idle_timeout_s`."""

    max_queued_events: int = 256
    max_queued_bytes: int = 16 * 1024 * 1024
    max_events_per_s: float | None = None
    """Client inputs a second, with a second's worth in a burst; past it the door waits before reading more."""
    idle_timeout_s: float | None = None


class SessionRunner:
    def __init__(
        self,
        session: Session,
        engine: Engine,
        emit: Emit,
        *,
        door: str,
        metrics: Metrics,
        limits: RunnerLimits | None = None,
        lifecycle: Lifecycle | None = None,
        clock: Callable[[], float] = time.monotonic,
        end_of_turn: EndOfTurnPredictor | None = None,
    ) -> None:
        self.session = session
        self.engine = engine
        self.door = door
        self.metrics = metrics
        self.limits = limits or RunnerLimits()
        self._lifecycle = lifecycle
        self._emit = emit
        self._clock = clock
        self._inputs: asyncio.Queue[tuple[object, int]] = asyncio.Queue()
        """(input, bytes it holds when it came from the client, else -1)."""
        self._queued_events = 0
        self._queued_bytes = 0
        self._room = asyncio.Event()
        self._tokens = self.limits.max_events_per_s or 0.0
        self._tokens_at = clock()
        self._last_client_input = clock()
        self._engine_tasks: dict[str, asyncio.Task[None]] = {}
        self._response_started: dict[str, float] = {}
        self._closed = False
        self._end_of_turn = end_of_turn
        self._false_interruptions = 0
        self._draining = False
        self._stop_requested = False
        self.end_reason: str | None = None
        """Why the session ended on the server's side: "idle", "write_timeout", "shutdown"; None otherwise."""

    def feed(self, item: SessionInput) -> None:
        """Queue an input of the server's own (engine deltas, playout progress) for the core."""
        if not self._closed:
            self._inputs.put_nowait((item, -1))

    async def put(self, item: SessionInput, size: int = 0) -> None:
        """Queue a client input of `size` bytes; waits while the session is `max_queued_events` or `max_queued_bytes`
        behind, or past `max_events_per_s`, so the door stops reading a client that sends faster than its session
        may go (a flood costs the server no more than a busy caller)."""
        while (wait := self._rate_wait()) > 0:
            await asyncio.sleep(wait)
        while not self._closed and self._backlog_full(size):
            self._room.clear()
            await self._room.wait()
        self.offer(item, size)

    def offer(self, item: SessionInput, size: int = 0) -> bool:
        """Queue a client input unless the session is too far behind (for doors that cannot wait: False)."""
        if self._closed:
            return True
        if self._backlog_full(size):
            return False
        self._queued_events += 1
        self._queued_bytes += size
        self._last_client_input = self._clock()
        self._inputs.put_nowait((item, size))
        return True

    def _rate_wait(self) -> float:
        """Take a token of the session's event rate: 0 when one was there, else the seconds until one is."""
        rate = self.limits.max_events_per_s
        if rate is None:
            return 0.0
        now = self._clock()
        self._tokens = min(rate, self._tokens + (now - self._tokens_at) * rate)
        self._tokens_at = now
        if self._tokens >= 1:
            self._tokens -= 1
            return 0.0
        return (1 - self._tokens) / rate

    def _backlog_full(self, size: int) -> bool:
        if self._queued_events >= self.limits.max_queued_events:
            return True
        return self._queued_bytes > 0 and self._queued_bytes + size > self.limits.max_queued_bytes

    def stop(self, reason: str | None = None) -> None:
        """Ask `run()` to end (the connection is gone or closing; `reason` when the server ends it)."""
        if reason is not None and self.end_reason is None:
            self.end_reason = reason
        self._stop_requested = True  # at once: nobody waits for the work queued or left (a long append) any more
        self._inputs.put_nowait((None, -1))

    def drain(self) -> None:
        """The server is shutting down: end once no response is in flight."""
        self._draining = True
        self._inputs.put_nowait((_WAKE, -1))

    async def run(self) -> None:
        """Pump until `stop()`; on exit every engine task of this session is cancelled and awaited."""
        log.info("%s: session open on %s", self.session.id, self.door)
        if self._lifecycle is not None:
            self._lifecycle.runners.add(self)
        try:
            await self._dispatch(self.session.start(self._clock()))
            while not self._stop_requested:
                if self.session.audio_pending:  # a long append, one step at a time between the other sessions
                    await self._vad_settled()
                    await self._dispatch(self._handle(Tick()))
                    await self._cleaned()
                    await asyncio.sleep(0)
                    continue
                if self._draining and self.session.active_response_id is None:
                    self.end_reason = self.end_reason or "shutdown"
                    break
                item = await self._next_input()
                if item is None:
                    break
                if item is _WAKE:
                    continue
                await self._vad_caught_up(item)
                await self._dispatch(self._handle(item))
                if isinstance(item, (AudioIn, ClientEvent)):
                    await self._cleaned()
                if not self._inputs.empty():
                    await asyncio.sleep(0)  # one input per turn of the loop: a flood never holds it
        except WriteTimeout as exc:
            log.warning("%s: dropping the client: %s", self.session.id, exc)
            self.end_reason = "write_timeout"
        finally:
            self._closed = True
            self._room.set()
            if self._lifecycle is not None:
                self._lifecycle.runners.discard(self)
            self.session.close()
            await self._cancel_all()
            forget_conversation(self.engine, self.session.id)
            if self.end_reason is not None:
                self.metrics.sessions_ended.labels(self.door, self.end_reason).inc()
            log.info("%s: session closed%s", self.session.id, f" ({self.end_reason})" if self.end_reason else "")

    async def _next_input(self) -> Any:
        """The next queued input; a `Tick` when the pacer is due first; `None` to end (stopped, or idle too long)."""
        deadline = self.session.next_deadline()
        idle_at = None
        if self.limits.idle_timeout_s is not None and self.session.active_response_id is None:
            idle_at = self._last_client_input + self.limits.idle_timeout_s
        wake = min((t for t in (deadline, idle_at) if t is not None), default=None)
        try:
            async with asyncio.timeout(None if wake is None else max(0.0, wake - self._clock())):
                item, size = await self._inputs.get()
        except TimeoutError:
            if idle_at is not None and self._clock() >= idle_at:
                await self._end_idle()
                return None
            return Tick()
        if size >= 0:
            self._queued_events -= 1
            self._queued_bytes -= size
            self._room.set()
        return item

    async def _end_idle(self) -> None:
        self.end_reason = "idle"
        timeout = self.limits.idle_timeout_s
        log.info("%s: no client input for %g s; ending the session", self.session.id, timeout)
        message = f"the session ended after {timeout:g} s without client events or audio"
        await self._dispatch([error_event(ProtocolError(message, code="session_idle_timeout"))])

    async def _cleaned(self) -> None:
        """Caller audio went to the cleaner's thread: once it is done, the core hears it at once."""
        cleaner = self.session.cleaner
        if isinstance(cleaner, ApmCleaner) and cleaner.pending:
            await cleaner.settle()
            await self._dispatch(self._handle(CallerAudioCleaned()))

    async def _vad_caught_up(self, item: SessionInput) -> None:
        """Caller input may bring a VAD frame that reads the previous frame's result, or take the cleaned audio of the
        previous chunk: await those results here, so the core never blocks the event loop (and every other session)
        waiting on the silero or the audio-cleanup thread."""
        if not isinstance(item, (AudioIn, ClientEvent)):
            return
        cleaner = self.session.cleaner
        if isinstance(cleaner, ApmCleaner) and cleaner.pending:
            await cleaner.settle()
        await self._vad_settled()

    async def _vad_settled(self) -> None:
        vad = self.session.vad
        if isinstance(vad, BatchedSileroVad) and vad.pending:
            await vad.settle()

    def _handle(self, item: SessionInput) -> list[SessionOutput]:
        """A bug in the core fails one input with an error event, never the whole session."""
        try:
            outputs = self.session.handle(item, self._clock())
            if self.session.false_interruptions != self._false_interruptions:
                self.metrics.false_interruptions.labels(self.door).inc()
                self._false_interruptions = self.session.false_interruptions
            return outputs
        except Exception as exc:
            context = f"{self.session.id}: session core failed on {type(item).__name__}"
            message = report_internal_error(log, context, exc)
            return [error_event(ProtocolError(message, code=INTERNAL_ERROR_CODE, error_type="server_error"))]

    async def _dispatch(self, outputs: list[SessionOutput]) -> None:
        for output in outputs:
            if isinstance(output, StartResponse):
                self._start_engine(output.response_id, output.request)
            elif isinstance(output, CancelResponse):
                self._cancel_engine(output.response_id)
            elif isinstance(output, TranscribeAudio):
                self._start_task(f"transcribe-{output.item_id}", self._transcribe(output))
            elif isinstance(output, PredictEndOfTurn):
                previous = self._engine_tasks.get(f"end-of-turn-{output.check_id - 1}")
                if previous is not None:  # the caller spoke again since: that answer would be ignored
                    previous.cancel()
                self._start_task(f"end-of-turn-{output.check_id}", self._predict_end_of_turn(output))
            self._observe(output)
            await self._emit(output)

    def _observe(self, output: SessionOutput) -> None:
        if isinstance(output, AudioOut):
            started = self._response_started.pop(output.response_id, None)
            if started is not None:
                self.metrics.first_audio.labels(self.door).observe(self._clock() - started)
        elif isinstance(output, ServerEvent):
            if output.type == "response.done":
                response = output.payload["response"]
                self._response_started.pop(response["id"], None)
                self.metrics.responses.labels(self.door, response["status"]).inc()
                if (response.get("status_details") or {}).get("reason") == "turn_detected":
                    self.metrics.barge_ins.labels(self.door).inc()
                for item in response["output"]:
                    if item.get("type") == "function_call":
                        outcome = "completed" if item.get("status") == "completed" else "invalid"
                        self.metrics.tool_calls.labels(self.door, outcome).inc()
            elif output.type == "error":
                self.metrics.protocol_errors.labels(self.door, str(output.payload["error"].get("code"))).inc()

    def _start_engine(self, response_id: str, request: ResponseRequest) -> None:
        self._response_started[response_id] = self._clock()
        self._start_task(response_id, self._run_engine(response_id, request))

    def _start_task(self, key: str, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work, name=f"engine-{key}")
        self._engine_tasks[key] = task
        task.add_done_callback(lambda _: self._engine_tasks.pop(key, None))

    async def _transcribe(self, order: TranscribeAudio) -> None:
        """Caller transcripts come from the engine's recogniser, off the turn's critical path."""
        transcribe = getattr(self.engine, "transcribe", None)
        if transcribe is None:
            self.feed(TranscriptionDone(order.item_id, None, f"engine {self.engine.name} cannot transcribe"))
            return
        try:
            text = await transcribe(order.audio, order.language, order.prompt)
        except EngineError as exc:
            log.warning("%s: transcription of %s failed: %s", self.session.id, order.item_id, exc)
            self.feed(TranscriptionDone(order.item_id, None, str(exc)))
        except Exception as exc:
            message = report_internal_error(log, f"{self.session.id}: transcription of {order.item_id} crashed", exc)
            self.feed(TranscriptionDone(order.item_id, None, message))
        else:
            self.feed(TranscriptionDone(order.item_id, text))

    async def _predict_end_of_turn(self, order: PredictEndOfTurn) -> None:
        """`semantic_vad`: the end-of-turn model's answer goes back to the core as an input (None if it failed: the
        turn then ends on the eagerness's longest silence)."""
        started = self._clock()
        try:
            predictor = self._end_of_turn or EndOfTurnBatcher.get()
            probability: float | None = await predictor.predict(order.audio)
        except Exception as exc:
            log.warning("%s: end-of-turn model failed: %s", self.session.id, exc)
            probability = None
        else:
            self.metrics.end_of_turn_seconds.observe(self._clock() - started)
        self.feed(EndOfTurnPredicted(order.check_id, probability))

    async def _run_engine(self, response_id: str, request: ResponseRequest) -> None:
        try:
            if not self.engine.ready:
                raise EngineNotReady("the engine is not ready (still loading or failed to load)")
            async for delta in self.engine.respond(request):
                self.feed(EngineOutput(response_id, delta))
            self.feed(EngineDone(response_id))
        except EngineError as exc:
            log.warning("%s: response %s failed: %s", self.session.id, response_id, exc)
            self.feed(EngineFailed(response_id, exc.code, str(exc)))
        except Exception as exc:
            message = report_internal_error(log, f"{self.session.id}: response {response_id} crashed", exc)
            self.feed(EngineFailed(response_id, INTERNAL_ERROR_CODE, message))

    def _cancel_engine(self, response_id: str) -> None:
        task = self._engine_tasks.pop(response_id, None)
        if task is not None:
            log.info("%s: cancelling response %s", self.session.id, response_id)
            task.cancel()

    async def _cancel_all(self) -> None:
        tasks = list(self._engine_tasks.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
