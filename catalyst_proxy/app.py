"""``create_app()``: the aiohttp application, with every collaborator it owns.

The app owns the upstream ``ClientSession`` and the key set: both are created
when the app starts and closed when it stops (``cleanup_ctx``), never module
globals. Tests pass their own ``clock`` or ``session`` instead of patching.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import aiohttp
from aiohttp import web

from .auth import Authenticator
from .bridge import BridgeSecret
from .config import ConfigError, Settings
from .jwks import Key, KeySet, load_local_keys
from .metrics import Metrics
from .middleware import make_middleware
from .ops import Ops
from .proxy import Proxy, new_upstream_session
from .routes import DEFAULT_ROUTES, Route, RoutesFileError, RouteTable, load_routes
from .runner import SERVER_OPTIONS

__all__ = ["PARTS", "SERVER_OPTIONS", "SESSION", "Parts", "create_app"]


@dataclass(frozen=True, slots=True)
class Parts:
    """What the running app is made of; tests and the server reach in through this."""

    settings: Settings
    metrics: Metrics
    keys: KeySet
    secret: BridgeSecret
    authenticator: Authenticator
    ops: Ops
    table: RouteTable


PARTS = web.AppKey("catalyst_proxy.parts", Parts)
SESSION = web.AppKey("catalyst_proxy.session", aiohttp.ClientSession)


def load_route_table(settings: Settings) -> RouteTable:
    routes: tuple[Route, ...] = DEFAULT_ROUTES
    if settings.routes_file:
        try:
            routes += load_routes(settings.routes_file, existing=routes)
        except RoutesFileError as exc:
            raise ConfigError("CATALYST_ROUTES_FILE", str(exc)) from None
    return RouteTable(routes)


def load_keys(settings: Settings) -> tuple[Key, ...]:
    if not settings.public_key_file:
        return ()
    try:
        return load_local_keys(settings.public_key_file)
    except (OSError, ValueError) as exc:
        raise ConfigError(
            "CATALYST_SESSION_PUBLIC_KEY_FILE", f"{settings.public_key_file}: {exc}"
        ) from None


def create_app(
    settings: Settings,
    *,
    metrics: Metrics | None = None,
    clock: Callable[[], float] = time.time,
    monotonic: Callable[[], float] = time.monotonic,
    session: aiohttp.ClientSession | None = None,
) -> web.Application:
    """Build the app; raises ConfigError for a bad routes file or key file."""
    metrics = metrics or Metrics()
    table = load_route_table(settings)
    keys = KeySet(
        local_keys=load_keys(settings),
        jwks_url=settings.jwks_url,
        cache_seconds=settings.jwks_cache_seconds,
        timeout=settings.jwks_timeout_seconds,
        metrics=metrics,
        clock=monotonic,
    )
    secret = BridgeSecret(settings.bridge_secret, settings.bridge_secret_file, clock=monotonic)
    authenticator = Authenticator(settings, keys, clock=clock)
    ops = Ops(keys, secret, metrics)
    app = web.Application(middlewares=[make_middleware(metrics)], handler_args=None)
    app[PARTS] = Parts(settings, metrics, keys, secret, authenticator, ops, table)

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        app[SESSION] = session or new_upstream_session(settings)
        await keys.start()
        yield
        await keys.close()
        if session is None:
            await app[SESSION].close()

    app.cleanup_ctx.append(lifecycle)
    proxy = Proxy(settings, table, authenticator, secret, metrics, lambda: app[SESSION])
    ops.add_routes(app)
    # Every other path goes to the proxy, which matches the raw path itself ("[\s\S]":
    # a percent-encoded newline decodes to one, and "." would not match it).
    app.router.add_route("*", r"/{tail:[\s\S]*}", proxy.handle, expect_handler=proxy.expect_handler)
    return app
