"""The asyncio shell around one `Session`: every door uses it, so every door behaves the same.

One task pumps inputs and time through the core (so the core is only ever touched by one task),
and one task per response iterates the engine and feeds its deltas back as inputs. The door
supplies `emit`, which turns the core's outputs into bytes on its transport.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

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
from omnivox.server.metrics import Metrics

log = logging.getLogger(__name__)

Emit = Callable[[SessionOutput], Awaitable[None]]


class SessionRunner:
    def __init__(
        self,
        session: Session,
        engine: Engine,
        emit: Emit,
        *,
        door: str,
        metrics: Metrics,
        clock: Callable[[], float] = time.monotonic,
        end_of_turn: EndOfTurnPredictor | None = None,
    ) -> None:
        self.session = session
        self.engine = engine
        self.door = door
        self.metrics = metrics
        self._emit = emit
        self._clock = clock
        self._inputs: asyncio.Queue[SessionInput | None] = asyncio.Queue()
        self._engine_tasks: dict[str, asyncio.Task[None]] = {}
        self._response_started: dict[str, float] = {}
        self._closed = False
        self._end_of_turn = end_of_turn
        self._false_interruptions = 0

    def feed(self, item: SessionInput) -> None:
        """Queue an input for the core (from the door's receive loop)."""
        if not self._closed:
            self._inputs.put_nowait(item)

    def stop(self) -> None:
        """Ask `run()` to end (the connection is gone or closing)."""
        self._inputs.put_nowait(None)

    async def run(self) -> None:
        """Pump until `stop()`; on exit every engine task of this session is cancelled and awaited."""
        log.info("%s: session open on %s", self.session.id, self.door)
        try:
            await self._dispatch(self.session.start(self._clock()))
            while True:
                deadline = self.session.next_deadline()
                if deadline is None:
                    item = await self._inputs.get()
                else:
                    try:
                        async with asyncio.timeout(max(0.0, deadline - self._clock())):
                            item = await self._inputs.get()
                    except TimeoutError:
                        item = Tick()
                if item is None:
                    break
                await self._vad_caught_up(item)
                await self._dispatch(self._handle(item))
                await self._cleaned(item)
        finally:
            self._closed = True
            self.session.close()
            await self._cancel_all()
            forget_conversation(self.engine, self.session.id)
            log.info("%s: session closed", self.session.id)

    async def _cleaned(self, item: SessionInput) -> None:
        """Caller audio went to the cleaner's thread: once it is done, the core hears it at once."""
        cleaner = self.session.cleaner
        if isinstance(item, (AudioIn, ClientEvent)) and isinstance(cleaner, ApmCleaner) and cleaner.pending:
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
