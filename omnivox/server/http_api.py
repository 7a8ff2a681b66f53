"""The HTTP doors' routes, `GET /v1/models` and `GET /openapi.json` (the schema of these routes).

These doors answer one request with one engine response: no VAD and no turns. Each door lives in its own module:
- `POST /v1/chat/completions`: `chat_api` (OpenAI's shape, with audio);
- `POST /audio/chat/completions`: `audio_chat_api` (the audio-modalities SSE format);
- `POST /v1/audio/transcriptions`: `transcription_api`;
- `POST /v1/audio/speech`: `speech_api` (served by the TTS stage).
They share `http_common` (errors, checks, SSE), `http_bodies` (request bodies) and `http_media` (messages and their
media parts decoded for the engine).
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from omnivox.server.audio_chat_api import audio_chat_completions
from omnivox.server.chat_api import chat_completions
from omnivox.server.http_bodies import INPUT_AUDIO_FORMATS, VOICES, AudioChatRequest, ChatCompletionRequest
from omnivox.server.http_common import check_auth, openai_errors
from omnivox.server.speech_api import SpeechRequest, speech
from omnivox.server.state import ServerState
from omnivox.server.transcription_api import TRANSCRIPTION_FORMATS, transcriptions


async def list_models(request: Request) -> Response:
    state: ServerState = request.app.state.omnivox
    check_auth(request, state)
    return JSONResponse(
        {
            "object": "list",
            "data": [
                {"id": name, "object": "model", "created": 0, "owned_by": "omnivox"} for name in state.model_names
            ],
        }
    )


def _error_responses(*statuses: int) -> dict[str, Any]:
    error = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
    return {str(status): {"description": "an OpenAI error object", "content": error} for status in statuses}


def openapi_schema(model_names: list[str] | None) -> dict[str, Any]:
    """OpenAPI 3.1 for the HTTP doors, request bodies generated from the pydantic models above; `model_names` are
    the only names accepted (None: any name)."""
    schemas: dict[str, Any] = {}
    for model in (ChatCompletionRequest, AudioChatRequest, SpeechRequest):
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
    model = {"type": "string", "enum": model_names} if model_names else {"type": "string"}
    schemas["ChatCompletionRequest"]["properties"]["model"] = model
    schemas["AudioChatRequest"]["properties"]["model"] = {"type": "string", "description": "any name"}
    schemas["AudioChatRequest"]["properties"]["stream"] = {"const": True, "description": "this endpoint only streams"}
    schemas["AudioChatRequest"]["required"].append("stream")
    schemas["AudioOutput"]["properties"]["voice"] = {"type": "string", "enum": list(VOICES), "default": "alloy"}
    schemas["InputAudio"]["properties"]["format"] = {"type": "string", "enum": list(INPUT_AUDIO_FORMATS)}
    schemas["Error"] = {
        "type": "object",
        "required": ["error"],
        "properties": {"error": {"type": "object", "required": ["message", "type"]}},
    }
    security = [{"bearer": []}]
    json_body = {"required": True, "content": {"application/json": {"schema": {}}}}
    sse_or_json = {
        "description": "a completion (JSON) or a stream of chunks (text/event-stream)",
        "content": {"application/json": {"schema": {"type": "object"}}, "text/event-stream": {"schema": {}}},
    }

    def body(name: str) -> dict[str, Any]:
        return {**json_body, "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{name}"}}}}

    return {
        "openapi": "3.1.0",
        "info": {"title": "omnivox HTTP API", "version": "1"},
        "components": {"schemas": schemas, "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "paths": {
            "/v1/chat/completions": {
                "post": {
                    "operationId": "createChatCompletion",
                    "security": security,
                    "requestBody": body("ChatCompletionRequest"),
                    "responses": {"200": sse_or_json, **_error_responses(400, 401, 403, 404, 413, 415, 429, 503)},
                }
            },
            "/audio/chat/completions": {
                "post": {
                    "operationId": "createAudioChatCompletion",
                    "security": security,
                    "requestBody": body("AudioChatRequest"),
                    "responses": {
                        "200": {"description": "SSE audio chunks", "content": {"text/event-stream": {"schema": {}}}},
                        **_error_responses(400, 401, 403, 404, 413, 415, 429, 503),
                    },
                }
            },
            "/v1/audio/transcriptions": {
                "post": {
                    "operationId": "createTranscription",
                    "security": security,
                    "requestBody": {
                        "required": True,
                        "content": {
                            "multipart/form-data": {
                                "schema": {
                                    "type": "object",
                                    "required": ["file", "model"],
                                    "properties": {
                                        "file": {"type": "string", "format": "binary"},
                                        "model": model,
                                        "language": {"type": "string"},
                                        "prompt": {"type": "string"},
                                        "response_format": {"type": "string", "enum": list(TRANSCRIPTION_FORMATS)},
                                    },
                                }
                            }
                        },
                    },
                    "responses": {
                        "200": {
                            "description": "the transcript",
                            "content": {"application/json": {"schema": {"type": "object"}}, "text/plain": {}},
                        },
                        **_error_responses(400, 401, 403, 404, 413, 501, 503),
                    },
                }
            },
            "/v1/audio/speech": {
                "post": {
                    "operationId": "createSpeech",
                    "security": security,
                    "requestBody": body("SpeechRequest"),
                    "responses": {
                        "200": {
                            "description": "the audio, streamed (or SSE with stream_format sse)",
                            "content": {"application/octet-stream": {}, "text/event-stream": {}},
                        },
                        **_error_responses(400, 401, 413, 429, 501, 503),
                    },
                }
            },
            "/v1/models": {
                "get": {
                    "operationId": "listModels",
                    "security": security,
                    "responses": {
                        "200": {"description": "the served model", "content": {"application/json": {"schema": {}}}},
                        **_error_responses(401, 403),
                    },
                }
            },
        },
    }


async def openapi(request: Request) -> Response:
    state: ServerState = request.app.state.omnivox
    return JSONResponse(openapi_schema(state.model_names if state.config.models.strict else None))


def http_api_routes() -> list[BaseRoute]:
    return [
        Route("/v1/chat/completions", openai_errors(chat_completions), methods=["POST"]),
        Route("/audio/chat/completions", openai_errors(audio_chat_completions), methods=["POST"]),
        Route("/v1/audio/transcriptions", openai_errors(transcriptions), methods=["POST"]),
        Route("/v1/audio/speech", openai_errors(speech), methods=["POST"]),
        Route("/v1/models", openai_errors(list_models), methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"]),
    ]
