"""The end-of-turn model behind `semantic_vad`: Smart Turn v3.2 (ONNX, BSD-2-Clause, by Daily), batched across
sessions on its own thread.

After a short silence the session core asks whether the caller's turn is complete (`PredictEndOfTurn`); the shell
hands the turn's audio to `EndOfTurnBatcher.predict` and feeds the probability back (`EndOfTurnPredicted`). The model
reads the last 8 s of 16 kHz audio as Whisper log-mel features (80 bins, with the mel filters of the transformers
`WhisperFeatureExtractor` the Qwen engines use, computed in one vectorised numpy pass: the extractor itself takes
30-130 ms of CPU for 8 s here, this 3 ms, same numbers) and answers P(turn complete): prosody and words, not
silence.

The ONNX file ships inside the `pipecat-ai` wheel (`pipecat/audio/turn/smart_turn/data/`); it is read from the
installed distribution without importing pipecat. `turn_detection.smart_turn_model` (config) points at another copy.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import importlib.metadata
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Protocol

import numpy as np
import onnxruntime

from omnivox.pipeline.engines.base import INPUT_RATE

logger = logging.getLogger(__name__)

WINDOW_SAMPLES = 8 * INPUT_RATE
"""The model sees the last 8 s of the turn (zero-padded in front when shorter)."""
TRAILING_SILENCE_SAMPLES = INPUT_RATE // 5
"""The model is trained on turns followed by ~200 ms of silence; the caller's speech up to the start of its silence
gets that silence appended, so the model can answer before the silence has really lasted that long."""
MEL_BINS = 80
SMART_TURN_DISTRIBUTION = "pipecat-ai"
SMART_TURN_DATA = "pipecat/audio/turn/smart_turn/data"
SMART_TURN_FILE = "smart-turn-v3.2-cpu.onnx"


class ModelNotFound(RuntimeError):
    """The Smart Turn ONNX file is not installed (or the configured path does not exist)."""


def smart_turn_model_path(configured: str | None = None) -> Path:
    """The configured file, else the one shipped in the installed `pipecat-ai` distribution."""
    if configured:
        path = Path(configured)
        if not path.is_file():
            raise ModelNotFound(f"Smart Turn model {path} does not exist")
        return path
    try:
        distribution = importlib.metadata.distribution(SMART_TURN_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise ModelNotFound(
            f"semantic_vad needs the Smart Turn ONNX model from the '{SMART_TURN_DISTRIBUTION}' package "
            f"(pip install {SMART_TURN_DISTRIBUTION}) or turn_detection.smart_turn_model set to its path"
        ) from None
    path = Path(str(distribution.locate_file(f"{SMART_TURN_DATA}/{SMART_TURN_FILE}")))
    if not path.is_file():
        raise ModelNotFound(f"{SMART_TURN_DISTRIBUTION} {distribution.version} has no {path}")
    return path


class EndOfTurnPredictor(Protocol):
    """What the shell needs: P(turn complete) for the audio of a turn so far."""

    async def predict(self, audio: np.ndarray) -> float: ...


class SmartTurnModel:
    """One onnxruntime session and feature extractor; `probabilities` takes a batch of turns."""

    def __init__(self, path: Path) -> None:
        from transformers import WhisperFeatureExtractor  # heavy import, paid once when the model loads

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        self._session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        extractor = WhisperFeatureExtractor(feature_size=MEL_BINS, sampling_rate=INPUT_RATE)
        self._mel_filters = np.asarray(extractor.mel_filters, dtype=np.float32)
        self._n_fft, self._hop = extractor.n_fft, extractor.hop_length
        self._window = np.hanning(self._n_fft + 1)[:-1].astype(np.float32)
        logger.info("loaded Smart Turn end-of-turn model from %s", path)

    @staticmethod
    def window(audio: np.ndarray) -> np.ndarray:
        """The last 8 s of `audio` followed by the trailing silence, zero-padded in front to exactly 8 s."""
        speech = np.asarray(audio, dtype=np.float32)[-(WINDOW_SAMPLES - TRAILING_SILENCE_SAMPLES) :]
        return np.pad(speech, (WINDOW_SAMPLES - TRAILING_SILENCE_SAMPLES - speech.size, TRAILING_SILENCE_SAMPLES))

    def features(self, audio: np.ndarray) -> np.ndarray:
        """Whisper log-mel (80 x 800) of the 8 s window, the audio normalised to zero mean and unit variance: what
        `WhisperFeatureExtractor(feature_size=80)(window, do_normalize=True)` returns."""
        samples = self.window(audio).astype(np.float64)
        samples = ((samples - samples.mean()) / np.sqrt(samples.var() + 1e-7)).astype(np.float32)
        half = self._n_fft // 2
        padded = np.pad(samples, (half, half), mode="reflect")
        frames = np.lib.stride_tricks.sliding_window_view(padded, self._n_fft)[:: self._hop][:-1]
        power = np.abs(np.fft.rfft(frames * self._window, axis=1)) ** 2
        log_mel = np.log10(np.maximum(power.astype(np.float32) @ self._mel_filters, 1e-10)).T
        log_mel = np.maximum(log_mel, log_mel.max() - 8.0)
        return ((log_mel + 4.0) / 4.0).astype(np.float32)

    def probabilities(self, turns: list[np.ndarray]) -> np.ndarray:
        batch = np.stack([self.features(turn) for turn in turns])
        return np.asarray(self._session.run(None, {"input_features": batch})[0], dtype=np.float32).reshape(-1)


@dataclass
class _Request:
    audio: np.ndarray
    future: asyncio.Future[float]


class EndOfTurnBatcher:
    """Runs the model for every session of the process on one thread, all waiting turns in one batch.

    onnxruntime and numpy release the GIL, so the event loop keeps serving while a batch runs. Requests are rare (one
    per pause of each caller), so a batch takes whatever is waiting when the thread wakes, after `gather_s` at most.
    """

    max_batch = 16
    gather_s = 0.002
    _instance: ClassVar[EndOfTurnBatcher | None] = None
    _instance_lock = threading.Lock()

    def __init__(self, model_path: str | None = None) -> None:
        self._model_path = model_path
        self._model: SmartTurnModel | None = None
        self._waiting: list[_Request] = []
        self._wake = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="omnivox-end-of-turn", daemon=True)
        self._thread.start()
        atexit.register(self.close)

    @classmethod
    def get(cls) -> EndOfTurnBatcher:
        """The process-wide batcher (its model: the configured file, else the one shipped in pipecat-ai)."""
        with cls._instance_lock:
            if cls._instance is None:
                cls._instance = cls(None)
            return cls._instance

    @classmethod
    def configure(cls, model_path: str | None) -> EndOfTurnBatcher:
        """Make the process-wide batcher use `model_path` (start-up, before any session asks)."""
        with cls._instance_lock:
            if cls._instance is None or cls._instance._model_path != model_path:
                cls._instance = cls(model_path)
            return cls._instance

    def load(self) -> SmartTurnModel:
        """Load the model now (start-up warms it here, not on the first caller's pause); raises ModelNotFound."""
        if self._model is None:
            self._model = SmartTurnModel(smart_turn_model_path(self._model_path))
        return self._model

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join(timeout=5)

    async def predict(self, audio: np.ndarray) -> float:
        """P(the turn is complete) for the turn's 16 kHz audio up to the start of the caller's silence."""
        future: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        with self._wake:
            if self._closed:
                raise RuntimeError("the end-of-turn batcher is closed")
            self._waiting.append(_Request(np.array(audio[-WINDOW_SAMPLES:], dtype=np.float32), future))
            self._wake.notify()
        return await future

    def _next_batch(self) -> list[_Request] | None:
        with self._wake:
            while not self._waiting and not self._closed:
                self._wake.wait()
            if self._closed:
                return None
        time.sleep(self.gather_s)
        with self._wake:
            waiting = [request for request in self._waiting if not request.future.done()]  # superseded: skipped
            batch, self._waiting = waiting[: self.max_batch], waiting[self.max_batch :]
            return batch

    def _run(self) -> None:
        while (batch := self._next_batch()) is not None:
            if not batch:
                continue
            try:
                probabilities = self.load().probabilities([request.audio for request in batch])
            except Exception as exc:
                logger.exception("end-of-turn batch of %d failed", len(batch))
                for request in batch:
                    _settle(request.future, exc)
                continue
            for request, probability in zip(batch, probabilities, strict=True):
                _settle(request.future, float(probability))


def _settle(future: asyncio.Future[float], result: float | BaseException) -> None:
    def resolve() -> None:
        if future.done():
            return
        if isinstance(result, BaseException):
            future.set_exception(result)
        else:
            future.set_result(result)

    with contextlib.suppress(RuntimeError):  # the waiter's loop is closed: nobody waits any more
        future.get_loop().call_soon_threadsafe(resolve)
