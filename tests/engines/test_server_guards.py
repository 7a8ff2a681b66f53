"""A real server around the tiny Qwen3-Omni engine: hostile audio is refused, a failed device is visible to
supervisors and orchestrators, and decode-slot fallbacks are counted in /metrics."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import soundfile
import torch
from tiny_qwen3 import build_tiny_qwen3

from omnivox.pipeline.engines import qwen3_omni, qwen_common
from omnivox.pipeline.engines.qwen3_omni import Qwen3OmniEngine
from tests.server_helpers import RunningServer, running_server, scripted_config
from tests.test_conformance import connect

OPTIONS: dict[str, Any] = {"device": "cpu", "max_text_tokens": 24, "max_audio_frames": 3, "talker_temperature": 0.0}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield build_tiny_qwen3(tmp_path_factory.mktemp("tiny-qwen3-server"))
    finally:
        torch.set_num_threads(threads)


def _float_wav(samples: np.ndarray) -> str:
    buffer = io.BytesIO()
    soundfile.write(buffer, samples, 16_000, format="WAV", subtype="FLOAT")
    return base64.b64encode(buffer.getvalue()).decode()


def _chat(server: RunningServer, content: list[dict[str, Any]], *, speak: bool = False) -> httpx.Response:
    body: dict[str, Any] = {"model": "qwen3-omni", "messages": [{"role": "user", "content": content}], "max_tokens": 24}
    if speak:
        body |= {"modalities": ["text", "audio"], "audio": {"voice": "alloy", "format": "wav"}}
    return httpx.post(f"{server.http_url}/v1/chat/completions", json=body, timeout=60)


def _metric(server: RunningServer, line_start: str) -> float:
    text = httpx.get(f"{server.http_url}/metrics").text
    return float(next(line for line in text.splitlines() if line.startswith(line_start)).rsplit(" ", 1)[1])


def test_audio_with_nan_samples_is_a_400_and_a_long_answer_keeps_its_slot_counted_in_metrics(
    checkpoint: Path,
) -> None:
    """With `static_cache_tokens` just above the prompt, the answer fills its slot and goes on on a growing cache:
    counted, where it used to be refused a slot (or fail) for want of room."""
    tone = (0.3 * np.sin(np.arange(16_000) / 16_000 * 2 * np.pi * 220)).astype(np.float32)
    poisoned = tone.copy()
    poisoned[1000] = np.nan
    engine = Qwen3OmniEngine(str(checkpoint), **OPTIONS, static_cache=True, static_cache_tokens=40, max_active=2)
    config = scripted_config(engine={"served_model_name": "qwen3-omni"})
    with running_server(config, engine) as server:
        refused = _chat(
            server, [{"type": "input_audio", "input_audio": {"data": _float_wav(poisoned), "format": "wav"}}]
        )
        answered = _chat(server, [{"type": "text", "text": "Please say something long."}])
        outgrew = _metric(server, 'omnivox_static_cache_fallbacks_total{reason="thinker_outgrew_slot"}')

    assert refused.status_code == 400
    assert refused.json()["error"]["code"] == "invalid_audio"  # the door refuses it before the engine's own check
    assert "not finite" in refused.json()["error"]["message"]
    assert answered.status_code == 200
    assert answered.json()["usage"]["completion_tokens"] > 0
    assert outgrew == 1


def test_a_failed_device_makes_health_and_readiness_fail_and_refuses_new_work(
    checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A CUDA device-side assert breaks the context for every later call: the worker's device check sees it, every
    request fails, and /healthz and /readyz say so (simulated here: the step raises and the check reports it)."""
    broken = "AcceleratorError: CUDA error: device-side assert triggered (simulated)"
    failing = {"on": False}
    real_predictor = qwen3_omni.predict_residuals

    def predictor(*args: Any, **kwargs: Any) -> Any:
        if failing["on"]:
            raise RuntimeError("CUDA error: device-side assert triggered (simulated)")
        return real_predictor(*args, **kwargs)

    monkeypatch.setattr(qwen3_omni, "predict_residuals", predictor)
    monkeypatch.setattr(qwen_common, "device_failure", lambda device: broken if failing["on"] else None)
    engine = Qwen3OmniEngine(str(checkpoint), **OPTIONS)
    config = scripted_config(engine={"served_model_name": "qwen3-omni"})
    with running_server(config, engine) as server:
        healthy = (httpx.get(f"{server.http_url}/healthz"), httpx.get(f"{server.http_url}/readyz"))
        fine = _chat(server, [{"type": "text", "text": "Hello"}], speak=True)
        failing["on"] = True
        failed = _chat(server, [{"type": "text", "text": "Hello"}], speak=True)
        after = _chat(server, [{"type": "text", "text": "Hello again"}])
        health, ready = httpx.get(f"{server.http_url}/healthz"), httpx.get(f"{server.http_url}/readyz")
        failed_metric = _metric(server, "omnivox_engine_failed ")

    assert [response.status_code for response in healthy] == [200, 200]
    assert healthy[1].json()["status"] == "ready"
    assert fine.status_code == 200
    assert failed.status_code in (500, 503)
    assert after.status_code == 503 and "restarted" in after.json()["error"]["message"]
    assert health.status_code == 503 and health.json()["status"] == "failed" and broken in health.json()["problem"]
    assert ready.status_code == 503 and ready.json()["status"] == "failed"
    assert failed_metric == 1


async def test_readiness_says_full_while_every_session_slot_is_taken() -> None:
    with running_server(scripted_config(server={"max_sessions": 1})) as server:
        async with httpx.AsyncClient(base_url=server.http_url) as client:
            before = await client.get("/readyz")
            async with connect(server):
                health, ready = await client.get("/healthz"), await client.get("/readyz")

    assert before.status_code == 200
    assert health.status_code == 200
    assert ready.status_code == 503 and ready.json()["status"] == "full"
