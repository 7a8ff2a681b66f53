"""Well-formed hostile media against a real server: files that make FFmpeg read local files, decompression bombs,
formats that lie about themselves, non-finite samples, too many parts and images that expand at decode time."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import struct
import tracemalloc
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import av
import httpx
import numpy as np
import pytest
import websockets

from omnivox.pipeline.audio import encode_audio_file, resample, synthesize_speech
from omnivox.pipeline.engines.base import Delta, ImagePart, ResponseRequest
from omnivox.pipeline.engines.scripted import ScriptedEngine
from omnivox.pipeline.media import ImageLimits, MediaError, check_image, decode_image
from tests.image_fixtures import png_image
from tests.server_helpers import RunningServer, running_server, scripted_config

SECRET = "the vault code is banana"


class RecordingEngine(ScriptedEngine):
    """Transcribes everything as the secret, so a leaked file would show; remembers the requests it answered."""

    def __init__(self) -> None:
        super().__init__(reply="ok", speed=20.0, first_audio_ms=0, transcript=SECRET)
        self.requests: list[ResponseRequest] = []

    def respond(self, request: ResponseRequest) -> AsyncIterator[Delta]:
        self.requests.append(request)
        return super().respond(request)


@pytest.fixture(scope="module")
def engine() -> RecordingEngine:
    return RecordingEngine()


@pytest.fixture(scope="module")
def server(engine: RecordingEngine) -> Iterator[RunningServer]:
    config = scripted_config(media={"max_parts": 3, "max_images": 2, "max_image_pixels": 4096 * 4096})
    with running_server(config, engine) as running:
        yield running


def wav(payload: bytes, *, rate: int = 16_000, channels: int = 1, bits: int = 16, format_tag: int = 1) -> bytes:
    """A WAV file with whatever header fields a client cares to declare."""
    block = channels * bits // 8
    fmt = struct.pack("<HHIIHH", format_tag, channels, rate, rate * block, block, bits)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(payload)) + payload
    return b"RIFF" + struct.pack("<I", len(body)) + body


def speech_wav() -> bytes:
    return encode_audio_file(synthesize_speech("hello", 16_000), 16_000, "wav")


def transcribe(server: RunningServer, data: bytes, filename: str = "upload.wav") -> httpx.Response:
    return httpx.post(
        f"{server.http_url}/v1/audio/transcriptions",
        files={"file": (filename, data)},
        data={"model": "scripted"},
        timeout=60,
    )


def chat(server: RunningServer, *parts: dict[str, Any]) -> httpx.Response:
    body = {"model": "scripted", "messages": [{"role": "user", "content": list(parts)}]}
    return httpx.post(f"{server.http_url}/v1/chat/completions", json=body, timeout=60)


def input_audio(data: bytes, fmt: str = "wav") -> dict[str, Any]:
    return {"type": "input_audio", "input_audio": {"data": base64.b64encode(data).decode(), "format": fmt}}


def image_url(data: bytes, mime: str = "image/png") -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": f"data:{mime};base64,{base64.b64encode(data).decode()}"}}


def assert_refused(response: httpx.Response, code: str) -> None:
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == code, response.text
    assert SECRET not in response.text


# ---------------------------------------------------------------------------------------------- nested inputs


@pytest.mark.parametrize(
    "script",
    [
        b"ffconcat version 1.0\nfile secret.wav\n",
        b"#EXTM3U\n#EXTINF:1,\nsecret.wav\n#EXT-X-ENDLIST\n",
        b"RIFF\x24\x00\x00\x00WAVEffconcat version 1.0\nfile secret.wav\n",
    ],
    ids=["ffconcat", "hls", "ffconcat-behind-riff"],
)
def test_a_script_naming_a_local_file_is_refused_on_every_audio_door(
    server: RunningServer, engine: RecordingEngine, script: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "secret.wav").write_bytes(speech_wav())
    monkeypatch.chdir(tmp_path)
    answered = len(engine.requests)
    assert transcribe(server, script).status_code == 400
    assert chat(server, input_audio(script)).status_code == 400
    url = {"type": "audio_url", "audio_url": {"url": "data:audio/wav;base64," + base64.b64encode(script).decode()}}
    assert chat(server, url).status_code == 400
    assert chat(server, image_url(script)).status_code == 400
    assert len(engine.requests) == answered


def test_the_image_decoder_never_opens_a_nested_input(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The engines decode images themselves: only with the sniffed format's decoder, never a probed demuxer."""
    (tmp_path / "secret.png").write_bytes(png_image(8, 8))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(MediaError):
        decode_image(b"ffconcat version 1.0\nfile secret.png\n")


