"""CPU cost of voice activity detection per session, and the sessions one core could listen to.

Feeds a realistic caller stream (espeak-ng sentences separated by pauses, over faint background noise) to each
detector in 20 ms chunks, as a door does, and measures process CPU time. Also measures the ingest path every
session pays before the VAD (PCM16 24 kHz wire bytes -> float32 -> 16 kHz).

    python benchmarks/vad_cost.py [--seconds 60] [--sessions 4]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np

from omnivox.pipeline.audio import PCM16, Framer, StreamResampler, synthesize_speech
from omnivox.pipeline.vad import VAD_KINDS, VAD_RATE, create_vad

CHUNK_MS = 20
SENTENCES = (
    "Hello, I would like to book a table for two people tonight.",
    "Could you tell me what time the restaurant opens on Sunday?",
    "Actually, make that four people, and we would prefer a quiet corner.",
    "Thank you very much, that is all I needed.",
)


def caller_stream(seconds: float) -> np.ndarray:
    """Sentences and pauses (about half speech) over faint noise, `seconds` long at 16 kHz."""
    rng = np.random.default_rng(0)
    pieces: list[np.ndarray] = []
    total = 0
    index = 0
    while total < seconds * VAD_RATE:
        speech = synthesize_speech(SENTENCES[index % len(SENTENCES)], rate=VAD_RATE)
        pause = np.zeros(int(rng.uniform(1.5, 4.0) * VAD_RATE), dtype=np.float32)
        pieces += [speech, pause]
        total += len(speech) + len(pause)
        index += 1
    stream = np.concatenate(pieces)[: int(seconds * VAD_RATE)]
    return stream + (0.003 * rng.standard_normal(len(stream))).astype(np.float32)


def cpu_seconds(work: Callable[[], None]) -> float:
    start = time.process_time()
    work()
    return time.process_time() - start


def vad_cpu(kind: str, stream: np.ndarray, sessions: int) -> tuple[float, float]:
    """CPU seconds for `sessions` interleaved detectors each hearing `stream`, and their speech fraction."""
    detectors = [create_vad(kind) for _ in range(sessions)]
    framers = [Framer(detector.frame_samples) for detector in detectors]
    chunk = VAD_RATE * CHUNK_MS // 1000
    speech_frames = 0
    total_frames = 0

    def run() -> None:
        nonlocal speech_frames, total_frames
        for start in range(0, len(stream), chunk):
            piece = stream[start : start + chunk]
            for detector, framer in zip(detectors, framers, strict=True):
                for frame in framer.push(piece):
                    speech_frames += detector.probability(frame) > 0.5
                    total_frames += 1

    return cpu_seconds(run), speech_frames / max(total_frames, 1)


def ingest_cpu(stream: np.ndarray, sessions: int) -> float:
    """CPU seconds to decode PCM16 24 kHz wire chunks and resample them to 16 kHz, for `sessions` streams."""
    upsampler = StreamResampler(VAD_RATE, PCM16.rate)
    wire_audio = np.concatenate((upsampler.process(stream), upsampler.flush()))
    wire_chunk = PCM16.rate * CHUNK_MS // 1000
    wire_chunks = [
        PCM16.encode(wire_audio[start : start + wire_chunk]) for start in range(0, len(wire_audio), wire_chunk)
    ]
    resamplers = [StreamResampler(PCM16.rate, VAD_RATE) for _ in range(sessions)]

    def run() -> None:
        for data in wire_chunks:
            for resampler in resamplers:
                resampler.process(PCM16.decode(data))

    return cpu_seconds(run)


def report(label: str, seconds_cpu: float, audio_seconds: float, sessions: int, extra: str = "") -> None:
    chunks = audio_seconds * 1000 / CHUNK_MS * sessions
    micros = seconds_cpu / chunks * 1e6
    per_core = CHUNK_MS * 1000 / micros
    print(f"{label:<28} {micros:8.1f} us CPU per 20 ms per session   ~{per_core:7.0f} sessions per core{extra}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="audio per session")
    parser.add_argument("--sessions", type=int, default=4, help="interleaved sessions (independent state each)")
    args = parser.parse_args()

    stream = caller_stream(args.seconds)
    print(
        f"{args.seconds:.0f} s of 16 kHz caller audio per session, {args.sessions} interleaved sessions, 20 ms chunks"
    )
    for kind in VAD_KINDS:
        create_vad(kind)  # load the shared model outside the measurement
        seconds_cpu, speech_fraction = vad_cpu(kind, stream, args.sessions)
        report(
            f"vad {kind}", seconds_cpu, args.seconds, args.sessions, f"   (speech in {speech_fraction:.0%} of frames)"
        )
    report("ingest pcm16 24k -> 16k", ingest_cpu(stream, args.sessions), args.seconds, args.sessions)


if __name__ == "__main__":
    main()
