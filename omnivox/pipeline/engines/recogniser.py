"""Offline English speech recognition (pocketsphinx) in worker processes.

pocketsphinx decodes while holding the GIL: run in a thread, one caller turn froze the event loop for 0.8-0.9 s,
delaying every session's events and opening gaps in audio already playing. A worker process (spawned, so it shares
no locks with the server's threads) decodes instead; the event loop only waits on a future.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import threading
from concurrent.futures import BrokenExecutor, ProcessPoolExecutor
from typing import Any

import numpy as np

from omnivox.pipeline.audio import float_to_pcm16
from omnivox.pipeline.engines.base import INPUT_RATE

log = logging.getLogger(__name__)

_decoder: Any = None
"""The worker process's pocketsphinx decoder, made on its first job (it loads its English model)."""


def _recognise(pcm16: bytes) -> str:
    """In the worker: 16 kHz PCM16 -> the best hypothesis ("" when nothing was recognised)."""
    global _decoder
    if _decoder is None:
        from pocketsphinx import Decoder

        _decoder = Decoder(samprate=INPUT_RATE, loglevel="FATAL")
    _decoder.start_utt()
    _decoder.process_raw(pcm16, full_utt=True)
    _decoder.end_utt()
    hypothesis = _decoder.hyp()
    return hypothesis.hypstr if hypothesis is not None else ""


class ProcessRecogniser:
    """pocketsphinx in `processes` worker processes, started on first use; jobs beyond them wait in line."""

    def __init__(self, processes: int = 1) -> None:
        if processes < 1:
            raise ValueError("recogniser processes must be >= 1")
        self.processes = processes
        self._pool: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()

    def _executor(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._pool is None:
                context = multiprocessing.get_context("spawn")
                self._pool = ProcessPoolExecutor(self.processes, mp_context=context)
            return self._pool

    async def transcribe(self, audio_16k: np.ndarray) -> str:
        pool = self._executor()
        try:
            return await asyncio.get_running_loop().run_in_executor(pool, _recognise, float_to_pcm16(audio_16k))
        except BrokenExecutor:
            log.warning("the recogniser process died; starting a new one for the next transcription")
            self._forget(pool)
            raise

    def _forget(self, pool: ProcessPoolExecutor) -> None:
        with self._lock:
            if self._pool is pool:
                self._pool = None
        pool.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