# ---------------------------------------------------------------------------------------------- bombs


@pytest.fixture(scope="module")
def hour_of_silence_flac() -> bytes:
    """One hour of 8 kHz silence: about 650 kB of FLAC, 115 MB as float32 samples."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="flac") as container:
        stream = container.add_stream("flac", rate=8000, layout="mono")
        silence = np.zeros((1, 8000 * 60), np.int16)
        for minute in range(60):
            frame = av.AudioFrame.from_ndarray(silence, format="s16", layout="mono")
            frame.sample_rate, frame.pts = 8000, minute * silence.shape[1]
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return buffer.getvalue()


def peak_memory_of(request: Any) -> tuple[Any, int]:
    """What `request()` returned and the peak of Python-tracked memory (numpy arrays included) while it ran."""
    tracemalloc.start()
    try:
        result = request()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_flac_of_an_hour_of_silence_stops_decoding_at_the_limit(
    server: RunningServer, hour_of_silence_flac: bytes
) -> None:
    response, peak = peak_memory_of(lambda: transcribe(server, hour_of_silence_flac, "silence.flac"))
    assert_refused(response, "audio_too_long")
    assert "600 s" in response.json()["error"]["message"]
    # 600 s decoded at 16 kHz is 38 MB; the whole hour would be 115 MB at 8 kHz, 230 MB at 16 kHz, plus copies
    assert peak < 100e6, f"peak memory {peak / 1e6:.0f} MB"


def test_a_wav_declaring_1_hz_is_refused_before_resampling(server: RunningServer) -> None:
    tiny_rate = wav(np.zeros(500, np.int16).tobytes(), rate=1)
    response, peak = peak_memory_of(lambda: transcribe(server, tiny_rate))
    assert_refused(response, "invalid_audio")
    assert "1 Hz" in response.json()["error"]["message"]
    assert peak < 10e6, f"peak memory {peak / 1e6:.0f} MB"


def test_audio_with_too_many_channels_is_refused(server: RunningServer) -> None:
    assert_refused(transcribe(server, wav(bytes(2 * 64 * 100), channels=64)), "invalid_audio")


# ---------------------------------------------------------------------------------------------- formats


def webm_opus(samples: np.ndarray, rate: int) -> bytes:
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="webm") as container:
        stream = container.add_stream("libopus", rate=48_000, layout="mono")
        frame = av.AudioFrame.from_ndarray(
            (resample(samples, rate, 48_000) * 32767).astype(np.int16)[None], format="s16", layout="mono"
        )
        frame.sample_rate = 48_000
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            container.mux(packet)
    return buffer.getvalue()


@pytest.mark.parametrize("fmt", ["wav", "mp3", "flac", "opus", "webm"])
def test_every_accepted_container_is_transcribed(server: RunningServer, fmt: str) -> None:
    speech = synthesize_speech("hello", 16_000)
    data = webm_opus(speech, 16_000) if fmt == "webm" else encode_audio_file(speech, 16_000, fmt)
    extension = {"opus": "ogg"}.get(fmt, fmt)
    assert transcribe(server, data, f"speech.{extension}").json() == {"text": SECRET}


def test_the_declared_format_must_be_the_real_one(server: RunningServer) -> None:
    speech = speech_wav()
    assert_refused(chat(server, input_audio(speech, "mp3")), "audio_format_mismatch")
    assert_refused(transcribe(server, speech, "speech.flac"), "audio_format_mismatch")
    url = "data:audio/ogg;base64," + base64.b64encode(speech).decode()
    assert_refused(chat(server, {"type": "audio_url", "audio_url": {"url": url}}), "audio_format_mismatch")
    assert transcribe(server, speech, "speech.wav").json() == {"text": SECRET}
    assert transcribe(server, speech, "blob").json() == {"text": SECRET}  # no declaration: the bytes decide


def test_a_codec_off_the_allow_list_is_refused(server: RunningServer) -> None:
    """WAV can carry any codec FFmpeg knows (here IMA ADPCM); only PCM and G.711 are accepted in it."""
    adpcm = wav(bytes(1024), bits=4, format_tag=0x11)
    assert_refused(transcribe(server, adpcm), "unsupported_audio_format")


def test_non_finite_samples_are_refused(server: RunningServer, engine: RecordingEngine) -> None:
    samples = np.full(16_000, 0.1, np.float32)
    samples[100] = np.nan
    samples[200] = np.inf
    answered = len(engine.requests)
    float_wav = wav(samples.tobytes(), bits=32, format_tag=3)
    assert_refused(chat(server, input_audio(float_wav)), "invalid_audio")
    assert_refused(transcribe(server, float_wav), "invalid_audio")
    assert len(engine.requests) == answered


def test_the_audio_of_all_parts_together_is_bounded() -> None:
    second = encode_audio_file(np.zeros(16_000, np.float32), 16_000, "wav")
    with running_server(scripted_config(media={"max_audio_s": 1.5})) as small:
        assert chat(small, input_audio(second)).status_code == 200
        response = chat(small, input_audio(second), input_audio(second))
    assert_refused(response, "audio_too_long")
    assert "1.5 s in all" in response.json()["error"]["message"]


def test_media_parts_per_request_are_bounded(server: RunningServer) -> None:
    second = encode_audio_file(np.zeros(1600, np.float32), 16_000, "wav")
    assert chat(server, *[input_audio(second)] * 3).status_code == 200
    assert_refused(chat(server, *[input_audio(second)] * 4), "too_many_parts")


# ---------------------------------------------------------------------------------------------- images


def with_png_size(data: bytes, width: int, height: int) -> bytes:
    """The same PNG with its header claiming other dimensions (the header's CRC is not what a decoder trusts)."""
    return data[:16] + struct.pack(">II", width, height) + data[24:]


def test_images_are_checked_on_their_header(server: RunningServer, engine: RecordingEngine) -> None:
    small = png_image(16, 24)
    assert chat(server, image_url(small)).status_code == 200
    part = engine.requests[-1].messages[0].parts[0]
    assert isinstance(part, ImagePart) and (part.data, part.mime_type) == (small, "image/png")
    assert_refused(chat(server, image_url(with_png_size(small, 100_000, 100_000))), "image_too_large")
    assert_refused(chat(server, image_url(small, "image/jpeg")), "image_format_mismatch")
    assert_refused(chat(server, image_url(b"\x89PNG\r\n\x1a\n")), "unsupported_image_format")
    assert_refused(chat(server, *[image_url(small)] * 3), "too_many_images")


def test_an_image_over_the_byte_limit_is_refused() -> None:
    with running_server(scripted_config(media={"max_image_bytes": 4096})) as small:
        response = chat(small, image_url(png_image(16, 24) + bytes(8192)))
    assert_refused(response, "image_too_large")


def webp(height: int, width: int) -> bytes:
    context = av.CodecContext.create("libwebp", "w")
    context.width, context.height, context.pix_fmt = width, height, "yuv420p"
    frame = av.VideoFrame.from_ndarray(np.zeros((height, width, 3), np.uint8), format="rgb24").reformat(
        format="yuv420p"
    )
    return b"".join(bytes(packet) for packet in [*context.encode(frame), *context.encode(None)])


def test_the_decoder_never_outgrows_the_header_the_door_checked() -> None:
    """A WebP whose canvas header says 24x16 around a 400x400 frame: FFmpeg would decode the frame at full size."""
    assert decode_image(png_image(16, 24)).shape == (16, 24, 3)
    frame = webp(400, 400)[12:]
    canvas = b"VP8X" + struct.pack("<I", 10) + bytes(4) + (23).to_bytes(3, "little") + (15).to_bytes(3, "little")
    body = b"WEBP" + canvas + frame
    lying = b"RIFF" + struct.pack("<I", len(body)) + body
    assert check_image(lying, "image/webp", ImageLimits()).width == 24
    with pytest.raises(MediaError, match="cannot decode"):
        decode_image(lying)


async def test_a_realtime_image_item_is_checked_and_the_socket_stays_open(server: RunningServer) -> None:
    async with websockets.connect(f"{server.ws_url}/v1/realtime") as ws:
        assert json.loads(await ws.recv())["type"] == "session.created"

        async def create(data: bytes) -> dict[str, Any]:
            url = "data:image/png;base64," + base64.b64encode(data).decode()
            item = {"type": "message", "role": "user", "content": [{"type": "input_image", "image_url": url}]}
            await ws.send(json.dumps({"type": "conversation.item.create", "item": item}))
            async with asyncio.timeout(10):
                return json.loads(await ws.recv())

        huge = await create(with_png_size(png_image(16, 24), 100_000, 100_000))
        fine = await create(png_image(16, 24))
    assert huge["type"] == "error" and huge["error"]["code"] == "image_too_large"
    assert fine["type"] == "conversation.item.added"
