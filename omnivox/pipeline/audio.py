"""Audio plumbing: sample conversions, streaming resampling, G.711, framing, formats and files.

Everything inside omnivox is mono float32 in [-1, 1]; the doors convert at the edges with these helpers.
G.711 is implemented with numpy (no `audioop`, which is gone in Python 3.13) and bit-exact to ITU-T G.711.
"""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
import struct
import subprocess
import wave
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import soxr

logger = logging.getLogger(__name__)

_PCM16_SCALE = 32768.0

# ---------------------------------------------------------------------------------------------- PCM16 <-> float


def pcm16_to_float(data: bytes) -> np.ndarray:
    """Little-endian signed 16-bit PCM -> float32 in [-1, 1)."""
    if len(data) % 2:
        raise ValueError(f"PCM16 audio must have an even number of bytes, got {len(data)}")
    samples = np.frombuffer(data, dtype="<i2").astype(np.float32)
    samples /= _PCM16_SCALE
    return samples


def _float_to_int16(samples: np.ndarray) -> np.ndarray:
    """Float in [-1, 1] -> int16, rounding and clipping (so out-of-range input saturates instead of wrapping)."""
    scaled = np.rint(np.asarray(samples, dtype=np.float32) * _PCM16_SCALE)
    return np.clip(scaled, -32768, 32767).astype(np.int16)


def float_to_pcm16(samples: np.ndarray) -> bytes:
    """Float samples -> little-endian signed 16-bit PCM, clipped to the int16 range."""
    return _float_to_int16(samples).astype("<i2").tobytes()


# ---------------------------------------------------------------------------------------------- resampling

_STREAM_QUALITY = "MQ"
"""soxr's 16-bit-precision filter: enough for int16 and G.711 wire audio, with a delay of at most 36 ms between any
two of 8/16/24/48 kHz (HQ holds back 66 ms going 8 -> 16 kHz, which a caller's barge-in would wait for)."""


class StreamResampler:
    """Resamples a mono float32 stream chunk by chunk, keeping filter state across chunks (no clicks at joins)."""

    def __init__(self, in_rate: int, out_rate: int) -> None:
        if in_rate <= 0 or out_rate <= 0:
            raise ValueError(f"sample rates must be positive, got {in_rate} -> {out_rate}")
        self.in_rate = in_rate
        self.out_rate = out_rate
        self._stream = (
            None
            if in_rate == out_rate
            else soxr.ResampleStream(in_rate, out_rate, 1, dtype="float32", quality=_STREAM_QUALITY)
        )

    def process(self, samples: np.ndarray) -> np.ndarray:
        """Resample the next chunk; the output lags the input by the filter delay until `flush`."""
        chunk = np.ascontiguousarray(samples, dtype=np.float32)
        if self._stream is None:
            return chunk
        return self._stream.resample_chunk(chunk)

    def flush(self) -> np.ndarray:
        """Return the samples still held in the filter at the end of the stream."""
        if self._stream is None:
            return np.zeros(0, dtype=np.float32)
        return self._stream.resample_chunk(np.zeros(0, dtype=np.float32), last=True)


def resample(samples: np.ndarray, in_rate: int, out_rate: int) -> np.ndarray:
    """Resample a whole signal at once (for files and synthesised speech, not for streams)."""
    signal = np.ascontiguousarray(samples, dtype=np.float32)
    if in_rate == out_rate:
        return signal
    return soxr.resample(signal, in_rate, out_rate).astype(np.float32, copy=False)


# ---------------------------------------------------------------------------------------------- G.711

_MULAW_SEGMENT_ENDS = np.array([0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF], dtype=np.int32)
_ALAW_SEGMENT_ENDS = np.array([0x1F, 0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF], dtype=np.int32)
_MULAW_BIAS = 0x21  # 0x84 in 16-bit terms, on the 14-bit magnitude
_MULAW_CLIP = 8159


def _mulaw_code_to_linear(code: int) -> int:
    """Decode one mu-law byte to 16-bit linear (ITU-T G.711)."""
    inverted = ~code & 0xFF
    magnitude = (((inverted & 0x0F) << 3) + 0x84) << ((inverted & 0x70) >> 4)
    return 0x84 - magnitude if inverted & 0x80 else magnitude - 0x84


