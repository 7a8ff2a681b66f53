"""Engines by name, imported lazily so that a server running the scripted engine never imports torch."""

from __future__ import annotations

import importlib
import logging
from typing import Any

from omnivox.pipeline.engines.base import Engine

log = logging.getLogger(__name__)

ENGINES = {
    "scripted": ("omnivox.pipeline.engines.scripted", "ScriptedEngine"),
    "qwen2.5-omni": ("omnivox.pipeline.engines.qwen2_5_omni", "Qwen25OmniEngine"),
    "qwen3-omni": ("omnivox.pipeline.engines.qwen3_omni", "Qwen3OmniEngine"),
    "remote": ("omnivox.pipeline.engines.remote", "RemoteEngine"),
}
DEFAULT_MODELS = {
    "scripted": "scripted",
    "qwen2.5-omni": "Qwen/Qwen2.5-Omni-7B",
    "qwen3-omni": "Qwen/Qwen3-Omni-30B-A3B-Instruct",
}


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def resolve_engine_name(name: str) -> str:
    """`auto` is Qwen2.5-Omni where a CUDA GPU exists, else the scripted no-GPU demo (said loudly)."""
    if name != "auto":
        if name not in ENGINES:
            raise ValueError(f"engine.name must be one of {['auto', *ENGINES]}, got {name!r}")
        return name
    if cuda_available():
        return "qwen2.5-omni"
    log.warning("engine 'auto': no CUDA GPU found, serving the scripted espeak-ng demo engine instead of Qwen-Omni")
    return "scripted"


def create_engine(name: str, model: str | None = None, options: dict[str, dict[str, Any]] | None = None) -> Engine:
    """Build (not load) the engine `name` with its own section of `options`; `start()` loads it."""
    resolved = resolve_engine_name(name)
    module_name, class_name = ENGINES[resolved]
    engine_class = getattr(importlib.import_module(module_name), class_name)
    if not model and resolved not in DEFAULT_MODELS:
        raise ValueError(f"engine {resolved} needs engine.model")
    return engine_class(model or DEFAULT_MODELS[resolved], **((options or {}).get(resolved) or {}))
