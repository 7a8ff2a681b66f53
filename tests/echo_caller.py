"""A caller on the Realtime WebSocket door whose microphone hears the agent: what it says, plus the agent's own audio
played back into it (a speakerphone or laptop speakers: delayed, attenuated) and line noise, streamed in real time.

Agent audio plays as it arrives (after what is still playing), like a browser's playback queue; the client stops its
playback when the server says the caller started a turn (`speech_started`), as OpenAI clients do. Used by the turn
taking tests and by `benchmarks/turn_taking.py`. `TwilioEchoCaller` is the same caller on the telephony door, as
Twilio: 8 kHz mu-law, marks echoed once the audio before them has played, `clear` drops the playout queue.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import json
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import websockets

from omnivox.pipeline.audio import mulaw_decode, mulaw_encode, pcm16_to_float, resample, synthesize_speech
from tests.audio_fixtures import encode

RATE = 24_000
VOICED = 0.01


@dataclass(frozen=True)
class Echo:
    delay_ms: float = 150.0
    gain_db: float = -10.0


@functools.lru_cache(maxsize=256)
def voice(text: str, espeak_voice: str = "en-us", words_per_minute: int = 160) -> np.ndarray:
    """`text` spoken by espeak-ng at 24 kHz, leading and trailing silence cut (cached)."""
    samples = synthesize_speech(text, RATE, espeak_voice, words_per_minute)
    voiced = np.flatnonzero(np.abs(samples) > VOICED)
    samples = samples[voiced[0] : voiced[-1] + 1] if voiced.size else samples
    samples.flags.writeable = False
    return samples


class EchoCaller:
    """One WebSocket session; `say()` queues speech, `events` keeps every server event with its arrival time."""

    rate = RATE

    def __init__(
        self,
        url: str,
        session: dict[str, Any] | None = None,
        echo: Echo | None = None,
        noise_dbfs: float | None = -55.0,
        seed: int = 0,
    ) -> None:
        self.url = url
        self.session = session or {}
        self.echo = echo
        self.noise = 0.0 if noise_dbfs is None else 10 ** (noise_dbfs / 20)
        self.rng = np.random.default_rng(seed)
        self.events: list[tuple[float, dict[str, Any]]] = []
        self.onsets: list[float] = []
        """Client time at which the chunk holding each phrase's first voiced sample was sent."""
        self.ends: list[float] = []
        """Client time at which the chunk holding each phrase's last voiced sample was sent."""
        self._speech = np.zeros(0, np.float32)
        self._marks: list[tuple[int, str]] = []
        self._far = np.zeros(0, np.float32)
        """The agent's audio on the caller's sample timeline (what the loudspeaker plays, when)."""
        self._play_end = 0
        self._received = 0
        self._position = 0
        self._start = 0.0
        self._ws: Any = None
        self._tasks: list[asyncio.Task[None]] = []
        self._arrived = asyncio.Event()
        self._chunk = self.rate // 50

    async def __aenter__(self) -> EchoCaller:
        await self._open()
        self._start = time.monotonic()
        self._tasks.append(asyncio.create_task(self._microphone()))
        return self

    async def _open(self) -> None:
        self._ws = await websockets.connect(f"{self.url}/v1/realtime", max_size=None)
        self._tasks.append(asyncio.create_task(self._read()))
        await self.wait_for("session.created", timeout=10)
        if self.session:
            await self.send({"type": "session.update", "session": {"type": "realtime", **self.session}})
            await self.wait_for("session.updated", timeout=10)

    async def __aexit__(self, *exc: object) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        with contextlib.suppress(Exception):
            await self._ws.close()

    async def send(self, event: dict[str, Any]) -> None:
        await self._ws.send(json.dumps(event))

    def say(self, samples: np.ndarray) -> None:
        """Queue caller audio (24 kHz) after whatever is still being said."""
        if self.rate != RATE:
            samples = resample(samples, RATE, self.rate)
        voiced = np.flatnonzero(np.abs(samples) > VOICED)
        if voiced.size:
            self._marks.append((self._speech.size + int(voiced[0]), "onset"))
            self._marks.append((self._speech.size + int(voiced[-1]), "end"))
        self._speech = np.concatenate((self._speech, samples.astype(np.float32)))

    @property
    def saying(self) -> bool:
        return self._speech.size > 0

    def of_type(self, event_type: str) -> list[tuple[float, dict[str, Any]]]:
        return [(at, event) for at, event in self.events if event["type"] == event_type]

    async def wait_for(self, event_type: str, timeout: float, after: float = 0.0) -> tuple[float, dict[str, Any]]:
        """The first `event_type` that arrived at or after client time `after` (waiting up to `timeout`)."""
        async with asyncio.timeout(timeout):
            while True:
                for at, event in self.events:
                    if event["type"] == event_type and at >= after:
                        return at, event
                self._arrived.clear()
                await self._arrived.wait()

    async def _read(self) -> None:
        async for raw in self._ws:
            event = json.loads(raw)
            now = time.monotonic()
            self.events.append((now, event))
            self._on_event(event, now)
            self._arrived.set()

    def _on_event(self, event: dict[str, Any], now: float) -> None:
        if event["type"] == "response.output_audio.delta":
            self._play(pcm16_to_float(base64.b64decode(event["delta"])), now)
        elif event["type"] == "input_audio_buffer.speech_started":
            self._stop_playback(now)

    async def _send_chunk(self, chunk: np.ndarray) -> None:
        audio = base64.b64encode(encode(np.clip(chunk, -1.0, 1.0))).decode()
        await self.send({"type": "input_audio_buffer.append", "audio": audio})

    def received_seconds(self) -> float:
        """How much agent audio arrived in all (what a `clear` dropped included)."""
        return self._received / self.rate

    def _clock_position(self, now: float) -> int:
        return int((now - self._start) * self.rate) if self._start else 0

    def _play(self, pcm: np.ndarray, now: float) -> None:
        self._received += pcm.size
        start = max(self._play_end, self._clock_position(now))
        end = start + pcm.size
        if end > self._far.size:
            self._far = np.concatenate((self._far, np.zeros(end - self._far.size + self.rate, np.float32)))
        self._far[start:end] = pcm
        self._play_end = end

    def _stop_playback(self, now: float) -> None:
        position = self._clock_position(now)
        self._far[position:] = 0.0
        self._play_end = min(self._play_end, position)

    def _echo_of(self, start: int) -> np.ndarray:
        assert self.echo is not None
        delay = int(self.echo.delay_ms * self.rate / 1000)
        low, high = start - delay, start - delay + self._chunk
        out = np.zeros(self._chunk, np.float32)
        if high > 0 and low < self._far.size:
            a, b = max(low, 0), min(high, self._far.size)
            out[a - low : b - low] = self._far[a:b]
        return out * 10 ** (self.echo.gain_db / 20)

    async def _microphone(self) -> None:
        index = 0
        while True:
            chunk_samples = self._chunk
            delay = self._start + index * chunk_samples / self.rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            self._tick(time.monotonic())
            own, self._speech = self._speech[:chunk_samples], self._speech[chunk_samples:]
            chunk = np.zeros(chunk_samples, np.float32)
            chunk[: own.size] = own
            if self.echo is not None:
                chunk += self._echo_of(self._position)
            if self.noise:
                chunk += self.rng.normal(0.0, self.noise, chunk_samples).astype(np.float32)
            now = time.monotonic()
            for offset, kind in [m for m in self._marks if m[0] < chunk_samples]:
                (self.onsets if kind == "onset" else self.ends).append(now + offset / self.rate)
            self._marks = [(offset - chunk_samples, kind) for offset, kind in self._marks if offset >= chunk_samples]
            self._position += chunk_samples
            index += 1
            await self._send_chunk(chunk)

    def _tick(self, now: float) -> None:
        """Called every 20 ms before the microphone's chunk goes out."""


