"""Configuration precedence and errors, and the `omnivox serve` command as a user runs it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from omnivox.server.config import ConfigError, load_config


def test_defaults_come_from_the_embedded_yaml() -> None:
    config = load_config(environ={})
    assert config.server.port == 8000
    assert config.engine.name == "auto"
    assert config.session.turn_detection is not None
    assert config.session.turn_detection.silence_duration_ms == 500


def test_file_then_environment_then_flags(tmp_path: Path) -> None:
    file = tmp_path / "omnivox.yaml"
    file.write_text("server:\n  port: 9001\n  max_sessions: 7\nvad:\n  kind: webrtc\n")
    env = {"OMNIVOX_SERVER__PORT": "9002", "OMNIVOX_SERVER__API_KEYS": "[sk-a, sk-b]"}
    config = load_config(file, {"server": {"host": "127.0.0.1"}}, environ=env)
    assert config.server.port == 9002
    assert config.server.max_sessions == 7
    assert config.server.api_keys == ["sk-a", "sk-b"]
    assert config.server.host == "127.0.0.1"
    assert config.vad.kind == "webrtc"
    assert load_config(file, {"server": {"port": 9003}}, environ=env).server.port == 9003


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("server:\n  port: 99999\n", "server.port"),
        ("vad:\n  kind: magic\n", "vad.kind"),
        ("server:\n  prot: 1\n", "server.prot"),
        ("session:\n  turn_detection:\n    threshold: 2\n", "session.turn_detection.threshold"),
    ],
)
def test_invalid_values_name_their_key(tmp_path: Path, text: str, key: str) -> None:
    file = tmp_path / "bad.yaml"
    file.write_text(text)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(file, environ={})


def test_broken_yaml_and_missing_file_are_clear(tmp_path: Path) -> None:
    file = tmp_path / "broken.yaml"
    file.write_text("server: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(file, environ={})
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml", environ={})


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_serve_command_runs_the_scripted_engine_and_stops_cleanly() -> None:
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMNIVOX_")}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "omnivox.server.cli",
            "serve",
            "--engine",
            "scripted",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1)
                break
            except httpx.TransportError:
                assert process.poll() is None, process.stdout.read() if process.stdout else ""
                assert time.monotonic() < deadline, "server did not come up"
                time.sleep(0.2)
        assert health.status_code == 200
        assert health.json()["engine"] == "scripted"
    finally:
        process.terminate()
        output, _ = process.communicate(timeout=20)
    assert process.returncode in (0, -signal.SIGTERM), output  # uvicorn re-raises SIGTERM after a clean shutdown
    assert "engine scripted ready" in output
    assert "Application shutdown complete" in output


def test_serve_with_an_invalid_config_exits_2_naming_the_key(tmp_path: Path) -> None:
    file = tmp_path / "bad.yaml"
    file.write_text("audio:\n  lead_ms: -5\n")
    result = subprocess.run(
        [sys.executable, "-m", "omnivox.server.cli", "serve", "--config", str(file)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "audio.lead_ms" in result.stderr


@pytest.mark.parametrize("name", ["gpu-7b.yaml", "gpu-qwen3.yaml", "phone.yaml"])
def test_example_configs_load_and_their_engine_options_are_known(name: str) -> None:
    from importlib import resources

    from omnivox.pipeline.engines.qwen2_5_omni import Qwen25OmniOptions
    from omnivox.pipeline.engines.qwen3_omni import Qwen3OmniOptions
    from omnivox.pipeline.engines.qwen_common import options_from_mapping

    path = resources.files("omnivox").joinpath("configs", name)
    config = load_config(str(path), environ={})
    for engine, options_class in (("qwen2.5-omni", Qwen25OmniOptions), ("qwen3-omni", Qwen3OmniOptions)):
        options_from_mapping(options_class, config.engine.options.get(engine) or {}, engine=engine)
