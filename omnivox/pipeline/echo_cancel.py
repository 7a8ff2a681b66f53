"""Cleaning the caller's audio before VAD and engine: acoustic echo cancellation against what the agent sent, noise
suppression (`noise_reduction`) and a high-pass filter, with WebRTC's audio processing module (AEC3, NS, AGC2) from
the `livekit` package (Apache-2.0; its native library bundles WebRTC, BSD-3-Clause).

Echo: a speakerphone, laptop speakers or a phone line play the agent's voice back into the caller's microphone, and a
VAD hears it as the caller speaking. The far-end reference is the agent audio the session sent, laid on the caller's
audio timeline where it starts to play: a frame goes where the caller's stream stands by the clock when it was sent
(not by the samples received so far, which lag when the server is busy), or right after the previous frame when the
audio was sent ahead of time (the pacer's lead). AEC3 estimates the remaining delay (the client's playout, the room,
the line: tens to hundreds of ms) and adapts to it.

Before AEC3 has converged on an echo path it suppresses everything the microphone picks up while the agent talks, so
on a line with no echo (a headset, a phone that cancels its own echo) a barge-in in the first seconds of agent speech
would be lost. `EchoPathDetector` therefore watches whether the microphone gets louder when the agent's audio plays:
only then is the echo-cancelled audio used; on an echo-free line the caller's audio passes without AEC.

The work runs on one thread for the whole process (the native calls release the GIL): `process(chunk)` hands the chunk
to that thread; the shell awaits `settle()` (off the event loop) and then tells the core `CallerAudioCleaned`, which
takes the cleaned chunk, so the cleaned stream lags by the thread's work, not by a chunk of whatever size the client
sends.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from omnivox.pipeline.audio import StreamResampler
from omnivox.pipeline.engines.base import INPUT_RATE

logger = logging.getLogger(__name__)

FRAME_SAMPLES = INPUT_RATE // 100
"""The audio processing module works on 10 ms frames."""
NOISE_REDUCTION_TYPES = ("near_field", "far_field")
STREAM_GAP_S = 1.0
"""Caller audio that resumes this much later than its samples account for (a client that stopped sending while the
agent spoke) is placed at the wall-clock position, so the reference does not slide against it."""


@dataclass(frozen=True)
class CleanupSettings:
    """What the session asked for: `audio.input.echo_cancellation` and `audio.input.noise_reduction.type`."""

    echo_cancellation: bool = False
    noise_reduction: str | None = None
    """None, `near_field` (close-talking microphone: noise suppression) or `far_field` (laptop or room microphone:
    noise suppression plus automatic gain, since the voice arrives quieter)."""

    @property
    def active(self) -> bool:
        return self.echo_cancellation or self.noise_reduction is not None


class CallerAudioCleaner(Protocol):
    """The session core's view of a cleaner: caller audio in, cleaned caller audio out, agent audio as reference."""

    def process(self, pcm: np.ndarray, now: float) -> np.ndarray:
        """Hand over the next caller chunk (16 kHz) received at `now`; return the cleaned audio finished so far."""
        ...

    def take(self) -> np.ndarray:
        """The cleaned audio finished so far (without handing anything over)."""
        ...

    def flush(self) -> np.ndarray:
        """Everything still in flight, cleaned (a commit needs the whole turn); blocks until it is done."""
        ...

    def far_end(self, pcm: np.ndarray, rate: int, now: float) -> None:
        """Agent audio sent to the caller at `now` (the echo reference)."""
        ...

    def far_end_dropped(self) -> None:
        """The door dropped the agent audio it had queued (a pause or barge-in): none of it will play."""
        ...

    @property
    def echo_suspected(self) -> bool:
        """The caller's line may return the agent's voice (speech over an answer may be its echo)."""
        ...


