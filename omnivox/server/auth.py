"""Who may use the server. API keys: `Authorization: Bearer <key>`, Azure-style `api-key`, or the browser subprotocol
`openai-insecure-api-key.<key>` for WebSockets; no keys configured means no auth, and an empty key never matches.
Browser origins: a request that carries an `Origin` (only browsers send one) must come from the server's own page or
an origin in `server.allowed_origins`, so that another site's page cannot drive the server from a visitor's browser;
clients that are not browsers send no `Origin` and are not concerned."""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Iterable, Mapping
from urllib.parse import urlsplit

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


def matching_key(keys: list[str], headers: Mapping[str, str], subprotocols: Iterable[str] = ()) -> str | None:
    """The configured key the client presented, or None (an empty or unknown key matches nothing)."""
    key = offered_key(headers, subprotocols)
    if not key:
        return None
    matches = [k for k in keys if hmac.compare_digest(key.encode(), k.encode())]
    return matches[0] if matches else None


def is_authorized(keys: list[str], headers: Mapping[str, str], subprotocols: Iterable[str] = ()) -> bool:
    return not keys or matching_key(keys, headers, subprotocols) is not None


def origin_allowed(headers: Mapping[str, str], allowed: Iterable[str], public_host: str | None = None) -> bool:
    """No `Origin` (not a browser), the server's own origin (same host as the request, or `public_host`), or one of
    `allowed` (`*` allows every origin)."""
    origin = headers.get("origin")
    if origin is None:
        return True
    origin = origin.strip().rstrip("/").lower()
    listed = {entry.strip().rstrip("/").lower() for entry in allowed}
    if "*" in listed or origin in listed:
        return True
    host = urlsplit(origin).netloc
    own = {value.strip().lower() for value in (headers.get("host"), public_host) if value}
    return bool(host) and host in own


def is_loopback(host: str) -> bool:
    """Whether binding `host` keeps the server to this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
