"""Operations endpoints: liveness, readiness, metrics."""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable

from aiohttp import web

from .bridge import BridgeSecret
from .idempotency import Idempotency
from .jwks import KeySet
from .metrics import CONTENT_TYPE, Metrics
from .routes import HEALTHZ, METRICS, OPENAPI_JSON, READYZ
from .store import Store
from .upstream import Breaker


class Ops:
    def __init__(
        self,
        keys: KeySet,
        secret: BridgeSecret,
        metrics: Metrics,
        breaker: Breaker,
        store: Store | None = None,
        idempotency: Idempotency | None = None,
    ) -> None:
        self._keys = keys
        self._secret = secret
        self._metrics = metrics
        self._breaker = breaker
        self._store = store
        self._idempotency = idempotency
        self.openapi = b"{}"  # the document, rendered once (set by create_app)
        self.draining = False

    async def healthz(self, request: web.BaseRequest) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(self, request: web.BaseRequest) -> web.Response:
        reasons = []
        if self.draining:
            reasons.append("shutting down")
        if not self._keys.usable:
            reasons.append(
                "no operator verification key is usable (the JWKS not fetched, or holding none)"
            )
        bridge = "set" if self._secret.get() is not None else "unset"
        body = {
            "status": "not-ready" if reasons else "ready",
            "reasons": reasons,
            "operator_keys": self._keys.describe(),
            "bridge_secret": bridge,
            # informational: an open breaker does not make the gateway unready
            "breaker": {
                "state": self._breaker.refresh(),
                "failures_in_a_row": self._breaker.failures,
                "retry_after_seconds": round(self._breaker.seconds_left(), 3),
            },
            # informational too: the shared store (Redis/Valkey), if any, never the password
            "store": self._store.report() if self._store is not None else None,
            "idempotency": self._idempotency.report() if self._idempotency else None,
            "pid": os.getpid(),  # which worker answered (serve --workers N)
        }
        return web.json_response(body, status=503 if reasons else 200)

    async def metrics(self, request: web.BaseRequest) -> web.Response:
        self._breaker.refresh()  # its gauge says the state now, traffic or not
        return web.Response(body=self._metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    async def openapi_json(self, request: web.BaseRequest) -> web.Response:
        return web.Response(body=self.openapi, content_type="application/json")

    def routes(self) -> dict[str, Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]]:
        """Path → handler (GET only; the dispatcher answers 405 for other methods)."""
        return {HEALTHZ: self.healthz, READYZ: self.readyz, METRICS: self.metrics,
                OPENAPI_JSON: self.openapi_json}  # fmt: skip
