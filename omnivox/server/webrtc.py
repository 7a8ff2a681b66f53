"""The WebRTC door: OpenAI's SDP-over-HTTP flow (`POST /v1/realtime/calls`), Opus both ways, events on `oai-events`.

The server owns playout here: a self-pacing outbound track emits one 20 ms frame per 20 ms of wall clock
(silence when the agent is quiet), reports what it really played to the session core, and drops its queue
at once on barge-in. Inbound Opus (48 kHz stereo) is mixed to mono and stream-resampled to 16 kHz.
"""

from __future__ import annotations

import asyncio
import contextlib
import fractions
import logging
import secrets
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import av
import numpy as np
from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from omnivox.pipeline.audio import StreamResampler, float_to_pcm16
from omnivox.pipeline.client_json import load_client_json
from omnivox.pipeline.engines.base import INPUT_RATE
from omnivox.pipeline.events import (
    AudioIn,
    AudioOut,
    ClearPlayout,
    ClientEvent,
    Dialect,
    PlayoutProgress,
    ProtocolError,
    SessionOutput,
    parse_client_event,
)
from omnivox.pipeline.internal_errors import report_internal_error
from omnivox.server.auth import matching_key
from omnivox.server.backpressure import WriteTimeout
from omnivox.server.config import LimitsConfig
from omnivox.server.http_common import ApiError, read_body, read_form
from omnivox.server.realtime_ws import EventWriter
from omnivox.server.runner import SessionRunner
from omnivox.server.state import ServerState, SessionLimitReached

log = logging.getLogger(__name__)

DOOR = "webrtc"
RATE = 48_000
"""Outbound frames at Opus' own rate, so aiortc's encoder never resamples."""
FRAME_SAMPLES = RATE // 50
EVENTS_CHANNEL = "oai-events"
OFFER_FIELD_BYTES = 1024 * 1024
"""The multipart `sdp` and `session` fields, each."""


class PacedAudioTrack(MediaStreamTrack):
    """Outbound audio: one 20 ms frame per 20 ms against `t0 + pts/rate` (aiortc calls `recv` back to back and
    ignores pts), silence when nothing is queued, and the played position of every item reported as it plays."""

    kind = "audio"

    def __init__(self, on_played: Any) -> None:
        super().__init__()
        self._queue: deque[tuple[str, np.ndarray]] = deque()
        self._pending = np.zeros(0, np.float32)
        self._pending_item: str | None = None
        self._played: dict[str, int] = {}
        self._on_played = on_played
        self._t0: float | None = None
        self._pts = 0

    def push(self, item_id: str, pcm: np.ndarray) -> None:
        self._queue.append((item_id, pcm))

    def clear(self) -> None:
        """Barge-in: nothing queued is played."""
        self._queue.clear()
        self._pending, self._pending_item = np.zeros(0, np.float32), None

    def _next_samples(self) -> tuple[str | None, np.ndarray]:
        while self._pending.size < FRAME_SAMPLES and self._queue:
            item_id, pcm = self._queue.popleft()
            if self._pending_item not in (None, item_id):
                break
            self._pending_item = item_id
            self._pending = np.concatenate([self._pending, pcm])
        item_id = self._pending_item
        if item_id is None:
            return None, np.zeros(FRAME_SAMPLES, np.float32)
        frame, self._pending = self._pending[:FRAME_SAMPLES], self._pending[FRAME_SAMPLES:]
        if not self._pending.size and not self._queue:
            self._pending_item = None
        if frame.size < FRAME_SAMPLES:
            frame = np.concatenate([frame, np.zeros(FRAME_SAMPLES - frame.size, np.float32)])
        return item_id, frame

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        if self._t0 is None:
            self._t0 = time.monotonic()
        else:
            self._pts += FRAME_SAMPLES
            delay = self._t0 + self._pts / RATE - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
        item_id, samples = self._next_samples()
        if item_id is not None:
            played = self._played.get(item_id, 0) + FRAME_SAMPLES
            self._played[item_id] = played
            self._on_played(item_id, played * 1000 / RATE)
        frame = av.AudioFrame(format="s16", layout="mono", samples=FRAME_SAMPLES)
        frame.planes[0].update(float_to_pcm16(samples))
        frame.pts = self._pts
        frame.sample_rate = RATE
        frame.time_base = fractions.Fraction(1, RATE)
        return frame


