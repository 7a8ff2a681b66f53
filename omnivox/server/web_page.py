"""The browser voice chat page: `/` and its few static assets under `/web/`, nothing else.

Only the listed files are served, so the package's other files never leak and every other path stays free
for the doors.
"""

from __future__ import annotations

from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse, PlainTextResponse, Response
from starlette.routing import BaseRoute, Route

WEB_CLIENT = Path(__file__).resolve().parent.parent / "web_client"

ASSETS = {
    "app.js": "text/javascript",
    "audio-worklets.js": "text/javascript",
    "style.css": "text/css",
}

NO_CACHE = {"Cache-Control": "no-cache"}


async def index(request: Request) -> Response:
    return FileResponse(WEB_CLIENT / "index.html", media_type="text/html", headers=NO_CACHE)


async def asset(request: Request) -> Response:
    name = request.path_params["name"]
    media_type = ASSETS.get(name)
    if media_type is None:
        return PlainTextResponse("not found", status_code=404)
    return FileResponse(WEB_CLIENT / name, media_type=media_type, headers=NO_CACHE)


def web_page_routes() -> list[BaseRoute]:
    return [Route("/", index), Route("/web/{name}", asset)]
