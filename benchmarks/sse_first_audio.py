"""Time to the first audio byte on the two SSE doors: `/v1/chat/completions` (stream, pcm16) and
`/audio/chat/completions` (the audio-modalities stream).

Measured at the client from sending the request to receiving the first `delta.audio.data` chunk, over sequential
requests. Without `--url` a scripted-engine server is started in a subprocess (`omnivox serve --engine scripted`,
whose simulated engine latency is `engine.options.scripted.first_audio_ms`, 50 ms by default); with `--url` any
running omnivox server is measured (e.g. a Qwen engine on a GPU machine).

    python benchmarks/sse_first_audio.py [--requests 30] [--url http://host:8000 --api-key KEY]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import numpy as np

QUESTION = "How is the weather today?"
DOORS = {
    "/v1/chat/completions": {"modalities": ["text", "audio"], "audio": {"voice": "alloy", "format": "pcm16"}},
    "/audio/chat/completions": {},
}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def scripted_server(*options: str) -> Iterator[str]:
    """An `omnivox serve --engine scripted [options]` subprocess, healthy, for the duration of the block."""
    port = free_port()
    command = shutil.which("omnivox")
    argv = [command] if command else [sys.executable, "-m", "omnivox.server.cli"]
    env = {**os.environ, "OMNIVOX_SERVER__LOG_LEVEL": "warning"}
    server = subprocess.Popen(
        [*argv, "serve", "--engine", "scripted", *options, "--host", "127.0.0.1", "--port", str(port)], env=env
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while not healthy(url):
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the scripted server did not become healthy within 60 s")
            time.sleep(0.2)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=15)


def healthy(url: str) -> bool:
    with contextlib.suppress(httpx.HTTPError):
        return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
    return False


def first_audio_seconds(client: httpx.Client, url: str, path: str, body: dict) -> float:
    """Request sent -> first audio data chunk received; the rest of the stream is read and dropped."""
    started = time.perf_counter()
    first: float | None = None
    with client.stream("POST", f"{url}{path}", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if first is None and line.startswith("data: {") and '"data":' in line:
                audio = json.loads(line[6:])["choices"][0]["delta"].get("audio") or {}
                if audio.get("data"):
                    first = time.perf_counter() - started
    if first is None:
        raise SystemExit(f"{path}: the stream carried no audio")
    return first


def measure(url: str, api_key: str, requests: int) -> None:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with httpx.Client(headers=headers, timeout=120) as client:
        model = client.get(f"{url}/v1/models").json()["data"][0]["id"]
        print(f"server {url}, model {model}, {requests} sequential requests per door")
        for path, extra in DOORS.items():
            body = {"model": model, "stream": True, "messages": [{"role": "user", "content": QUESTION}], **extra}
            first_audio_seconds(client, url, path, body)  # warm-up: connection, caches
            samples = np.array([first_audio_seconds(client, url, path, body) for _ in range(requests)]) * 1000
            p50, p95 = np.percentile(samples, [50, 95])
            print(
                f"{path:26s} first audio byte: p50 {p50:6.1f} ms  p95 {p95:6.1f} ms  "
                f"min {samples.min():6.1f} ms  max {samples.max():6.1f} ms"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=30, help="timed requests per door")
    parser.add_argument("--url", help="a running omnivox server; default: start a scripted one")
    parser.add_argument("--api-key", default="", help="Bearer key, if the server wants one")
    args = parser.parse_args()
    if args.url:
        measure(args.url.rstrip("/"), args.api_key, args.requests)
        return
    with scripted_server() as url:
        measure(url, args.api_key, args.requests)


if __name__ == "__main__":
    main()
