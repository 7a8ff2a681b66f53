"""The cost of the hop to an engine host: first audio and barge-in through `--engine remote` vs in process.

Two processes on loopback: an engine host (`omnivox serve` with the scripted engine at real time, printing the
moment each answer is aborted) and a front (`omnivox serve --engine remote` pointed at it). The same host is also
called directly, as the in-process reference with the same engine.

- First audio: a Realtime WebSocket client sends a text item and `response.create` and times the first
  `response.output_audio.delta`; turns alternate between the host (in process) and the front (through the hop),
  so both see the same machine load. Printed: p50/p95 of each, their difference, and the percentiles of the
  difference between back-to-back turns.
- Barge-in: a caller streams speech at real time into the front (silero server VAD at default settings) and talks
  over every answer one second into it. Timed from the chunk holding the interruption's first voiced sample to the
  host aborting the answer (CLOCK_MONOTONIC is one clock for all processes), and, for reference, to the same
  moment when the caller talks to the host directly; and the hop's own share, from the remote engine cancelling a
  turn to the host aborting it.

    python benchmarks/remote_hop.py [--turns 40] [--barge-ins 12]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import socket
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import websockets

from omnivox.pipeline.audio import float_to_pcm16, synthesize_speech

RATE = 24_000
CHUNK_MS = 20
REPLY = "Sure. Tomorrow will be sunny in the morning, with clouds and some light rain coming in from the west."
QUESTION = "What will the weather be like tomorrow?"
INTERRUPTION = "Wait, what about the weekend?"
ABORTED = "aborted "


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# ---------------------------------------------------------------------------------------------- the engine host


def serve_host(port: int) -> None:
    """Run the engine host: the scripted engine, printing `aborted <monotonic>` when an answer is cancelled."""
    import uvicorn

    from omnivox.pipeline.engines.scripted import ScriptedEngine
    from omnivox.server.app import create_app
    from omnivox.server.cli import uvicorn_options
    from omnivox.server.config import load_config

    class AbortReporting(ScriptedEngine):
        async def respond(self, request: Any) -> AsyncIterator[Any]:
            try:
                async for delta in super().respond(request):
                    yield delta
            except (asyncio.CancelledError, GeneratorExit):
                print(f"{ABORTED}{time.monotonic():.6f}", flush=True)
                raise

    config = load_config(overrides={"server": {"host": "127.0.0.1", "port": port, "log_level": "warning"}})
    options = {**(config.engine.options.get("scripted") or {}), "reply": REPLY, "speed": 1.0}
    engine = AbortReporting(**options)  # real-time speech: still generating when the caller barges in
    uvicorn.run(create_app(config, engine), **uvicorn_options(config))


class Process:
    """A server subprocess whose stdout lines are collected."""

    def __init__(self, process: asyncio.subprocess.Process, port: int) -> None:
        self.process = process
        self.port = port
        self.aborts: list[float] = []
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.process.stdout is not None
        async for line in self.process.stdout:
            text = line.decode().strip()
            if text.startswith(ABORTED):
                self.aborts.append(float(text[len(ABORTED) :]))

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/realtime?model=scripted"

    async def wait_healthy(self) -> None:
        deadline = time.monotonic() + 90
        while True:
            with contextlib.suppress(OSError):
                reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
                writer.write(b"GET /healthz HTTP/1.0\r\n\r\n")
                status = await reader.readline()
                writer.close()
                if b" 200 " in status:
                    return
            if self.process.returncode is not None or time.monotonic() > deadline:
                raise SystemExit(f"server on port {self.port} did not come up")
            await asyncio.sleep(0.2)

    async def stop(self) -> None:
        self.process.terminate()
        await self.process.wait()
        self.reader.cancel()


async def start(argv: list[str], port: int) -> Process:
    env = {**os.environ, "OMNIVOX_SERVER__LOG_LEVEL": "warning", "OMNIVOX_SERVER__MAX_SESSIONS": "1000"}
    process = await asyncio.create_subprocess_exec(*argv, env=env, stdout=asyncio.subprocess.PIPE)
    server = Process(process, port)
    await server.wait_healthy()
    return server


# ---------------------------------------------------------------------------------------------- first audio


async def first_audio_ms(ws: websockets.ClientConnection) -> float:
    item = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": QUESTION}]}
    await ws.send(json.dumps({"type": "conversation.item.create", "item": item}))
    started = time.monotonic()
    await ws.send(json.dumps({"type": "response.create"}))
    first = None
    while True:
        event = json.loads(await ws.recv())
        if event["type"] == "response.output_audio.delta" and first is None:
            first = (time.monotonic() - started) * 1000
            await ws.send(json.dumps({"type": "response.cancel"}))  # the engine speaks at real time: no need to wait
        elif event["type"] == "response.done":
            assert first is not None, event
            return first


async def manual_session(url: str) -> websockets.ClientConnection:
    ws = await websockets.connect(url, compression=None, max_size=None)
    await ws.recv()  # session.created
    session = {"type": "realtime", "audio": {"input": {"turn_detection": None}}}
    await ws.send(json.dumps({"type": "session.update", "session": session}))
    while json.loads(await ws.recv())["type"] != "session.updated":
        pass
    return ws


async def measure_first_audio(host: Process, front: Process, turns: int) -> dict[str, list[float]]:
    sessions = {"in process": await manual_session(host.ws_url), "remote": await manual_session(front.ws_url)}
    for ws in sessions.values():  # warm both paths (first espeak synthesis, first connection to the host)
        await first_audio_ms(ws)
    figures: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(turns):
        for name, ws in sessions.items():
            figures[name].append(await first_audio_ms(ws))
    for ws in sessions.values():
        await ws.close()
    return figures


# ---------------------------------------------------------------------------------------------- barge-in


class Caller:
    """Real-time 20 ms PCM16 chunks into a Realtime session: silence unless a phrase is queued."""

    def __init__(self, ws: websockets.ClientConnection) -> None:
        self.ws = ws
        self.pending = np.zeros(0, np.float32)
        self.onset_sample: int | None = None
        self.onsets: list[float] = []

    def say(self, text: str) -> None:
        spoken = synthesize_speech(text, RATE)
        self.onset_sample = self.pending.size + int(np.flatnonzero(np.abs(spoken) > 0.01)[0])
        self.pending = np.concatenate((self.pending, spoken))

    async def run(self) -> None:
        samples = RATE * CHUNK_MS // 1000
        start, index = time.monotonic(), 0
        while True:
            await asyncio.sleep(max(0.0, start + index * CHUNK_MS / 1000 - time.monotonic()))
            chunk, self.pending = self.pending[:samples], self.pending[samples:]
            chunk = np.pad(chunk, (0, samples - chunk.size))
            if self.onset_sample is not None and self.onset_sample < samples:
                self.onsets.append(time.monotonic())
                self.onset_sample = None
            elif self.onset_sample is not None:
                self.onset_sample -= samples
            audio = base64.b64encode(float_to_pcm16(chunk)).decode()
            await self.ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": audio}))
            index += 1


async def measure_barge_in(server: Process, host: Process, barge_ins: int) -> list[float]:
    """Caller speech onset -> the host aborted the answer, ms, for each barge-in into `server`."""
    latencies = []
    speaking = asyncio.Event()

    async def read(ws: websockets.ClientConnection) -> None:  # always reading: a full socket would stall the server
        async for message in ws:
            if json.loads(message)["type"] == "response.output_audio.delta":
                speaking.set()

    async with websockets.connect(server.ws_url, compression=None, max_size=None) as ws:
        caller = Caller(ws)
        tasks = [asyncio.create_task(caller.run()), asyncio.create_task(read(ws))]
        caller.say(QUESTION)
        try:
            while len(latencies) < barge_ins:
                await asyncio.wait_for(speaking.wait(), 30)
                await asyncio.sleep(1.0)
                aborts, onsets = len(host.aborts), len(caller.onsets)
                caller.say(INTERRUPTION)
                deadline = time.monotonic() + 5
                while len(host.aborts) == aborts or len(caller.onsets) == onsets:
                    if time.monotonic() > deadline:
                        raise SystemExit("the host never aborted the interrupted answer")
                    await asyncio.sleep(0.002)
                latencies.append((host.aborts[-1] - caller.onsets[-1]) * 1000)
                speaking.clear()
        finally:
            for task in tasks:
                task.cancel()
    return latencies


async def measure_cancel(host: Process, cancels: int) -> list[float]:
    """The hop's own share of a barge-in: the remote engine's turn cancelled -> the host aborted it, ms."""
    from omnivox.pipeline.engines.base import AudioDelta, Message, ResponseRequest, TextPart
    from omnivox.pipeline.engines.remote import RemoteEngine

    engine = RemoteEngine("scripted", urls=[f"http://127.0.0.1:{host.port}"])
    await engine.start()
    request = ResponseRequest(messages=(Message("user", (TextPart(QUESTION),)),))
    latencies = []
    try:
        for _ in range(cancels):
            speaking = asyncio.Event()

            async def answer(speaking: asyncio.Event) -> None:
                async for delta in engine.respond(request):
                    if isinstance(delta, AudioDelta):
                        speaking.set()

            turn = asyncio.create_task(answer(speaking))
            await speaking.wait()
            await asyncio.sleep(0.3)
            aborts, cancelled_at = len(host.aborts), time.monotonic()
            turn.cancel()
            while len(host.aborts) == aborts:
                await asyncio.sleep(0.001)
            latencies.append((host.aborts[-1] - cancelled_at) * 1000)
    finally:
        await engine.close()
    return latencies


def summary(name: str, values: list[float]) -> str:
    p50, p95 = np.percentile(values, [50, 95])
    return f"{name:34s} p50 {p50:7.1f} ms  p95 {p95:7.1f} ms  (n={len(values)})"


async def main(turns: int, barge_ins: int) -> None:
    host_port, front_port = free_port(), free_port()
    host = await start([sys.executable, __file__, "--serve-host", str(host_port)], host_port)
    front_argv = [sys.executable, "-m", "omnivox.server.cli", "serve", "--engine", "remote", "--model", "scripted"]
    front_argv += ["--engine-url", f"http://127.0.0.1:{host_port}", "--host", "127.0.0.1", "--port", str(front_port)]
    front = await start(front_argv, front_port)
    try:
        print(f"# {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}; scripted engine, loopback")
        figures = await measure_first_audio(host, front, turns)
        print("first audio (response.create -> first audio delta):")
        for name, values in figures.items():
            print(summary(f"  {name}", values))
        added = np.percentile(figures["remote"], [50, 95]) - np.percentile(figures["in process"], [50, 95])
        print(f"  added by the hop                   p50 {added[0]:7.1f} ms  p95 {added[1]:7.1f} ms")
        pairs = np.subtract(figures["remote"], figures["in process"])  # turns taken back to back: alike load
        print(summary("  hop, turn by turn", list(pairs)))
        print("barge-in (caller speech onset -> engine answer aborted):")
        print(summary("  in process", await measure_barge_in(host, host, barge_ins)))
        print(summary("  remote (abort seen by the host)", await measure_barge_in(front, host, barge_ins)))
        print(summary("  of which the hop: cancel -> abort", await measure_cancel(host, 2 * barge_ins)))
        print(f"# load average {os.getloadavg()[0]:.2f} after the run")
    finally:
        await front.stop()
        await host.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--turns", type=int, default=40, help="first-audio turns per path")
    parser.add_argument("--barge-ins", type=int, default=12, help="barge-ins per path")
    parser.add_argument("--serve-host", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_host:
        serve_host(args.serve_host)
    else:
        asyncio.run(main(args.turns, args.barge_ins))
