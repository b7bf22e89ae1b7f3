"""``create_app()``: the application, with every collaborator it owns.

The app owns the upstream client (and its pool) and the key set: both are
created when the app starts and closed when it stops (``cleanup_ctx``), never
module globals. Requests do not go through aiohttp's router or middlewares:
``Runner`` serves the app's ``Dispatcher`` with aiohttp's low-level server, and
the app is the lifecycle around it. Tests pass their own ``clock``, and their own
``Tuning``, instead of patching.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import orjson
from aiohttp import web

from . import log, openapi
from .auth import Authenticator
from .bridge import BridgeSecret
from .config import ConfigError, Settings
from .dispatch import Dispatcher
from .idempotency import Idempotency, MemoryRecords, RedisRecords, route_modes
from .idempotency.guard import LEASE_MARGIN
from .idempotency.memory import MAX_BYTES, MAX_RECORDS, answer_budget
from .jwks import Key, KeySet, load_local_keys
from .metrics import Metrics
from .ops import Ops
from .proxy import SEND_PATIENCE, Proxy
from .ratelimit import MemoryCounters, RateLimiter, RedisCounters
from .routes import DEFAULT_ROUTES, Route, RoutesFileError, RouteTable, load_routes
from .store import Store
from .upstream import Breaker, Client

__all__ = ["PARTS", "Parts", "Tuning", "create_app"]


@dataclass(frozen=True, slots=True)
class Tuning:
    """Fixed values that are not configuration (each documented where it is defined), which
    tests shorten to reach their behaviour in a moment."""

    lease_margin: float = LEASE_MARGIN  # s past the budget before an orphan reads unknown
    send_patience: float = SEND_PATIENCE  # s a client may take none of an answer
    memory_max_records: int = MAX_RECORDS  # the memory idempotency store's bounds
    memory_max_bytes: int = MAX_BYTES


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
    client: Client
    dispatcher: Dispatcher
    store: Store | None
    limiter: RateLimiter
    idempotency: Idempotency
    tuning: Tuning


PARTS = web.AppKey("catalyst_proxy.parts", Parts)


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
    workers: int = 1,
    tuning: Tuning = Tuning(),  # (frozen: one shared default is safe)
) -> web.Application:
    """Build the app; raises ConfigError for a bad routes file, key file or password file,
    or an idempotency mode ``workers`` processes cannot honour without a shared store."""
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
    breaker = Breaker(
        settings.breaker_failures,
        settings.breaker_cooldown_seconds,
        clock=monotonic,
        on_change=_breaker_moved(metrics),
    )
    client = Client(
        settings.gateway_url,
        timeout=settings.upstream_timeout_seconds,
        max_connections=settings.upstream_max_connections,
        max_pending=settings.upstream_max_pending,
        idle_seconds=settings.upstream_idle_seconds,
        breaker=breaker,
    )
    store = Store(settings, clock=monotonic) if settings.redis_url else None
    limiter = RateLimiter(
        table.routes,
        settings.rate_limit,
        RedisCounters(store) if store is not None else MemoryCounters(),
        refuse_on_store_error=settings.rate_limit_on_store_error == "refuse",
        metrics=metrics,
        clock=monotonic,
    )
    modes, off_reason = route_modes(settings, table.routes, workers=workers)
    lease = settings.upstream_timeout_seconds + tuning.lease_margin
    records = (
        RedisRecords(store, settings.idempotency_ttl_seconds, lease=lease)
        if store is not None
        else MemoryRecords(
            settings.idempotency_ttl_seconds,
            clock=clock,
            on_evict=lambda count: metrics.idempotency_evictions.add(amount=count),
            on_drop_answers=lambda count: metrics.idempotency_answers_dropped.add(amount=count),
            max_in_flight=settings.upstream_max_connections + settings.upstream_max_pending,
            max_answer_bytes=answer_budget(settings.idempotency_max_body_bytes),
            max_records=tuning.memory_max_records,
            max_bytes=tuning.memory_max_bytes,
        )
    )
    idempotency = Idempotency(
        modes,
        records,
        metrics,
        lease_seconds=lease,
        max_body_bytes=settings.idempotency_max_body_bytes,
        shared=store is not None,
        off_reason=off_reason,
        clock=clock,
    )
    ops = Ops(keys, secret, metrics, breaker, store, idempotency)
    ops.openapi = orjson.dumps(
        openapi.document(
            table.routes,
            idempotency=idempotency.mode,
            rate_limited=lambda path: limiter.policy_header(path) is not None,
            shared_store=store is not None,
            refuse_on_store_error=settings.rate_limit_on_store_error == "refuse",
        )
    )
    proxy = Proxy(
        settings, authenticator, secret, metrics, client, limiter, idempotency,
        send_patience=tuning.send_patience,
    )  # fmt: skip
    dispatcher = Dispatcher(table, ops.routes(), proxy, metrics)
    app = web.Application(handler_args=None)
    app[PARTS] = Parts(
        settings, metrics, keys, secret, authenticator, ops, table, client, dispatcher,
        store, limiter, idempotency, tuning,
    )  # fmt: skip

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        await client.start()
        metrics.watch_pool(lambda: client.pool.open, lambda: client.pool.waiting)
        if off_reason is not None:
            log.get_logger().warning(log.IDEMPOTENCY_OFF, reason=off_reason)
        if store is not None:
            if isinstance(records, RedisRecords) and idempotency.active:
                # Each time the store comes up: at start-up, or later if it was down then.
                store.on_up.append(records.check_policy)
            await store.start()
        await keys.start()
        yield
        await keys.close()
        await client.close()
        await idempotency.close()  # record updates still on their way
        limiter.close()  # its store errors not yet logged
        if store is not None:
            await store.close()

    app.cleanup_ctx.append(lifecycle)
    return app


def _breaker_moved(metrics: Metrics) -> Callable[[str, int], None]:
    logger = log.get_logger()

    def moved(state: str, failures: int) -> None:
        metrics.breaker_moved(state)
        report = logger.warning if state == "open" else logger.info
        report(log.BREAKER, state=state, failures_in_a_row=failures)

    return moved