def _alaw_code_to_linear(code: int) -> int:
    """Decode one A-law byte to 16-bit linear (ITU-T G.711)."""
    toggled = code ^ 0x55
    segment = (toggled & 0x70) >> 4
    magnitude = (toggled & 0x0F) << 4
    magnitude += 8 if segment == 0 else 0x108
    if segment > 1:
        magnitude <<= segment - 1
    return magnitude if toggled & 0x80 else -magnitude


_MULAW_TABLE = np.array([_mulaw_code_to_linear(code) for code in range(256)], dtype=np.int16)
_ALAW_TABLE = np.array([_alaw_code_to_linear(code) for code in range(256)], dtype=np.int16)


def mulaw_encode(samples: np.ndarray) -> bytes:
    """Float samples -> G.711 mu-law bytes (one byte per sample)."""
    pcm14 = _float_to_int16(samples).astype(np.int32) >> 2
    negative = pcm14 < 0
    magnitude = np.minimum(np.where(negative, -pcm14, pcm14), _MULAW_CLIP) + _MULAW_BIAS
    segment = np.searchsorted(_MULAW_SEGMENT_ENDS, magnitude, side="left")
    code = np.where(segment >= 8, 0x7F, (np.minimum(segment, 7) << 4) | ((magnitude >> (segment + 1)) & 0x0F))
    mask = np.where(negative, 0x7F, 0xFF)
    return (code ^ mask).astype(np.uint8).tobytes()


def mulaw_decode(data: bytes) -> np.ndarray:
    """G.711 mu-law bytes -> float32 samples."""
    return _MULAW_TABLE[np.frombuffer(data, dtype=np.uint8)].astype(np.float32) / _PCM16_SCALE


def alaw_encode(samples: np.ndarray) -> bytes:
    """Float samples -> G.711 A-law bytes (one byte per sample)."""
    pcm13 = _float_to_int16(samples).astype(np.int32) >> 3
    negative = pcm13 < 0
    magnitude = np.where(negative, -pcm13 - 1, pcm13)
    segment = np.searchsorted(_ALAW_SEGMENT_ENDS, magnitude, side="left")
    shift = np.where(segment < 2, 1, segment)
    code = np.where(segment >= 8, 0x7F, (np.minimum(segment, 7) << 4) | ((magnitude >> shift) & 0x0F))
    mask = np.where(negative, 0x55, 0xD5)
    return (code ^ mask).astype(np.uint8).tobytes()


def alaw_decode(data: bytes) -> np.ndarray:
    """G.711 A-law bytes -> float32 samples."""
    return _ALAW_TABLE[np.frombuffer(data, dtype=np.uint8)].astype(np.float32) / _PCM16_SCALE


# ---------------------------------------------------------------------------------------------- framing


class Framer:
    """Cuts a stream of arbitrary-length chunks into frames of exactly `frame_samples`, carrying the remainder over.

    Samples are copied once, into the frame being filled: a caller's chunk is usually shorter than a frame, so
    joining it to the remainder and cutting again would copy every sample twice per chunk."""

    def __init__(self, frame_samples: int) -> None:
        if frame_samples <= 0:
            raise ValueError(f"frame_samples must be positive, got {frame_samples}")
        self.frame_samples = frame_samples
        self._frame = np.empty(frame_samples, dtype=np.float32)
        self._filled = 0

    @property
    def pending(self) -> int:
        """Samples held back waiting for a full frame."""
        return self._filled

    def push(self, samples: np.ndarray) -> list[np.ndarray]:
        """Add samples; return every complete frame now available, in order."""
        chunk = np.asarray(samples, dtype=np.float32)
        frames: list[np.ndarray] = []
        used = 0
        while (take := self.frame_samples - self._filled) <= len(chunk) - used:
            self._frame[self._filled :] = chunk[used : used + take]
            frames.append(self._frame)
            self._frame, self._filled = np.empty(self.frame_samples, dtype=np.float32), 0
            used += take
        rest = len(chunk) - used
        self._frame[self._filled : self._filled + rest] = chunk[used:]
        self._filled += rest
        return frames

    def flush(self) -> np.ndarray | None:
        """Return the partial frame held back (shorter than a frame), or None when nothing is held."""
        if not self._filled:
            return None
        remainder, self._filled = self._frame[: self._filled].copy(), 0
        return remainder


# ---------------------------------------------------------------------------------------------- wire formats