class _Worker:
    """The process's one audio-processing thread: jobs of all sessions in arrival order."""

    _instance: _Worker | None = None
    _lock = threading.Lock()

    def __init__(self) -> None:
        self._jobs: deque[Callable[[], None]] = deque()
        self._wake = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="omnivox-audio-cleanup", daemon=True)
        self._thread.start()
        atexit.register(self.close)  # a native call still running at interpreter exit aborts the process

    @classmethod
    def get(cls) -> _Worker:
        with cls._lock:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance

    def submit(self, job: Callable[[], None]) -> None:
        with self._wake:
            self._jobs.append(job)
            self._wake.notify()

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._jobs and not self._closed:
                    self._wake.wait()
                if self._closed:
                    return
                job = self._jobs.popleft()
            try:
                job()
            except Exception:
                logger.exception("audio cleanup job failed")


class EchoPathDetector:
    """Is there an echo path? Judged on the first `decide_frames` of each agent utterance: echo raises the
    microphone's mean power over its noise floor while the agent's voice plays; on an echo-free line it stays at the
    floor. The frames are judged in four parts, and the quieter of the last two decides, so a caller who talks over
    part of them (a barge-in) does not pass for an echo; the first half may precede the echo's delay (up to 250
    ms). The verdict holds until the next utterance is judged; before the first one an echo is assumed (the safe side
    against self-interruption)."""

    active_dbfs = -50.0
    """A reference frame louder than this is agent audio playing."""
    echo_db = 4.0
    """Mean microphone power during agent audio this far above the floor is an echo."""
    decide_frames = 50
    new_utterance_frames = 100
    """Agent silence (in 10 ms frames) after which its next audio is a new utterance, judged anew."""

    def __init__(self) -> None:
        self.echo = True
        self._floor: float | None = None
        self._powers: list[float] = []
        self._quiet_frames = 0

    def update(self, microphone: np.ndarray, reference: np.ndarray) -> None:
        power = float(np.mean(microphone.astype(np.float64) ** 2)) + 1e-10
        if _dbfs(reference) > self.active_dbfs:
            self._quiet_frames = 0
            if self._floor is not None and len(self._powers) < self.decide_frames:
                self._powers.append(power)
                if len(self._powers) == self.decide_frames:
                    parts = np.array_split(np.array(self._powers), 4)[2:]
                    rise = min(10 * float(np.log10(np.mean(part))) for part in parts) - self._floor
                    self.echo = bool(rise >= self.echo_db)
                    logger.debug("echo path: %s (microphone %.1f dB over its floor)", self.echo, rise)
            return
        self._quiet_frames += 1
        if self._quiet_frames >= self.new_utterance_frames:
            self._powers.clear()
        # the floor follows the quietest frames at once and creeps up 2 dB a second (minimum statistics)
        level = 10 * float(np.log10(power))
        self._floor = level if self._floor is None else min(level, self._floor + 0.02)


def _dbfs(samples: np.ndarray) -> float:
    return 10 * float(np.log10(np.mean(samples.astype(np.float64) ** 2) + 1e-10))


class _FarEndTimeline:
    """The agent's audio placed on the caller's sample timeline (16 kHz), read back frame by frame."""

    def __init__(self) -> None:
        self._chunks: deque[tuple[int, np.ndarray]] = deque()
        self._write = 0

    def drop_after(self, caller_position: int) -> None:
        """Forget what was to play from `caller_position` on (the door dropped it)."""
        kept: deque[tuple[int, np.ndarray]] = deque()
        for start, chunk in self._chunks:
            if start < caller_position:
                kept.append((start, chunk[: caller_position - start]))
        self._chunks = kept
        self._write = min(self._write, caller_position)

    def write(self, samples: np.ndarray, caller_position: int) -> None:
        """Audio sent when the caller's stream had reached `caller_position`: it plays from there, or after what was
        sent before it if that still plays."""
        if samples.size:
            start = max(self._write, caller_position)
            self._chunks.append((start, samples))
            self._write = start + samples.size

    def read(self, start: int, count: int) -> np.ndarray:
        """Samples [start, start + count) (silence where nothing plays); older audio is forgotten."""
        out = np.zeros(count, np.float32)
        end = start + count
        while self._chunks and self._chunks[0][0] + self._chunks[0][1].size <= start:
            self._chunks.popleft()
        for chunk_start, chunk in self._chunks:
            if chunk_start >= end:
                break
            low, high = max(start, chunk_start), min(end, chunk_start + chunk.size)
            out[low - start : high - start] = chunk[low - chunk_start : high - chunk_start]
        return out