@dataclass
class Call:
    """One WebRTC call: its peer connection, session runner and tasks; `close()` releases everything once."""

    call_id: str
    pc: RTCPeerConnection
    runner: SessionRunner
    writer: EventWriter
    track: PacedAudioTrack
    release_slot: Any
    max_buffered_bytes: int
    tasks: list[asyncio.Task[Any]] = field(default_factory=list)
    channel: Any = None
    outbox: list[str] = field(default_factory=list)
    closed: bool = False
    owner: str | None = None
    """The API key that made the call (None without keys): the only one that may hang it up."""

    async def send_text(self, text: str) -> None:
        """Events to the peer; one that lets `webrtc.max_buffered_bytes` pile up (unread, or not yet connected) is
        dropped (`WriteTimeout` ends the session, which hangs up)."""
        if self.channel is not None and self.channel.readyState == "open":
            queued = self.channel.bufferedAmount
            self.channel.send(text)
        else:
            queued = sum(len(t) for t in self.outbox)
            self.outbox.append(text)
        if queued + len(text) > self.max_buffered_bytes:
            raise WriteTimeout(f"{queued + len(text)} bytes of events wait on the data channel")

    def attach_channel(self, channel: Any) -> None:
        self.channel = channel
        for text in self.outbox:
            channel.send(text)
        self.outbox.clear()

    async def close(self, calls: dict[str, Call]) -> None:
        if self.closed:
            return
        self.closed = True
        calls.pop(self.call_id, None)
        self.runner.stop()
        self.track.stop()
        for task in self.tasks:
            if task is not asyncio.current_task():
                task.cancel()
        for task in self.tasks:
            if task is not asyncio.current_task():
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        with contextlib.suppress(Exception):
            await self.pc.close()
        self.release_slot()
        log.info("%s: WebRTC call %s closed", self.runner.session.id, self.call_id)


def _calls(request: Request) -> dict[str, Call]:
    app_state = request.app.state
    if not hasattr(app_state, "webrtc_calls"):
        app_state.webrtc_calls = {}
    return app_state.webrtc_calls


