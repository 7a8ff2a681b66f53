"""Engines by name, imported lazily so that a server running the scripted engine never imports torch."""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING, Any

from omnivox.pipeline.engines.base import Engine

if TYPE_CHECKING:
    from omnivox.pipeline.tts import TtsStage

log = logging.getLogger(__name__)

ENGINES = {
    "scripted": ("omnivox.pipeline.engines.scripted", "ScriptedEngine"),
    "qwen2.5-omni": ("omnivox.pipeline.engines.qwen2_5_omni", "Qwen25OmniEngine"),
    "qwen3-omni": ("omnivox.pipeline.engines.qwen3_omni", "Qwen3OmniEngine"),
    "cascade": ("omnivox.pipeline.engines.cascade", "CascadeEngine"),
    "remote": ("omnivox.pipeline.engines.remote", "RemoteEngine"),
}
DEFAULT_MODELS = {
    "scripted": "scripted",
    "qwen2.5-omni": "Qwen/Qwen2.5-Omni-7B",
    "qwen3-omni": "Qwen/Qwen3-Omni-30B-A3B-Instruct",
}
SPEAKING_ENGINES = {"cascade"}
"""Engines that speak through the TTS stage (the scripted engine too, when its options say `tts: true`)."""


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
    log.warning("engine 'auto': no CUDA GPU found, serving the scripted no-GPU demo engine instead of Qwen-Omni")
    return "scripted"


def create_engine(
    name: str,
    model: str | None = None,
    options: dict[str, dict[str, Any] | None] | None = None,
    *,
    fallback: dict[str, Any] | None = None,
    tts: TtsStage | None = None,
) -> Engine:
    """Build (not load) the engine `name` with its own section of `options`; `start()` loads it. When `auto` falls
    back to the scripted engine, `fallback` is merged over its options (the no-GPU demo). Engines that speak through
    the TTS stage get `tts`."""
    resolved = resolve_engine_name(name)
    module_name, class_name = ENGINES[resolved]
    engine_class = getattr(importlib.import_module(module_name), class_name)
    if not model and resolved not in DEFAULT_MODELS:
        raise ValueError(f"engine {resolved} needs engine.model")
    section = dict((options or {}).get(resolved) or {})
    if name == "auto" and resolved == "scripted":
        section.update(fallback or {})
    if resolved in SPEAKING_ENGINES or section.pop("tts", False) is True:
        if tts is None:
            raise ValueError(f"engine {resolved}: it speaks through the TTS stage, but none was given")
        section["tts"] = tts
    return engine_class(model or DEFAULT_MODELS[resolved], **section)
