"""Tiny random Qwen-Omni checkpoints, built once per test session (builders live in the tiny_* modules)."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny_models import build_tiny_qwen2_5


@pytest.fixture(scope="session")
def tiny_qwen2_5_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Qwen2.5-Omni checkpoint directory (weights, config, spk_dict.pt, tokenizer)."""
    return build_tiny_qwen2_5(tmp_path_factory.mktemp("tiny-qwen2.5-omni"))
