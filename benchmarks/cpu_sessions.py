"""Server CPU per realtime WebSocket session, and the most sessions this machine serves with no late audio frame.

The server runs in a subprocess (`omnivox serve --engine scripted`), so its CPU is measured apart from the
clients'. Each client is a realistic caller on loopback: PCM16 24 kHz in 20 ms chunks at real-time pace, speech
made by espeak-ng then silence, with server VAD on (silero by default) and the scripted engine answering every
turn. The clients time every `response.output_audio.delta` against the pace the server promises (real time plus
`lead_ms` ahead, from the first delta of the response); a frame later than that is late.

    python benchmarks/cpu_sessions.py [--sessions 10,25,50,75,100] [--seconds 20] [--vad silero|webrtc]
                                      [--listen-only] [--workers N]

Prints, for each N: server CPU (seconds per wall second, total and per session), the server's run-queue wait
(seconds per second it was ready to run but another process had the CPU), sessions per core at that cost,
p50/p99/max frame lateness (ms), responses completed, turns detected and the detection delay (speech onset sent ->
`speech_started` received, ms), and the client's own CPU and send lag; then the highest N (of those tried, in
order, stopping at the first failure) with p99 frame lateness < 20 ms, p99 detection delay < 400 ms and no errors.
The server has one event loop, so on any machine it uses at most about one core: sessions per core is the
capacity of one server process. The CPU per session is only meaningful on rows that are sustained (a server that
falls behind its input does less work than it was given); a large server_wait means other processes had the CPU.
Other `OMNIVOX_*` variables in the environment reach the server too.

`--workers N` measures front workers instead: a scripted engine host in its own process and a front
(`omnivox serve --engine remote --workers N`, a single process for N=1) whose process tree is measured; the host's
CPU is left out (with `--listen-only` it does nothing).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import functools
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field

import numpy as np
import psutil
import uvloop
import websockets

from omnivox.pipeline.audio import float_to_pcm16, synthesize_speech

RATE = 24_000
CHUNK_MS = 20
MAX_P99_LATENESS_MS = 20.0
MAX_DETECTION_P99_MS = 400.0
"""Speech onset to `speech_started`: silero needs ~100-200 ms of speech; more means the server lags its input."""
SENTENCES = (
    "Hello, I would like to book a table for two people tonight.",
    "Could you tell me what time the restaurant opens on Sunday?",
    "Actually, make that four people, and we would prefer a quiet corner.",
    "Thank you very much, that is all I needed.",
)
PAUSE_S = 8.0
"""Silence after each sentence: long enough for the agent's answer (about 5 s) to play out."""


@dataclass(frozen=True)
class CallerLoop:
    messages: list[str]
    """Ready-to-send `input_audio_buffer.append` messages of 20 ms each (encoded once, shared by all callers)."""
    onsets: frozenset[int]
    """Indexes of the messages holding the first voiced sample of a sentence."""


@functools.lru_cache(maxsize=1)
def caller_loop() -> CallerLoop:
    parts: list[np.ndarray] = []
    onsets: set[int] = set()
    chunk_samples = RATE * CHUNK_MS // 1000
    position = 0
    for sentence in SENTENCES:
        spoken = synthesize_speech(sentence, RATE)
        onsets.add((position + int(np.flatnonzero(np.abs(spoken) > 0.01)[0])) // chunk_samples)
        parts += [spoken, np.zeros(int(PAUSE_S * RATE), np.float32)]
        position += spoken.size + parts[-1].size
    pcm = float_to_pcm16(np.concatenate(parts))
    step = chunk_samples * 2
    messages = [
        json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(pcm[i : i + step]).decode()})
        for i in range(0, len(pcm) - step + 1, step)
    ]
    return CallerLoop(messages, frozenset(onsets))