_WIRE_CODECS: dict[str, tuple[Callable[[np.ndarray], bytes], Callable[[bytes], np.ndarray]]] = {
    "pcm16": (float_to_pcm16, pcm16_to_float),
    "g711_ulaw": (mulaw_encode, mulaw_decode),
    "g711_alaw": (alaw_encode, alaw_decode),
}
"""Wire format name -> (encode, decode)."""


@dataclass(frozen=True)
class AudioFormat:
    """A Realtime wire audio format: how bytes on the wire map to float32 samples at `rate`."""

    name: str
    rate: int
    bytes_per_sample: int

    def __post_init__(self) -> None:
        if self.name not in _WIRE_CODECS:
            raise ValueError(f"unknown wire codec {self.name!r}; expected one of {sorted(_WIRE_CODECS)}")

    def decode(self, data: bytes) -> np.ndarray:
        """Wire bytes -> float32 samples at `rate`."""
        return _WIRE_CODECS[self.name][1](data)

    def encode(self, samples: np.ndarray) -> bytes:
        """Float32 samples at `rate` -> wire bytes."""
        return _WIRE_CODECS[self.name][0](samples)

    def duration_ms(self, nbytes: int) -> float:
        """Milliseconds of audio held in `nbytes` of this format."""
        return nbytes / self.bytes_per_sample / self.rate * 1000.0


PCM16 = AudioFormat("pcm16", 24_000, 2)
G711_ULAW = AudioFormat("g711_ulaw", 8_000, 1)
G711_ALAW = AudioFormat("g711_alaw", 8_000, 1)

_FORMATS_BY_NAME = {
    "pcm16": PCM16,
    "g711_ulaw": G711_ULAW,
    "g711_alaw": G711_ALAW,
    "audio/pcm": PCM16,
    "audio/pcmu": G711_ULAW,
    "audio/pcma": G711_ALAW,
}


def audio_format(name: str) -> AudioFormat:
    """Look up a format by its beta name ("pcm16", "g711_ulaw", "g711_alaw") or GA type ("audio/pcm", ...)."""
    try:
        return _FORMATS_BY_NAME[name]
    except (KeyError, TypeError):
        raise ValueError(f"unsupported audio format {name!r}; expected one of {sorted(_FORMATS_BY_NAME)}") from None


# ---------------------------------------------------------------------------------------------- files


def _to_mono(samples: np.ndarray) -> np.ndarray:
    """Average channels of an (n, channels) array; pass (n,) through."""
    return samples.mean(axis=1, dtype=np.float32) if samples.ndim == 2 else samples


def _wav_bytes_to_float(source: str | Path | io.BytesIO) -> tuple[np.ndarray, int]:
    """Read a PCM16 WAV into mono float32 with the stdlib `wave` module."""
    with wave.open(source if isinstance(source, io.BytesIO) else str(source), "rb") as reader:
        if reader.getsampwidth() != 2:
            raise ValueError(f"only 16-bit WAV is supported, got {8 * reader.getsampwidth()}-bit")
        channels = reader.getnchannels()
        rate = reader.getframerate()
        samples = pcm16_to_float(reader.readframes(reader.getnframes()))
    return _to_mono(samples.reshape(-1, channels)), rate


def read_wav(path: str | Path) -> tuple[np.ndarray, int]:
    """Read a 16-bit WAV file as mono float32 (stereo is downmixed) and its sample rate."""
    return _wav_bytes_to_float(path)


def _write_wav_to(target: str | io.BytesIO, samples: np.ndarray, rate: int, channels: int) -> None:
    data = np.asarray(samples, dtype=np.float32)
    if data.ndim == 2 and data.shape[1] != channels:
        raise ValueError(f"samples have {data.shape[1]} channels but channels={channels}")
    if data.ndim == 1 and channels != 1:
        data = np.repeat(data[:, None], channels, axis=1)
    with wave.open(target, "wb") as writer:
        writer.setnchannels(channels)
        writer.setsampwidth(2)
        writer.setframerate(rate)
        writer.writeframes(float_to_pcm16(data.reshape(-1)))


def write_wav(path: str | Path, samples: np.ndarray, rate: int, channels: int = 1) -> None:
    """Write float samples, shape (n,) or (n, channels), as a 16-bit PCM WAV file."""
    _write_wav_to(str(path), samples, rate, channels)


