"""CPU time of the Whisper log-mel features of one user turn: padded to 30 s (as the Qwen-Omni processors do) and as
the engines pad it (one FFT window past the turn), on one thread.

    python benchmarks/audio_features.py --seconds 4
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from transformers import WhisperFeatureExtractor

from omnivox.pipeline.engines.base import INPUT_RATE
from omnivox.pipeline.engines.qwen_common import feature_padding


def median_ms(extract: WhisperFeatureExtractor, audio: np.ndarray, padded: int, reps: int) -> float:
    times = []
    for _ in range(reps):
        started = time.perf_counter()
        extract([audio], sampling_rate=INPUT_RATE, padding="max_length", max_length=padded, truncation=False)
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    extract = WhisperFeatureExtractor(feature_size=128, sampling_rate=INPUT_RATE)
    audio = (0.1 * np.random.default_rng(0).standard_normal(int(args.seconds * INPUT_RATE))).astype(np.float32)
    engine_padding = feature_padding(extract, audio.size)
    print(f"{args.seconds:.1f} s turn, median of {args.reps}")
    print(f"padded to 30 s (processor)       {median_ms(extract, audio, 30 * INPUT_RATE, args.reps):7.1f} ms")
    print(f"padded one window past the turn  {median_ms(extract, audio, engine_padding, args.reps):7.1f} ms")


if __name__ == "__main__":
    main()
