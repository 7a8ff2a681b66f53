"""Voice activity detection: silero-vad (default, ONNX on CPU) and webrtcvad (light), behind one interface.

Both work on fixed-size frames of 16 kHz mono float32 and keep their streaming state per instance, so one
instance belongs to one session. The silero model is loaded once per process and shared by every instance:
a new session costs two small arrays, not a model load.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import importlib.resources
import logging
import threading
import time
from collections import deque
from typing import Protocol

import numpy as np
import onnxruntime
import webrtcvad

from omnivox.pipeline.audio import float_to_pcm16

logger = logging.getLogger(__name__)

VAD_RATE = 16_000


class Vad(Protocol):
    """Speech probability of consecutive 16 kHz frames of one stream."""

    frame_samples: int

    def probability(self, frame: np.ndarray) -> float:
        """Probability in [0, 1] that `frame` (exactly `frame_samples` float32 samples at 16 kHz) holds speech."""
        ...

    def reset(self) -> None:
        """Forget the stream so far (a new stream starts)."""
        ...


def _check_frame(frame: np.ndarray, frame_samples: int, kind: str) -> np.ndarray:
    samples = np.asarray(frame, dtype=np.float32).reshape(-1)
    if len(samples) != frame_samples:
        raise ValueError(f"{kind} VAD needs frames of exactly {frame_samples} samples at 16 kHz, got {len(samples)}")
    return samples


class _SharedSileroModel:
    """The one onnxruntime session of the process, created on first use."""

    _session: onnxruntime.InferenceSession | None = None
    _lock = threading.Lock()

    @classmethod
    def get(cls) -> onnxruntime.InferenceSession:
        with cls._lock:
            if cls._session is None:
                model = importlib.resources.files("silero_vad").joinpath("data", "silero_vad.onnx")
                options = onnxruntime.SessionOptions()
                options.intra_op_num_threads = 1
                options.inter_op_num_threads = 1
                options.log_severity_level = 3
                with importlib.resources.as_file(model) as model_path:
                    cls._session = onnxruntime.InferenceSession(
                        str(model_path), sess_options=options, providers=["CPUExecutionProvider"]
                    )
                logger.info("loaded silero-vad ONNX model from %s", model)
            return cls._session


class SileroVad:
    """silero-vad v5 on onnxruntime: 512-sample frames, recurrent state and 64-sample context kept per instance."""

    frame_samples = 512
    _context_samples = 64
    _state_shape = (2, 1, 128)

    def __init__(self) -> None:
        self._session = _SharedSileroModel.get()
        self._sample_rate = np.array(VAD_RATE, dtype=np.int64)
        self.reset()

    def reset(self) -> None:
        self._state = np.zeros(self._state_shape, dtype=np.float32)
        self._context = np.zeros(self._context_samples, dtype=np.float32)

    def probability(self, frame: np.ndarray) -> float:
        samples = _check_frame(frame, self.frame_samples, "silero")
        model_input = np.concatenate((self._context, samples))[None, :]
        output, self._state = self._session.run(
            None, {"input": model_input, "state": self._state, "sr": self._sample_rate}
        )
        self._context = samples[-self._context_samples :].copy()
        return float(output[0, 0])


class _SileroBatcher:
    """Runs silero for every session of the process in batches, on its own thread.

    onnxruntime releases the GIL, so inference leaves the event loop free (and can use another core), and one call
    for B sessions costs about a third per frame of B calls (measured 94 us per frame at batch 8, 268 us alone).
    Each instance has at most one frame in a batch, so its recurrent state advances frame by frame.

    A frame's result is only read when its session's next frame arrives (32 ms later in real time), so the first
    waiting frame holds the batch open for `gather_s` while other sessions' frames join it; whoever blocks on a
    result (`hurry`) closes it at once, so a burst of audio never waits on the gathering.
    """

    max_batch = 64
    gather_s = 0.010
    _instance: _SileroBatcher | None = None
    _instance_lock = threading.Lock()

    def __init__(self) -> None:
        self._session = _SharedSileroModel.get()
        self._sample_rate = np.array(VAD_RATE, dtype=np.int64)
        self._waiting: dict[BatchedSileroVad, list[np.ndarray]] = {}
        self._wake = threading.Condition()
        self._gather_until = 0.0
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="omnivox-silero", daemon=True)
        self._thread.start()
        atexit.register(self.close)  # a native call still running at interpreter exit aborts the process

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join(timeout=5)

    @classmethod
    def get(cls) -> _SileroBatcher:
        with cls._instance_lock:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance

    def submit(self, vad: BatchedSileroVad, model_input: np.ndarray) -> None:
        with self._wake:
            if not self._waiting:
                self._gather_until = time.monotonic() + self.gather_s
                self._wake.notify()
            self._waiting.setdefault(vad, []).append(model_input)
            if len(self._waiting) == self.max_batch:
                self._wake.notify()

    def hurry(self) -> None:
        """Someone is blocked on a result: run what is waiting now instead of gathering more."""
        with self._wake:
            self._gather_until = 0.0
            self._wake.notify()

    def _next_batch(self) -> tuple[list[BatchedSileroVad], list[np.ndarray]] | None:
        """Wait until the gathering is over (or the batch is full), then take one frame per waiting instance; None
        once closed. Frames left waiting (an instance's second frame, past `max_batch`) go in the next batch at once."""
        with self._wake:
            while not self._closed:
                if not self._waiting:
                    self._wake.wait()
                    continue
                left = self._gather_until - time.monotonic()
                if left <= 0 or len(self._waiting) >= self.max_batch:
                    break
                self._wake.wait(left)
            if self._closed:
                return None
            batch = list(self._waiting)[: self.max_batch]
            inputs = [self._waiting[vad].pop(0) for vad in batch]
            for vad in batch:
                if not self._waiting[vad]:
                    del self._waiting[vad]
            return batch, inputs

    def _run(self) -> None:
        while (taken := self._next_batch()) is not None:
            batch, inputs = taken
            states = np.concatenate([vad.state for vad in batch], axis=1)
            try:
                output, new_states = self._session.run(
                    None, {"input": np.stack(inputs), "state": states, "sr": self._sample_rate}
                )
            except Exception:
                logger.exception("silero batch of %d failed", len(batch))
                continue
            for row, vad in enumerate(batch):
                vad.completed(float(output[row, 0]), new_states[:, row : row + 1])


class BatchedSileroVad:
    """silero-vad for servers: frames go to the process-wide batcher, and `probability(frame k)` returns the result of
    frame k-1. Decisions lag the audio by one 32 ms frame in exchange for a fraction of the CPU per session; in real
    time the previous frame is long done, and a burst of audio (a client sending faster than real time) waits for
    each previous frame, so every frame's result is used exactly once, in order. An asyncio shell awaits `settle()`
    before feeding more audio, so that wait never blocks its event loop (and the other sessions' frames join the
    batch meanwhile)."""

    frame_samples = SileroVad.frame_samples
    result_timeout_s = 2.0

    def __init__(self) -> None:
        self._batcher = _SileroBatcher.get()
        self._done = threading.Condition()
        self._settle_waiters: list[asyncio.Future[None]] = []
        self.reset()

    def reset(self) -> None:
        with self._done:
            self.state = np.zeros(SileroVad._state_shape, dtype=np.float32)
            self._context = np.zeros(SileroVad._context_samples, dtype=np.float32)
            self._results: deque[float] = deque()
            self._submitted = self._completed = 0
            self.latest = 0.0

    def probability(self, frame: np.ndarray) -> float:
        samples = _check_frame(frame, self.frame_samples, "silero")
        model_input = np.concatenate((self._context, samples))
        self._context = samples[-SileroVad._context_samples :].copy()
        self._submitted += 1
        self._batcher.submit(self, model_input)
        if self._submitted == 1:
            return 0.0
        with self._done:
            if not self._results:
                self._batcher.hurry()
                if not self._done.wait_for(lambda: self._results, self.result_timeout_s):
                    raise RuntimeError("silero batcher gave no result in time")
            return self._results.popleft()

    def completed(self, probability: float, state: np.ndarray) -> None:
        """Called by the batcher thread with this instance's next result, in frame order."""
        with self._done:
            self.state, self.latest = state, probability
            self._results.append(probability)
            self._completed += 1
            self._done.notify_all()
            if self._completed >= self._submitted:
                for future in self._settle_waiters:
                    with contextlib.suppress(RuntimeError):  # the waiter's loop is closed: nobody waits any more
                        future.get_loop().call_soon_threadsafe(_resolve, future)
                self._settle_waiters.clear()

    @property
    def pending(self) -> bool:
        """A submitted frame has no result yet: the next `probability` may block until it has."""
        return self._completed < self._submitted

    async def settle(self) -> None:
        """Wait, without blocking the event loop, until every submitted frame has a result (at most
        `result_timeout_s`; `probability` then reports a batcher that is stuck)."""
        with self._done:
            if self._completed >= self._submitted:
                return
            future = asyncio.get_running_loop().create_future()
            self._settle_waiters.append(future)
        self._batcher.hurry()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.result_timeout_s):
                await future

    def wait(self, timeout: float = 5.0) -> bool:
        """Block until every submitted frame has a result; `latest` is then the last frame's (tests, offline use)."""
        with self._done:
            if self._completed < self._submitted:
                self._batcher.hurry()
            return self._done.wait_for(lambda: self._completed >= self._submitted, timeout)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class WebRtcVad:
    """The WebRTC GMM detector: 30 ms frames, a hard 1.0 / 0.0 decision, `aggressiveness` 0 (lenient) to 3."""

    frame_samples = 480

    def __init__(self, aggressiveness: int = 2) -> None:
        if aggressiveness not in (0, 1, 2, 3):
            raise ValueError(f"webrtc VAD aggressiveness must be 0, 1, 2 or 3, got {aggressiveness!r}")
        self.aggressiveness = aggressiveness
        self._detector = webrtcvad.Vad(aggressiveness)

    def reset(self) -> None:
        self._detector = webrtcvad.Vad(self.aggressiveness)

    def probability(self, frame: np.ndarray) -> float:
        samples = _check_frame(frame, self.frame_samples, "webrtc")
        return 1.0 if self._detector.is_speech(float_to_pcm16(samples), VAD_RATE) else 0.0


VAD_KINDS = ("silero", "webrtc")


def create_vad(kind: str) -> Vad:
    """Make a fresh per-session detector of `kind` ("silero": batched across sessions, or "webrtc")."""
    if kind == "silero":
        return BatchedSileroVad()
    if kind == "webrtc":
        return WebRtcVad()
    raise ValueError(f"unknown VAD kind {kind!r}; expected one of {VAD_KINDS}")