@dataclass
class Stats:
    """What one measurement window saw, over all sessions."""

    lateness_ms: list[float] = field(default_factory=list)
    responses_done: int = 0
    turns: int = 0
    errors: list[str] = field(default_factory=list)
    detection_ms: list[float] = field(default_factory=list)
    """From sending the chunk where a sentence starts to receiving `speech_started`: the server keeps up."""
    send_lag_ms: list[float] = field(default_factory=list)
    """How late the clients' own sends were (client overload shows here, not in the server's figures)."""


@dataclass
class Window:
    start: float
    end: float

    def __contains__(self, moment: float) -> bool:
        return self.start <= moment < self.end


class ResponseClock:
    """Expected arrival of each delta of one response: the server paces at real time plus `lead` from the first."""

    def __init__(self, lead_s: float) -> None:
        self.lead_s = lead_s
        self.first_at: float | None = None
        self.audio_s = 0.0

    def lateness_ms(self, arrived: float, delta_s: float) -> float | None:
        """Lateness of a paced frame; None for frames inside the lead, which the server may send at once."""
        if self.first_at is None:
            self.first_at = arrived
        due_audio_s = self.audio_s + delta_s - self.lead_s
        self.audio_s += delta_s
        if due_audio_s <= 0:
            return None
        return (arrived - (self.first_at + due_audio_s)) * 1000


@dataclass
class Caller:
    """One session's client state shared by its sender and reader."""

    stats: Stats
    window: Window
    lead_s: float
    last_onset_sent: float | None = None


async def read_events(ws: websockets.ClientConnection, caller: Caller) -> None:
    stats, window, lead_s = caller.stats, caller.window, caller.lead_s
    clock = ResponseClock(lead_s)
    async for message in ws:
        arrived = time.monotonic()
        event = json.loads(message)
        kind = event["type"]
        if kind == "response.output_audio.delta":
            lateness = clock.lateness_ms(arrived, len(base64.b64decode(event["delta"])) / 2 / RATE)
            if lateness is not None and arrived in window:
                stats.lateness_ms.append(lateness)
        elif kind == "response.created":
            clock = ResponseClock(lead_s)
        elif arrived in window:
            if kind == "response.done":
                stats.responses_done += 1
            elif kind == "input_audio_buffer.speech_started":
                stats.turns += 1
                if caller.last_onset_sent is not None:
                    stats.detection_ms.append((arrived - caller.last_onset_sent) * 1000)
                    caller.last_onset_sent = None
            elif kind == "error":
                stats.errors.append(event["error"].get("code") or event["error"]["message"])


async def run_caller(url: str, loop: CallerLoop, offset: int, caller: Caller, listen_only: bool) -> None:
    stats, window = caller.stats, caller.window
    async with websockets.connect(url, compression=None, max_size=None, open_timeout=60) as ws:
        created = json.loads(await ws.recv())
        if created["type"] != "session.created":
            stats.errors.append(f"refused: {created}")
            return
        if listen_only:
            turn_detection = {"type": "server_vad", "create_response": False}
            update = {"type": "realtime", "audio": {"input": {"turn_detection": turn_detection}}}
            await ws.send(json.dumps({"type": "session.update", "session": update}))
        reader = asyncio.create_task(read_events(ws, caller))
        start, index = time.monotonic(), 0
        try:
            while (due := start + index * CHUNK_MS / 1000) < window.end:
                delay = due - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                elif due in window:
                    stats.send_lag_ms.append(-delay * 1000)
                position = (offset + index) % len(loop.messages)
                if position in loop.onsets:
                    caller.last_onset_sent = time.monotonic()
                await ws.send(loop.messages[position])
                index += 1
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(
    port: int, vad: str, lead_ms: int, engine_args: tuple[str, ...] = ("--engine", "scripted")
) -> subprocess.Popen[bytes]:
    command = shutil.which("omnivox")
    argv = [command] if command else [sys.executable, "-m", "omnivox.server.cli"]
    env = {
        **os.environ,
        "OMNIVOX_VAD__KIND": vad,
        "OMNIVOX_AUDIO__LEAD_MS": str(lead_ms),
        "OMNIVOX_SERVER__MAX_SESSIONS": "10000",
        "OMNIVOX_SERVER__LOG_LEVEL": "warning",
    }
    server = subprocess.Popen([*argv, "serve", *engine_args, "--host", "127.0.0.1", "--port", str(port)], env=env)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited with code {server.returncode}")
        with (
            contextlib.suppress(OSError),
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as reply,
        ):
            if reply.status == 200:
                return server
        time.sleep(0.2)
    server.terminate()
    raise SystemExit("the server did not become healthy within 60 s")


