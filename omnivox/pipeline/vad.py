"""Voice activity detection: silero-vad (default, ONNX on CPU) and webrtcvad (light), behind one interface.

Both work on fixed-size frames of 16 kHz mono float32 and keep their streaming state per instance, so one
instance belongs to one session. The silero model is loaded once per process and shared by every instance:
a new session costs two small arrays, not a model load.
"""

from __future__ import annotations

import importlib.resources
import logging
import threading
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
    """Make a fresh per-session detector of `kind` ("silero" or "webrtc")."""
    if kind == "silero":
        return SileroVad()
    if kind == "webrtc":
        return WebRtcVad()
    raise ValueError(f"unknown VAD kind {kind!r}; expected one of {VAD_KINDS}")