class TwilioEchoCaller(EchoCaller):
    """The same caller dialled in through the telephony door, speaking Twilio's Media Streams protocol."""

    rate = 8000

    def __init__(self, url: str, **options: Any) -> None:
        super().__init__(url, **options)
        self._pending_marks: list[tuple[int, str]] = []
        self.clears: list[float] = []

    async def _open(self) -> None:
        self._ws = await websockets.connect(f"{self.url}/telephony/twilio", max_size=None)
        self._tasks.append(asyncio.create_task(self._read()))
        await self.send({"event": "connected", "protocol": "Call", "version": "1.0.0"})
        media_format = {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}
        start = {"streamSid": "MZtest", "callSid": "CAtest", "mediaFormat": media_format}
        await self.send({"event": "start", "streamSid": "MZtest", "start": start})

    def _on_event(self, event: dict[str, Any], now: float) -> None:
        kind = event.get("event")
        event["type"] = f"twilio.{kind}"
        if kind == "media":
            self._play(mulaw_decode(base64.b64decode(event["media"]["payload"])), now)
        elif kind == "mark":
            self._pending_marks.append((self._play_end, event["mark"]["name"]))
        elif kind == "clear":
            self.clears.append(now)
            self._stop_playback(now)
            self._echo_marks(lambda _: True)

    def _tick(self, now: float) -> None:
        position = self._clock_position(now)
        self._echo_marks(lambda at: at <= position)

    def _echo_marks(self, due: Any) -> None:
        echoed = [name for at, name in self._pending_marks if due(at)]
        self._pending_marks = [(at, name) for at, name in self._pending_marks if not due(at)]
        for name in echoed:
            self._tasks.append(
                asyncio.create_task(self.send({"event": "mark", "streamSid": "MZtest", "mark": {"name": name}}))
            )

    async def _send_chunk(self, chunk: np.ndarray) -> None:
        payload = base64.b64encode(mulaw_encode(np.clip(chunk, -1.0, 1.0))).decode()
        await self.send({"event": "media", "streamSid": "MZtest", "media": {"payload": payload}})