def process_tree(process: psutil.Process) -> list[psutil.Process]:
    """The server and its worker processes (`--workers`)."""
    with contextlib.suppress(psutil.Error):
        return [process, *process.children(recursive=True)]
    return [process]


def cpu_seconds(process: psutil.Process) -> float:
    total = 0.0
    for member in process_tree(process):
        with contextlib.suppress(psutil.Error):
            times = member.cpu_times()
            total += times.user + times.system
    return total


def run_queue_seconds(process: psutil.Process) -> float:
    """Time the server's threads were runnable but waiting for a CPU (Linux schedstat): other load on the machine
    shows here, so a shortfall can be told apart from the server being too slow."""
    total_ns = 0
    for member in process_tree(process):
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{member.pid}/task"):
                with contextlib.suppress(OSError), open(f"/proc/{member.pid}/task/{task}/schedstat") as stat:
                    total_ns += int(stat.read().split()[1])
    return total_ns / 1e9


async def measure(
    port: int, server: psutil.Process, sessions: int, seconds: float, warmup: float, lead_s: float, listen_only: bool
) -> dict[str, float | str]:
    loop = caller_loop()
    url = f"ws://127.0.0.1:{port}/v1/realtime?model=bench"
    ramp = min(2.0, sessions * 0.02)
    now = time.monotonic()
    window = Window(now + ramp + warmup, now + ramp + warmup + seconds)
    stats = Stats()
    rng = random.Random(sessions)
    callers = []
    for _ in range(sessions):
        caller = Caller(stats, window, lead_s)
        offset = rng.randrange(len(loop.messages))
        callers.append(asyncio.create_task(run_caller(url, loop, offset, caller, listen_only)))
        await asyncio.sleep(ramp / sessions)
    await asyncio.sleep(max(0.0, window.start - time.monotonic()))
    me = psutil.Process()
    server_cpu, client_cpu, server_wait, wall = (
        cpu_seconds(server),
        cpu_seconds(me),
        run_queue_seconds(server),
        time.monotonic(),
    )
    await asyncio.sleep(max(0.0, window.end - time.monotonic()))
    server_cpu, client_cpu, server_wait, wall = (
        cpu_seconds(server) - server_cpu,
        cpu_seconds(me) - client_cpu,
        run_queue_seconds(server) - server_wait,
        time.monotonic() - wall,
    )
    results = await asyncio.gather(*callers, return_exceptions=True)
    stats.errors += [f"{type(r).__name__}: {r}" for r in results if isinstance(r, BaseException)]
    lateness = np.array(stats.lateness_ms or [0.0])
    send_lag = np.array(stats.send_lag_ms or [0.0])
    detection = np.array(stats.detection_ms or [float("nan")])
    return {
        "sessions": sessions,
        "server_cpu": server_cpu / wall,
        "server_wait": server_wait / wall,
        "per_session_ms": server_cpu / wall / sessions * 1000,
        "client_cpu": client_cpu / wall,
        "p50": float(np.percentile(lateness, 50)),
        "p99": float(np.percentile(lateness, 99)),
        "max": float(lateness.max()),
        "frames": len(stats.lateness_ms),
        "responses": stats.responses_done,
        "turns": stats.turns,
        "errors": len(stats.errors),
        "detect_p50": float(np.percentile(detection, 50)),
        "detect_p99": float(np.percentile(detection, 99)),
        "client_send_lag_p99": float(np.percentile(send_lag, 99)),
        "first_error": stats.errors[0] if stats.errors else "",
    }


