"""Which part of a long conversation the model sees: the session's `truncation` setting.

When the conversation after the instructions outgrows the token limit (the client's
`token_limits.post_instructions`, else the engine's context less the answer's tokens), the oldest turns are
dropped until `retention_ratio` of the limit is used (`"auto"` keeps as much as fits, `"disabled"` never drops).
Dropping more than needed lets the following turns continue the same prompt (and the engine's stored prefix)
until the next cut. The window always starts at a user message, so a function call and its output are dropped
together, and the newest user turn is always kept. Items stay in the conversation; only the model stops seeing them.

Token counts are estimates made without the engine's tokenizer: text at `CHARS_PER_TOKEN`, audio at the engine's
audio tokens per second, images at `IMAGE_TOKENS`, plus `MESSAGE_OVERHEAD_TOKENS` for each item's turn markers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from omnivox.pipeline.conversation import Item
from omnivox.pipeline.engines.base import INPUT_RATE

CHARS_PER_TOKEN = 3.0
"""Conservative for English with byte-level BPE (about 4 characters a token); other scripts take more tokens."""
IMAGE_TOKENS = 1280
"""The most one image costs in the Qwen-Omni engines (their `max_pixels`)."""
MESSAGE_OVERHEAD_TOKENS = 5


class TruncationError(ValueError):
    """The `truncation` setting is malformed; `param` names the field."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class TruncationPolicy:
    enabled: bool = True
    retention_ratio: float = 1.0
    post_instructions_tokens: int | None = None

    @classmethod
    def parse(cls, data: Any, param: str = "truncation") -> TruncationPolicy:
        """`"auto"` | `"disabled"` | `{"type": "retention_ratio", "retention_ratio", "token_limits"?}`; None is
        `"auto"`."""
        if data is None or data == "auto":
            return cls()
        if data == "disabled":
            return cls(enabled=False)
        if not isinstance(data, dict) or data.get("type") != "retention_ratio":
            raise TruncationError(f"{param} must be auto, disabled or {{type: retention_ratio, ...}}", param)
        ratio = data.get("retention_ratio")
        if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not 0 <= ratio <= 1:
            raise TruncationError(f"{param}.retention_ratio must be a number in [0, 1]", f"{param}.retention_ratio")
        limits = data.get("token_limits")
        limit = None
        if limits is not None:
            limit = limits.get("post_instructions") if isinstance(limits, dict) else limits
            if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
                raise TruncationError(
                    f"{param}.token_limits.post_instructions must be a positive integer",
                    f"{param}.token_limits.post_instructions",
                )
        return cls(True, float(ratio), limit)


def estimated_tokens(item: Item, audio_tokens_per_second: float) -> int:
    """What `item` costs in the model's prompt, estimated (see the module docstring)."""
    chars = len(item.text) + len(item.arguments) + len(item.output) + len(item.name) + len(item.transcript or "")
    audio = item.audio.size / INPUT_RATE * audio_tokens_per_second if item.audio is not None else 0.0
    return MESSAGE_OVERHEAD_TOKENS + math.ceil(chars / CHARS_PER_TOKEN + audio) + IMAGE_TOKENS * len(item.images)


def window_start(
    items: list[Item],
    start: int,
    policy: TruncationPolicy,
    *,
    context_tokens: int | None,
    answer_tokens: int,
    audio_tokens_per_second: float,
) -> int:
    """The index of the first item the model sees, given it saw from `start` on until now (never moves back)."""
    if not policy.enabled:
        return start
    limit = policy.post_instructions_tokens
    if context_tokens is not None:
        fits = context_tokens - answer_tokens
        limit = fits if limit is None else min(limit, fits)
    if limit is None:
        return start
    costs = [estimated_tokens(item, audio_tokens_per_second) for item in items]
    total = sum(costs[start:])
    if total <= limit:
        return start
    keep = limit * policy.retention_ratio
    turns = [i for i in range(start + 1, len(items)) if items[i].type == "message" and items[i].role == "user"]
    for boundary in turns:
        total -= sum(costs[start:boundary])
        start = boundary
        if total <= keep:
            break
    return start
