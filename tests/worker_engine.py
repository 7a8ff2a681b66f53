"""An engine double on the real `GpuWorker`, whose generations can speak, crash with a CUDA-like error, hang (a stuck
kernel) or kill the worker thread, to see what clients and `/healthz` make of it."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator

import numpy as np

from omnivox.pipeline.engines.base import AudioDelta, Delta, ResponseRequest, TextDelta
from omnivox.pipeline.engines.scheduler import GpuWorker

CUDA_DETAILS = "CUDA error: an illegal memory access was encountered at /opt/omnivox/secret_kernels.cu:42"
"""What a driver says: never for clients."""


class WorkerKilled(BaseException):
    """Escapes every `except Exception`, as a fatal error in native code would, and ends the worker thread."""


class ScriptedGeneration:
    """Speaks three 40 ms steps, unless told to crash, hang or kill at its step `at`."""

    def __init__(self, behaviour: str, release: threading.Event, at: int) -> None:
        self.behaviour, self.release, self.at = behaviour, release, at
        self.steps = 0

    @property
    def finished(self) -> bool:
        return self.steps >= 3

    def step(self) -> list[Delta]:
        if self.steps == self.at:
            if self.behaviour == "crash":
                raise RuntimeError(CUDA_DETAILS)
            if self.behaviour == "kill":
                raise WorkerKilled(CUDA_DETAILS)
            if self.behaviour == "hang":
                self.release.wait()
        self.steps += 1
        return [TextDelta("hi "), AudioDelta(np.full(960, 0.1, np.float32))]

    def close(self) -> None:
        return None


class WorkerEngine:
    name = "worker"
    model_id = "worker-model"
    native_rate = 24_000

    def __init__(self, stall_timeout_s: float = 30.0) -> None:
        self.stall_timeout_s = stall_timeout_s
        self.behaviour = "speak"
        self.at = 0
        self.release = threading.Event()
        self.worker: GpuWorker | None = None

    @property
    def ready(self) -> bool:
        return self.worker is not None

    @property
    def health_problem(self) -> str | None:
        return self.worker.health_problem if self.worker is not None else None

    async def start(self) -> None:
        self.worker = GpuWorker("test-gpu", stall_timeout_s=self.stall_timeout_s)

    async def close(self) -> None:
        self.release.set()
        if self.worker is not None:
            self.worker.close()

    async def respond(self, request: ResponseRequest) -> AsyncIterator[Delta]:
        assert self.worker is not None
        behaviour, at = self.behaviour, self.at
        async for delta in self.worker.stream(lambda: ScriptedGeneration(behaviour, self.release, at)):
            yield delta

    async def transcribe(self, audio: np.ndarray, language: str | None = None, prompt: str = "") -> str:
        raise RuntimeError(CUDA_DETAILS)
