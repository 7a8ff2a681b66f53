"""The OpenAI-Realtime WebSocket door (`/v1/realtime`): JSON events in and out, GA or beta per connection.

It only translates: text frames -> `ClientEvent`s for the session core, core outputs -> JSON events,
with audio frames rendered as `response.output_audio.delta` in the session's output format.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.websockets import WebSocket, WebSocketDisconnect

from omnivox.pipeline.audio import audio_format
from omnivox.pipeline.events import (
    AudioOut,
    Dialect,
    ProtocolError,
    ServerEvent,
    SessionOutput,
    error_event,
    parse_client_event,
    render_server_event,
)
from omnivox.pipeline.session import Session
from omnivox.server.auth import is_authorized
from omnivox.server.backpressure import TimedSend, WriteTimeout, abort_connection
from omnivox.server.config import LimitsConfig
from omnivox.server.lifecycle import GOING_AWAY
from omnivox.server.runner import SessionRunner
from omnivox.server.state import ServerState, SessionLimitReached

log = logging.getLogger(__name__)

DOOR = "realtime_ws"
TRY_AGAIN_LATER = 1013
POLICY_VIOLATION = 1008


def choose_dialect(headers: dict[str, str], subprotocols: list[str]) -> Dialect:
    beta = "realtime=v1" in headers.get("openai-beta", "") or "openai-beta.realtime-v1" in subprotocols
    return Dialect.BETA if beta else Dialect.GA


class EventWriter:
    """Renders core outputs as JSON events in one dialect, numbering `event_id`s; shared by the WebSocket door
    and the WebRTC data channel (which passes `send_audio=False`: its audio goes on the RTP track)."""

    def __init__(
        self,
        session: Session,
        dialect: Dialect,
        send_text: Callable[[str], Awaitable[None]],
        *,
        send_audio: bool = True,
    ) -> None:
        self.session = session
        self.dialect = dialect
        self._send_text = send_text
        self._send_audio = send_audio
        self._count = 0
        self._lock = asyncio.Lock()

    async def event(self, event: ServerEvent) -> None:
        async with self._lock:
            self._count += 1
            rendered = render_server_event(event, self.dialect, f"event_{self._count}")
            if rendered is not None:
                await self._send_text(json.dumps(rendered))

    async def error(self, exc: ProtocolError, event_id: str | None = None) -> None:
        await self.event(error_event(exc, event_id))

    async def output(self, output: SessionOutput) -> None:
        if isinstance(output, ServerEvent):
            await self.event(output)
        elif isinstance(output, AudioOut) and self._send_audio:
            data = audio_format(self.session.output_format).encode(output.pcm)
            await self.event(
                ServerEvent(
                    "response.output_audio.delta",
                    {
                        "response_id": output.response_id,
                        "item_id": output.item_id,
                        "output_index": output.output_index,
                        "content_index": output.content_index,
                        "delta": base64.b64encode(data).decode(),
                    },
                )
            )


def _parse_with_limit(raw: str, dialect: Dialect, limits: LimitsConfig, beta_pcm16_rate: int) -> Any:
    limit = limits.max_message_bytes
    if len(raw) > limit:
        raise ProtocolError(f"message of {len(raw)} bytes is over the {limit}-byte limit", code="message_too_large")
    return parse_client_event(raw, dialect, max_depth=limits.max_json_depth, beta_pcm16_rate=beta_pcm16_rate)


async def realtime_endpoint(websocket: WebSocket) -> None:
    state: ServerState = websocket.app.state.omnivox
    headers = {k.lower(): v for k, v in websocket.headers.items()}
    if not state.origin_allowed(headers, DOOR):
        await websocket.close(POLICY_VIOLATION)  # before the handshake: the browser gets a 403
        return
    offered = [p.strip() for p in headers.get("sec-websocket-protocol", "").split(",") if p.strip()]
    await websocket.accept(subprotocol="realtime" if "realtime" in offered else None)
    dialect = choose_dialect(headers, offered)
    if not is_authorized(state.config.server.api_keys, headers, offered):
        state.metrics.sessions_rejected.labels(DOOR, "auth").inc()
        await _refuse(websocket, dialect, "invalid_api_key", "missing or invalid API key", POLICY_VIOLATION)
        return
    model = websocket.query_params.get("model")
    if not state.accepts_model(model):
        state.metrics.sessions_rejected.labels(DOOR, "model").inc()
        message = f"the model {model!r} does not exist; this server serves {state.model_name!r} (and its aliases)"
        await _refuse(websocket, dialect, "model_not_found", message, POLICY_VIOLATION)
        return
    try:
        with state.session_slot(DOOR):
            await _serve(websocket, state, dialect)
    except SessionLimitReached as exc:
        await _refuse(websocket, dialect, "session_limit_reached", str(exc), TRY_AGAIN_LATER)


async def _refuse(websocket: WebSocket, dialect: Dialect, code: str, message: str, close_code: int) -> None:
    event = error_event(ProtocolError(message, code=code))
    with contextlib.suppress(Exception):
        await websocket.send_text(json.dumps(render_server_event(event, dialect, "event_1")))
        await websocket.close(close_code, message[:120])


async def _serve(websocket: WebSocket, state: ServerState, dialect: Dialect) -> None:
    session = state.new_session()
    model = websocket.query_params.get("model")
    if model:
        session.config["model"] = model
    if dialect is Dialect.BETA:  # what a beta client means by "pcm16", from its first append on
        session.config["audio"]["input"]["format"]["rate"] = state.config.audio.beta_pcm16_input_rate
    send = TimedSend(websocket.send_text, state.config.connections.write_timeout_s)
    writer = EventWriter(session, dialect, send)
    runner = state.new_runner(session, writer.output, DOOR)
    pump = asyncio.create_task(runner.run(), name=f"pump-{session.id}")
    receiver = asyncio.create_task(_receive(websocket, runner, writer, dialect, state))
    pump.add_done_callback(lambda _: receiver.cancel())  # the server ended the session: stop reading
    try:
        await asyncio.wait({receiver})
    finally:
        receiver.cancel()
        runner.stop()
        with contextlib.suppress(Exception):
            await pump
        await _close(websocket, runner, send)
    if not receiver.cancelled() and receiver.exception() is not None:
        log.warning("%s: reading the client failed: %r", session.id, receiver.exception())


async def _receive(
    websocket: WebSocket, runner: SessionRunner, writer: EventWriter, dialect: Dialect, state: ServerState
) -> None:
    """Client messages -> the runner's bounded queue (awaiting room there, so a flood stops being read)."""
    limits = state.config.limits
    pcm16_rate = state.config.audio.beta_pcm16_input_rate
    with contextlib.suppress(WebSocketDisconnect, WriteTimeout):
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            raw = message.get("text")
            if raw is None:
                await writer.error(
                    ProtocolError("binary frames are not supported; send JSON text", code="invalid_frame")
                )
                continue
            try:
                event = _parse_with_limit(raw, dialect, limits, pcm16_rate)
            except ProtocolError as exc:
                await writer.error(exc, exc.event_id)
                continue
            await runner.put(event, len(raw))


async def _close(websocket: WebSocket, runner: SessionRunner, send: TimedSend) -> None:
    """End the connection the way the session ended: a client that stopped reading is dropped, the others hear why."""
    if (send.timed_out or runner.end_reason == "write_timeout") and abort_connection(websocket.scope):
        return
    code = {
        "shutdown": (GOING_AWAY, "server shutting down"),
        "idle": (1000, "idle timeout"),
        "write_timeout": (POLICY_VIOLATION, "client stopped reading"),  # when the connection cannot be aborted
    }.get("write_timeout" if send.timed_out else runner.end_reason or "")
    if code is None:
        return
    with contextlib.suppress(Exception):
        async with asyncio.timeout(send.timeout_s):
            await websocket.close(*code)
