"""Helpers shared by the operator-session suites (test_auth, test_attacks_tokens, test_jwks).

- ``ROUTES``: every proxied (method, client path) of the contract's route table.
- ``present(source, token)``: the request headers that carry ``token`` as a
  ``Bearer`` header or as the raw ``catalyst_session`` cookie.
- ``call(gw, method, path, headers)``: one request on a proxied route.
- ``claims(**overrides)``: a Keycloak-shaped claim set valid at ``now``.
- ``Clock``: a settable clock for the ``clock=`` / ``monotonic=`` seams.
- ``metric()``: one sample of the gateway's Prometheus text.
- ``WatchedJWKS``: the JWKS server, plus a way to wait for its n-th fetch.
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from .support import JWKSServer

ROUTES: tuple[tuple[str, str], ...] = (
    ("POST", "/api/v1/billing/purchase"),
    ("POST", "/api/v1/sme/billing/purchase"),
    ("GET", "/api/v1/sme/billing/vouchers/list"),
    ("POST", "/api/v1/sme/billing/vouchers/issue"),
    ("POST", "/api/v1/sme/billing/vouchers/revoke/VCH-NONE"),
    ("DELETE", "/api/v1/sme/billing/vouchers/revoke/VCH-NONE"),
)
SOURCES = ("header", "cookie")
PURCHASE = "/api/v1/billing/purchase"
ORDER = b'{"sku": "starter"}'


def present(source: str, token: str) -> dict[str, str]:
    """Headers carrying ``token`` through ``source`` (``header`` or ``cookie``)."""
    if source == "header":
        return {"Authorization": f"Bearer {token}"}
    assert source == "cookie"
    return {"Cookie": f"catalyst_session={token}"}


async def call(gw: Any, method: str, path: str, headers: dict[str, str]) -> Any:
    """One request on a proxied route (a JSON order for POST) → (status, headers, body)."""
    if method == "POST":
        headers = {**headers, "Content-Type": "application/json"}
        return await gw.request(method, path, headers=headers, data=ORDER)
    return await gw.request(method, path, headers=headers)


def expected_status(method: str, path: str, role: str) -> int:
    """What the SME stand-in answers ``role`` on a route (revoke names an unknown voucher)."""
    admin = role in ("superadmin", "sovereign-admin")
    if path.endswith("/issue"):
        return 201 if admin else 403
    if "/revoke/" in path:
        return 404 if admin else 403
    return 200


def claims(now: float | None = None, **overrides: Any) -> dict[str, Any]:
    """A valid operator claim set at ``now`` (default: the wall clock); None drops a claim."""
    issued = int(time.time() if now is None else now)
    base: dict[str, Any] = {
        "sub": "op-1",
        "email": "op1@example.test",
        "email_verified": True,
        "iat": issued,
        "exp": issued + 600,
        "realm_access": {"roles": ["catalyst-owner"]},
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


class Clock:
    """A clock a test moves by hand: ``clock()`` reads it, ``clock.now = ...`` sets it."""

    def __init__(self, now: float | None = None) -> None:
        self.now = time.time() if now is None else now

    def __call__(self) -> float:
        return self.now


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text (0.0 when absent)."""
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        match = re.match(r"^([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)$", line)
        if match is None or match.group(1) != name:
            continue
        found = ",".join(sorted((match.group(2) or "").split(","))) if match.group(2) else ""
        if found == wanted:
            return float(match.group(3))
    return 0.0


@dataclass
class WatchedJWKS(JWKSServer):
    """A ``JWKSServer`` a test can wait on: ``await server.wait_fetches(n)``."""

    _arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        # super()._handle counts the fetch before its first await, so a waiter
        # woken by this event always sees the new count.
        arrived, self._arrived = self._arrived, asyncio.Event()
        handling = super()._handle(request)
        arrived.set()
        return await handling

    async def wait_fetches(self, count: int) -> None:
        while self.fetches < count:
            await self._arrived.wait()
