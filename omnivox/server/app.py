"""The ASGI application: every door mounted on one Starlette app around one engine."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route, WebSocketRoute

from omnivox import __version__
from omnivox.pipeline.echo_cancel import load_audio_processing
from omnivox.pipeline.end_of_turn import EndOfTurnBatcher, ModelNotFound
from omnivox.pipeline.engines import create_engine
from omnivox.pipeline.engines.base import Engine, engine_failure, engine_health_problem
from omnivox.pipeline.tts import TtsSettings, TtsStage, create_tts_stage
from omnivox.pipeline.vad import create_vad
from omnivox.server.auth import is_authorized
from omnivox.server.config import Config
from omnivox.server.http_api import http_api_routes
from omnivox.server.http_common import ApiError
from omnivox.server.lifecycle import GuardedApp
from omnivox.server.realtime_ws import realtime_endpoint
from omnivox.server.state import ServerState
from omnivox.server.telephony import telephony_routes
from omnivox.server.web_page import web_page_routes
from omnivox.server.webrtc import close_all_calls, webrtc_routes

log = logging.getLogger(__name__)


def engine_status(state: ServerState) -> str:
    """The engine's state: "failed" once its device broke (only a restart recovers), "unhealthy" while its worker is
    dead or stalled, "unavailable" while no remote engine host is ready, "loading" until it is ready, else "ok"."""
    if engine_failure(state.engine) is not None:
        return "failed"
    if engine_health_problem(state.engine) is not None:
        return "unhealthy"
    if state.engine.ready:
        return "ok"
    return "unavailable" if _remote_health(state) else "loading"


def _remote_health(state: ServerState) -> dict[str, Any]:
    """What an engine reached over the network says of its hosts (the remote engine's `health()`), else nothing."""
    health = getattr(state.engine, "health", None)
    return health() if health is not None else {}


async def healthz(request: Request) -> Response:
    """Liveness: 503 while loading, while the engine cannot serve (a dead or stalled worker) and once it failed for
    good (a broken CUDA context), so a supervisor restarts the process."""
    state: ServerState = request.app.state.omnivox
    status = engine_status(state)
    problem = engine_health_problem(state.engine)
    body = {
        "status": status,
        "version": __version__,
        "engine": state.engine.name,
        "model": state.model_name,
        "sessions": state.sessions_open,
        "max_sessions": state.config.server.max_sessions,
        **({"problem": problem} if problem else {}),
        **_remote_health(state),
    }
    return JSONResponse(body, status_code=200 if status == "ok" else 503)


async def readyz(request: Request) -> Response:
    """Readiness, for orchestrators routing new callers: 200 only while the engine serves and a session is free."""
    state: ServerState = request.app.state.omnivox
    status = engine_status(state)
    if status == "ok" and state.sessions_open >= state.config.server.max_sessions:
        status = "full"
    body = {"status": "ready" if status == "ok" else status, "sessions": state.sessions_open}
    return JSONResponse(body, status_code=200 if status == "ok" else 503)


async def metrics(request: Request) -> Response:
    state: ServerState = request.app.state.omnivox
    server = state.config.server
    if server.metrics_require_key and not is_authorized(server.api_keys, request.headers):
        return JSONResponse(ApiError(401, "missing or invalid API key", code="invalid_api_key").body(), 401)
    return Response(state.metrics.render(), media_type="text/plain; version=0.0.4")


def _load_end_of_turn_model(path: str | None) -> None:
    """semantic_vad's model loads at start-up, not on a caller's first pause; without it semantic_vad turns end on
    the eagerness's longest silence, and the log says why."""
    try:
        EndOfTurnBatcher.configure(path).load()
    except ModelNotFound as exc:
        log.warning("semantic_vad will end turns on silence only: %s", exc)


def door_routes() -> list[BaseRoute]:
    """Routes of every door; each door module owns its paths."""
    return [
        Route("/healthz", healthz),
        Route("/readyz", readyz),
        Route("/metrics", metrics),
        WebSocketRoute("/v1/realtime", realtime_endpoint),
        *http_api_routes(),
        *web_page_routes(),
        *telephony_routes(),
        *webrtc_routes(),
    ]


def create_tts(config: Config) -> TtsStage:
    """The TTS stage the configuration describes (nothing loads until it starts: an engine that speaks through it
    starts it, else the speech door on its first request)."""
    speech_door_only = {"max_input_chars", "max_queued_requests"}
    return create_tts_stage(TtsSettings.from_mapping(config.tts.model_dump(exclude=speech_door_only)))


def create_app(config: Config, engine: Engine | None = None) -> Starlette:
    """Build the app; the engine loads during start-up (a failure stops the server with its message)."""
    tts = getattr(engine, "tts", None) or create_tts(config)
    engine = engine or create_engine(
        config.engine.name,
        config.engine.model,
        config.engine.engine_options(),
        fallback=config.engine.fallback,
        tts=tts,
    )
    state = ServerState(config=config, engine=engine, tts=tts)
    state.metrics.watch_engine(engine)
    watch_hosts = getattr(engine, "watch_hosts", None)
    if watch_hosts is not None:
        watch_hosts(state.metrics.observe_engine_host)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        log.info("loading engine %s (%s)", engine.name, engine.model_id)
        await engine.start()
        # the VAD model loads once per process (~2 s for silero): here, not in the first caller's event loop turn
        await asyncio.to_thread(create_vad, config.vad.kind)
        await asyncio.to_thread(_load_end_of_turn_model, config.vad.smart_turn_model)
        await asyncio.to_thread(load_audio_processing)
        state.metrics.engine_ready.set(1)
        log.info("engine %s ready; serving model %s", engine.name, state.model_name)
        try:
            yield
        finally:
            await close_all_calls(app.state)
            state.metrics.engine_ready.set(0)
            await engine.close()
            await tts.close()

    app = GuardedApp(
        routes=door_routes(),
        lifespan=lifespan,
        lifecycle=state.lifecycle,
        max_websockets=config.connections.limit_concurrency,
    )
    app.state.omnivox = state
    return app
