"""A local stand-in of the SME gateway and billing service.

It does what the real Go gateway does to a request from catalyst-proxy:
verifies the ``Authorization: Bearer`` token as HS256/384/512 with the shared
secret (``exp`` required and checked; any other algorithm refused), strips the
``/api`` prefix, and answers the billing routes with realistic bodies:

=======  ==============================  ===================================
POST     /billing/checkout, /purchase    200 order, 400 bad body
GET      /billing/vouchers/list          200 the org's vouchers
POST     /billing/vouchers/issue         201 voucher; 403 for ``member``
DELETE   /billing/vouchers/revoke/{c}    200 revoked; 403 member; 404 unknown
=======  ==============================  ===================================

Every request is recorded in ``SME.received`` (method, raw target, headers,
body, verified claims, whether the body arrived complete), which is how tests
see what went upstream. ``python -m catalyst_proxy.devtools.sme`` runs it alone.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

import jwt
from aiohttp import web
from multidict import CIMultiDict

Handler = Callable[["Received", dict[str, Any]], Awaitable[web.Response]]


@dataclass(slots=True)
class Received:
    method: str
    target: str  # raw request target: path and query, as sent
    headers: CIMultiDict[str]
    body: bytes = b""
    complete: bool = False  # the whole declared/chunked body arrived
    claims: dict[str, Any] | None = None

    @property
    def path(self) -> str:
        return self.target.partition("?")[0]

    @property
    def query(self) -> str:
        return self.target.partition("?")[2]

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.body).hexdigest()


@dataclass(slots=True)
class Voucher:
    code: str
    amount_cents: int
    issued_by: str
    revoked: bool = False


@dataclass
class SME:
    """The stand-in's state; ``app()`` builds the aiohttp application around it."""

    secret: bytes
    received: list[Received] = field(default_factory=list)
    vouchers: dict[str, Voucher] = field(default_factory=dict)
    credit_cents: int = 50_000

    def app(self) -> web.Application:
        app = web.Application(client_max_size=16 * 1024 * 1024)
        app.router.add_route("*", r"/{tail:[\s\S]*}", self._dispatch)
        return app

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        seen = Received(request.method, request.raw_path, CIMultiDict(request.headers))
        self.received.append(seen)
        try:
            seen.body = await request.read()
            seen.complete = True
        except (ConnectionError, asyncio.IncompleteReadError, web.HTTPException):
            return web.Response(status=400)
        claims = self._verify(request.headers.get("Authorization", ""))
        if claims is None:
            return _error(401, "unauthorized")
        seen.claims = claims
        path = seen.path
        if not path.startswith("/api/"):
            return _error(404, "not-found")
        handler, code = self._route(request.method, path[len("/api") :])
        if handler is None:
            return _error(404, "not-found")
        return await handler(seen, {"code": code, **claims})

    def _verify(self, authorization: str) -> dict[str, Any] | None:
        scheme, _, token = authorization.partition(" ")
        if scheme != "Bearer" or not token:
            return None
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                self.secret,
                algorithms=["HS256", "HS384", "HS512"],
                options={"require": ["exp", "sub"]},
            )
        except jwt.PyJWTError:
            return None
        return claims

    def _route(self, method: str, path: str) -> tuple[Handler | None, str | None]:
        if method == "POST" and path in ("/billing/checkout", "/billing/purchase"):
            return self._checkout, None
        if method == "GET" and path == "/billing/vouchers/list":
            return self._list, None
        if method == "POST" and path == "/billing/vouchers/issue":
            return self._issue, None
        prefix = "/billing/vouchers/revoke/"
        if method == "DELETE" and path.startswith(prefix) and "/" not in path[len(prefix) :]:
            return self._revoke, unquote(path[len(prefix) :])
        return None, None

    async def _checkout(self, seen: Received, ctx: dict[str, Any]) -> web.Response:
        order = _json_body(seen)
        if not isinstance(order, dict) or not isinstance(order.get("sku", "plan"), str):
            return _error(400, "invalid-body")
        quantity = order.get("quantity", 1)
        if not isinstance(quantity, int) or isinstance(quantity, bool) or quantity < 1:
            return _error(400, "invalid-quantity")
        total = 1_900 * quantity
        paid_by_credit = bool(order.get("use_credit")) and total <= self.credit_cents
        if paid_by_credit:
            self.credit_cents -= total
        ref = secrets.token_hex(9)
        return web.json_response(
            {
                "order_id": f"ord_{ref}",
                "paid_by_credit": paid_by_credit,
                "session_url": None if paid_by_credit else f"https://pay.example.test/s/{ref}",
            }
        )

    async def _list(self, seen: Received, ctx: dict[str, Any]) -> web.Response:
        vouchers = [
            {"code": v.code, "amount_cents": v.amount_cents, "revoked": v.revoked}
            for v in self.vouchers.values()
        ]
        return web.json_response({"vouchers": vouchers})

    async def _issue(self, seen: Received, ctx: dict[str, Any]) -> web.Response:
        if ctx.get("role") not in ("superadmin", "sovereign-admin"):
            return _error(403, "forbidden")
        spec = _json_body(seen) or {}
        amount = spec.get("amount_cents", 1_000) if isinstance(spec, dict) else None
        if not isinstance(amount, int) or isinstance(amount, bool) or amount <= 0:
            return _error(400, "invalid-amount")
        code = spec.get("code") or f"VCH-{secrets.token_hex(4).upper()}"
        if not isinstance(code, str) or code in self.vouchers:
            return _error(409, "voucher-exists")
        self.vouchers[code] = Voucher(code, amount, str(ctx["sub"]))
        return web.json_response({"code": code, "amount_cents": amount}, status=201)

    async def _revoke(self, seen: Received, ctx: dict[str, Any]) -> web.Response:
        if ctx.get("role") not in ("superadmin", "sovereign-admin"):
            return _error(403, "forbidden")
        voucher = self.vouchers.get(ctx["code"] or "")
        if voucher is None:
            return _error(404, "voucher-not-found")
        voucher.revoked = True
        return web.json_response({"code": voucher.code, "revoked": True})


def _json_body(seen: Received) -> Any:
    if not seen.body:
        return {}
    try:
        return json.loads(seen.body)
    except ValueError:
        return None


def _error(status: int, code: str) -> web.Response:
    return web.json_response({"error": code}, status=status)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8081)
    parser.add_argument("--secret-file", required=True, help="file holding the HS256 secret")
    args = parser.parse_args(argv)
    with open(args.secret_file, "rb") as file:
        secret = file.read().strip()
    web.run_app(SME(secret).app(), host=args.host, port=args.port, print=None)


if __name__ == "__main__":
    main()
