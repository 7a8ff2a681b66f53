"""Audio files encoded as the audio is made: each `push` returns the bytes ready so far, so a client can play a
streamed mp3/opus/flac/wav answer before it is complete. The muxer writes to a sink that cannot seek (a header is
never rewritten at the end), and Ogg pages are flushed every 60 ms instead of every second."""

from __future__ import annotations

import struct

import av
import numpy as np

from omnivox.pipeline.audio import StreamResampler, float_to_pcm16

STREAMED_FORMATS = ("pcm", "wav", "mp3", "opus", "flac")
_CODECS = {"mp3": ("mp3", "mp3", None), "flac": ("flac", "flac", None), "opus": ("ogg", "libopus", 48_000)}
"""format -> (container, codec, required rate or None)."""
_UNKNOWN_SIZE = 0xFFFFFFFF


class _Sink:
    """A write-only, unseekable file for the muxer."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def write(self, data: bytes) -> int:
        self.parts.append(bytes(data))
        return len(data)

    def seekable(self) -> bool:
        return False

    def flush(self) -> None:
        pass

    def take(self) -> bytes:
        data, self.parts = b"".join(self.parts), []
        return data


def streamed_wav_header(rate: int) -> bytes:
    """A 16-bit mono WAV header whose sizes say "unknown" (as OpenAI's streamed wav does)."""
    fmt = struct.pack("<HHIIHH", 1, 1, rate, rate * 2, 2, 16)
    return (
        b"RIFF"
        + struct.pack("<I", _UNKNOWN_SIZE)
        + b"WAVEfmt "
        + struct.pack("<I", 16)
        + fmt
        + b"data"
        + (struct.pack("<I", _UNKNOWN_SIZE))
    )


class StreamingEncoder:
    """Mono float32 at `rate` in, file bytes out as they are ready (`pcm` is raw 16-bit little-endian)."""

    def __init__(self, fmt: str, rate: int) -> None:
        if fmt not in STREAMED_FORMATS:
            raise ValueError(f"unsupported format {fmt!r}; expected one of {', '.join(STREAMED_FORMATS)}")
        self.fmt = fmt
        self._header = streamed_wav_header(rate) if fmt == "wav" else b""
        self._container = None
        if fmt in _CODECS:
            container, codec, required_rate = _CODECS[fmt]
            self.rate = required_rate or rate
            self._sink = _Sink()
            options = {"page_duration": "60000"} if container == "ogg" else {}
            self._container = av.open(self._sink, mode="w", format=container, options=options)
            self._stream = self._container.add_stream(codec, rate=self.rate, layout="mono")
            self._pts = 0
        else:
            self.rate = rate
        self._resampler = StreamResampler(rate, self.rate)

    def push(self, samples: np.ndarray) -> bytes:
        return self._encode(self._resampler.process(samples))

    def finish(self) -> bytes:
        """The rest: the resampler's tail, the encoder's delayed frames and the container's trailer."""
        data = self._encode(self._resampler.flush())
        if self._container is not None:
            for packet in self._stream.encode(None):
                self._container.mux(packet)
            self._container.close()
            data += self._sink.take()
        return data

    def _encode(self, samples: np.ndarray) -> bytes:
        header, self._header = self._header, b""
        if self._container is None:
            return header + float_to_pcm16(samples)
        if samples.size:
            pcm = np.frombuffer(float_to_pcm16(samples), dtype="<i2").reshape(1, -1)
            frame = av.AudioFrame.from_ndarray(pcm, format="s16", layout="mono")
            frame.sample_rate = self.rate
            frame.pts = self._pts
            self._pts += pcm.shape[1]
            for packet in self._stream.encode(frame):
                self._container.mux(packet)
        return self._sink.take()
