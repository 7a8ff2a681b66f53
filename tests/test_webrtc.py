"""The WebRTC door with a real aiortc peer on loopback: SDP flow, events on `oai-events`, Opus audio both ways."""

from __future__ import annotations

import asyncio
import fractions
import json
import time
from typing import Any

import aioice.ice
import aioice.stun
import av
import httpx
import numpy as np
import pytest
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from prometheus_client.parser import text_string_to_metric_families

from omnivox.pipeline.audio import float_to_pcm16, resample, synthesize_speech
from omnivox.pipeline.engines.scripted import ScriptedEngine
from tests.server_helpers import RunningServer, running_server, scripted_config, settles

pytestmark = pytest.mark.slow
RATE = 48_000
FRAME = 960
SHORT_REPLY = "Hello there, how are you today?"
TINY_REPLY = "Hi there."
LONG_REPLY = " ".join(["This is a long answer that keeps going so that the caller can interrupt it."] * 4)


@pytest.fixture(autouse=True)
def loopback_ice(monkeypatch: pytest.MonkeyPatch) -> None:
    """aioice leaves 127.0.0.1 out of its host candidates; tests stay on loopback."""
    monkeypatch.setattr(aioice.ice, "get_host_addresses", lambda use_ipv4, use_ipv6: ["127.0.0.1"])


class CallerTrack(MediaStreamTrack):
    """The caller's microphone: a script of audio played in real time in 20 ms frames, then silence."""

    kind = "audio"

    def __init__(self) -> None:
        super().__init__()
        self.script = np.zeros(0, np.float32)
        self.position = 0
        self.t0: float | None = None
        self.pts = 0

    def say(self, samples_48k: np.ndarray) -> float:
        """Queue speech right after what is queued; returns the wall time its first sample is sent."""
        start = max(self.position + FRAME, self.script.size)
        gap = np.zeros(start - self.script.size, np.float32)
        self.script = np.concatenate([self.script, gap, samples_48k])
        return (self.t0 or time.monotonic()) + start / RATE

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        if self.t0 is None:
            self.t0 = time.monotonic()
        else:
            self.pts += FRAME
            await asyncio.sleep(max(0.0, self.t0 + self.pts / RATE - time.monotonic()))
        chunk = self.script[self.position : self.position + FRAME]
        self.position += FRAME
        if chunk.size < FRAME:
            chunk = np.concatenate([chunk, np.zeros(FRAME - chunk.size, np.float32)])
        frame = av.AudioFrame(format="s16", layout="mono", samples=FRAME)
        frame.planes[0].update(float_to_pcm16(chunk))
        frame.pts, frame.sample_rate, frame.time_base = self.pts, RATE, fractions.Fraction(1, RATE)
        return frame


class Peer:
    """An aiortc client doing what a browser does: mic track, `oai-events` channel, SDP POST."""

    def __init__(self) -> None:
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.mic = CallerTrack()
        self.pc.addTrack(self.mic)
        self.channel = self.pc.createDataChannel("oai-events")
        self.events: list[dict[str, Any]] = []
        self.received: list[tuple[float, np.ndarray]] = []
        self.received_pts: list[int] = []
        self.tasks: list[asyncio.Task[None]] = []
        self.channel.on("message", lambda message: self.events.append(json.loads(message)))
        self.pc.on("track", lambda track: self.tasks.append(asyncio.ensure_future(self._listen(track))))

    async def _listen(self, track: MediaStreamTrack) -> None:
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            pcm = frame.to_ndarray().reshape(-1).astype(np.float32) / 32768.0
            channels = len(frame.layout.channels)
            self.received.append((time.monotonic(), pcm.reshape(-1, channels).mean(axis=1)))
            self.received_pts.append(int(frame.pts))

    async def offer(self) -> str:
        await self.pc.setLocalDescription(await self.pc.createOffer())
        return self.pc.localDescription.sdp

    async def connect(
        self,
        server: RunningServer,
        *,
        path: str = "/v1/realtime/calls",
        multipart: bool = False,
        headers: dict[str, str] | None = None,
        session: dict[str, Any] | None = None,
    ) -> httpx.Response:
        offer = await self.offer()
        async with httpx.AsyncClient(base_url=server.http_url, timeout=20) as client:
            if multipart:
                files = {"sdp": (None, offer)}
                if session is not None:
                    files["session"] = (None, json.dumps(session))
                response = await client.post(path, files=files, headers=headers)
            else:
                response = await post_offer(client, offer, path, headers)
        if response.status_code == 201:
            await self.pc.setRemoteDescription(RTCSessionDescription(response.text, "answer"))
        return response

    async def wait_for(self, event_type: str, count: int = 1, timeout: float = 30) -> dict[str, Any]:
        async with asyncio.timeout(timeout):
            while sum(1 for e in self.events if e["type"] == event_type) < count:
                await asyncio.sleep(0.02)
        return [e for e in self.events if e["type"] == event_type][count - 1]

    def send(self, event: dict[str, Any]) -> None:
        self.channel.send(json.dumps(event))

    def ask(self, text: str) -> None:
        """A typed user turn, then a request for the agent's spoken answer."""
        content = [{"type": "input_text", "text": text}]
        self.send({"type": "conversation.item.create", "item": {"type": "message", "role": "user", "content": content}})
        self.send({"type": "response.create"})

    async def close(self) -> None:
        await self.pc.close()
        for task in self.tasks:
            task.cancel()


