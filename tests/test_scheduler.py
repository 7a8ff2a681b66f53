"""The GPU worker: fair interleaving, batching, admission limits, cancellation and failures of one request."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from typing import Any

import numpy as np
import pytest

from omnivox.pipeline.engines.base import AudioDelta, EngineBusy, EngineError, EngineOutOfMemory, TextDelta
from omnivox.pipeline.engines.scheduler import GpuWorker


class CountingGeneration:
    """Emits `steps` text deltas named after itself, one per step, recording every step it runs."""

    def __init__(
        self,
        name: str,
        steps: int,
        log: list[str],
        step_s: float = 0.0,
        fail_at: int | None = None,
        error: Exception | None = None,
    ) -> None:
        self.name, self.steps, self.log, self.step_s = name, steps, log, step_s
        self.fail_at, self.error = fail_at, error
        self.done = 0
        self.closed = threading.Event()

    @property
    def finished(self) -> bool:
        return self.done >= self.steps

    def step(self) -> list[TextDelta]:
        if self.fail_at is not None and self.done == self.fail_at:
            raise self.error or RuntimeError("boom")
        time.sleep(self.step_s)
        self.done += 1
        self.log.append(self.name)
        return [TextDelta(f"{self.name}{self.done}")]

    def close(self) -> None:
        self.closed.set()


async def collect_items(stream: Any) -> list[Any]:
    return [item async for item in stream]


async def collect(worker: GpuWorker, generation: CountingGeneration) -> list[str]:
    return [d.text async for d in worker.stream(lambda: generation)]  # type: ignore[union-attr]


async def test_active_generations_interleave_step_by_step() -> None:
    worker = GpuWorker("test", max_active=2)
    log: list[str] = []
    try:
        long, short = CountingGeneration("L", 30, log, 0.001), CountingGeneration("S", 5, log, 0.001)
        results = await asyncio.gather(collect(worker, long), collect(worker, short))
    finally:
        worker.close()
    assert results[1] == [f"S{i}" for i in range(1, 6)]
    assert log.index("S") < 3  # the short answer starts at once, not after the long one
    assert log[:10].count("S") == 5  # and finishes within the first ten steps
    assert long.closed.is_set() and short.closed.is_set()


async def test_batched_step_advances_all_active_generations_together() -> None:
    batches: list[int] = []

    def step_batch(generations):  # type: ignore[no-untyped-def]
        batches.append(len(generations))
        return [g.step() for g in generations]

    worker = GpuWorker("test", max_active=4, step_batch=step_batch)
    log: list[str] = []
    try:
        gens = [CountingGeneration(f"g{i}", 10, log, 0.001) for i in range(3)]
        await asyncio.gather(*(collect(worker, g) for g in gens))
    finally:
        worker.close()
    assert max(batches) == 3


async def test_a_failure_inside_a_batched_step_fails_only_its_own_request() -> None:
    def step_batch(generations):  # type: ignore[no-untyped-def]
        results = []
        for generation in generations:
            try:
                results.append(generation.step())
            except Exception as exc:
                results.append(exc)
        return results

    worker = GpuWorker("test", max_active=4, step_batch=step_batch)
    log: list[str] = []
    try:
        healthy = CountingGeneration("ok", 8, log, 0.001)
        failing = CountingGeneration("bad", 8, log, 0.001, fail_at=2, error=RuntimeError("out of memory"))
        results = await asyncio.gather(collect(worker, healthy), collect(worker, failing), return_exceptions=True)
    finally:
        worker.close()
    assert results[0] == [f"ok{i}" for i in range(1, 9)]
    assert isinstance(results[1], EngineOutOfMemory)
    assert failing.closed.is_set() and healthy.closed.is_set()


class SpeakingGeneration(CountingGeneration):
    """Text for its first `silent_steps` steps (prefill, first chunk being made), then audio."""

    def __init__(self, name: str, steps: int, log: list[str], silent_steps: int) -> None:
        super().__init__(name, steps, log, 0.001)
        self.silent_steps = silent_steps

    def step(self) -> list[TextDelta | AudioDelta]:  # type: ignore[override]
        deltas = super().step()
        if self.done > self.silent_steps:
            return [AudioDelta(np.zeros(480, dtype=np.float32))]
        return deltas


async def test_background_work_waits_until_every_answer_is_speaking() -> None:
    """A caller transcript queued first must not delay the first audio of the answer queued just after it."""
    worker = GpuWorker("test", max_active=4)
    log: list[str] = []
    try:
        transcript = CountingGeneration("T", 5, log, 0.001)
        answer = SpeakingGeneration("A", 8, log, silent_steps=3)
        background = asyncio.create_task(
            collect_items(worker.stream(lambda: transcript, background=True))  # type: ignore[arg-type,return-value]
        )
        await asyncio.sleep(0)
        spoken = await collect_items(worker.stream(lambda: answer))  # type: ignore[arg-type,return-value]
        heard = await background
    finally:
        worker.close()
    assert log[:4] == ["A"] * 4  # the answer's silent steps and its first audio come before any transcript step
    assert "T" in log[4:8]  # then both advance together
    assert len(spoken) == 8 and [d.text for d in heard] == [f"T{i}" for i in range(1, 6)]


async def test_queue_over_limit_is_busy() -> None:
    worker = GpuWorker("test", max_active=1, max_queued=1)
    log: list[str] = []
    try:
        first = asyncio.create_task(collect(worker, CountingGeneration("a", 50, log, 0.005)))
        await asyncio.sleep(0.05)
        second = asyncio.create_task(collect(worker, CountingGeneration("b", 1, log)))
        await asyncio.sleep(0.01)
        with pytest.raises(EngineBusy):
            await collect(worker, CountingGeneration("c", 1, log))
        await asyncio.gather(first, second)
    finally:
        worker.close()


async def test_a_cancelled_request_leaves_the_queue_at_once() -> None:
    """A caller who hangs up while waiting must not keep a place in the queue (others would get server_busy)."""
    worker = GpuWorker("test", max_active=1, max_queued=1)
    log: list[str] = []
    first = asyncio.create_task(collect(worker, CountingGeneration("a", 400, log, 0.005)))
    try:
        await asyncio.sleep(0.05)
        waiting = asyncio.create_task(collect(worker, CountingGeneration("b", 1, log)))
        await asyncio.sleep(0.01)
        assert worker.load == (1, 1)
        waiting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await waiting
        assert worker.load == (1, 0)
        assert await collect(worker, CountingGeneration("c", 1, log)) == ["c1"]
        assert "b" not in log
    finally:
        first.cancel()
        worker.close()


async def test_cancel_stops_the_generation_before_its_next_step_and_frees_it() -> None:
    worker = GpuWorker("test")
    log: list[str] = []
    generation = CountingGeneration("x", 10_000, log, 0.002)
    try:
        stream = worker.stream(lambda: generation)
        await anext(stream)
        await stream.aclose()
        assert await asyncio.to_thread(generation.closed.wait, 2.0)
        steps_at_cancel = generation.done
        await asyncio.sleep(0.2)
        assert generation.done <= steps_at_cancel + 1
    finally:
        worker.close()


async def test_one_failing_request_does_not_stop_the_others() -> None:
    worker = GpuWorker("test", max_active=2)
    log: list[str] = []
    try:
        bad = CountingGeneration("bad", 10, log, 0.001, fail_at=2)
        oom = CountingGeneration("oom", 10, log, 0.001, fail_at=1, error=RuntimeError("CUDA out of memory"))
        good = CountingGeneration("ok", 10, log, 0.001)
        results = await asyncio.gather(
            collect(worker, bad), collect(worker, oom), collect(worker, good), return_exceptions=True
        )
    finally:
        worker.close()
    assert isinstance(results[0], EngineError) and results[0].code == "internal_error"
    assert "boom" not in str(results[0]) and "error id" in str(results[0])  # the details are in the log
    assert isinstance(results[1], EngineOutOfMemory)
    assert results[2] == [f"ok{i}" for i in range(1, 11)]
    assert bad.closed.is_set() and oom.closed.is_set()


async def test_failure_to_start_a_generation_is_reported() -> None:
    worker = GpuWorker("test")

    def broken() -> CountingGeneration:
        raise EngineError("prompt too long")

    try:
        with pytest.raises(EngineError, match="prompt too long"):
            async for _ in worker.stream(broken):  # type: ignore[arg-type]
                pass
    finally:
        worker.close()
