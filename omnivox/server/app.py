"""The ASGI application: every door mounted on one Starlette app around one engine."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route, WebSocketRoute

from omnivox import __version__
from omnivox.pipeline.engines import create_engine
from omnivox.pipeline.engines.base import Engine
from omnivox.pipeline.vad import create_vad
from omnivox.server.config import Config
from omnivox.server.http_api import http_api_routes
from omnivox.server.lifecycle import GuardedApp
from omnivox.server.realtime_ws import realtime_endpoint
from omnivox.server.state import ServerState
from omnivox.server.telephony import telephony_routes
from omnivox.server.web_page import web_page_routes
from omnivox.server.webrtc import close_all_calls, webrtc_routes

log = logging.getLogger(__name__)


async def healthz(request: Request) -> Response:
    state: ServerState = request.app.state.omnivox
    ready = state.engine.ready
    body = {
        "status": "ok" if ready else "loading",
        "version": __version__,
        "engine": state.engine.name,
        "model": state.model_name,
        "sessions": state.sessions_open,
        "max_sessions": state.config.server.max_sessions,
    }
    return JSONResponse(body, status_code=200 if ready else 503)


async def metrics(request: Request) -> Response:
    state: ServerState = request.app.state.omnivox
    return Response(state.metrics.render(), media_type="text/plain; version=0.0.4")


def door_routes() -> list[BaseRoute]:
    """Routes of every door; each door module owns its paths."""
    return [
        Route("/healthz", healthz),
        Route("/metrics", metrics),
        WebSocketRoute("/v1/realtime", realtime_endpoint),
        *http_api_routes(),
        *web_page_routes(),
        *telephony_routes(),
        *webrtc_routes(),
    ]


def create_app(config: Config, engine: Engine | None = None) -> Starlette:
    """Build the app; the engine loads during start-up (a failure stops the server with its message)."""
    engine = engine or create_engine(config.engine.name, config.engine.model, config.engine.options)
    state = ServerState(config=config, engine=engine)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        log.info("loading engine %s (%s)", engine.name, engine.model_id)
        await engine.start()
        # the VAD model loads once per process (~2 s for silero): here, not in the first caller's event loop turn
        await asyncio.to_thread(create_vad, config.vad.kind)
        state.metrics.engine_ready.set(1)
        log.info("engine %s ready; serving model %s", engine.name, state.model_name)
        try:
            yield
        finally:
            await close_all_calls(app.state)
            state.metrics.engine_ready.set(0)
            await engine.close()

    app = GuardedApp(
        routes=door_routes(),
        lifespan=lifespan,
        lifecycle=state.lifecycle,
        max_websockets=config.connections.limit_concurrency,
    )
    app.state.omnivox = state
    return app
