"""The voice chat page in real headless Chromium, with the scripted engine and a fake microphone.

The fake caller (an espeak-ng WAV Chromium plays as its microphone) says one sentence, waits 2 s and says
another. The first reply is long, so the second sentence talks over it (barge-in); the second reply is short
and plays to the end. Everything timed is measured inside the page (`window.omnivox.stats`, see app.js).
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from omnivox.pipeline.audio import synthesize_speech, write_wav
from omnivox.pipeline.engines.scripted import ESPEAK_VOICES, ScriptedEngine
from tests.server_helpers import RunningServer, running_server, scripted_config

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"

LONG_REPLY = "Hello! This is omnivox, a self hosted voice agent. How can I help you today?"
SHORT_REPLY = "Sure thing, here it comes."
CALLER_TRANSCRIPT = "what is the weather like today"
CALLER_RATE = 48_000
API_KEY = "sk-browser-test"
BARGE_IN_STOP_MS = 300
SOUND_LEVEL = 0.015
"""The page's threshold of audible sound (app.js SOUND_LEVEL), used to measure the reply's audible span."""


def in_chromium(test: Any) -> Any:
    """Marks a test that drives the page in Chromium."""
    for mark in (
        pytest.mark.browser,
        pytest.mark.slow,
        pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian chromium at /usr/bin/chromium"),
    ):
        test = mark(test)
    return test


@pytest.fixture(scope="module")
def caller_wav(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Speech, 2 s of silence, speech, then enough silence for the last reply before Chromium loops the file."""
    first = synthesize_speech("Hello there, what is the weather like today?", CALLER_RATE)
    second = synthesize_speech("Wait, tell me a joke instead.", CALLER_RATE)
    samples = np.concatenate([_silence(0.5), first, _silence(2.0), second, _silence(6.0)])
    path = tmp_path_factory.mktemp("caller") / "caller.wav"
    write_wav(path, samples, CALLER_RATE)
    return path


def _silence(seconds: float) -> np.ndarray:
    return np.zeros(int(CALLER_RATE * seconds), np.float32)


@pytest.fixture(scope="module")
def browser(caller_wav: Path) -> Iterator[Any]:
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=str(CHROMIUM),
            args=[
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--use-fake-ui-for-media-stream",
                "--use-fake-device-for-media-stream",
                f"--use-file-for-fake-audio-capture={caller_wav}",
                "--autoplay-policy=no-user-gesture-required",
                "--allow-loopback-in-peer-connection",
            ],
        )
        yield chromium
        chromium.close()


@pytest.fixture
def server() -> Iterator[RunningServer]:
    """A fresh server per call, so the scripted replies start again at the long one."""
    options = {"replies": [LONG_REPLY, SHORT_REPLY], "transcript": CALLER_TRANSCRIPT}
    with running_server(scripted_config(engine={"options": {"scripted": options}})) as running:
        yield running


def audible_seconds(text: str) -> float:
    """How long the scripted engine's speech for `text` is audible, first to last sound block of 20 ms."""
    engine = ScriptedEngine()
    speech = synthesize_speech(text, engine.native_rate, ESPEAK_VOICES["alloy"], engine.words_per_minute)
    block = engine.native_rate // 50
    levels = [np.sqrt(np.mean(speech[i : i + block] ** 2)) for i in range(0, speech.size - block, block)]
    loud = [i for i, level in enumerate(levels) if level >= SOUND_LEVEL]
    return (loud[-1] - loud[0] + 1) * 0.02


def open_page(browser: Any, server: RunningServer) -> Any:
    page = browser.new_page(viewport={"width": 900, "height": 1000})
    page.goto(f"{server.http_url}/")
    return page


