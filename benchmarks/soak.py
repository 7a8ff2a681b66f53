"""Soak: real-time callers and a share of hostile clients against one server, for a long time.

The server runs in a subprocess (`omnivox serve --engine scripted`, default config otherwise). Well-behaved callers
(this process) stream espeak-ng speech and silence at real time over the Realtime WebSocket (PCM16 24 kHz,
`--chunk-ms` chunks, server VAD), wait for each spoken answer, barge in on a share of them (`--barge-in-share`),
and hang up and call again after 2-5 turns. Each also sends a harmless `session.update` every second and times its
`session.updated`. Hostile clients (a separate process, so that their own work does not slow the callers' clocks)
cycle through the attack classes the server bounds: oversize appends (120 s of audio in one message), messages
over the size limit, clients that stop reading while flooding, event floods, bad JSON and frames, oversized fields,
stalled SSE readers, oversized telephony media and idle connections.

    python benchmarks/soak.py [--sessions 50] [--duration 3600] [--hostile-share 0.2] [--report-every 300]
        [--attacks oversize_append,flood,...]

Prints a line per report interval (server RSS, sessions, failures, event latency in that interval) and a summary:
well-behaved sessions served and failed (by kind), turns answered and barge-ins, voice-to-voice, the event latency of
well-behaved sessions (round trip of a control event, and lateness of paced audio frames against the pace the
server promises: real time plus `audio.lead_ms` from a response's first frame), the hostile attacks and how the
server met them, and the server's RSS (its process tree) after warm-up and at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import contextlib
import functools
import json
import multiprocessing
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil
import uvloop
import websockets
from cpu_sessions import ResponseClock, cpu_seconds, free_port, run_queue_seconds

from omnivox.pipeline.audio import float_to_pcm16, synthesize_speech

RATE = 24_000
LEAD_S = 0.2
"""The server's `audio.lead_ms` (default): paced frames may arrive this far ahead of real time."""
SENTENCES = (
    "Hello, I would like to book a table for two people tonight.",
    "Could you tell me what time the restaurant opens on Sunday?",
    "Actually, make that four people, and we would prefer a quiet corner.",
    "Thank you very much, that is all I needed.",
)
ANSWER_TIMEOUT_S = 25.0
PROBE_EVERY_S = 1.0
ATTACKS = {  # name: weight
    "oversize_append": 2,
    "over_limit_message": 1,
    "non_reader": 2,
    "flood": 2,
    "bad_frames": 2,
    "oversized_fields": 2,
    "stalled_sse": 1,
    "telephony_oversize": 1,
    "idle_holder": 1,
}


# ---------------------------------------------------------------------------------------------- audio


@dataclass(frozen=True)
class Speech:
    messages: tuple[str, ...]
    """`input_audio_buffer.append` messages of one chunk each."""
    seconds: float


@functools.lru_cache(maxsize=1)
def utterances(chunk_ms: int) -> tuple[Speech, ...]:
    step = RATE * chunk_ms // 1000 * 2
    spoken = []
    for sentence in SENTENCES:
        pcm = float_to_pcm16(synthesize_speech(sentence, RATE))
        pcm += b"\0" * (-len(pcm) % step)
        messages = tuple(append_message(pcm[i : i + step]) for i in range(0, len(pcm), step))
        spoken.append(Speech(messages, len(pcm) / 2 / RATE))
    return tuple(spoken)


def append_message(pcm: bytes) -> str:
    return json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(pcm).decode()})


# ---------------------------------------------------------------------------------------------- well-behaved


@dataclass
class CallerStats:
    sessions_started: int = 0
    sessions_completed: int = 0
    turns_answered: int = 0
    barge_ins: int = 0
    failures: collections.Counter[str] = field(default_factory=collections.Counter)
    probe_ms: array = field(default_factory=lambda: array("d"))
    lateness_ms: array = field(default_factory=lambda: array("d"))
    v2v_ms: array = field(default_factory=lambda: array("d"))
    client_lag_ms: array = field(default_factory=lambda: array("d"))
    """How late this process's own timers fire: client overload, which inflates every latency measured here."""


