"""Operations endpoints: liveness, readiness, metrics."""

from __future__ import annotations

import os

from aiohttp import web

from .bridge import BridgeSecret
from .jwks import KeySet
from .metrics import CONTENT_TYPE, Metrics


class Ops:
    def __init__(self, keys: KeySet, secret: BridgeSecret, metrics: Metrics) -> None:
        self._keys = keys
        self._secret = secret
        self._metrics = metrics
        self.draining = False

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        reasons = []
        if self.draining:
            reasons.append("shutting down")
        if not self._keys.usable:
            reasons.append("no operator verification key is usable yet (JWKS not fetched)")
        bridge = "set" if self._secret.get() is not None else "unset"
        body = {
            "status": "not-ready" if reasons else "ready",
            "reasons": reasons,
            "operator_keys": self._keys.describe(),
            "bridge_secret": bridge,
            "pid": os.getpid(),  # which worker answered (serve --workers N)
        }
        return web.json_response(body, status=503 if reasons else 200)

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=self._metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/healthz", self.healthz, allow_head=False)
        app.router.add_get("/readyz", self.readyz, allow_head=False)
        app.router.add_get("/metrics", self.metrics, allow_head=False)