def talk(page: Any, transport: str) -> dict[str, Any]:
    """One call: both caller sentences and both replies, then hang up; returns the page's stats."""
    page.select_option("#transport", transport)
    page.click("#call-button")
    page.wait_for_function(
        """() => {
            const s = window.omnivox.stats;
            return s.turns.length >= 2 && s.bargeIns.length >= 1 && window.omnivox.state === "listening"
              && s.agentSegments.length && s.agentSegments.at(-1).start >= s.turns[1].firstAudioAt;
        }""",
        timeout=25_000,
    )
    page.wait_for_function(
        f"""() => {{
            const texts = selector => [...document.querySelectorAll(selector)].map(e => e.textContent);
            return texts("li.turn.agent .text")[1] === {json.dumps(SHORT_REPLY)}
              && texts("li.turn.caller .text").slice(0, 2).every(text => text === {json.dumps(CALLER_TRANSCRIPT)});
        }}""",
        timeout=5_000,
    )
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=ARTIFACTS / f"browser-{transport}.png", full_page=True)
    stats = page.evaluate("window.omnivox.stats")
    (ARTIFACTS / f"browser-{transport}.json").write_text(json.dumps(stats, indent=1))
    page.click("#call-button")
    assert page.inner_text("#call-button") == "Connect"
    return stats


def summary(stats: dict[str, Any]) -> str:
    turns = [(round(t["latencyMs"]), t["endOfSpeechFrom"]) for t in stats["turns"]]
    segments = [(round(s["start"]), round(s["end"])) for s in stats["agentSegments"]]
    barge_ins = [round(b["stopMs"]) for b in stats["bargeIns"]]
    return f"turns {turns}; barge-in stop ms {barge_ins}; agent sound {segments}; errors {stats['errors']}"


def check_conversation(page: Any, stats: dict[str, Any]) -> None:
    """What a caller sees and hears, whatever the transport."""
    assert stats["errors"] == []
    callers = page.locator("li.turn.caller .text").all_inner_texts()
    agents = page.locator("li.turn.agent .text").all_inner_texts()
    assert callers[:2] == [CALLER_TRANSCRIPT] * 2
    heard, full = agents[0], agents[1]
    assert full == SHORT_REPLY
    assert heard and LONG_REPLY.startswith(heard) and len(heard) < len(LONG_REPLY) / 2, heard
    assert page.locator("li.turn.agent.truncated").count() == 1

    first, second = stats["turns"][:2]
    for turn in (first, second):
        # the server waits 500 ms of silence before it answers, so a smaller figure is a measuring bug
        assert 450 < turn["latencyMs"] < 2500, turn
    assert page.inner_text("#latency") == f"{round(second['latencyMs'])} ms"

    reply = next(s for s in stats["agentSegments"] if s["start"] == second["firstAudioAt"])
    played = (reply["end"] - reply["start"]) / 1000
    assert played == pytest.approx(audible_seconds(SHORT_REPLY), abs=0.15), "the short reply played whole, no gap"
    assert stats["playedSeconds"] > played

    states = [entry["state"] for entry in stats["stateHistory"]]
    speaking = states.index("speaking")
    assert "interrupted" in states[speaking:] and "listening" in states[states.index("interrupted") :]


def check_barge_in(stats: dict[str, Any]) -> None:
    barge_in = stats["bargeIns"][0]
    onset = barge_in["onsetAt"]
    assert any(s["start"] < onset < s["end"] + 250 for s in stats["agentSegments"]), "the caller talked over audio"
    assert 0 <= barge_in["stopMs"] <= BARGE_IN_STOP_MS, barge_in


@in_chromium
@pytest.mark.parametrize("transport", ["websocket", "webrtc"])
def test_call_with_barge_in(browser: Any, server: RunningServer, transport: str) -> None:
    if transport == "webrtc":
        skip_without_webrtc_door(server)
    page = open_page(browser, server)
    stats = talk(page, transport)
    print(summary(stats))  # shown when the test fails: the figures the page measured
    check_conversation(page, stats)
    check_barge_in(stats)
    ends = {turn["endOfSpeechFrom"] for turn in stats["turns"]}
    assert ends == {"audio_end_ms" if transport == "websocket" else "microphone"}
    if transport == "websocket":
        # The page owns playout here; the server pauses its audio at the caller's onset (until the speech proves to
        # be an interruption), so the page plays out what it was sent and the server's own truncation is exact.
        # Audio the page drops unplayed it reports with a truncate.
        assert stats["events"]["conversation.item.truncated"] == 1
        for truncate in stats["truncates"]:
            assert 300 < truncate["audio_end_ms"] < audible_seconds(LONG_REPLY) * 1000 / 2, truncate
    else:
        assert stats["events"]["output_audio_buffer.cleared"] == 1
        assert stats["truncates"] == [], "the server owns playout and truncates by itself"
    page.close()


