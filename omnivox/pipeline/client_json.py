"""JSON from clients, parsed so that a hostile document is refused with one `ValueError` instead of surprising the code
behind the parser.

Python's `json` accepts `NaN` and `Infinity`, turns `1e999` into infinity, builds integers of up to 4300 digits, and
nests as deep as the recursion limit allows, raising `RecursionError` (not a `ValueError`) past it; a document nested
just under that limit parses, then breaks the first recursive code that walks it (a deep copy, a render). Here numbers
must be finite and integers fit in 64 bits, and nesting is bounded by `max_depth`.
"""

from __future__ import annotations

import json
import math
from typing import Any

_MAX_INTEGER = 2**64
_MAX_INTEGER_CHARS = len(str(_MAX_INTEGER)) + 1


class JsonRefused(ValueError):
    """Not acceptable JSON; the message says why (it quotes only the position, never the document)."""


def _integer(text: str) -> int:
    if len(text) > _MAX_INTEGER_CHARS or abs(value := int(text)) >= _MAX_INTEGER:
        raise JsonRefused("an integer is out of the 64-bit range")
    return value


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise JsonRefused("a number is too large")
    return value


def _constant(name: str) -> Any:
    raise JsonRefused(f"{name} is not a JSON number")


def load_client_json(raw: str | bytes, max_depth: int) -> Any:
    """Parse a client's JSON document; raises `JsonRefused` for anything malformed or out of bounds."""
    try:
        data = json.loads(raw, parse_int=_integer, parse_float=_finite, parse_constant=_constant)
    except JsonRefused:
        raise
    except RecursionError:
        raise JsonRefused(f"nested deeper than {max_depth} levels") from None
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise JsonRefused(f"invalid JSON: {exc}") from None
    if _may_nest_deeper(raw, max_depth) and _depth_exceeds(data, max_depth):
        raise JsonRefused(f"nested deeper than {max_depth} levels")
    return data


def _may_nest_deeper(raw: str | bytes, max_depth: int) -> bool:
    """A cheap bound: a document with fewer brackets than `max_depth` (in strings or not) cannot nest deeper."""
    if isinstance(raw, str):
        return raw.count("[") + raw.count("{") > max_depth
    return raw.count(b"[") + raw.count(b"{") > max_depth


def _depth_exceeds(data: Any, max_depth: int) -> bool:
    """Walks containers only, without recursion (its cost is bounded by the parse that built them)."""
    stack = [(data, 1)] if isinstance(data, dict | list) else []
    while stack:
        node, depth = stack.pop()
        if depth > max_depth:
            return True
        children = node.values() if isinstance(node, dict) else node
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False