class Mic:
    """A caller's microphone: chunks at real time on an absolute schedule, speech when asked, silence otherwise."""

    def __init__(self, ws: Any, chunk_ms: int) -> None:
        self.ws = ws
        self.chunk_s = chunk_ms / 1000
        self.silence = append_message(b"\0" * (RATE * chunk_ms // 1000 * 2))
        self.queue: collections.deque[str] = collections.deque()

    def say(self, speech: Speech) -> float:
        """Queue an utterance; returns the moment its last chunk will have been sent."""
        self.queue.extend(speech.messages)
        return time.monotonic() + len(self.queue) * self.chunk_s

    async def run(self) -> None:
        start, index = time.monotonic(), 0
        while True:
            delay = start + index * self.chunk_s - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            await self.ws.send(self.queue.popleft() if self.queue else self.silence)
            index += 1


class CallerSession:
    """What the reader has seen of one session, for the caller's turns to wait on."""

    def __init__(self, stats: CallerStats) -> None:
        self.stats = stats
        self.changed = asyncio.Event()
        self.done: list[tuple[str, str]] = []
        """(response id, status) of every finished response."""
        self.first_audio: dict[str, float] = {}
        self.probes: collections.deque[float] = collections.deque()
        self.error: str | None = None

    async def read(self, ws: Any) -> None:
        try:
            await self._read(ws)
        except websockets.ConnectionClosed as exc:
            self.error = f"closed:{exc.rcvd.code if exc.rcvd else 'abnormal'}"
        else:
            self.error = self.error or "closed:by_server"
        self.changed.set()

    async def _read(self, ws: Any) -> None:
        clock = ResponseClock(LEAD_S)
        response_id = ""
        async for message in ws:
            arrived = time.monotonic()
            event = json.loads(message)
            kind = event["type"]
            if kind == "response.output_audio.delta":
                self.first_audio.setdefault(response_id, arrived)
                late = clock.lateness_ms(arrived, len(event["delta"]) * 3 / 4 / 2 / RATE)
                if late is not None:
                    self.stats.lateness_ms.append(late)
            elif kind == "response.created":
                response_id, clock = event["response"]["id"], ResponseClock(LEAD_S)
            elif kind == "response.done":
                self.done.append((event["response"]["id"], event["response"]["status"]))
            elif kind == "session.updated" and self.probes:
                self.stats.probe_ms.append((arrived - self.probes.popleft()) * 1000)
            elif kind == "error":
                self.error = f"error:{event['error'].get('code')}"
            self.changed.set()

    async def probe(self, ws: Any) -> None:
        while True:
            await asyncio.sleep(PROBE_EVERY_S)
            self.probes.append(time.monotonic())
            await ws.send(json.dumps({"type": "session.update", "session": {"type": "realtime"}}))

    async def wait_done(self, count: int, timeout: float) -> tuple[str, str]:
        """The `count`-th finished response (1-based)."""
        async with asyncio.timeout(timeout):
            while len(self.done) < count:
                if self.error:
                    raise RuntimeError(self.error)
                self.changed.clear()
                await self.changed.wait()
        return self.done[count - 1]

    async def wait_first_audio(self, timeout: float) -> None:
        async with asyncio.timeout(timeout):
            while not self.first_audio or len(self.first_audio) <= len(self.done):
                if self.error:
                    raise RuntimeError(self.error)
                self.changed.clear()
                await self.changed.wait()


async def caller_session(url: str, args: argparse.Namespace, rng: random.Random, stats: CallerStats) -> None:
    speeches = utterances(args.chunk_ms)
    async with websockets.connect(url, compression=None, max_size=None, open_timeout=30, close_timeout=5) as ws:
        created = json.loads(await ws.recv())
        if created["type"] != "session.created":
            raise RuntimeError(f"refused:{created.get('error', {}).get('code')}")
        stats.sessions_started += 1
        state, mic = CallerSession(stats), Mic(ws, args.chunk_ms)
        tasks = [asyncio.create_task(job) for job in (state.read(ws), state.probe(ws), mic.run())]
        try:
            finished = 0
            for _ in range(rng.randint(2, 5)):
                speech = rng.choice(speeches)
                spoken_at = mic.say(speech)
                if rng.random() < args.barge_in_share:
                    await state.wait_first_audio(speech.seconds + ANSWER_TIMEOUT_S)
                    await asyncio.sleep(1.0)
                    spoken_at = mic.say(rng.choice(speeches))
                    finished += 1
                    _, status = await state.wait_done(finished, ANSWER_TIMEOUT_S)
                    if status != "cancelled":
                        raise RuntimeError(f"barge_in_not_cancelled:{status}")
                    stats.barge_ins += 1
                finished += 1
                response_id, status = await state.wait_done(finished, speech.seconds + ANSWER_TIMEOUT_S)
                if status != "completed":
                    raise RuntimeError(f"answer_{status}")
                stats.turns_answered += 1
                if response_id in state.first_audio:
                    stats.v2v_ms.append((state.first_audio[response_id] - spoken_at) * 1000)
                await asyncio.sleep(rng.uniform(0.3, 2.0))
            if state.error:
                raise RuntimeError(state.error)
            stats.sessions_completed += 1
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task


async def caller(url: str, args: argparse.Namespace, seed: int, stats: CallerStats, stop_at: float) -> None:
    rng = random.Random(seed)
    while time.monotonic() < stop_at:
        try:
            await caller_session(url, args, rng, stats)
        except TimeoutError:
            stats.failures["no_answer"] += 1
        except websockets.ConnectionClosed as exc:
            stats.failures[f"closed:{exc.rcvd.code if exc.rcvd else 'abnormal'}"] += 1
        except (OSError, websockets.InvalidHandshake) as exc:
            stats.failures[f"connect:{type(exc).__name__}"] += 1
        except RuntimeError as exc:
            stats.failures[str(exc)] += 1
        await asyncio.sleep(rng.uniform(0.2, 1.0))


# ---------------------------------------------------------------------------------------------- hostile


def tiny_socket(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.setblocking(False)
    return sock


@functools.lru_cache(maxsize=1)
def oversize_append() -> str:
    speech = synthesize_speech("Are you still there?", RATE)
    audio = np.concatenate([np.zeros(118 * RATE, np.float32), speech])
    return append_message(float_to_pcm16(audio))


async def error_codes(ws: Any, seconds: float) -> collections.Counter[str]:
    """What the server answered within `seconds`: error codes, other events, or how it closed."""
    seen: collections.Counter[str] = collections.Counter()
    with contextlib.suppress(TimeoutError, websockets.ConnectionClosed):
        async with asyncio.timeout(seconds):
            async for message in ws:
                event = json.loads(message) if isinstance(message, str) else {}
                kind = event.get("type", "?")
                seen[f"error:{event['error'].get('code')}" if kind == "error" else "events"] += 1
    if ws.close_code is not None:
        seen[f"closed:{ws.close_code}"] += 1
    return seen


async def attack(kind: str, port: int, rng: random.Random) -> collections.Counter[str]:
    url = f"ws://127.0.0.1:{port}/v1/realtime"
    if kind == "stalled_sse":
        return await stalled_sse(port)
    if kind == "telephony_oversize":
        async with websockets.connect(f"ws://127.0.0.1:{port}/telephony/twilio", max_size=None) as ws:
            start = {"event": "start", "streamSid": "MZ1", "start": {"streamSid": "MZ1", "callSid": "CA1"}}
            await ws.send(json.dumps(start))
            await ws.send(json.dumps({"event": "media", "streamSid": "MZ1", "media": {"payload": "/" * 2_000_000}}))
            await asyncio.sleep(2)
            await ws.send(json.dumps({"event": "stop", "streamSid": "MZ1"}))
            return await error_codes(ws, 5)
    if kind == "non_reader":
        return await non_reader(url, port)
    async with websockets.connect(url, max_size=None, open_timeout=30, close_timeout=2) as ws:
        if kind == "oversize_append":
            await ws.send(oversize_append())
            return await error_codes(ws, 8)
        if kind == "over_limit_message":
            await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": "A" * (17 * 1024 * 1024)}))
            return await error_codes(ws, 5)
        if kind == "flood":
            reading = asyncio.create_task(error_codes(ws, 15))
            for n in range(5000):
                await ws.send('{"type": "input_audio_buffer.clear"}' if n % 2 else '{"type": "no.such.event"}')
            return await reading
        if kind == "bad_frames":
            for frame in ("{not json", b"\x00\x01binary", "[" * 100_000 + "]" * 100_000, '{"type": 1e999999}'):
                await ws.send(frame)
            await ws.send(
                json.dumps({"type": "session.update", "session": {"type": "realtime", "temperature": 10**400}})
            )
            return await error_codes(ws, 3)
        if kind == "oversized_fields":
            junk = "x" * 300_000
            await ws.send(json.dumps({"type": "session.update", "session": {"type": "realtime", "junk": junk}}))
            await ws.send(json.dumps({"type": "session.update", "session": {"instructions": junk}}))
            item = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": junk}]}
            await ws.send(json.dumps({"type": "conversation.item.create", "item": item}))
            metadata = {f"k{n}": junk[:1000] for n in range(50)}
            await ws.send(json.dumps({"type": "response.create", "response": {"metadata": metadata}}))
            return await error_codes(ws, 3)
        await asyncio.sleep(rng.uniform(5, 20))  # idle_holder
        return collections.Counter({"held": 1})


async def non_reader(url: str, port: int) -> collections.Counter[str]:
    instructions = "Please answer in full sentences. " * 1900
    update = json.dumps({"type": "session.update", "session": {"type": "realtime", "instructions": instructions}})
    began = time.monotonic()
    seen: collections.Counter[str] = collections.Counter()
    async with websockets.connect(url, sock=tiny_socket(port), max_queue=1, max_size=None, close_timeout=1) as ws:
        try:
            async with asyncio.timeout(40):
                while True:
                    await ws.send(update)
        except TimeoutError:
            seen["never_dropped"] += 1
        except websockets.ConnectionClosed:
            seen[f"dropped_within_{5 * int((time.monotonic() - began) / 5 + 1)}s"] += 1
    return seen


async def stalled_sse(port: int) -> collections.Counter[str]:
    body = json.dumps(
        {
            "model": "scripted",
            "messages": [{"role": "user", "content": "tell me a story"}],
            "modalities": ["text", "audio"],
            "audio": {"voice": "alloy", "format": "pcm16"},
            "stream": True,
        }
    ).encode()
    reader, writer = await asyncio.open_connection(sock=tiny_socket(port))
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: soak\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    status = (await asyncio.wait_for(reader.readline(), 30)).split(b" ")[1].decode()
    await asyncio.sleep(15)  # never reads the stream
    writer.close()
    return collections.Counter({f"status:{status}": 1})


async def hostile_client(
    port: int, seed: int, stop_at: float, outcomes: dict[str, collections.Counter[str]], attacks: list[str]
) -> None:
    rng = random.Random(seed)
    kinds, weights = attacks, [ATTACKS[kind] for kind in attacks]
    while time.monotonic() < stop_at:
        kind = rng.choices(kinds, weights)[0]
        try:
            seen = await asyncio.wait_for(attack(kind, port, rng), 60)
        except websockets.ConnectionClosed as exc:
            seen = collections.Counter({f"closed:{exc.rcvd.code if exc.rcvd else 'abnormal'}": 1})
        except Exception as exc:
            seen = collections.Counter({f"client:{type(exc).__name__}": 1})
        outcomes.setdefault(kind, collections.Counter()).update(seen)
        await asyncio.sleep(rng.uniform(0.5, 3.0))


def run_hostile(port: int, clients: int, seconds: float, results: Any, attacks: list[str]) -> None:
    """The hostile clients' process: its own event loop, results back as plain dicts."""

    async def main() -> dict[str, dict[str, int]]:
        oversize_append()
        outcomes: dict[str, collections.Counter[str]] = {}
        stop_at = time.monotonic() + seconds
        await asyncio.gather(*(hostile_client(port, 1000 + n, stop_at, outcomes, attacks) for n in range(clients)))
        return {kind: dict(seen) for kind, seen in outcomes.items()}

    results.put(uvloop.run(main()))


# ---------------------------------------------------------------------------------------------- server and report


def start_server(port: int, config: Path) -> subprocess.Popen[bytes]:
    command = shutil.which("omnivox")
    argv = [command] if command else [sys.executable, "-m", "omnivox.server.cli"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMNIVOX_")}
    server = subprocess.Popen(
        [*argv, "serve", "--engine", "scripted", "--host", "127.0.0.1", "--port", str(port), "--config", str(config)],
        env=env,
    )
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited with code {server.returncode}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return server
        time.sleep(0.2)
    server.terminate()
    raise SystemExit("the server did not become healthy within 90 s")


def tree_rss_mb(process: psutil.Process) -> float:
    total = 0
    for member in [process, *process.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            total += member.memory_info().rss
    return total / 2**20


def percentiles(values: array, *qs: float) -> list[float]:
    if not values:
        return [float("nan")] * len(qs)
    data = np.frombuffer(values, dtype=np.float64)
    return [float(np.percentile(data, q)) for q in qs]


async def client_lag(stats: CallerStats) -> None:
    while True:
        due = time.monotonic() + 0.01
        await asyncio.sleep(0.01)
        stats.client_lag_ms.append((time.monotonic() - due) * 1000)


def interval_line(elapsed: float, rss: float, stats: CallerStats, marks: dict[str, int], usage: list[float]) -> str:
    """One report interval: server RSS, CPU and run-queue wait (s/s), the callers' CPU, load, sessions, and p99s in
    the interval."""
    p99 = {name: percentiles(array("d", getattr(stats, name)[mark:]), 99)[0] for name, mark in marks.items()}
    return (
        f"{elapsed:6.0f} s  rss {rss:6.1f} MB  server cpu {usage[0]:4.2f} wait {usage[1]:4.2f}  "
        f"callers cpu {usage[3]:4.2f}  load {usage[2]:5.2f}  sessions {stats.sessions_started:5d}  "
        f"failed {sum(stats.failures.values()):3d}  "
        f"p99: control {p99['probe_ms']:6.1f} ms, audio lateness {p99['lateness_ms']:6.1f} ms, "
        f"client lag {p99['client_lag_ms']:6.1f} ms"
    )


async def soak(args: argparse.Namespace, port: int, server: psutil.Process) -> tuple[CallerStats, list[float]]:
    utterances(args.chunk_ms)
    url = f"ws://127.0.0.1:{port}/v1/realtime"
    stats = CallerStats()
    stop_at = time.monotonic() + args.duration
    callers = []
    for n in range(args.sessions):
        callers.append(asyncio.create_task(caller(url, args, n, stats, stop_at)))
        await asyncio.sleep(0.05)
    lag = asyncio.create_task(client_lag(stats))
    rss: list[float] = []
    began, last_report = time.monotonic(), time.monotonic()
    marks = dict.fromkeys(("probe_ms", "lateness_ms", "client_lag_ms"), 0)
    me = psutil.Process()
    cpu_mark, wait_mark, mine_mark = cpu_seconds(server), run_queue_seconds(server), cpu_seconds(me)
    while time.monotonic() < stop_at:
        await asyncio.sleep(min(10.0, max(0.0, stop_at - time.monotonic())))
        rss.append(tree_rss_mb(server))
        if time.monotonic() - last_report >= args.report_every:
            now = time.monotonic()
            cpu, wait, mine = cpu_seconds(server), run_queue_seconds(server), cpu_seconds(me)
            span = now - last_report
            usage = [(cpu - cpu_mark) / span, (wait - wait_mark) / span, os.getloadavg()[0], (mine - mine_mark) / span]
            print(interval_line(now - began, rss[-1], stats, marks, usage), flush=True)
            marks = {name: len(getattr(stats, name)) for name in marks}
            last_report, cpu_mark, wait_mark, mine_mark = now, cpu, wait, mine
    await asyncio.gather(*callers, return_exceptions=True)
    lag.cancel()
    return stats, rss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=50, help="well-behaved callers at once")
    parser.add_argument("--duration", type=float, default=3600.0, help="seconds")
    parser.add_argument("--hostile-share", type=float, default=0.2, help="hostile clients per well-behaved caller")
    parser.add_argument("--barge-in-share", type=float, default=0.25, help="turns where the caller talks over")
    parser.add_argument("--chunk-ms", type=int, default=40, help="caller audio chunk")
    parser.add_argument("--report-every", type=float, default=300.0, help="seconds between interval lines")
    parser.add_argument("--warmup", type=float, default=None, help="seconds before RSS counts (default 10 %%)")
    parser.add_argument(
        "--attacks", default=",".join(ATTACKS), help=f"hostile attacks, comma-separated (of {', '.join(ATTACKS)})"
    )
    parser.add_argument(
        "--no-echo-cancellation",
        action="store_true",
        help="serve with audio.echo_cancellation.realtime_ws false (the default config has it on)",
    )
    args = parser.parse_args()
    attacks = args.attacks.split(",")
    if unknown := set(attacks) - set(ATTACKS):
        parser.error(f"unknown attacks: {', '.join(sorted(unknown))}")
    hostile = round(args.sessions * args.hostile_share)
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "soak.yaml"
        echo = "\naudio:\n  echo_cancellation:\n    realtime_ws: false\n" if args.no_echo_cancellation else "\n"
        config.write_text("server:\n  log_level: warning" + echo)
        server_process = start_server(port, config)
        try:
            server = psutil.Process(server_process.pid)
            print(
                f"# {psutil.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} before the run; "
                f"{args.sessions} callers + {hostile} hostile clients for {args.duration:.0f} s; scripted engine",
                flush=True,
            )
            results: Any = multiprocessing.get_context("spawn").Queue()
            hostile_process = multiprocessing.get_context("spawn").Process(
                target=run_hostile, args=(port, hostile, args.duration, results, attacks), daemon=True
            )
            if hostile:
                hostile_process.start()
            stats, rss = uvloop.run(soak(args, port, server))
            outcomes = results.get(timeout=120) if hostile else {}
            print(f"# load average {os.getloadavg()[0]:.2f} at the end")
            report(args, stats, rss, outcomes, server)
        finally:
            server_process.terminate()
            server_process.wait(timeout=60)


def report(
    args: argparse.Namespace,
    stats: CallerStats,
    rss: list[float],
    outcomes: dict[str, dict[str, int]],
    server: psutil.Process,
) -> None:
    failed = sum(stats.failures.values())
    print(
        f"well-behaved sessions: {stats.sessions_started} served, {stats.sessions_completed} completed all their "
        f"turns, {failed} failed {dict(stats.failures.most_common())}"
    )
    v2v = percentiles(stats.v2v_ms, 50, 99)
    print(
        f"turns answered: {stats.turns_answered}; barge-ins cancelled as asked: {stats.barge_ins}; "
        f"voice-to-voice (last speech chunk sent -> first audio) p50 {v2v[0]:.0f} ms p99 {v2v[1]:.0f} ms"
    )
    probe = percentiles(stats.probe_ms, 50, 99, 100)
    late = percentiles(stats.lateness_ms, 50, 99, 100)
    lag = percentiles(stats.client_lag_ms, 50, 99)
    print(
        f"event latency of well-behaved sessions: control round trip p50 {probe[0]:.1f} p99 {probe[1]:.1f} "
        f"max {probe[2]:.1f} ms (n={len(stats.probe_ms)}); paced audio lateness p50 {late[0]:.1f} "
        f"p99 {late[1]:.1f} max {late[2]:.1f} ms (n={len(stats.lateness_ms)}); the callers' own timer lag "
        f"p50 {lag[0]:.1f} p99 {lag[1]:.1f} ms"
    )
    for kind in ATTACKS:
        if kind in outcomes:
            seen = sorted(outcomes[kind].items(), key=lambda pair: -pair[1])
            print(f"hostile {kind:20s} {', '.join(f'{name} x{count}' for name, count in seen)}")
    warmup = args.warmup if args.warmup is not None else args.duration / 10
    after = rss[int(warmup / 10) :] or rss
    if after:
        growth = (after[-1] - after[0]) / after[0] * 100
        print(
            f"server RSS (process tree): {after[0]:.1f} MB after {warmup:.0f} s warm-up, {after[-1]:.1f} MB at the "
            f"end ({growth:+.1f} %), max {max(after):.1f} MB; samples every 10 s: "
            + " ".join(f"{value:.0f}" for value in rss[:: max(1, len(rss) // 24)])
        )


if __name__ == "__main__":
    main()
