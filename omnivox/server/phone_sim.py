"""`omnivox call`: a phone call simulator that dials a Twilio Media Streams server exactly as Twilio would.

It lives in `omnivox/server/` next to the CLI that runs it because it is a tool about a server door, but it imports
nothing of the server: it speaks only the Twilio protocol over a WebSocket (connected, start, a `media` event every
20 ms in real time, echoed marks, stop), so it measures any Media Streams server, omnivox or not.

Twilio's side is emulated faithfully: agent audio joins a real-time playout queue, a `mark` is echoed only when the
audio queued before it has played, and `clear` drops the queue (echoing the marks it held, as Twilio does). The
whole call is recorded as heard, caller left and agent right, and every turn is measured: voice-to-voice latency
(end of the caller's speech to the first agent audio heard), barge-in latency (caller speech onset to `clear`) and
agent underruns (gaps in the agent's audio over 40 ms while it speaks).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import secrets
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import websockets

from omnivox.pipeline.audio import mulaw_decode, mulaw_encode, read_wav, resample, synthesize_speech, write_wav

log = logging.getLogger(__name__)

PHONE_RATE = 8000
FRAME_S = 0.02
FRAME_SAMPLES = int(PHONE_RATE * FRAME_S)
UNDERRUN_MS = 40
SPEECH_LEVEL = 0.02
"""Amplitude above which a caller sample counts as speech (onset and offset of an utterance)."""


@dataclass(frozen=True)
class Utterance:
    label: str
    audio: np.ndarray  # float32 at 8 kHz

    @classmethod
    def say(cls, text: str) -> Utterance:
        return cls(text, synthesize_speech(text, PHONE_RATE))

    @classmethod
    def from_wav(cls, path: str | Path) -> Utterance:
        samples, rate = read_wav(path)
        return cls(Path(path).name, resample(samples, rate, PHONE_RATE))

    def speech_bounds_s(self) -> tuple[float, float]:
        """Where the speech starts and ends inside the audio (synthesised speech has silent edges)."""
        loud = np.flatnonzero(np.abs(self.audio) > SPEECH_LEVEL)
        if not loud.size:
            return 0.0, self.audio.size / PHONE_RATE
        return loud[0] / PHONE_RATE, (loud[-1] + 1) / PHONE_RATE


@dataclass
class Turn:
    """One caller utterance and the agent audio heard after it; times in seconds since the call started."""

    index: int
    label: str
    speech_onset_s: float
    speech_end_s: float | None = None
    agent_start_s: float | None = None
    agent_end_s: float | None = None
    agent_heard_s: float = 0.0
    barge_in_s: float | None = None
    gaps_ms: list[float] = field(default_factory=list)

    @property
    def voice_to_voice_ms(self) -> float | None:
        if self.agent_start_s is None or self.speech_end_s is None:
            return None
        return (self.agent_start_s - self.speech_end_s) * 1000

    @property
    def barge_in_ms(self) -> float | None:
        return None if self.barge_in_s is None else (self.barge_in_s - self.speech_onset_s) * 1000

    @property
    def underruns(self) -> list[float]:
        return [gap for gap in self.gaps_ms if gap > UNDERRUN_MS]


@dataclass(frozen=True)
class MarkEcho:
    name: str
    at_s: float
    by_clear: bool
    """Echoed because a `clear` dropped the audio before it (never heard), not because it played."""


@dataclass
class CallResult:
    turns: list[Turn]
    caller: np.ndarray
    agent: np.ndarray
    marks: list[MarkEcho]
    clears_s: list[float]
    hung_up_by_server: bool

    def stereo(self) -> np.ndarray:
        return np.stack([self.caller, self.agent], axis=1)


@dataclass
class CallOptions:
    url: str
    utterances: list[Utterance]
    pause_s: float = 0.5
    barge_in_after_s: float | None = None
    turns_timeout_s: float = 15.0
    agent_done_silence_s: float = 1.0
    """Agent silence that ends its answer (the simulator cannot know the server's turn boundaries)."""
    custom_parameters: dict[str, str] = field(default_factory=dict)


class _Playout:
    """Twilio's outbound buffer: audio and marks in arrival order, played at real time."""

    def __init__(self, echo: list[tuple[str, bool]]) -> None:
        self._queue: deque[np.ndarray | str] = deque()
        self._echo = echo

    def push_audio(self, samples: np.ndarray) -> None:
        self._queue.append(samples)

    def push_mark(self, name: str) -> None:
        self._queue.append(name)

    def clear(self) -> None:
        for entry in self._queue:
            if isinstance(entry, str):
                self._echo.append((entry, True))
        self._queue.clear()

    def play(self) -> tuple[np.ndarray, int]:
        """One 20 ms frame of agent audio and how many of its samples came from the queue (the rest is silence)."""
        frame = np.zeros(FRAME_SAMPLES, dtype=np.float32)
        filled = 0
        while self._queue:
            head = self._queue[0]
            if isinstance(head, str):
                self._echo.append((head, False))
                self._queue.popleft()
                continue
            if filled == FRAME_SAMPLES:
                break
            take = min(FRAME_SAMPLES - filled, head.size)
            frame[filled : filled + take] = head[:take]
            filled += take
            if take == head.size:
                self._queue.popleft()
            else:
                self._queue[0] = head[take:]
        return frame, filled


class PhoneCall:
    def __init__(self, options: CallOptions) -> None:
        self.options = options
        self.stream_sid = "MZ" + secrets.token_hex(16)
        self.call_sid = "CA" + secrets.token_hex(16)
        self._echo: list[tuple[str, bool]] = []
        self._playout = _Playout(self._echo)
        self._sequence = 0
        self._t0 = 0.0
        self._tick = 0
        self._clears: list[float] = []
        self._marks: list[MarkEcho] = []
        self._caller: list[np.ndarray] = []
        self._agent: list[np.ndarray] = [np.zeros(FRAME_SAMPLES, np.float32)]  # agent frame k plays during k + 1
        self._turns: list[Turn] = []
        self._server_closed = False
        self._send_lock = asyncio.Lock()
        self._silent_s = 0.0

    @property
    def now_s(self) -> float:
        return self._tick * FRAME_S

    async def run(self) -> CallResult:
        async with websockets.connect(self.options.url, open_timeout=10, max_size=None) as ws:
            receiver = asyncio.create_task(self._receive(ws))
            try:
                await self._send(ws, {"event": "connected", "protocol": "Call", "version": "1.0.0"})
                await self._send(ws, self._start_message())
                self._t0 = time.monotonic()
                await self._converse(ws)
                if not self._server_closed:
                    stop = {"accountSid": "AC" + "0" * 32, "callSid": self.call_sid}
                    await self._send(ws, {"event": "stop", "streamSid": self.stream_sid, "stop": stop})
            finally:
                receiver.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await receiver
        return CallResult(
            self._turns,
            np.concatenate(self._caller) if self._caller else np.zeros(0, np.float32),
            np.concatenate(self._agent)[: len(self._caller) * FRAME_SAMPLES],
            self._marks,
            self._clears,
            self._server_closed,
        )

    def _start_message(self) -> dict[str, Any]:
        return {
            "event": "start",
            "streamSid": self.stream_sid,
            "start": {
                "accountSid": "AC" + "0" * 32,
                "streamSid": self.stream_sid,
                "callSid": self.call_sid,
                "tracks": ["inbound"],
                "customParameters": dict(self.options.custom_parameters),
                "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": PHONE_RATE, "channels": 1},
            },
        }

    async def _send(self, ws: Any, message: dict[str, Any]) -> None:
        self._sequence += 1
        async with self._send_lock:
            await ws.send(json.dumps({**message, "sequenceNumber": str(self._sequence)}))

    async def _receive(self, ws: Any) -> None:
        try:
            async for raw in ws:
                try:
                    self._on_server_message(json.loads(raw))
                except (ValueError, TypeError, KeyError, AttributeError) as exc:
                    log.warning("ignored a malformed server message (%s): %.80r", exc, raw)
        except websockets.ConnectionClosed:
            pass
        self._server_closed = True

    def _on_server_message(self, message: dict[str, Any]) -> None:
        event = message["event"]
        if event == "media":
            self._playout.push_audio(mulaw_decode(base64.b64decode(message["media"]["payload"], validate=True)))
        elif event == "mark":
            self._playout.push_mark(str(message["mark"]["name"]))
        elif event == "clear":
            self._clears.append(time.monotonic() - self._t0)
            self._playout.clear()
        else:
            log.warning("ignored server message %r", event)

    async def _converse(self, ws: Any) -> None:
        """Speak each utterance, wait for (or barge into) each answer, all on one 20 ms real-time clock."""
        pending = deque(self.options.utterances)
        speaking: Utterance | None = None
        position = 0
        next_start_s: float | None = 0.0
        while not self._server_closed:
            if speaking is None and pending and next_start_s is not None and self.now_s >= next_start_s:
                speaking, position, next_start_s = pending.popleft(), 0, None
                self._turns.append(
                    Turn(len(self._turns) + 1, speaking.label, self.now_s + speaking.speech_bounds_s()[0])
                )
            caller = np.zeros(FRAME_SAMPLES, np.float32)
            if speaking is not None:
                chunk = speaking.audio[position : position + FRAME_SAMPLES]
                caller[: chunk.size] = chunk
                position += FRAME_SAMPLES
                if position >= speaking.audio.size:
                    trailing_s = speaking.audio.size / PHONE_RATE - speaking.speech_bounds_s()[1]
                    self._turns[-1].speech_end_s = self.now_s + chunk.size / PHONE_RATE - trailing_s
                    speaking = None
            await self._wait_for_tick()
            payload = mulaw_encode(caller)
            await self._send_media(ws, payload)
            agent, filled = self._playout.play()
            await self._echo_marks(ws)
            self._caller.append(mulaw_decode(payload))
            self._agent.append(agent)
            self._account_agent(filled)
            self._tick += 1
            turn = self._turns[-1] if self._turns else None
            if turn is None or turn.speech_end_s is None or next_start_s is not None:
                continue
            if turn.agent_start_s is None:
                if self.now_s - turn.speech_end_s > self.options.turns_timeout_s:
                    log.warning("turn %d: no answer within %.1f s", turn.index, self.options.turns_timeout_s)
                    if not pending:
                        return
                    next_start_s = self.now_s
                continue
            barge_in_after = self.options.barge_in_after_s
            if barge_in_after is not None and pending and self.now_s - turn.agent_start_s >= barge_in_after:
                next_start_s = self.now_s
            elif self._silent_s >= self.options.agent_done_silence_s:
                if not pending:
                    return
                next_start_s = self.now_s + self.options.pause_s

    def _account_agent(self, filled: int) -> None:
        """Attribute the agent audio played this tick: to the answer of the latest finished utterance."""
        turns = [t for t in self._turns if t.speech_end_s is not None]
        if not turns:
            return
        turn, play_s = turns[-1], self.now_s + FRAME_S  # the frame taken at the end of tick k plays during k + 1
        if filled:
            if turn.agent_start_s is None:
                turn.agent_start_s = play_s
            elif self._silent_s > 0:
                turn.gaps_ms.append(self._silent_s * 1000)
            turn.agent_heard_s += filled / PHONE_RATE
            turn.agent_end_s = play_s + filled / PHONE_RATE
            self._silent_s = play_s + FRAME_S - turn.agent_end_s
        elif turn.agent_start_s is not None:
            self._silent_s += FRAME_S
        if self._turns[-1] is not turn:
            self._silent_s = 0.0  # the caller is speaking again: the previous answer is over

    async def _wait_for_tick(self) -> None:
        """Frame k of the caller is sent once it has been spoken, at (k + 1) x 20 ms, as a phone network does."""
        delay = self._t0 + (self._tick + 1) * FRAME_S - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)

    async def _send_media(self, ws: Any, payload: bytes) -> None:
        media = {
            "track": "inbound",
            "chunk": str(self._tick + 1),
            "timestamp": str(round(self._tick * FRAME_S * 1000)),
            "payload": base64.b64encode(payload).decode(),
        }
        await self._send(ws, {"event": "media", "streamSid": self.stream_sid, "media": media})

    async def _echo_marks(self, ws: Any) -> None:
        echoes, self._echo[:] = list(self._echo), []
        for name, by_clear in echoes:
            self._marks.append(MarkEcho(name, time.monotonic() - self._t0, by_clear))
            await self._send(ws, {"event": "mark", "streamSid": self.stream_sid, "mark": {"name": name}})


