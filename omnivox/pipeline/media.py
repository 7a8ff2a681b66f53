"""Client media, audio files and images, treated as hostile bytes: sniffed, checked against what the request declared
and against an allow-list, and decoded with bounded output.

FFmpeg never chooses anything for client bytes. The demuxer (for images, the decoder alone, with no demuxer) is forced
from the sniffed format; no protocol may be opened, so a concat script, a playlist or any other nested input cannot
reach a file or the network; the codec must be on its container's allow-list; and decoding stops as soon as the audio
passes its duration budget, so a small file that expands to hours costs no more memory than the budget. Error
messages are written for the client: FFmpeg's own text (which may name files) only goes to the log.
"""

from __future__ import annotations

import io
import logging
import struct
import wave
from collections.abc import Collection
from dataclasses import dataclass

import av
import numpy as np

from omnivox.pipeline.audio import StreamResampler, pcm16_to_float, resample

log = logging.getLogger(__name__)


class MediaError(ValueError):
    """Client media that is refused; `code` is the machine-readable reason sent with the error."""

    def __init__(self, message: str, code: str = "invalid_media") -> None:
        super().__init__(message)
        self.code = code


# ---------------------------------------------------------------------------------------------- audio files


@dataclass(frozen=True)
class AudioContainer:
    """An accepted audio container: the FFmpeg demuxer forced for it and the decoders allowed inside it."""

    demuxer: str
    codecs: frozenset[str]


AUDIO_CONTAINERS: dict[str, AudioContainer] = {
    "wav": AudioContainer(
        "wav",
        frozenset({"pcm_s16le", "pcm_s24le", "pcm_s32le", "pcm_u8", "pcm_f32le", "pcm_f64le", "pcm_mulaw", "pcm_alaw"}),
    ),
    "mp3": AudioContainer("mp3", frozenset({"mp3float", "mp3"})),
    "flac": AudioContainer("flac", frozenset({"flac"})),
    "ogg": AudioContainer("ogg", frozenset({"opus", "vorbis"})),
    "webm": AudioContainer("webm", frozenset({"opus", "vorbis"})),
}
"""Container name -> how it is opened. Every door accepts a subset of these names."""

AUDIO_NAMES = {
    "wav": "wav",
    "wave": "wav",
    "x-wav": "wav",
    "vnd.wave": "wav",
    "mp3": "mp3",
    "mpeg": "mp3",
    "mpga": "mp3",
    "mpeg3": "mp3",
    "x-mpeg-3": "mp3",
    "flac": "flac",
    "x-flac": "flac",
    "ogg": "ogg",
    "oga": "ogg",
    "opus": "ogg",
    "webm": "webm",
}
"""A format name, MIME subtype or file extension -> the container it names ("opus" is Ogg Opus)."""


@dataclass(frozen=True)
class AudioLimits:
    """Bounds on one decoded audio file."""

    max_seconds: float
    min_rate: int = 8_000
    max_rate: int = 192_000
    max_channels: int = 8


_DEMUXER_OPTIONS = {
    "protocol_whitelist": "none",  # no protocol at all: the bytes come from memory and nothing else may be opened
    "max_streams": "8",
    "probesize": str(1 << 20),
}


def container_of_type(mime: str | None) -> str | None:
    """The container an audio MIME type names; None when it names none (absent, `application/octet-stream`, not
    audio): then the bytes decide. An audio type we do not accept is refused."""
    kind, _, subtype = (mime or "").split(";", 1)[0].strip().lower().partition("/")
    if (kind, subtype) == ("application", "ogg"):
        return "ogg"
    if kind not in ("audio", "video"):
        return None
    if subtype not in AUDIO_NAMES:
        raise MediaError(f"unsupported audio type {kind}/{subtype}", code="unsupported_audio_format")
    return AUDIO_NAMES[subtype]


def container_of_file_name(name: str | None) -> str | None:
    """The container a file name's extension names; None for no extension or one we do not know."""
    stem, dot, extension = (name or "").lower().rpartition(".")
    return AUDIO_NAMES.get(extension) if dot and stem else None


