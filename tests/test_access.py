"""Who may use the server, tried against a real one: keys checked before any session slot is taken, empty keys,
browser origins on every door, JSON doors only for JSON, WebRTC calls ended only by their owner, /metrics behind the
key, and the loud start-up warning of an open server."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import httpx
import pytest
import websockets

from omnivox.server import cli
from omnivox.server.config import ConfigError, load_config
from tests.server_helpers import running_server, scripted_config
from tests.test_telephony import STREAM_SID, start_event
from tests.test_webrtc import Peer, loopback_ice  # noqa: F401 - the autouse fixture keeps ICE on loopback

KEY = "sk-owner"
EVIL = "https://evil.example"


async def closed_code(ws: Any) -> int:
    with pytest.raises(websockets.ConnectionClosed) as closed:
        async with asyncio.timeout(10):
            while True:
                await ws.recv()
    return closed.value.rcvd.code


# ---------------------------------------------------------------------------------------------- keys before slots


async def test_telephony_streams_take_no_slot_before_their_key_is_checked() -> None:
    """Streams that connect and never send `start` (or send a wrong key) must not hold the only slot."""
    config = scripted_config(server={"api_keys": [KEY], "max_sessions": 1})
    with running_server(config) as server:
        url = f"{server.ws_url}/telephony/twilio"
        silent = [await websockets.connect(url) for _ in range(3)]
        try:
            async with websockets.connect(url) as wrong:
                await wrong.send(start_event(api_key="sk-wrong"))
                assert await closed_code(wrong) == 1008
            assert server.state.sessions_open == 0
            headers = {"Authorization": f"Bearer {KEY}"}
            async with websockets.connect(f"{server.ws_url}/v1/realtime", additional_headers=headers) as ws:
                assert json.loads(await ws.recv())["type"] == "session.created"
            async with websockets.connect(url) as caller:
                await caller.send(start_event(api_key=KEY))
                await asyncio.sleep(0.3)
                assert server.state.sessions_open == 1
                await caller.send(json.dumps({"event": "stop", "streamSid": STREAM_SID, "stop": {}}))
        finally:
            for ws in silent:
                await ws.close()


def test_an_empty_key_is_a_start_up_error_never_an_open_door() -> None:
    for keys in ([""], ["sk-a", " "], [" sk-a"]):
        with pytest.raises(ConfigError, match=r"server\.api_keys"):
            load_config(overrides={"server": {"api_keys": keys}}, environ={})
    for value in ("", "[]", "[ ]", "null"):  # e.g. OMNIVOX_SERVER__API_KEYS="[$KEY]" with KEY unset
        with pytest.raises(ConfigError, match="OMNIVOX_SERVER__API_KEYS is set but holds no key"):
            load_config(environ={"OMNIVOX_SERVER__API_KEYS": value})
    assert load_config(environ={"OMNIVOX_SERVER__API_KEYS": "[sk-a]"}).server.api_keys == ["sk-a"]


# ---------------------------------------------------------------------------------------------- browser origins


async def test_websocket_doors_refuse_other_sites_and_serve_their_own_page_and_non_browsers() -> None:
    config = scripted_config(server={"allowed_origins": ["https://app.example"]})
    with running_server(config) as server:
        own = f"http://{server.host}:{server.port}"
        for path in ("/v1/realtime", "/telephony/twilio"):
            with pytest.raises(websockets.InvalidStatus) as refused:
                await websockets.connect(f"{server.ws_url}{path}", origin=EVIL)
            assert refused.value.response.status_code == 403
        for origin in (None, own, "https://app.example"):
            async with websockets.connect(f"{server.ws_url}/v1/realtime", origin=origin) as ws:
                assert json.loads(await ws.recv())["type"] == "session.created"
    with running_server(scripted_config(server={"allowed_origins": ["*"]})) as open_server:
        async with websockets.connect(f"{open_server.ws_url}/v1/realtime", origin=EVIL) as ws:
            assert json.loads(await ws.recv())["type"] == "session.created"


def test_http_doors_refuse_other_sites() -> None:
    with running_server() as server:
        body = {"model": "scripted", "messages": [{"role": "user", "content": "hi"}]}
        headers = {"Origin": EVIL}
        for path in ("/v1/chat/completions", "/audio/chat/completions"):
            response = httpx.post(f"{server.http_url}{path}", json=body, headers=headers)
            assert response.status_code == 403 and response.json()["error"]["code"] == "origin_not_allowed"
        files = {"sdp": (None, "v=0\r\n")}
        for path in ("/v1/realtime/calls", "/v1/audio/transcriptions"):
            response = httpx.post(f"{server.http_url}{path}", files=files, headers=headers)
            assert response.status_code == 403, path


def test_json_doors_refuse_bodies_that_a_form_can_post() -> None:
    """`text/plain` and form posts need no CORS preflight: another site's page could send them."""
    with running_server() as server:
        body = json.dumps({"model": "scripted", "messages": [{"role": "user", "content": "hi"}], "stream": True})
        for content_type in ("text/plain", "application/x-www-form-urlencoded", None):
            headers = {"Content-Type": content_type} if content_type else {}
            for path in ("/v1/chat/completions", "/audio/chat/completions"):
                response = httpx.post(f"{server.http_url}{path}", content=body, headers=headers)
                assert response.status_code == 415, (path, content_type)
                assert response.json()["error"]["code"] == "unsupported_content_type"
        json_type = {"Content-Type": "application/json; charset=utf-8"}
        assert httpx.post(f"{server.http_url}/v1/chat/completions", content=body, headers=json_type).status_code == 200


