"""What hostile media costs the server: each attack sent to `POST /v1/audio/transcriptions` of an
`omnivox serve --engine scripted` subprocess, with the server's peak RSS growth (VmHWM, reset before each attack
through /proc/PID/clear_refs; Linux only) and the time to its answer.

    python benchmarks/media_bombs.py [--minutes 60] [--rate 48000]

Attacks: a FLAC of silence (`--minutes` long at `--rate`), a WAV declaring 1 Hz, an FFmpeg concat script naming a
WAV in the server's working directory (its transcript would be the disclosure).
"""

from __future__ import annotations

import argparse
import io
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import av
import httpx
import numpy as np

from omnivox.pipeline.audio import encode_audio_file, synthesize_speech


def silent_flac(minutes: int, rate: int) -> bytes:
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="flac") as container:
        stream = container.add_stream("flac", rate=rate, layout="mono")
        minute = np.zeros((1, rate * 60), np.int16)
        for index in range(minutes):
            frame = av.AudioFrame.from_ndarray(minute, format="s16", layout="mono")
            frame.sample_rate, frame.pts = rate, index * minute.shape[1]
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return buffer.getvalue()


def one_hertz_wav(samples: int) -> bytes:
    fmt = struct.pack("<HHIIHH", 1, 1, 1, 2, 2, 16)
    data = bytes(2 * samples)
    body = b"WAVEfmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(data)) + data
    return b"RIFF" + struct.pack("<I", len(body)) + body


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=int, default=60)
    parser.add_argument("--rate", type=int, default=48_000)
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="omnivox-bombs-"))
    secret = synthesize_speech("the code is banana", 16_000)
    (workdir / "secret.wav").write_bytes(encode_audio_file(secret, 16_000, "wav"))
    flac = silent_flac(args.minutes, args.rate)
    attacks = {
        f"flac, {args.minutes} min of silence at {args.rate} Hz": ("silence.flac", flac),
        "wav declaring 1 Hz, 500 samples": ("tiny.wav", one_hertz_wav(500)),
        "ffconcat naming ./secret.wav": ("a.wav", b"ffconcat version 1.0\nfile secret.wav\n"),
    }
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "omnivox.server.cli", "serve", "--engine", "scripted", "--port", str(port)],
        cwd=workdir,
        env={**os.environ, "OMNIVOX_SERVER__LOG_LEVEL": "warning", "OMNIVOX_SERVER__HOST": "127.0.0.1"},
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.2)
        print(f"{'attack':45} {'bytes':>9} {'status':>6} {'peak RSS growth':>16} {'seconds':>8}  answer")
        for name, (filename, data) in attacks.items():
            Path(f"/proc/{server.pid}/clear_refs").write_text("5")  # resets the peak RSS to the current RSS
            before = rss_mb(server.pid)
            started = time.monotonic()
            response = httpx.post(
                f"{url}/v1/audio/transcriptions",
                files={"file": (filename, data)},
                data={"model": "scripted"},
                timeout=300,
            )
            seconds = time.monotonic() - started
            growth = peak_rss_mb(server.pid) - before
            answer = response.text[:90]
            print(f"{name:45} {len(data):9d} {response.status_code:6d} {growth:13.0f} MB {seconds:8.2f}  {answer}")
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