def assign_barge_ins(result: CallResult) -> None:
    """A `clear` during a caller turn that started while the agent was speaking is that turn's barge-in."""
    for turn in result.turns:
        later = [at for at in result.clears_s if at >= turn.speech_onset_s - FRAME_S]
        if later and (turn.speech_end_s is None or later[0] <= turn.speech_end_s + 1.0):
            turn.barge_in_s = later[0]


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def format_report(result: CallResult) -> str:
    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.0f}"

    lines = [f"{'turn':>4}  {'caller said':<32} {'v2v ms':>7} {'barge-in ms':>11} {'agent s':>7} {'underruns':>9}"]
    for turn in result.turns:
        lines.append(
            f"{turn.index:>4}  {turn.label[:32]:<32} {ms(turn.voice_to_voice_ms):>7} {ms(turn.barge_in_ms):>11} "
            f"{turn.agent_heard_s:>7.2f} {len(turn.underruns):>9}"
        )
    v2v = [t.voice_to_voice_ms for t in result.turns if t.voice_to_voice_ms is not None]
    barge = [t.barge_in_ms for t in result.turns if t.barge_in_ms is not None]
    lines.append(f"voice-to-voice ms: p50 {ms(percentile(v2v, 50))}  p95 {ms(percentile(v2v, 95))}  (n={len(v2v)})")
    lines.append(
        f"barge-in ms:       p50 {ms(percentile(barge, 50))}  p95 {ms(percentile(barge, 95))}  (n={len(barge)})"
    )
    underruns = sum(len(t.underruns) for t in result.turns)
    lines.append(f"agent underruns (gaps > {UNDERRUN_MS} ms while speaking): {underruns}")
    return "\n".join(lines)


async def run_call(options: CallOptions, record: str | Path | None = None) -> CallResult:
    result = await PhoneCall(options).run()
    assign_barge_ins(result)
    if record is not None:
        write_wav(record, result.stereo(), PHONE_RATE, channels=2)
    return result