class ApmCleaner:
    """One caller's WebRTC audio processing module, run on the shared thread (see the module docstring)."""

    result_timeout_s = 2.0

    def __init__(self, settings: CleanupSettings) -> None:
        from livekit import rtc  # the native library loads on first use, not when omnivox is imported

        self._rtc = rtc
        self.settings = settings
        self._apm = self._module(settings.echo_cancellation)
        self._plain = self._module(False) if settings.echo_cancellation and settings.noise_reduction else None
        """Noise reduction without AEC, for an echo-free line."""
        self.echo_path = EchoPathDetector()
        self._worker = _Worker.get()
        self._done = threading.Condition()
        self._results: list[np.ndarray] = []
        self._submitted = self._completed = 0
        self._settle_waiters: list[asyncio.Future[None]] = []
        # worker-side state
        self._near_pending = np.zeros(0, np.float32)
        self._position = 0
        """Caller samples received so far, on the shared timeline (gaps in the stream skipped over)."""
        self._processed = 0
        """Timeline position of the next caller frame to process."""
        self._origin: float | None = None
        self._far = _FarEndTimeline()
        self._far_resampler: StreamResampler | None = None

    def _module(self, echo_cancellation: bool) -> object:
        return self._rtc.AudioProcessingModule(
            echo_cancellation=echo_cancellation,
            noise_suppression=self.settings.noise_reduction is not None,
            high_pass_filter=True,
            auto_gain_control=self.settings.noise_reduction == "far_field",
        )

    # ------------------------------------------------------------ the session core's side

    def process(self, pcm: np.ndarray, now: float) -> np.ndarray:
        samples = np.array(pcm, dtype=np.float32)
        self._submit(lambda: self._process_near(samples, now))
        return self._take_results()

    def take(self) -> np.ndarray:
        return self._take_results()

    def flush(self) -> np.ndarray:
        self._submit(self._process_rest)
        self.wait()
        return self._take_results()

    def far_end(self, pcm: np.ndarray, rate: int, now: float) -> None:
        if self.settings.echo_cancellation:
            samples = np.array(pcm, dtype=np.float32)
            self._worker.submit(lambda: self._add_far_end(samples, rate, now))

    def far_end_dropped(self) -> None:
        if self.settings.echo_cancellation:
            self._worker.submit(lambda: self._far.drop_after(self._position))

    @property
    def echo_suspected(self) -> bool:
        return self.settings.echo_cancellation and self.echo_path.echo

    # ------------------------------------------------------------ the shell's side

    @property
    def pending(self) -> bool:
        return self._completed < self._submitted

    async def settle(self) -> None:
        """Wait, without blocking the event loop, until every chunk handed over is cleaned (at most
        `result_timeout_s`)."""
        with self._done:
            if self._completed >= self._submitted:
                return
            future = asyncio.get_running_loop().create_future()
            self._settle_waiters.append(future)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.result_timeout_s):
                await future

    def wait(self, timeout: float | None = None) -> bool:
        with self._done:
            return self._done.wait_for(lambda: self._completed >= self._submitted, timeout or self.result_timeout_s)

    # ------------------------------------------------------------ internals

    def _submit(self, job: Callable[[], np.ndarray]) -> None:
        with self._done:
            self._submitted += 1

        def run() -> None:
            try:
                result = job()
            except Exception:
                logger.exception("cleaning caller audio failed; passing it through")
                result = np.zeros(0, np.float32)
            self._complete(result)

        self._worker.submit(run)

    def _complete(self, result: np.ndarray) -> None:
        with self._done:
            if result.size:
                self._results.append(result)
            self._completed += 1
            self._done.notify_all()
            if self._completed >= self._submitted:
                for future in self._settle_waiters:
                    with contextlib.suppress(RuntimeError):
                        future.get_loop().call_soon_threadsafe(_resolve, future)
                self._settle_waiters.clear()

    def _take_results(self) -> np.ndarray:
        with self._done:
            results, self._results = self._results, []
        if not results:
            return np.zeros(0, np.float32)
        return results[0] if len(results) == 1 else np.concatenate(results)

    def _process_near(self, samples: np.ndarray, now: float) -> np.ndarray:
        if self._origin is None:
            self._origin = now - samples.size / INPUT_RATE
        on_clock = int((now - self._origin) * INPUT_RATE) - samples.size
        if on_clock - self._position > STREAM_GAP_S * INPUT_RATE:
            skipped = on_clock - self._position
            self._position += skipped
            self._processed += skipped
        self._position += samples.size
        pending = np.concatenate((self._near_pending, samples)) if self._near_pending.size else samples
        whole = pending.size - pending.size % FRAME_SAMPLES
        self._near_pending = pending[whole:]
        return self._run_frames(pending[:whole])

    def _process_rest(self) -> np.ndarray:
        """The last partial frame, zero-padded through the module and cut back to its length."""
        rest = self._near_pending
        self._near_pending = np.zeros(0, np.float32)
        if not rest.size:
            return rest
        padded = np.concatenate((rest, np.zeros(FRAME_SAMPLES - rest.size, np.float32)))
        cleaned = self._run_frames(padded)[: rest.size]
        self._processed -= FRAME_SAMPLES - rest.size
        return cleaned

    def _run_frames(self, samples: np.ndarray) -> np.ndarray:
        """10 ms frames through the module; on a line judged echo-free AEC3 is skipped (it would only cost CPU and
        mute the caller while the agent talks), so only noise reduction, if asked for, touches the audio."""
        out = samples.copy()
        for start in range(0, samples.size, FRAME_SAMPLES):
            raw = samples[start : start + FRAME_SAMPLES]
            module = self._apm
            if self.settings.echo_cancellation:
                reference = self._far.read(self._processed, FRAME_SAMPLES)
                self.echo_path.update(raw, reference)
                if self.echo_path.echo:
                    self._apm.process_reverse_stream(self._frame(reference))
                    self._apm.set_stream_delay_ms(0)
                else:
                    module = self._plain
            self._processed += FRAME_SAMPLES
            if module is None:
                continue
            frame = self._frame(raw)
            module.process_stream(frame)
            out[start : start + FRAME_SAMPLES] = np.frombuffer(frame.data, np.int16) / 32768.0
        return out

    def _frame(self, samples: np.ndarray) -> Any:
        pcm = np.clip(np.rint(samples * 32768.0), -32768, 32767).astype(np.int16)
        return self._rtc.AudioFrame(pcm.tobytes(), INPUT_RATE, 1, FRAME_SAMPLES)

    def _add_far_end(self, samples: np.ndarray, rate: int, now: float) -> None:
        if self._far_resampler is None or self._far_resampler.in_rate != rate:
            self._far_resampler = StreamResampler(rate, INPUT_RATE)
        on_clock = self._position if self._origin is None else int((now - self._origin) * INPUT_RATE)
        self._far.write(self._far_resampler.process(samples), max(on_clock, self._position))


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def load_audio_processing() -> None:
    """Load WebRTC's audio processing library and start its runtime (a few hundred ms, more on a busy machine): at
    start-up, not on the event loop when a session's first caller audio asks for a cleaner."""
    ApmCleaner(CleanupSettings(echo_cancellation=True, noise_reduction="near_field"))


def create_cleaner(settings: CleanupSettings) -> CallerAudioCleaner | None:
    """The cleaner a session's settings ask for, or None when they ask for nothing (the audio passes untouched)."""
    return ApmCleaner(settings) if settings.active else None