def sniff_audio(data: bytes) -> str | None:
    """The container the bytes really are, from their magic numbers (an ID3v2 tag may precede mp3 and flac)."""
    head = data
    if head[:3] == b"ID3" and len(head) >= 10:
        size = (head[6] & 0x7F) << 21 | (head[7] & 0x7F) << 14 | (head[8] & 0x7F) << 7 | (head[9] & 0x7F)
        head = head[10 + size :]
        if head[:4] == b"fLaC":
            return "flac"
        return "mp3" if _is_mpeg_audio_frame(head) else None
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        return "wav"
    if head[:4] == b"fLaC":
        return "flac"
    if head[:4] == b"OggS":
        return "ogg"
    if head[:4] == b"\x1a\x45\xdf\xa3" and b"webm" in head[:64]:
        return "webm"
    if _is_mpeg_audio_frame(head):
        return "mp3"
    return None


def _is_mpeg_audio_frame(head: bytes) -> bool:
    """An MPEG audio layer III frame header: 11 sync bits, then the layer bits saying III."""
    return len(head) >= 4 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0 and head[1] & 0x06 == 0x02


def check_audio_container(data: bytes, declared: str | None, allowed: Collection[str]) -> str:
    """The sniffed container, refused unless it is allowed here and is the container the request declared (None:
    it declared none)."""
    sniffed = sniff_audio(data)
    names = ", ".join(sorted(allowed))
    if sniffed is None:
        raise MediaError(f"not an audio file this endpoint accepts ({names})", code="unsupported_audio_format")
    if sniffed not in allowed:
        raise MediaError(f"{sniffed} audio is not accepted here; use one of {names}", code="unsupported_audio_format")
    if declared is not None and declared != sniffed:
        message = f"the request declares {declared} audio but the data is {sniffed}"
        raise MediaError(message, code="audio_format_mismatch")
    return sniffed


def decode_audio(
    data: bytes, *, declared: str | None, allowed: Collection[str], limits: AudioLimits, out_rate: int
) -> np.ndarray:
    """A client's audio file -> mono float32 at `out_rate`, decoding at most `limits.max_seconds` of it."""
    return _decode(data, declared, allowed, limits, out_rate)[0]


def decode_audio_native(data: bytes, *, allowed: Collection[str], limits: AudioLimits) -> tuple[np.ndarray, int]:
    """An audio file -> (mono float32, its own rate), for short clips whose rate the caller resamples as a stream
    (an engine host's streamed WAV chunks); the same checks and duration budget as `decode_audio`."""
    return _decode(data, None, allowed, limits, None)


def _decode(
    data: bytes, declared: str | None, allowed: Collection[str], limits: AudioLimits, out_rate: int | None
) -> tuple[np.ndarray, int]:
    name = check_audio_container(data, declared, allowed)
    if name == "wav" and (pcm := _pcm16_wav(data, limits)) is not None:
        samples, rate = pcm
        return (samples, rate) if out_rate is None else (resample(samples, rate, out_rate), out_rate)
    spec = AUDIO_CONTAINERS[name]
    try:
        with av.open(io.BytesIO(data), mode="r", format=spec.demuxer, options=_DEMUXER_OPTIONS) as container:
            if not container.streams.audio:
                raise MediaError(f"the {name} file has no audio stream", code="invalid_audio")
            stream = container.streams.audio[0]
            return _decode_stream(container, stream, name, spec, limits, out_rate)
    except av.FFmpegError as exc:
        log.info("undecodable %s upload of %d bytes: %s", name, len(data), exc)
        raise MediaError(f"cannot decode this {name} file", code="invalid_audio") from None


def _pcm16_wav(data: bytes, limits: AudioLimits) -> tuple[np.ndarray, int] | None:
    """PCM16 WAV, what engine hosts exchange and most clients send, read with the standard library (0.1 ms for 5 s
    instead of 6 ms through FFmpeg) and held to the same bounds; None for any other WAV, left to FFmpeg."""
    try:
        with wave.open(io.BytesIO(data), "rb") as reader:
            if reader.getsampwidth() != 2 or reader.getcomptype() != "NONE":
                return None
            rate, channels = reader.getframerate(), reader.getnchannels()
            budget = int(limits.max_seconds * rate)
            raw = reader.readframes(budget + 1) if _rate_and_channels_fit(rate, channels, limits) else b""
    except (wave.Error, EOFError, struct.error, RuntimeError, ValueError):  # what `wave` raises for broken headers
        return None
    _check_rate_and_channels(rate, channels, limits)
    frames = len(raw) // (2 * channels)
    if frames > budget:
        raise MediaError(f"the audio is longer than {limits.max_seconds:g} s", code="audio_too_long")
    if not frames:
        return None
    samples = pcm16_to_float(raw[: frames * 2 * channels]).reshape(frames, channels)
    return (samples[:, 0] if channels == 1 else samples.mean(axis=1, dtype=np.float32)), rate


