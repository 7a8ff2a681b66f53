"""The Twilio Media Streams door (`WS /telephony/twilio`) and its TwiML webhook (`POST /telephony/twilio/incoming`).

Twilio is the WebSocket client; we are the server side of a bidirectional `<Connect><Stream>`. Caller audio arrives
as 20 ms of 8 kHz mu-law per `media` event and is resampled to 16 kHz for the session core; the agent's 8 kHz frames
go back as `media` payloads paced at real time plus `telephony.lead_ms`. Twilio owns playout, so this door places a
`mark` after every group of frames and reports each echoed mark to the core as `PlayoutProgress`: on barge-in the
door sends `clear` and the core truncates the assistant item at the last echoed mark, which is what the caller heard.
With `server.api_keys` set, a stream must carry a key as its `api_key` custom parameter; the webhook puts one in the
TwiML only for requests whose Twilio signature it verified.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import hmac
import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from xml.sax.saxutils import quoteattr

import numpy as np
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from omnivox.pipeline.audio import StreamResampler, mulaw_decode, mulaw_encode
from omnivox.pipeline.client_json import JsonRefused, load_client_json
from omnivox.pipeline.engines.base import INPUT_RATE
from omnivox.pipeline.events import (
    AudioIn,
    AudioOut,
    ClearPlayout,
    ClientEvent,
    PlayoutProgress,
    ServerEvent,
    SessionOutput,
)
from omnivox.server.auth import is_authorized
from omnivox.server.backpressure import TimedSend, WriteTimeout, abort_connection
from omnivox.server.lifecycle import GOING_AWAY
from omnivox.server.runner import SessionRunner
from omnivox.server.state import ServerState, SessionLimitReached

log = logging.getLogger(__name__)

DOOR = "telephony"
STREAM_PATH = "/telephony/twilio"
INCOMING_PATH = "/telephony/twilio/incoming"
PHONE_RATE = 8000
FRAME_BYTES = PHONE_RATE * 20 // 1000
MULAW_SILENCE = b"\xff"
MARK_EVERY_MS = 100
"""Audio between two marks: the precision of the truncation at barge-in, at one small message per 100 ms."""
TRY_AGAIN_LATER = 1013
POLICY_VIOLATION = 1008
START_TIMEOUT_S = 10.0
"""A connection that sends no `start` this long after opening is dropped, so it cannot hold a session slot."""
API_KEY_PARAMETER = "api_key"
"""Media Streams cannot carry headers from Twilio, so with `server.api_keys` set the key is a `<Parameter>`."""


def mark_name(item_id: str, audio_ms: float) -> str:
    """A mark says which item and how many whole ms of it will have played once Twilio echoes it."""
    return f"{item_id}:{int(audio_ms)}"


_MARK_NAME = re.compile(r"(?P<item>[^:]{1,128}):(?P<millis>[0-9]{1,9})")
"""What `mark_name` writes; a name echoed back that does not look like it was never ours."""
DTMF_DIGITS = frozenset("0123456789*#ABCD")
_SID = re.compile(r"[A-Za-z0-9_-]{1,64}")


def _sid(value: Any) -> str | None:
    """A Twilio id (`MZ...`, `CA...`: 34 characters) as the client sent it, or None when it cannot be one."""
    return value if isinstance(value, str) and _SID.fullmatch(value) else None


def parse_mark_name(name: str) -> tuple[str, int] | None:
    match = _MARK_NAME.fullmatch(name)
    return (match["item"], int(match["millis"])) if match else None


def twilio_signature(auth_token: str, url: str, params: Mapping[str, str]) -> str:
    """Twilio's request signature: base64 HMAC-SHA1 of the URL followed by each POST parameter, sorted by name."""
    payload = url + "".join(name + params[name] for name in sorted(params))
    digest = hmac.new(auth_token.encode(), payload.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode()


def _session_defaults(custom: Any) -> dict[str, Any]:
    """Per-call `<Parameter>`s that configure the agent: `voice` and `instructions`."""
    if not isinstance(custom, dict):
        return {}
    defaults: dict[str, Any] = {}
    if isinstance(custom.get("instructions"), str):
        defaults["instructions"] = custom["instructions"]
    if isinstance(custom.get("voice"), str) and custom["voice"]:
        defaults["audio"] = {"output": {"voice": custom["voice"]}}
    return defaults


@dataclass
class _Playout:
    """What has been sent for the item now playing and which marks Twilio has yet to echo (each at most
    `telephony.max_pending_marks`, oldest forgotten first: a caller that never echoes cannot grow them)."""

    max_marks: int
    item_id: str | None = None
    sent_ms: float = 0.0
    marked_ms: float = 0.0
    heard_ms: float = 0.0
    """The item's last echoed mark: what the caller has heard of it."""
    pending: dict[str, None] = field(default_factory=dict)
    stale: dict[str, None] = field(default_factory=dict)

    def remember(self, marks: dict[str, None], name: str) -> None:
        marks[name] = None
        while len(marks) > self.max_marks:
            del marks[next(iter(marks))]


class TwilioCall:
    """One Media Streams connection: Twilio events in, core outputs out."""

    def __init__(self, websocket: WebSocket, state: ServerState) -> None:
        self.websocket = websocket
        self.state = state
        self.stream_sid: str | None = None
        self.call_sid: str | None = None
        self.runner: SessionRunner | None = None
        self.pump: asyncio.Task[None] | None = None
        self._receiver: asyncio.Task[None] | None = None
        self._resampler = StreamResampler(PHONE_RATE, INPUT_RATE)
        self._playout = _Playout(state.config.telephony.max_pending_marks)
        self._write = TimedSend(websocket.send_text, state.config.connections.write_timeout_s)
        self._send_lock = asyncio.Lock()
        self._stopped = False
        self._close_code = 1000
        self._warned: set[str] = set()

    @property
    def label(self) -> str:
        return f"call {self.call_sid or '?'} (stream {self.stream_sid or '?'})"

    async def serve(self) -> None:
        """Wait for `start` without a session slot, check it (stream id, key), then take a slot for the call."""
        try:
            start = await self._await_start()
            if start is not None and self._accept(start):
                with self.state.session_slot(DOOR):
                    try:
                        self._start_session(start)
                        self._receiver = asyncio.create_task(self._receive())
                        await asyncio.wait({self._receiver})
                    finally:
                        if self._receiver is not None:
                            self._receiver.cancel()
                        await self._stop_session()
        except SessionLimitReached as exc:
            log.warning("%s: call refused: %s", self.label, exc)
            self._close_code = TRY_AGAIN_LATER
        except WebSocketDisconnect:
            log.info("%s: socket dropped", self.label)
        except TimeoutError:
            log.warning("%s: no 'start' within %.0f s, hanging up", self.label, START_TIMEOUT_S)
        finally:
            await self._close()

    def _stop_reading(self, _: object) -> None:
        """The session ended on the server's side (idle, shutdown, a client that does not read): hang up."""
        if self._receiver is not None:
            self._receiver.cancel()

    async def _close(self) -> None:
        """End the connection the way the call ended: a caller side that stopped reading is dropped, the others are
        told why (going away at shutdown)."""
        reason = self.runner.end_reason if self.runner is not None else None
        if (self._write.timed_out or reason == "write_timeout") and abort_connection(self.websocket.scope):
            return
        code = GOING_AWAY if reason == "shutdown" else self._close_code
        with contextlib.suppress(Exception):
            async with asyncio.timeout(self._write.timeout_s):
                await self.websocket.close(code)

    def _warn_once(self, kind: str, message: str, *args: Any) -> None:
        """A misbehaving client repeats itself every 20 ms: say it once per kind, then only at debug level."""
        level = logging.DEBUG if kind in self._warned else logging.WARNING
        self._warned.add(kind)
        log.log(level, "%s: " + message, self.label, *args)

    async def _next_message(self) -> dict[str, Any] | None:
        """The next JSON object Twilio sent (anything else, or over `telephony.max_message_bytes`, is ignored); None
        once the socket is closed."""
        limit = self.state.config.telephony.max_message_bytes
        while True:
            message = await self.websocket.receive()
            if message["type"] == "websocket.disconnect":
                log.info("%s: socket closed by the caller side", self.label)
                return None
            raw = message.get("text")
            if raw is None:
                self._warn_once("binary", "binary frames ignored (Media Streams sends JSON text)")
                continue
            if len(raw) > limit:
                self._warn_once("size", "message of %d bytes over telephony.max_message_bytes dropped", len(raw))
                continue
            try:
                parsed = load_client_json(raw, self.state.config.limits.max_json_depth)
            except JsonRefused as exc:
                self._warn_once("json", "ignored a frame that is refused as JSON (%s): %.80r", exc, raw)
                continue
            if isinstance(parsed, dict):
                return parsed
            self._warn_once("json", "ignored a JSON frame that is not an object")

    async def _await_start(self) -> dict[str, Any] | None:
        """The `start` message, within `START_TIMEOUT_S`; None when the caller side hangs up first."""
        async with asyncio.timeout(START_TIMEOUT_S):
            while (message := await self._next_message()) is not None:
                event = message.get("event")
                if event == "start":
                    return message
                if event == "stop":
                    return None
                if event == "connected":
                    log.debug("%s: connected (protocol %.40r)", self.label, message.get("protocol"))
                else:
                    self._warn_once("early", "%.40r before 'start' ignored", event)
        return None

    async def _receive(self) -> None:
        """Twilio's messages into the session until `stop`, a hang-up, or the session's end (`_stop_reading`)."""
        try:
            while not self._stopped:
                message = await self._next_message()
                if message is None:
                    return
                await self._on_message(message)
        except WebSocketDisconnect:
            log.info("%s: socket dropped", self.label)

    async def _stop_session(self) -> None:
        if self.runner is not None:
            self.runner.stop()
        if self.pump is not None:
            with contextlib.suppress(Exception):
                await self.pump

    # ------------------------------------------------------------ Twilio -> core

    def _accept(self, message: dict[str, Any]) -> bool:
        """A `start` names a stream id we can echo and carries a valid key (when keys are set)."""
        start = message.get("start") if isinstance(message.get("start"), dict) else {}
        self.stream_sid = _sid(message.get("streamSid")) or _sid(start.get("streamSid"))
        self.call_sid = _sid(start.get("callSid"))
        if self.stream_sid is None:  # it is echoed in every message we send: never an arbitrary client string
            log.warning("%s: refused, 'start' without a valid streamSid", self.label)
        elif not self._authorized(start.get("customParameters")):
            log.warning("%s: refused, no valid '%s' custom parameter", self.label, API_KEY_PARAMETER)
            self.state.metrics.sessions_rejected.labels(DOOR, "auth").inc()
        else:
            return True
        self._close_code = POLICY_VIOLATION
        return False

    def _authorized(self, custom: Any) -> bool:
        headers = {k.lower(): v for k, v in self.websocket.headers.items()}
        key = custom.get(API_KEY_PARAMETER) if isinstance(custom, dict) else None
        if isinstance(key, str):
            headers["authorization"] = f"Bearer {key}"
        return is_authorized(self.state.config.server.api_keys, headers)

    async def _on_message(self, message: dict[str, Any]) -> None:
        event = message.get("event")
        if event == "media":
            await self._on_media(message.get("media"))
        elif event == "mark":
            await self._on_mark(message.get("mark"))
        elif event == "dtmf":
            await self._on_dtmf(message.get("dtmf"))
        elif event == "stop":
            log.info("%s: stop received, hanging up", self.label)
            self._stopped = True
        elif event == "start":
            log.warning("%s: second 'start' ignored", self.label)
        else:
            self._warn_once("unknown", "unknown event %.40r ignored", event)

    def _start_session(self, message: dict[str, Any]) -> None:
        start = message.get("start") if isinstance(message.get("start"), dict) else {}
        media_format = start.get("mediaFormat") if isinstance(start.get("mediaFormat"), dict) else {}
        if media_format and (media_format.get("encoding"), media_format.get("sampleRate")) != (
            "audio/x-mulaw",
            PHONE_RATE,
        ):
            log.warning("%s: media format %.120r is not 8 kHz mu-law; decoding as mu-law", self.label, media_format)
        telephony = self.state.config.telephony
        session = self.state.new_session(
            frame_ms=telephony.frame_ms,
            lead_ms=telephony.lead_ms,
            output_rate=PHONE_RATE,
            server_playout=True,
            defaults=_session_defaults(start.get("customParameters")),
            door=DOOR,
        )
        self.runner = self.state.new_runner(session, self._emit, DOOR)
        self.pump = asyncio.create_task(self.runner.run(), name=f"pump-{session.id}")
        self.pump.add_done_callback(self._stop_reading)
        log.info("%s: started session %s", self.label, session.id)

    async def _on_media(self, media: Any) -> None:
        assert self.runner is not None
        if not isinstance(media, dict) or media.get("track", "inbound") not in ("inbound", "inbound_track"):
            return
        try:
            payload = base64.b64decode(media.get("payload", ""), validate=True)
        except (binascii.Error, TypeError, ValueError):
            self._warn_once("base64", "media chunk %.20r with bad base64 ignored", media.get("chunk"))
            return
        await self.runner.put(AudioIn(self._resampler.process(mulaw_decode(payload))), len(payload))

    async def _on_dtmf(self, dtmf: Any) -> None:
        assert self.runner is not None
        digit = dtmf.get("digit") if isinstance(dtmf, dict) else None
        if not isinstance(digit, str) or digit not in DTMF_DIGITS:
            self._warn_once("dtmf", "dtmf event without a keypad digit ignored: %.20r", digit)
            return
        log.info("%s: caller pressed %s", self.label, digit)
        if not self.state.config.telephony.dtmf_to_conversation:
            return
        item = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": digit}]}
        await self.runner.put(ClientEvent("conversation.item.create", {"item": item}))

    async def _on_mark(self, mark: Any) -> None:
        assert self.runner is not None
        name = mark.get("name") if isinstance(mark, dict) else None
        if not isinstance(name, str):
            return
        playout = self._playout
        playout.pending.pop(name, None)
        if name in playout.stale:
            del playout.stale[name]  # echoed because of our `clear`: that audio was never heard
            return
        parsed = parse_mark_name(name)
        if parsed is None:
            self._warn_once("mark", "echo of unknown mark %.80r ignored", name)
            return
        if parsed[0] == playout.item_id:
            playout.heard_ms = max(playout.heard_ms, parsed[1])
        await self.runner.put(PlayoutProgress(*parsed))

    # ------------------------------------------------------------ core -> Twilio

    async def _emit(self, output: SessionOutput) -> None:
        if isinstance(output, AudioOut):
            await self._send_audio(output)
        elif isinstance(output, ClearPlayout):
            await self._send_clear()
        elif isinstance(output, ServerEvent):
            await self._observe(output)

    async def _send_audio(self, frame: AudioOut) -> None:
        playout = self._playout
        if playout.item_id != frame.item_id:
            playout.item_id, playout.sent_ms, playout.marked_ms, playout.heard_ms = frame.item_id, 0.0, 0.0, 0.0
        payload = mulaw_encode(np.asarray(frame.pcm)).ljust(FRAME_BYTES, MULAW_SILENCE)
        playout.sent_ms += frame.pcm.size * 1000 / PHONE_RATE
        await self._send({"event": "media", "media": {"payload": base64.b64encode(payload).decode()}})
        if playout.sent_ms - playout.marked_ms >= MARK_EVERY_MS:
            await self._send_mark()

    async def _send_mark(self) -> None:
        playout = self._playout
        if playout.item_id is None or playout.sent_ms <= playout.marked_ms:
            return
        name = mark_name(playout.item_id, playout.sent_ms)
        playout.marked_ms = playout.sent_ms
        playout.remember(playout.pending, name)
        await self._send({"event": "mark", "mark": {"name": name}})

    async def _send_clear(self) -> None:
        playout = self._playout
        for name in playout.pending:
            playout.remember(playout.stale, name)
        playout.pending.clear()
        # a paused answer resumes from what was heard (the core rewinds to the same mark); a cancelled one never
        playout.sent_ms = playout.marked_ms = playout.heard_ms
        await self._send({"event": "clear"})

    async def _observe(self, event: ServerEvent) -> None:
        if event.type == "response.output_audio.done":
            # the last frames of an answer get their own mark, so its full length is known once heard
            await self._send_mark()
        elif event.type == "conversation.item.truncated":
            log.info(
                "%s: barge-in; item %s truncated at %d ms (the last echoed mark)",
                self.label,
                event.payload["item_id"],
                event.payload["audio_end_ms"],
            )
        elif event.type == "error":
            log.warning("%s: %s", self.label, event.payload["error"].get("message"))

    async def _send(self, message: dict[str, Any]) -> None:
        if self.stream_sid is None:
            return
        async with self._send_lock:
            try:
                await self._write(json.dumps({**message, "streamSid": self.stream_sid}))
            except WriteTimeout:
                raise  # the caller side stopped reading: the runner ends the call
            except Exception:  # a dropped socket ends the receive loop, which closes the call
                log.debug("%s: send failed", self.label, exc_info=True)


async def twilio_stream_endpoint(websocket: WebSocket) -> None:
    state: ServerState = websocket.app.state.omnivox
    if not state.origin_allowed({k.lower(): v for k, v in websocket.headers.items()}, DOOR):
        await websocket.close(POLICY_VIOLATION)  # before the handshake: a 403
        return
    await websocket.accept()
    await TwilioCall(websocket, state).serve()


def _candidate_urls(request: Request, public_host: str | None) -> list[str]:
    """The URL Twilio signed: as we see it, or as dialled through the public host (TLS ends at a proxy)."""
    seen = str(request.url)
    urls = [seen]
    query = f"?{request.url.query}" if request.url.query else ""
    for host in filter(None, (public_host, request.headers.get("host"))):
        urls.append(f"https://{host}{request.url.path}{query}")
    return urls


async def twilio_incoming(request: Request) -> Response:
    """Twilio's voice webhook: answer the call by connecting it to our Media Streams WebSocket."""
    state: ServerState = request.app.state.omnivox
    public_host = state.config.server.public_host
    token = state.config.telephony.twilio_auth_token
    if token:
        form = await request.form()
        params = {name: str(value) for name, value in form.items()}
        offered = request.headers.get("x-twilio-signature", "")
        expected = [twilio_signature(token, url, params) for url in _candidate_urls(request, public_host)]
        if not any(hmac.compare_digest(offered.encode(), sig.encode()) for sig in expected):
            log.warning("telephony: incoming webhook with a missing or wrong X-Twilio-Signature refused")
            return Response("invalid Twilio signature", status_code=403, media_type="text/plain")
    host = public_host or request.headers.get("host") or f"{state.config.server.host}:{state.config.server.port}"
    stream_url = quoteattr(f"wss://{host}{STREAM_PATH}")
    parameters = ""
    keys = state.config.server.api_keys
    if keys and token:
        parameters = f"<Parameter name={quoteattr(API_KEY_PARAMETER)} value={quoteattr(keys[0])}/>"
    elif keys:
        log.warning(
            "telephony: server.api_keys is set but telephony.twilio_auth_token is not: the TwiML carries no key"
        )
    stream = f"<Stream url={stream_url}>{parameters}</Stream>" if parameters else f"<Stream url={stream_url}/>"
    twiml = f'<?xml version="1.0" encoding="UTF-8"?><Response><Connect>{stream}</Connect></Response>'
    return Response(twiml, media_type="application/xml")


def telephony_routes() -> list[BaseRoute]:
    return [
        WebSocketRoute(STREAM_PATH, twilio_stream_endpoint),
        Route(INCOMING_PATH, twilio_incoming, methods=["POST"]),
    ]
