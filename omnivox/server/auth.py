"""API keys: `Authorization: Bearer <key>`, Azure-style `api-key`, or the browser subprotocol
`openai-insecure-api-key.<key>` for WebSockets. No keys configured means no auth."""

from __future__ import annotations

import hmac
from collections.abc import Iterable, Mapping

BROWSER_KEY_PREFIX = "openai-insecure-api-key."


def offered_key(headers: Mapping[str, str], subprotocols: Iterable[str] = ()) -> str | None:
    """The key a client presented, by any of the accepted means."""
    authorization = headers.get("authorization", "")
    if authorization.lower().startswith("bearer "):
        return authorization[7:].strip()
    if headers.get("api-key"):
        return headers["api-key"].strip()
    for protocol in subprotocols:
        if protocol.startswith(BROWSER_KEY_PREFIX):
            return protocol[len(BROWSER_KEY_PREFIX) :]
    return None


def is_authorized(keys: list[str], headers: Mapping[str, str], subprotocols: Iterable[str] = ()) -> bool:
    if not keys:
        return True
    key = offered_key(headers, subprotocols)
    return key is not None and any(hmac.compare_digest(key.encode(), k.encode()) for k in keys)