def _rate_and_channels_fit(rate: int, channels: int, limits: AudioLimits) -> bool:
    return limits.min_rate <= rate <= limits.max_rate and 1 <= channels <= limits.max_channels


def _check_rate_and_channels(rate: int, channels: int, limits: AudioLimits) -> None:
    if not limits.min_rate <= rate <= limits.max_rate:
        raise MediaError(
            f"a sample rate of {rate} Hz is outside {limits.min_rate}-{limits.max_rate} Hz", code="invalid_audio"
        )
    if not 1 <= channels <= limits.max_channels:
        raise MediaError(f"audio with {channels} channels is not accepted", code="invalid_audio")


def _decode_stream(
    container: av.container.InputContainer,
    stream: av.AudioStream,
    name: str,
    spec: AudioContainer,
    limits: AudioLimits,
    out_rate: int | None,
) -> tuple[np.ndarray, int]:
    codec = stream.codec_context.name
    if codec not in spec.codecs:
        raise MediaError(f"{codec} audio in {name} is not accepted", code="unsupported_audio_format")
    rate = stream.codec_context.sample_rate or stream.rate
    _check_rate_and_channels(rate, stream.codec_context.channels, limits)
    budget = int(limits.max_seconds * rate)
    to_mono = av.AudioResampler(format="flt", layout="mono", rate=rate)
    resampler = StreamResampler(rate, out_rate) if out_rate is not None else None
    pieces: list[np.ndarray] = []
    decoded = 0

    def take(frames: list[av.AudioFrame]) -> None:
        for frame in frames:
            samples = frame.to_ndarray().reshape(-1)
            if not np.isfinite(samples).all():
                raise MediaError("the audio holds samples that are not finite numbers", code="invalid_audio")
            pieces.append(resampler.process(samples) if resampler is not None else samples)

    for frame in container.decode(stream):
        if frame.sample_rate != rate:
            raise MediaError("the audio changes its sample rate midway", code="invalid_audio")
        decoded += frame.samples
        if decoded > budget:  # stop here: the rest is never decoded
            raise MediaError(f"the audio is longer than {limits.max_seconds:g} s", code="audio_too_long")
        take(to_mono.resample(frame))
    take(to_mono.resample(None))
    if resampler is not None:
        pieces.append(resampler.flush())
    if not decoded:
        raise MediaError(f"the {name} file holds no audio samples", code="invalid_audio")
    return np.concatenate(pieces).astype(np.float32, copy=False), out_rate or rate


# ---------------------------------------------------------------------------------------------- images

IMAGE_DECODERS = {"png": "png", "jpeg": "mjpeg", "webp": "webp", "gif": "gif"}
"""Accepted image format -> the FFmpeg decoder that reads it (no demuxer is involved)."""

_IMAGE_TYPES = {"png": "png", "jpeg": "jpeg", "jpg": "jpeg", "pjpeg": "jpeg", "webp": "webp", "gif": "gif"}


@dataclass(frozen=True)
class ImageLimits:
    """Bounds on images, checked on their headers before anything is decoded: bytes and pixels of one image, and
    how many one request (or one conversation item) may hold."""

    max_bytes: int = 10 * 1024 * 1024
    max_pixels: int = 16 * 1024 * 1024
    max_count: int = 8


@dataclass(frozen=True)
class ImageInfo:
    format: str
    width: int
    height: int

    @property
    def mime_type(self) -> str:
        return f"image/{self.format}"