def skip_without_webrtc_door(server: RunningServer) -> None:
    if not any(getattr(route, "path", None) == "/v1/realtime/calls" for route in server.app.routes):
        pytest.skip("the WebRTC door (POST /v1/realtime/calls) is not routed in this build")


@pytest.fixture(scope="module")
def keyed_server() -> Iterator[RunningServer]:
    with running_server(scripted_config(server={"api_keys": [API_KEY]})) as running:
        yield running


@in_chromium
@pytest.mark.parametrize("transport", ["websocket", "webrtc"])
def test_api_key_is_checked(browser: Any, keyed_server: RunningServer, transport: str) -> None:
    if transport == "webrtc":
        skip_without_webrtc_door(keyed_server)
    page = open_page(browser, keyed_server)
    page.select_option("#transport", transport)
    page.fill("#api-key", "sk-wrong")
    page.click("#call-button")
    page.wait_for_selector("#error:not([hidden])", timeout=10_000)
    assert page.inner_text("#error").startswith("401 Unauthorized")
    assert page.inner_text("#call-button") == "Connect"

    page.fill("#api-key", API_KEY)
    page.click("#call-button")
    page.wait_for_function("() => window.omnivox.state === 'listening'", timeout=10_000)
    assert page.is_hidden("#error")
    assert "Connected over" in page.inner_text("#call-status")
    # the page shows the session's turn detection, and the browser (not the server) cancels echo
    assert page.inner_text("#turn-detection") == "server_vad (500 ms) · echo cancelled by the browser"
    page.click("#call-button")
    page.close()


@in_chromium
@pytest.mark.parametrize("transport", ["websocket", "webrtc"])
def test_unreachable_server_is_reported(browser: Any, keyed_server: RunningServer, transport: str) -> None:
    page = open_page(browser, keyed_server)
    page.select_option("#transport", transport)
    page.fill("#server-url", f"http://127.0.0.1:{free_port()}")
    page.click("#call-button")
    page.wait_for_selector("#error:not([hidden])", timeout=10_000)
    assert page.inner_text("#error").startswith("Cannot reach the server at http://127.0.0.1:")
    assert page.evaluate("window.omnivox.connected") is False
    page.close()


@in_chromium
def test_denied_microphone_is_reported(browser: Any, keyed_server: RunningServer) -> None:
    page = browser.new_page()
    page.add_init_script(
        """navigator.mediaDevices.getUserMedia = () =>
             Promise.reject(new DOMException("Permission denied", "NotAllowedError"));"""
    )
    page.goto(f"{keyed_server.http_url}/")
    page.click("#call-button")
    page.wait_for_selector("#error:not([hidden])", timeout=10_000)
    assert page.inner_text("#error").startswith("Microphone permission was denied")
    page.close()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_page_and_only_its_assets_are_served(keyed_server: RunningServer) -> None:
    page = httpx.get(f"{keyed_server.http_url}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'id="call-button"' in page.text and "/web/app.js" in page.text
    for asset, media_type in [("app.js", "text/javascript"), ("audio-worklets.js", "text/javascript")]:
        response = httpx.get(f"{keyed_server.http_url}/web/{asset}")
        assert response.status_code == 200 and response.headers["content-type"].startswith(media_type)
    for hidden in ["__init__.py", "index.html.bak", "..%2Fserver%2Fapp.py"]:
        assert httpx.get(f"{keyed_server.http_url}/web/{hidden}").status_code == 404
    assert httpx.get(f"{keyed_server.http_url}/healthz").status_code == 200
