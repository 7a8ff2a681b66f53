"""Property-based fuzzing of the HTTP doors from their own OpenAPI schema: no generated input may cause a 5xx."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from tests.server_helpers import running_server, scripted_config

EXAMPLES_PER_OPERATION = 30


@pytest.fixture(scope="module")
def http_schema() -> Iterator[schemathesis.BaseSchema]:
    scripted = {"reply": "Fine, thanks.", "speed": 200.0, "first_audio_ms": 0, "transcript": "fine"}
    config = scripted_config(
        engine={"options": {"scripted": scripted}},
        limits={"max_http_body_bytes": 256 * 1024},
        tts={"backend": "espeak", "max_input_chars": 200},
    )
    with running_server(config) as server:
        yield schemathesis.openapi.from_url(f"{server.http_url}/openapi.json")


OPERATIONS = [
    "POST /v1/chat/completions",
    "POST /audio/chat/completions",
    "POST /v1/audio/transcriptions",
    "POST /v1/audio/speech",
    "GET /v1/models",
]


def test_the_schema_describes_every_http_door(http_schema: schemathesis.BaseSchema) -> None:
    described = {
        f"{method.upper()} {path}" for path, methods in http_schema.raw_schema["paths"].items() for method in methods
    }
    assert described == set(OPERATIONS)


@pytest.mark.slow
@pytest.mark.parametrize("label", OPERATIONS)
def test_no_generated_request_causes_a_server_error(http_schema: schemathesis.BaseSchema, label: str) -> None:
    method, path = label.split(" ")
    operation = http_schema[path][method]

    @given(case=operation.as_strategy())
    @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, suppress_health_check=list(HealthCheck))
    def call(case: schemathesis.Case) -> None:
        response = case.call(timeout=30)
        assert response.status_code < 500, f"{label} -> {response.status_code}: {response.text[:500]}"

    call()