def check_image(data: bytes, declared_mime: str | None, limits: ImageLimits) -> ImageInfo:
    """Size, format (sniffed, and the same as declared) and dimensions (read from the header) of a client image."""
    if len(data) > limits.max_bytes:
        raise MediaError(f"the image is larger than {limits.max_bytes} bytes", code="image_too_large")
    info = read_image_header(data)
    declared = (declared_mime or "").split(";", 1)[0].strip().lower()
    if declared not in ("", "application/octet-stream"):
        kind, _, subtype = declared.partition("/")
        if kind != "image" or _IMAGE_TYPES.get(subtype) is None:
            raise MediaError(f"unsupported image type {declared!r}", code="unsupported_image_format")
        if _IMAGE_TYPES[subtype] != info.format:
            raise MediaError(
                f"the request declares {declared} but the data is {info.mime_type}", code="image_format_mismatch"
            )
    if info.width < 1 or info.height < 1:
        raise MediaError("the image header declares no pixels", code="invalid_image")
    if info.width * info.height > limits.max_pixels:
        raise MediaError(
            f"an image of {info.width}x{info.height} pixels is over the {limits.max_pixels}-pixel limit",
            code="image_too_large",
        )
    return info


def read_image_header(data: bytes) -> ImageInfo:
    """Format and dimensions of a PNG, JPEG, WebP or GIF from its header alone."""
    try:
        if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR":
            width, height = struct.unpack(">II", data[16:24])
            return ImageInfo("png", width, height)
        if data[:6] in (b"GIF87a", b"GIF89a"):
            width, height = struct.unpack("<HH", data[6:10])
            return ImageInfo("gif", width, height)
        if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
            return _webp_header(data)
        if data[:3] == b"\xff\xd8\xff":
            return _jpeg_header(data)
    except struct.error:
        pass
    raise MediaError("not a PNG, JPEG, WebP or GIF image (or its header is cut short)", code="unsupported_image_format")


def _webp_header(data: bytes) -> ImageInfo:
    chunk = data[12:16]
    if chunk == b"VP8 " and data[23:26] == b"\x9d\x01\x2a":
        width, height = struct.unpack("<HH", data[26:30])
        return ImageInfo("webp", width & 0x3FFF, height & 0x3FFF)
    if chunk == b"VP8L" and data[20] == 0x2F:
        bits = int.from_bytes(data[21:25], "little")
        return ImageInfo("webp", (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1)
    if chunk == b"VP8X":
        return ImageInfo("webp", int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1)
    raise struct.error("unknown WebP chunk")


_JPEG_FRAME_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def _jpeg_header(data: bytes) -> ImageInfo:
    """The first start-of-frame segment's dimensions, walking the marker segments that precede it."""
    position = 2
    while position + 4 <= len(data):
        if data[position] != 0xFF:
            break
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        (length,) = struct.unpack(">H", data[position + 2 : position + 4])
        if marker in _JPEG_FRAME_MARKERS:
            height, width = struct.unpack(">HH", data[position + 5 : position + 9])
            return ImageInfo("jpeg", width, height)
        position += 2 + length
    raise struct.error("no JPEG frame header")


_DECODE_MARGIN = 128


def decode_image(data: bytes) -> np.ndarray:
    """Image bytes -> `[H, W, 3]` uint8 RGB, with the decoder of the sniffed format alone (no demuxer, so nothing
    can be opened) and bounded to the pixels its header declares, so the decoder never allocates more than that."""
    info = read_image_header(data)
    context = av.CodecContext.create(IMAGE_DECODERS[info.format], "r")
    # FFmpeg checks its buffers' padded size (width aligned to 64, and more for some codecs), hence the margin
    context.options = {"max_pixels": str((info.width + _DECODE_MARGIN) * (info.height + _DECODE_MARGIN))}
    try:
        frames = [*context.decode(av.Packet(data)), *context.decode(None)]
    except (av.FFmpegError, ValueError) as exc:
        log.info("undecodable %s image of %d bytes: %s", info.format, len(data), exc)
        raise MediaError(f"cannot decode this {info.format} image", code="invalid_image") from None
    if not frames:
        raise MediaError(f"cannot decode this {info.format} image", code="invalid_image")
    return frames[0].to_ndarray(format="rgb24")
