"""The configuration of the remote engine, and `--workers` refused for engines that live in the server process."""

from __future__ import annotations

import subprocess
import sys
from importlib import resources

import pytest

from omnivox.pipeline.engines import create_engine
from omnivox.pipeline.engines.remote import RemoteEngine
from omnivox.server.config import ConfigError, load_config


def test_the_example_remote_config_builds_the_remote_engine() -> None:
    config = load_config(str(resources.files("omnivox").joinpath("configs", "remote.yaml")), environ={})
    engine = create_engine(config.engine.name, config.engine.model, config.engine.engine_options())
    assert isinstance(engine, RemoteEngine)
    assert engine.model_id == "Qwen/Qwen2.5-Omni-7B" and engine.dialect == "omnivox"
    assert engine._urls == ["http://gpu-1:8000", "http://gpu-2:8000"]


@pytest.mark.parametrize(
    ("engine", "message"),
    [
        ({"name": "remote", "model": "m"}, "needs engine.url or engine.urls"),
        ({"name": "remote", "url": "http://gpu:8000"}, "needs engine.model"),
        ({"name": "remote", "model": "m", "urls": ["gpu:8000"]}, "engine.urls: .*http://"),
    ],
)
def test_a_remote_engine_without_hosts_or_model_is_refused_at_start_up(engine: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(overrides={"engine": engine}, environ={})


def test_url_and_urls_are_one_list_of_hosts() -> None:
    config = load_config(
        overrides={
            "engine": {"name": "remote", "model": "m", "url": "http://a:1", "urls": ["http://b:1", "http://a:1"]}
        },
        environ={},
    )
    assert config.engine.engine_options()["remote"]["urls"] == ["http://a:1", "http://b:1"]


def test_several_workers_are_refused_for_an_in_process_engine() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "omnivox.server.cli", "serve", "--engine", "scripted", "--workers", "2"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "--workers 2 needs engine.name remote" in result.stderr
