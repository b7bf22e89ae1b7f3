"""Which headers cross the gateway, in each direction, and why.

Both directions are allow-lists: a header not named here does not cross.

Client → SME gateway. The SME gateway authorises *only* on the bridge token we
mint, so nothing the client sends can claim an identity upstream: the client's
``Authorization`` and ``Cookie`` never leave, nor do look-alikes such as
``X-User-Role``, ``X-Forwarded-User`` or ``X-HTTP-Method-Override``.

Trust in forwarded headers: the gateway runs behind the console's ingress,
which sets ``X-Forwarded-Proto``/``-Host``; we pass those on when present (or
state our own view) and append the peer address to ``X-Forwarded-For`` the way
nginx's ``$proxy_add_x_forwarded_for`` does. They are informational for the
SME gateway's logs; no decision here or upstream may rest on them, because a
client can send any value it likes.
"""

from __future__ import annotations

import os
import re
from typing import Any

from multidict import CIMultiDict

# RFC 9110 §7.6.1 connection-specific fields (plus the de-facto Keep-Alive family).
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)

# Client headers copied upstream verbatim, when present.
FORWARDED_REQUEST_HEADERS = ("Content-Type", "traceparent", "tracestate", "Idempotency-Key")

# Upstream answer headers copied to the client, when present (Content-Length is framing).
FORWARDED_RESPONSE_HEADERS = (
    "Content-Type",
    "Content-Encoding",
    "Cache-Control",
    "Location",
    "Retry-After",
    "ETag",
)

REQUEST_ID = "X-Request-ID"
_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._~:@+=/-]{1,128}")


def request_id(headers: Any) -> str:
    """The client's X-Request-ID when it is one sane token of ≤128 characters, else a new one."""
    values = headers.getall(REQUEST_ID, ())
    if len(values) == 1 and _SANE_REQUEST_ID.fullmatch(values[0]):
        return str(values[0])
    return os.urandom(16).hex()  # 32 hex digits, as uuid4().hex, at a fifth of the cost


def upstream_request_headers(
    headers: Any,
    *,
    bridge_token: str,
    request_id: str,
    peer: str | None,
    scheme: str,
    host: str | None,
) -> CIMultiDict[str]:
    """The exact header set sent to the SME gateway (framing headers are added by the caller)."""
    out: CIMultiDict[str] = CIMultiDict()
    out["Authorization"] = "Bearer " + bridge_token
    out["Accept"] = "application/json"
    out[REQUEST_ID] = request_id
    for name in FORWARDED_REQUEST_HEADERS:
        value = headers.get(name)
        if value is not None:
            out[name] = value
    prior = ", ".join(headers.getall("X-Forwarded-For", ()))
    if peer:
        out["X-Forwarded-For"] = f"{prior}, {peer}" if prior else peer
    elif prior:
        out["X-Forwarded-For"] = prior
    out["X-Forwarded-Proto"] = headers.get("X-Forwarded-Proto") or scheme
    forwarded_host = headers.get("X-Forwarded-Host") or host
    if forwarded_host:
        out["X-Forwarded-Host"] = forwarded_host
    return out


def client_response_headers(upstream: Any, request_id: str) -> CIMultiDict[str]:
    """The answer's headers: the allow-list, a default Content-Type, and X-Request-ID."""
    out: CIMultiDict[str] = CIMultiDict()
    for name in FORWARDED_RESPONSE_HEADERS:
        for value in upstream.getall(name, ()):
            out.add(name, value)
    if "Content-Type" not in out:
        out["Content-Type"] = "application/json"
    out[REQUEST_ID] = request_id
    return out