async def post_offer(
    client: httpx.AsyncClient, offer: str, path: str = "/v1/realtime/calls", headers: dict[str, str] | None = None
) -> httpx.Response:
    return await client.post(path, content=offer, headers={"Content-Type": "application/sdp", **(headers or {})})


def without_lines(sdp: str, prefix: str) -> str:
    return "".join(line for line in sdp.splitlines(keepends=True) if not line.startswith(prefix))


async def scrape(server: RunningServer, name: str, **labels: str) -> float:
    """One sample of `GET /metrics`, read the way an operator's Prometheus reads it."""
    async with httpx.AsyncClient(base_url=server.http_url) as client:
        text = (await client.get("/metrics")).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    raise KeyError(f"{name}{labels} is not in /metrics")


def speech_48k(text: str) -> np.ndarray:
    return resample(synthesize_speech(text, 16_000), 16_000, RATE)


def loud_frames(peer: Peer, threshold: float = 0.01) -> list[tuple[float, bool]]:
    return [(t, float(np.sqrt(np.mean(pcm**2))) > threshold) for t, pcm in peer.received]


async def test_spoken_turn_over_webrtc() -> None:
    reply_audio = synthesize_speech(SHORT_REPLY, 24_000, "en-us", 170)
    with running_server(scripted_config(), ScriptedEngine(reply=SHORT_REPLY)) as server:
        peer = Peer()
        try:
            response = await peer.connect(server)
            assert response.status_code == 201
            assert response.headers["content-type"].startswith("application/sdp")
            assert response.headers["location"].startswith("/v1/realtime/calls/")
            await peer.wait_for("session.created", timeout=10)
            peer.mic.say(np.concatenate([np.zeros(RATE // 2, np.float32), speech_48k("What time is it?")]))
            await peer.wait_for("response.done")
            await asyncio.sleep(0.3)
        finally:
            await peer.close()
        await asyncio.sleep(0.5)
        assert server.state.sessions_open == 0
    types = [e["type"] for e in peer.events]
    assert types[0] == "session.created"
    for expected in (
        "input_audio_buffer.speech_started",
        "input_audio_buffer.speech_stopped",
        "input_audio_buffer.committed",
        "response.created",
        "output_audio_buffer.started",
        "response.output_audio_transcript.done",
        "response.done",
        "output_audio_buffer.stopped",
    ):
        assert expected in types, expected
    assert "response.output_audio.delta" not in types
    assert peer.events[types.index("response.done")]["response"]["status"] == "completed"
    frames = loud_frames(peer)
    loud = [i for i, (_, is_loud) in enumerate(frames) if is_loud]
    answer_s = (loud[-1] - loud[0] + 1) * 0.02
    assert abs(answer_s - reply_audio.size / 24_000) < 0.35
    # continuity: the RTP clock of the answer advances 20 ms per frame, no frame lost (a gap > 40 ms would show)
    steps = np.diff(peer.received_pts[loud[0] : loud[-1] + 1])
    assert steps.size and np.all(steps == FRAME)


async def test_barge_in_stops_playout_and_truncates_at_what_was_played() -> None:
    with running_server(scripted_config(), ScriptedEngine(reply=LONG_REPLY)) as server:
        peer = Peer()
        try:
            assert (await peer.connect(server)).status_code == 201
            await peer.wait_for("session.created", timeout=10)
            peer.mic.say(np.concatenate([np.zeros(RATE // 2, np.float32), speech_48k("Tell me a story.")]))
            await peer.wait_for("output_audio_buffer.started")
            await asyncio.sleep(1.5)
            onset = peer.mic.say(speech_48k("Stop, stop please."))
            done = await peer.wait_for("response.done")
            await peer.wait_for("output_audio_buffer.cleared")
            truncated = await peer.wait_for("conversation.item.truncated")
            await asyncio.sleep(0.5)
        finally:
            await peer.close()
    assert done["response"]["status"] == "cancelled"
    assert done["response"]["status_details"]["reason"] == "turn_detected"
    # the old answer stops within 450 ms of the caller's first speech sample, measured at the receiving client
    # (VAD onset + 60 ms server lead + both Opus jitter buffers); a new answer may start later
    loud_after = [t for t, is_loud in loud_frames(peer) if is_loud and t > onset + 0.45]
    assert not loud_after or min(loud_after) > onset + 0.8
    assert 1000 <= truncated["audio_end_ms"] <= 4000


async def test_multipart_offer_with_session_and_auth() -> None:
    config = scripted_config(server={"api_keys": ["sk-rtc"]})
    with running_server(config, ScriptedEngine(reply=SHORT_REPLY)) as server:
        refused = Peer()
        try:
            response = await refused.connect(server, multipart=True)
            assert response.status_code == 401
            assert response.json()["error"]["code"] == "invalid_api_key"
        finally:
            await refused.close()
        peer = Peer()
        try:
            response = await peer.connect(
                server,
                multipart=True,
                headers={"Authorization": "Bearer sk-rtc"},
                session={"instructions": "be brief", "audio": {"output": {"voice": "ash"}}},
            )
            assert response.status_code == 201
            updated = await peer.wait_for("session.updated", timeout=10)
            assert updated["session"]["instructions"] == "be brief"
            peer.send({"type": "output_audio_buffer.clear"})
            await peer.wait_for("output_audio_buffer.cleared")
            call_id = response.headers["location"].rsplit("/", 1)[-1]
            async with httpx.AsyncClient(base_url=server.http_url) as client:
                hangup = await client.post(
                    f"/v1/realtime/calls/{call_id}/hangup", headers={"Authorization": "Bearer sk-rtc"}
                )
            assert hangup.status_code == 200
            assert await settles(lambda: server.state.sessions_open == 0)
        finally:
            await peer.close()


async def test_beta_route_speaks_the_beta_dialect() -> None:
    """Clients of the beta SDP flow (`POST /v1/realtime?model=…`) parse beta event names and session shapes."""
    with running_server(scripted_config(), ScriptedEngine(reply=TINY_REPLY)) as server:
        peer = Peer()
        try:
            response = await peer.connect(server, path="/v1/realtime?model=gpt-4o-realtime-preview")
            assert response.status_code == 201
            assert response.headers["content-type"].startswith("application/sdp")
            created = await peer.wait_for("session.created", timeout=10)
            peer.send({"type": "session.update", "session": {"voice": "ash", "modalities": ["text", "audio"]}})
            updated = await peer.wait_for("session.updated")
            peer.ask("Hi")
            done = await peer.wait_for("response.done")
        finally:
            await peer.close()
    assert peer.events[0]["type"] == "session.created"
    session = created["session"]
    assert session["object"] == "realtime.session"
    assert session["model"] == "gpt-4o-realtime-preview"
    assert session["modalities"] == ["text", "audio"]
    assert "audio" not in session and "type" not in session
    assert updated["session"]["voice"] == "ash"
    types = [e["type"] for e in peer.events]
    assert "error" not in types
    assert "conversation.item.created" in types
    assert "response.audio_transcript.done" in types
    for ga_only in ("conversation.item.added", "conversation.item.done", "response.output_audio_transcript.done"):
        assert ga_only not in types, ga_only
    assert done["response"]["status"] == "completed"
    assert done["response"]["modalities"] == ["text", "audio"]
    assert done["response"]["output"][0]["content"][0]["type"] == "audio"


async def test_offer_beyond_max_sessions_is_refused_and_the_open_call_goes_on() -> None:
    """A full server answers a further offer with 429 and an OpenAI error body a client can show, without
    disturbing the call it is already serving."""
    config = scripted_config(server={"max_sessions": 1})
    with running_server(config, ScriptedEngine(reply=TINY_REPLY)) as server:
        first, second = Peer(), Peer()
        try:
            assert (await first.connect(server)).status_code == 201
            await first.wait_for("session.created", timeout=10)
            refused = await second.connect(server)
            assert refused.status_code == 429
            assert refused.headers["content-type"].startswith("application/json")
            error = refused.json()["error"]
            assert error["type"] == "rate_limit_error"
            assert error["code"] == "session_limit_reached"
            assert "1 sessions" in error["message"]
            first.ask("Hi")
            done = await first.wait_for("response.done")
            await first.wait_for("output_audio_buffer.stopped")
            assert server.state.sessions_open == 1
            assert await scrape(server, "omnivox_sessions_active", door="webrtc") == 1
            assert await scrape(server, "omnivox_sessions_rejected_total", door="webrtc", reason="limit") == 1
        finally:
            await first.close()
            await second.close()
    assert done["response"]["status"] == "completed"
    assert any(is_loud for _, is_loud in loud_frames(first))


async def test_failed_ice_closes_the_call_and_frees_its_slot(monkeypatch: pytest.MonkeyPatch) -> None:
    """An offer whose candidates the server cannot reach (here the caller's ports are already closed) fails
    ICE; that call must give its session slot back, or a server at `max_sessions` would refuse every later caller."""
    monkeypatch.setattr(aioice.stun, "RETRY_RTO", 0.1)
    monkeypatch.setattr(aioice.stun, "RETRY_MAX", 1)
    config = scripted_config(server={"max_sessions": 1})
    with running_server(config, ScriptedEngine(reply=TINY_REPLY)) as server:
        ghost, peer = Peer(), Peer()
        try:
            offer = await ghost.offer()
            await ghost.close()
            async with httpx.AsyncClient(base_url=server.http_url, timeout=20) as client:
                answered = await post_offer(client, offer)
            assert answered.status_code == 201
            assert await settles(lambda: server.state.sessions_open == 0)
            assert not server.app.state.webrtc_calls
            assert await scrape(server, "omnivox_sessions_active", door="webrtc") == 0
            assert (await peer.connect(server)).status_code == 201
            await peer.wait_for("session.created", timeout=10)
        finally:
            await ghost.close()
            await peer.close()


@pytest.mark.parametrize(
    "dropped", ["a=end-of-candidates", "a=candidate:"], ids=["browser-offer-without-end", "offer-without-candidates"]
)
async def test_peer_that_never_connects_is_hung_up_and_connected_calls_are_not(dropped: str) -> None:
    """ICE neither fails nor even starts for these offers once the caller has gone away (browsers' offers carry
    no end-of-candidates): the server hangs up calls not connected in time, and leaves connected calls alone."""
    config = scripted_config(server={"max_sessions": 1}, webrtc={"connect_timeout_s": 1.5})
    with running_server(config, ScriptedEngine(reply=TINY_REPLY)) as server:
        ghost, peer = Peer(), Peer()
        try:
            async with httpx.AsyncClient(base_url=server.http_url, timeout=20) as client:
                answered = await post_offer(client, without_lines(await ghost.offer(), dropped))
            await ghost.close()
            assert answered.status_code == 201
            assert server.state.sessions_open == 1
            assert await settles(lambda: server.state.sessions_open == 0)
            assert not server.app.state.webrtc_calls
            assert await scrape(server, "omnivox_sessions_active", door="webrtc") == 0
            assert (await peer.connect(server)).status_code == 201
            answered_at = time.monotonic()
            await peer.wait_for("session.created", timeout=10)
            await asyncio.sleep(max(0.0, answered_at + 1.8 - time.monotonic()))
            peer.send({"type": "session.update", "session": {"type": "realtime", "instructions": "still here"}})
            updated = await peer.wait_for("session.updated")
            assert updated["session"]["instructions"] == "still here"
            assert server.state.sessions_open == 1
        finally:
            await ghost.close()
            await peer.close()


async def test_unusable_offer_is_refused_without_leaving_a_call_behind() -> None:
    """A 400 for an offer the server cannot negotiate must also drop the half-built call and its peer
    connection: otherwise every bad POST leaves one behind for the life of the server."""
    config = scripted_config(server={"max_sessions": 1})
    with running_server(config, ScriptedEngine(reply=TINY_REPLY)) as server:
        peer = Peer()
        try:
            async with httpx.AsyncClient(base_url=server.http_url, timeout=20) as client:
                refused = await post_offer(client, "v=0\r\ns=not an offer\r\n")
            assert refused.status_code == 400
            assert refused.json()["error"]["code"] == "invalid_offer"
            assert not server.app.state.webrtc_calls
            assert server.state.sessions_open == 0
            assert (await peer.connect(server)).status_code == 201
            await peer.wait_for("session.created", timeout=10)
        finally:
            await peer.close()