def _error(status: int, message: str, code: str, error_type: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse(
        {"error": {"message": message, "type": error_type, "code": code, "param": None}}, status_code=status
    )


async def _read_offer(request: Request, limits: LimitsConfig) -> tuple[str, dict[str, Any] | None]:
    """The SDP offer and the optional session (multipart), within `limits.max_http_body_bytes`."""
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        form = await read_form(
            request, limits.max_http_body_bytes, max_files=2, max_fields=2, max_field_bytes=OFFER_FIELD_BYTES
        )
        sdp, session = form.get("sdp"), form.get("session")
        if hasattr(sdp, "read"):
            sdp = (await sdp.read()).decode()
        if hasattr(session, "read"):
            session = (await session.read()).decode()
        if not isinstance(sdp, str) or not sdp.strip():
            raise ValueError("the form needs an 'sdp' field holding the offer")
        has_session = isinstance(session, str) and session.strip()
        parsed = load_client_json(session, limits.max_json_depth) if has_session else None
        if parsed is not None and not isinstance(parsed, dict):
            raise ValueError("the 'session' field must be a JSON object")
        return sdp, parsed
    body = (await read_body(request, limits.max_http_body_bytes)).decode(errors="replace")
    if not body.strip():
        raise ValueError("the body must be an SDP offer (application/sdp) or a multipart form with 'sdp'")
    return body, None


def _caller_key(request: Request, state: ServerState) -> tuple[str | None, JSONResponse | None]:
    """The key the caller presented (None when the server has no keys), or the response refusing the caller."""
    headers = {k.lower(): v for k, v in request.headers.items()}
    if not state.origin_allowed(headers, DOOR):
        return None, _error(403, "this origin is not allowed (server.allowed_origins)", "origin_not_allowed")
    keys = state.config.server.api_keys
    key = matching_key(keys, headers)
    if keys and key is None:
        state.metrics.sessions_rejected.labels(DOOR, "auth").inc()
        return None, _error(401, "missing or invalid API key", "invalid_api_key")
    return key, None


async def create_call(request: Request) -> Response:
    """`POST /v1/realtime/calls` (GA) and `POST /v1/realtime` (beta): SDP offer in, SDP answer out."""
    state: ServerState = request.app.state.omnivox
    owner, refused = _caller_key(request, state)
    if refused is not None:
        return refused
    try:
        offer, session_update = await _read_offer(request, state.config.limits)
    except ApiError as exc:
        return JSONResponse(exc.body(), status_code=exc.status)
    except (ValueError, UnicodeDecodeError) as exc:
        return _error(400, str(exc), "invalid_offer")
    slot = contextlib.ExitStack()
    try:
        slot.enter_context(state.session_slot(DOOR))
    except SessionLimitReached as exc:
        return _error(429, str(exc), "session_limit_reached", "rate_limit_error")
    dialect = Dialect.BETA if request.url.path.rstrip("/").endswith("/v1/realtime") else Dialect.GA
    try:
        call = await _answer(request, state, offer, session_update, dialect, slot.close)
        call.owner = owner
    except Exception as exc:
        slot.close()
        message = report_internal_error(log, "WebRTC offer refused", exc, public="could not accept the SDP offer")
        return _error(400, message, "invalid_offer")
    answer = call.pc.localDescription
    return Response(
        answer.sdp,
        status_code=201,
        media_type="application/sdp",
        headers={"Location": f"/v1/realtime/calls/{call.call_id}"},
    )


async def _answer(
    request: Request,
    state: ServerState,
    offer: str,
    session_update: dict[str, Any] | None,
    dialect: Dialect,
    release_slot: Any,
) -> Call:
    config = state.config.webrtc
    servers = [RTCIceServer(**server) for server in config.ice_servers]
    pc = RTCPeerConnection(RTCConfiguration(iceServers=servers))
    session = state.new_session(
        frame_ms=config.frame_ms, lead_ms=config.lead_ms, output_rate=RATE, server_playout=True, door=DOOR
    )
    model = request.query_params.get("model")
    if model:
        session.config["model"] = model
    calls = _calls(request)
    holder: dict[str, Call] = {}

    def played(item_id: str, played_ms: float) -> None:
        holder["call"].runner.feed(PlayoutProgress(item_id, played_ms))

    track = PacedAudioTrack(played)
    writer = EventWriter(session, dialect, lambda text: holder["call"].send_text(text), send_audio=False)

    async def emit(output: SessionOutput) -> None:
        if isinstance(output, AudioOut):
            track.push(output.item_id, output.pcm)
        elif isinstance(output, ClearPlayout):
            track.clear()
        await writer.output(output)

    runner = state.new_runner(session, emit, DOOR)
    max_depth = state.config.limits.max_json_depth
    call = Call(secrets.token_hex(12), pc, runner, writer, track, release_slot, config.max_buffered_bytes)
    holder["call"] = call
    calls[call.call_id] = call

    @pc.on("datachannel")
    def on_datachannel(channel: Any) -> None:
        if channel.label != EVENTS_CHANNEL:
            return
        call.attach_channel(channel)

        @channel.on("message")
        def on_message(message: Any) -> None:
            try:
                if not isinstance(message, str):
                    raise ProtocolError("binary messages are not supported; send JSON text", code="invalid_frame")
                if len(message) > config.max_message_bytes:
                    raise ProtocolError(
                        f"message of {len(message)} bytes is over the {config.max_message_bytes}-byte limit",
                        code="message_too_large",
                    )
                event = parse_client_event(message, dialect, max_depth=max_depth)
                if not runner.offer(event, len(message)):
                    raise ProtocolError(
                        "too many events are waiting for this session; slow down",
                        code="input_queue_full",
                        event_id=event.event_id,
                    )
            except ProtocolError as exc:
                call.tasks.append(asyncio.ensure_future(_send_error(call, exc)))

        @channel.on("close")
        def on_close() -> None:
            call.tasks.append(asyncio.ensure_future(call.close(calls)))

    @pc.on("track")
    def on_track(remote: MediaStreamTrack) -> None:
        if remote.kind == "audio":
            call.tasks.append(asyncio.ensure_future(_pump_caller_audio(remote, runner)))

    @pc.on("connectionstatechange")
    async def on_state() -> None:
        if pc.connectionState in ("failed", "closed"):
            await call.close(calls)

    pc.addTrack(track)
    try:
        await pc.setRemoteDescription(RTCSessionDescription(offer, "offer"))
        await pc.setLocalDescription(await pc.createAnswer())
    except Exception:
        await call.close(calls)
        raise
    if session_update:
        runner.feed(ClientEvent("session.update", {"session": {"type": "realtime", **session_update}}))
    pump = asyncio.ensure_future(runner.run())
    pump.add_done_callback(lambda _: call.tasks.append(asyncio.ensure_future(call.close(calls))))
    call.tasks.append(pump)
    call.tasks.append(asyncio.ensure_future(_hang_up_unless_connected(call, calls, config.connect_timeout_s)))
    log.info("%s: WebRTC call %s answered", session.id, call.call_id)
    return call


async def _hang_up_unless_connected(call: Call, calls: dict[str, Call], timeout_s: float) -> None:
    """Frees the slot of a call whose peer never completed the connection (ICE and DTLS) in `webrtc.connect_timeout_s`.

    aioice never fails ICE on its own while the offer has not signalled end-of-candidates (browsers' offers do not),
    nor starts it for an offer without candidates, so a caller who went away after the POST would otherwise hold its
    session slot for good.
    """
    await asyncio.sleep(timeout_s)
    if call.pc.connectionState != "connected":
        log.info("WebRTC call %s not connected after %.0f s; hanging up", call.call_id, timeout_s)
        await call.close(calls)


async def _send_error(call: Call, exc: ProtocolError) -> None:
    with contextlib.suppress(WriteTimeout):  # the session ends on its own next send
        await call.writer.error(exc, exc.event_id)


async def _pump_caller_audio(track: MediaStreamTrack, runner: SessionRunner) -> None:
    """Caller Opus frames -> mono -> 16 kHz -> the session core."""
    resampler: StreamResampler | None = None
    while True:
        try:
            frame = await track.recv()
        except MediaStreamError:
            return
        samples = frame.to_ndarray()
        channels = len(frame.layout.channels)
        pcm = samples.reshape(-1)[: frame.samples * channels].astype(np.float32) / 32768.0
        if channels > 1:
            pcm = pcm.reshape(-1, channels).mean(axis=1)
        if resampler is None or resampler.in_rate != frame.sample_rate:
            resampler = StreamResampler(frame.sample_rate, INPUT_RATE)
        await runner.put(AudioIn(resampler.process(pcm)), pcm.nbytes)


async def hangup_call(request: Request) -> Response:
    """Only the key that made a call may end it (to another key, the call does not exist)."""
    state: ServerState = request.app.state.omnivox
    key, refused = _caller_key(request, state)
    if refused is not None:
        return refused
    calls = _calls(request)
    call = calls.get(request.path_params["call_id"])
    if call is None or call.owner != key:
        return _error(404, "no such call", "call_not_found")
    await call.close(calls)
    return Response(status_code=200)


async def close_all_calls(app_state: Any) -> None:
    """Server shutdown: hang up every call."""
    calls: dict[str, Call] = getattr(app_state, "webrtc_calls", {})
    for call in list(calls.values()):
        await call.close(calls)


def webrtc_routes() -> list[BaseRoute]:
    return [
        Route("/v1/realtime/calls", create_call, methods=["POST"]),
        Route("/v1/realtime", create_call, methods=["POST"]),
        Route("/v1/realtime/calls/{call_id}/hangup", hangup_call, methods=["POST"]),
    ]
