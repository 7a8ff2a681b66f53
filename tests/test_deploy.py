"""The deployment files in deploy/ agree with omnivox and with each other. No Docker engine or cluster runs here, so
this checks what can be checked without one: every configuration the containers get loads through omnivox's own
validation, the fronts list the engine pods and ports that exist, probes and GPU requests are where they belong, and
the commands parse with the `omnivox` CLI."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from omnivox.server.cli import build_parser
from omnivox.server.config import Config, load_config

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"


def manifests(name: str) -> dict[str, dict[str, Any]]:
    """The Kubernetes objects of one file, by kind."""
    return {document["kind"]: document for document in yaml.safe_load_all((DEPLOY / "k8s" / name).read_text())}


def dockerfile_command(name: str) -> list[str]:
    (line,) = [line for line in (DEPLOY / name).read_text().splitlines() if line.startswith("CMD ")]
    return json.loads(line[len("CMD ") :])


def container(workload: dict[str, Any]) -> dict[str, Any]:
    (only,) = workload["spec"]["template"]["spec"]["containers"]
    return only


def image_config(dockerfile: str) -> tuple[argparse.Namespace, Config]:
    """The image command's arguments, and the configuration it serves with (a file copied from deploy/ into the
    image, or one of the package's)."""
    command = dockerfile_command(dockerfile)
    assert command[0] == "omnivox"
    args = build_parser().parse_args(command[1:])
    copied = re.search(r"COPY deploy/(\S+) (\S+)", (DEPLOY / dockerfile).read_text())
    path = DEPLOY / copied.group(1) if copied and args.config == copied.group(2) else ROOT / args.config
    return args, load_config(path, environ={})


@pytest.mark.parametrize("dockerfile", ["Dockerfile.front", "Dockerfile.engine"])
def test_the_images_commands_parse_and_their_configs_load(dockerfile: str) -> None:
    args, loaded = image_config(dockerfile)
    if dockerfile == "Dockerfile.front":
        assert loaded.engine.name == "remote" and args.workers == 2
    else:
        assert loaded.engine.name == "qwen2.5-omni" and args.port == 8000


def apt_packages(dockerfile: str) -> set[str]:
    """The packages the image's `apt-get install` lines name."""
    text = (DEPLOY / dockerfile).read_text().replace("\\\n", " ")
    found: set[str] = set()
    for command in re.findall(r"apt-get install ([^&\n]+)", text):
        found.update(word for word in command.split() if not word.startswith("-"))
    return found


@pytest.mark.parametrize("dockerfile", ["Dockerfile.front", "Dockerfile.engine"])
def test_every_image_has_the_espeak_ng_its_speech_needs(dockerfile: str) -> None:
    """Every omnivox serves POST /v1/audio/speech through its TTS stage: Piper (the default) takes its phonemes from
    libespeak-ng, and the espeak backend speaks with espeak-ng."""
    _, config = image_config(dockerfile)
    assert config.tts.backend in ("piper", "espeak")
    assert "espeak-ng" in apt_packages(dockerfile)


def test_compose_runs_a_front_in_front_of_a_gpu_engine_host() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    engine, front = compose["services"]["engine"], compose["services"]["front"]
    (device,) = engine["deploy"]["resources"]["reservations"]["devices"]
    assert device["capabilities"] == ["gpu"]
    assert "/healthz" in " ".join(engine["healthcheck"]["test"])
    config = load_config(DEPLOY / "front.yaml", environ=front["environment"])
    assert config.engine.host_urls() == ["http://engine:8000"]
    assert front["depends_on"]["engine"]["condition"] == "service_healthy"


def test_kubernetes_fronts_list_every_engine_pod_and_probe_readiness_only_on_healthz(tmp_path: Path) -> None:
    engine, front = manifests("engine.yaml"), manifests("front.yaml")
    sts, headless = engine["StatefulSet"], engine["Service"]
    assert headless["spec"]["clusterIP"] == "None" and sts["spec"]["serviceName"] == headless["metadata"]["name"]
    port = headless["spec"]["ports"][0]["port"]
    pods = [f"http://{sts['metadata']['name']}-{i}.{headless['metadata']['name']}:{port}" for i in range(2)]
    assert sts["spec"]["replicas"] == len(pods)

    config_file = tmp_path / "front.yaml"
    config_file.write_text(front["ConfigMap"]["data"]["front.yaml"])
    config = load_config(config_file, environ={})
    assert config.engine.name == "remote" and config.engine.host_urls() == pods

    gpu = container(sts)
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert gpu["readinessProbe"]["httpGet"]["path"] == "/healthz"
    cpu = container(front["Deployment"])
    assert cpu["readinessProbe"]["httpGet"]["path"] == "/healthz"
    assert "httpGet" not in cpu["livenessProbe"]  # a down engine host must not restart the fronts
    args = build_parser().parse_args(cpu["args"][1:])
    mount = cpu["volumeMounts"][0]["mountPath"]
    assert args.config == f"{mount}/front.yaml" and args.workers == 2
    assert front["Service"]["spec"]["selector"] == front["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert headless["spec"]["selector"] == sts["spec"]["template"]["metadata"]["labels"]