# ---------------------------------------------------------------------------------------------- WebRTC, metrics


@pytest.mark.slow
async def test_only_the_key_that_made_a_webrtc_call_can_hang_it_up() -> None:
    config = scripted_config(server={"api_keys": [KEY, "sk-other"]})
    with running_server(config) as server:
        peer = Peer()
        try:
            offer = await peer.connect(server, headers={"Authorization": f"Bearer {KEY}"})
            assert offer.status_code == 201
            hangup = f"{offer.headers['location']}/hangup"
            async with httpx.AsyncClient(base_url=server.http_url) as client:
                other = await client.post(hangup, headers={"Authorization": "Bearer sk-other"})
                nobody = await client.post(hangup)
                still_open = server.state.sessions_open
                owner = await client.post(hangup, headers={"Authorization": f"Bearer {KEY}"})
        finally:
            await peer.close()
    assert other.status_code == 404 and nobody.status_code == 401
    assert still_open == 1
    assert owner.status_code == 200


def test_metrics_can_be_put_behind_the_key() -> None:
    config = scripted_config(server={"api_keys": [KEY], "metrics_require_key": True})
    with running_server(config) as server:
        assert httpx.get(f"{server.http_url}/metrics").status_code == 401
        keyed = httpx.get(f"{server.http_url}/metrics", headers={"Authorization": f"Bearer {KEY}"})
        assert keyed.status_code == 200 and "omnivox_sessions_total" in keyed.text
        assert httpx.get(f"{server.http_url}/healthz").status_code == 200
    with running_server(scripted_config(server={"api_keys": [KEY]})) as default:
        assert httpx.get(f"{default.http_url}/metrics").status_code == 200


@pytest.mark.parametrize(
    ("host", "keys", "warned"),
    [
        ("0.0.0.0", [], True),
        ("192.168.1.20", [], True),
        ("127.0.0.1", [], False),
        ("::1", [], False),
        ("0.0.0.0", [KEY], False),
    ],
)
def test_an_open_server_on_the_network_says_so_at_start_up(
    host: str, keys: list[str], warned: bool, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    started: list[Any] = []
    monkeypatch.setattr("omnivox.server.lifecycle.DrainingServer.run", lambda server: started.append(server.config))
    overrides = {"engine": {"name": "scripted"}, "server": {"host": host, "api_keys": keys}}
    config = load_config(overrides=overrides, environ={})
    with caplog.at_level(logging.WARNING):
        cli.serve(config)
    assert started and started[0].host == host
    assert ("NO API KEY" in caplog.text) is warned