def print_row(row: dict[str, float | str]) -> None:
    per_session_ms = float(row["per_session_ms"])
    per_core = 1000 / per_session_ms if per_session_ms > 0 else float("inf")
    print(
        f"{row['sessions']:8d}  {row['server_cpu']:10.3f}  {row['server_wait']:11.3f}  {per_session_ms:16.2f}  "
        f"{per_core:13.0f}  "
        f"{row['p50']:6.1f}  {row['p99']:6.1f}  {row['max']:6.1f}  {row['frames']:6d}  {row['responses']:9d}  "
        f"{row['turns']:5d}  {row['detect_p50']:9.0f}  {row['detect_p99']:9.0f}  {row['errors']:6d}  "
        f"{row['client_cpu']:10.3f}  {row['client_send_lag_p99']:13.1f}",
        flush=True,
    )
    if row["first_error"]:
        print(f"#   first error: {row['first_error']}")


def sustained(row: dict[str, float | str]) -> bool:
    """No late frame (p99), turn detection keeping up, and no errors."""
    detect_p99 = float(row["detect_p99"])
    keeps_up = detect_p99 != detect_p99 or detect_p99 < MAX_DETECTION_P99_MS  # NaN: no turn in the window
    return float(row["p99"]) < MAX_P99_LATENESS_MS and keeps_up and row["errors"] == 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", default="10,25,50,75,100", help="comma-separated session counts, increasing")
    parser.add_argument("--seconds", type=float, default=20.0, help="measurement window per count")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds of load before the window opens")
    parser.add_argument("--vad", choices=("silero", "webrtc"), default="silero")
    parser.add_argument("--lead-ms", type=int, default=200, help="audio.lead_ms of the server")
    parser.add_argument("--listen-only", action="store_true", help="create_response false: VAD and transport only")
    parser.add_argument("--workers", type=int, help="measure a remote-engine front with this many worker processes")
    args = parser.parse_args()
    counts = [int(n) for n in args.sessions.split(",")]
    port = free_port()
    host = None
    if args.workers:
        host_port = free_port()
        host = start_server(host_port, args.vad, args.lead_ms)
        front = ("--engine", "remote", "--model", "scripted", "--engine-url", f"http://127.0.0.1:{host_port}")
        server = start_server(port, args.vad, args.lead_ms, (*front, "--workers", str(args.workers)))
    else:
        server = start_server(port, args.vad, args.lead_ms)
    try:
        caller_loop()
        process = psutil.Process(server.pid)
        mode = "listen only" if args.listen_only else "scripted engine answering"
        if args.workers:
            mode += f"; remote-engine front, {args.workers} worker process(es)"
        load = os.getloadavg()[0]
        print(f"# {psutil.cpu_count()} cores, load average {load:.2f} before the run; vad={args.vad}; {mode}")
        print(
            "sessions  server_cpu  server_wait  cpu_ms/s/session  sessions/core  p50_ms  p99_ms  max_ms  frames  "
            "responses  turns  detect_p50  detect_p99  errors  client_cpu  client_lag_p99"
        )
        best = 0
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            for count in counts:
                row = runner.run(
                    measure(port, process, count, args.seconds, args.warmup, args.lead_ms / 1000, args.listen_only)
                )
                print_row(row)
                if not sustained(row):
                    break
                best = count
        print(f"# load average {os.getloadavg()[0]:.2f} after the run")
        print(
            f"# highest N sustained (p99 frame lateness < {MAX_P99_LATENESS_MS:.0f} ms, "
            f"p99 turn detection < {MAX_DETECTION_P99_MS:.0f} ms, no errors): {best}"
        )
    finally:
        for process in (server, host):
            if process is not None:
                process.terminate()
                process.wait(timeout=15)


if __name__ == "__main__":
    main()