def decode_audio_file(data: bytes) -> tuple[np.ndarray, int]:
    """Decode a wav/mp3/flac/ogg/opus file held in memory to mono float32 at its native rate.

    PCM16 WAV, what engine hosts exchange every turn, is read with the stdlib (0.13 ms for 5 s of audio instead of
    6 ms through FFmpeg); any other WAV (float, 24-bit, extensible) and every other format go through FFmpeg."""
    if data[:4] == b"RIFF" and data[8:12] == b"WAVE":
        with contextlib.suppress(wave.Error, EOFError, ValueError, struct.error):
            samples, rate = _wav_bytes_to_float(io.BytesIO(data))
            if samples.size:
                return samples, rate
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            if not container.streams.audio:
                raise ValueError("the file has no audio stream")
            stream = container.streams.audio[0]
            rate = stream.codec_context.sample_rate or stream.rate
            to_mono = av.AudioResampler(format="flt", layout="mono", rate=rate)
            pieces = [
                converted.to_ndarray().reshape(-1)
                for frame in container.decode(stream)
                for converted in to_mono.resample(frame)
            ]
            pieces.extend(converted.to_ndarray().reshape(-1) for converted in to_mono.resample(None))
    except (av.error.FFmpegError, StopIteration, IndexError) as exc:
        raise ValueError(f"could not decode audio file ({len(data)} bytes): {exc}") from exc
    if not pieces:
        raise ValueError(f"audio file ({len(data)} bytes) holds no audio samples")
    return np.concatenate(pieces).astype(np.float32, copy=False), rate


_CONTAINER_CODECS = {"mp3": ("mp3", "mp3", None), "flac": ("flac", "flac", None), "opus": ("ogg", "libopus", 48_000)}
"""fmt -> (container, codec, required sample rate or None)."""

ENCODABLE_FORMATS = ("wav", "mp3", "flac", "opus", "pcm16")


def encode_audio_file(samples: np.ndarray, rate: int, fmt: str) -> bytes:
    """Encode mono float32 samples as a whole file: wav, mp3, flac, opus (in Ogg, at 48 kHz) or raw pcm16."""
    if fmt == "pcm16":
        return float_to_pcm16(samples)
    if fmt == "wav":
        buffer = io.BytesIO()
        _write_wav_to(buffer, samples, rate, 1)
        return buffer.getvalue()
    if fmt not in _CONTAINER_CODECS:
        raise ValueError(f"unsupported output audio format {fmt!r}; expected one of {ENCODABLE_FORMATS}")
    container_name, codec, required_rate = _CONTAINER_CODECS[fmt]
    out_rate = required_rate or rate
    pcm = _float_to_int16(resample(samples, rate, out_rate))
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format=container_name) as container:
        stream = container.add_stream(codec, rate=out_rate, layout="mono")
        frame = av.AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = out_rate
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------- speech synthesis


def synthesize_speech(text: str, rate: int = 16_000, voice: str = "en-us", words_per_minute: int = 160) -> np.ndarray:
    """Speak `text` with the espeak-ng binary (offline, a real if robotic voice) as mono float32 at `rate`."""
    binary = shutil.which("espeak-ng")
    if binary is None:
        raise RuntimeError("espeak-ng is not installed; install it with `apt-get install espeak-ng`")
    command = [binary, "--stdout", "-v", voice, "-s", str(words_per_minute), "--", text]
    result = subprocess.run(command, capture_output=True, check=False, timeout=60)
    if result.returncode != 0 or not result.stdout:
        stderr = result.stderr.decode(errors="replace").strip()
        raise RuntimeError(f"espeak-ng failed (exit {result.returncode}, voice {voice!r}): {stderr}")
    samples, native_rate = _wav_bytes_to_float(io.BytesIO(_fix_streamed_wav_sizes(result.stdout)))
    logger.debug("synthesised %d samples at %d Hz for %d characters", len(samples), native_rate, len(text))
    return resample(samples, native_rate, rate)


def _fix_streamed_wav_sizes(data: bytes) -> bytes:
    """espeak-ng writes a WAV to a pipe with placeholder sizes; patch the RIFF and data sizes to the real lengths."""
    data_chunk = data.find(b"data", 12)
    if data.startswith(b"RIFF") and data_chunk >= 0:
        payload = len(data) - data_chunk - 8
        payload -= payload % 2
        return (
            b"RIFF"
            + (data_chunk + payload).to_bytes(4, "little")
            + data[8:data_chunk]
            + b"data"
            + payload.to_bytes(4, "little")
            + data[data_chunk + 8 : data_chunk + 8 + payload]
        )
    return data
