"""`POST /v1/audio/transcriptions`: a multipart upload, answered by the engine's recogniser (501 where it has
none). The file must be wav, mp3, flac, ogg or webm, and the one its content type (or else its file name) says."""

from __future__ import annotations

import asyncio
import functools

from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

from omnivox.pipeline.engines.base import INPUT_RATE
from omnivox.pipeline.media import MediaError, container_of_file_name, container_of_type
from omnivox.server.http_common import ApiError, check_auth, check_model, check_ready, read_form
from omnivox.server.http_media import FILE_AUDIO_CONTAINERS, decode_input_audio, refused_media
from omnivox.server.state import ServerState

TRANSCRIPTION_FORMATS = ("json", "text", "verbose_json")


async def transcriptions(request: Request) -> Response:
    state: ServerState = request.app.state.omnivox
    check_auth(request, state)
    if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
        raise ApiError(400, "send the audio as multipart/form-data with a `file` field")
    form = await read_form(request, state.config.limits.max_http_body_bytes, max_files=1, max_fields=16)
    upload = form.get("file")
    if not isinstance(upload, UploadFile):
        raise ApiError(400, "the `file` field (an audio file) is required", param="file")
    fields = {name: form.get(name) for name in ("model", "language", "prompt", "response_format")}
    if any(value is not None and not isinstance(value, str) for value in fields.values()):
        raise ApiError(400, "model, language, prompt and response_format are text fields")
    if not fields["model"]:
        raise ApiError(400, "the `model` field is required", param="model")
    check_model(state, fields["model"])
    response_format = fields["response_format"] or "json"
    if response_format not in TRANSCRIPTION_FORMATS:
        raise ApiError(
            400,
            f"response_format {response_format!r} is not supported; use one of {', '.join(TRANSCRIPTION_FORMATS)}",
            param="response_format",
        )
    recognise = getattr(state.engine, "transcribe", None)
    if recognise is None:
        raise ApiError(
            501, f"the {state.engine.name} engine cannot transcribe", kind="server_error", code="not_implemented"
        )
    check_ready(state)
    try:
        declared = container_of_type(upload.content_type) or container_of_file_name(upload.filename)
    except MediaError as exc:
        raise refused_media(exc, "file") from None
    raw = await upload.read()
    media = state.config.media
    audio = await asyncio.to_thread(
        functools.partial(
            decode_input_audio,
            raw,
            declared=declared,
            allowed=FILE_AUDIO_CONTAINERS,
            param="file",
            media=media,
            max_seconds=media.max_audio_s,
        )
    )
    text = await recognise(audio, fields["language"] or None, fields["prompt"] or "")
    if response_format == "text":
        return PlainTextResponse(text)
    if response_format == "json":
        return JSONResponse({"text": text})
    return JSONResponse(
        {
            "task": "transcribe",
            "language": fields["language"] or "",
            "duration": round(audio.size / INPUT_RATE, 3),
            "text": text,
            "segments": [],
        }
    )
