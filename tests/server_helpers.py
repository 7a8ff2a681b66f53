"""A real omnivox server (uvicorn, websockets protocol) on a free loopback port, in a background thread."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import uvicorn

from omnivox.pipeline.audio import resample
from omnivox.pipeline.engines.base import Engine
from omnivox.pipeline.recognisers import PocketsphinxRecogniser
from omnivox.server.app import create_app
from omnivox.server.config import Config, load_config
from omnivox.server.lifecycle import DrainingServer, uvicorn_settings
from omnivox.server.phone_sim import CallOptions, Turn, Utterance, run_call


@dataclass
class RunningServer:
    host: str
    port: int
    app: Any
    config: Config

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://{self.host}:{self.port}"

    @property
    def state(self) -> Any:
        return self.app.state.omnivox


def scripted_config(**sections: dict[str, Any]) -> Config:
    """The default config with the scripted engine, fast, plus per-test overrides (nested dicts)."""
    overrides: dict[str, Any] = {"engine": {"name": "scripted"}, "server": {"log_level": "warning"}}
    for section, values in sections.items():
        overrides[section] = {**overrides.get(section, {}), **values}
    return load_config(overrides=overrides, environ={})


@contextmanager
def running_server(
    config: Config | None = None, engine: Engine | None = None, port: int = 0, loop: str = "asyncio"
) -> Iterator[RunningServer]:
    """omnivox with the connection bounds and drain of `omnivox serve`; `loop="uvloop"` runs its event loop too."""
    config = config or scripted_config()
    app = create_app(config, engine)
    settings = {**uvicorn_settings(config), "loop": loop}
    server = DrainingServer(
        uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="on", log_level="warning", **settings),
        app.state.omnivox.lifecycle,
        config.connections.drain_timeout_s,
    )
    with _running(server) as bound:
        yield RunningServer("127.0.0.1", bound, app, config)


@contextmanager
def serving(app: Any, port: int = 0, ws_max_size: int = 16 * 1024 * 1024) -> Iterator[int]:
    """Any ASGI app on loopback (a free port unless `port` is given) until the block ends; yields the port."""
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        loop="asyncio",
        ws="websockets",
        lifespan="on",
        log_level="warning",
        ws_max_size=ws_max_size,
        ws_per_message_deflate=False,
    )
    with _running(uvicorn.Server(config)) as bound:
        yield bound


@contextmanager
def _running(server: uvicorn.Server) -> Iterator[int]:
    """Run `server` in a background thread until the block ends; yields its port."""
    thread = threading.Thread(target=server.run, name="omnivox-test-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    try:
        yield server.servers[0].sockets[0].getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(timeout=15)


async def settles(check: Callable[[], bool], timeout: float = 5) -> bool:
    """Polls until `check()` holds; False if it still does not after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


async def phone_turn(server: RunningServer, said: str, turns_timeout_s: float) -> tuple[Turn, set[str]]:
    """One phone call through the simulator saying `said`: its turn, and the words pocketsphinx recognises in what
    the caller heard of the answer."""
    options = CallOptions(
        url=f"{server.ws_url}/telephony/twilio",
        utterances=[Utterance.say(said)],
        pause_s=0.2,
        agent_done_silence_s=1.0,
        turns_timeout_s=turns_timeout_s,
    )
    result = await run_call(options)
    (turn,) = result.turns
    if turn.agent_start_s is None:
        return turn, set()
    start = int(turn.agent_start_s * 8000)
    answer = result.agent[start : start + int(turn.agent_heard_s * 8000) + 800]
    return turn, set(PocketsphinxRecogniser().recognise(resample(answer, 8000, 16_000)).split())
