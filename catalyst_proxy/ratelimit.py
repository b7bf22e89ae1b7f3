"""Per-operator rate limits (reference.md "Rate limits"), checked right after authentication.

Each operator (``sub``) has its own budget on each row of the route table
(aliases included): ``CATALYST_RATE_LIMIT``, or the row's own ``rate_limit``
from the routes file. A request over any of the row's rates gets
``429 rate-limited`` with ``Retry-After`` and the IETF httpapi
ratelimit-headers fields (draft 08 on, structured fields)::

    RateLimit-Policy: "30-per-minute";q=30;w=60, "500-per-hour";q=500;w=3600
    RateLimit: "30-per-minute";r=0;t=12

The algorithm is the sliding window counter (the count of the current window
plus the previous window's, weighted by how much of it still overlaps): memory
bounded by two counters per operator and rate, no double burst at a window's
edge (a fixed window's flaw), no list of every hit (a moving window's cost).

Counters live in the process (``MemoryCounters``) or, with
``CATALYST_REDIS_URL``, in Redis/Valkey through the ``limits`` library's
sliding-window strategy (``RedisCounters``), so every worker and replica shares
them. ``limits``' async memory storage is not used: measured, its expiry task
scans every key after each hit (~270 µs per request with 10,000 operators).
When the shared store fails, ``CATALYST_RATE_LIMIT_ON_STORE_ERROR`` decides:
``allow`` (counted in the metrics) or ``refuse``
(``503 rate-limit-store-unavailable``). Either way the error is logged
(``ratelimit.store_error``): the first at once, then at most one line every
``STORE_ERROR_LOG_EVERY`` seconds, carrying how many requests met one since the
line before (an outage under load is thousands a second; the metrics count each).
Errors held back are told by a line at the end of their window even if no error
follows them, or at shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from limits import (
    RateLimitItem,
    RateLimitItemPerDay,
    RateLimitItemPerHour,
    RateLimitItemPerMinute,
    RateLimitItemPerSecond,
)
from limits.aio.storage import RedisStorage
from limits.aio.strategies import SlidingWindowCounterRateLimiter
from limits.errors import StorageError

from . import log
from .config import Rate
from .errors import RateLimited, RateLimitStoreUnavailable
from .metrics import Metrics
from .routes import Route
from .store import COMMAND_TIMEOUT, Store, StoreUnavailable

STORE_ERROR_LOG_EVERY = 10.0  # seconds between two ratelimit.store_error lines, at most
MAX_MEMORY_KEYS = 100_000  # per process; the least recently used counters go first
_MIN_WAIT = 0.001  # a refused hit's wait is never 0 (0 means allowed)
_STORE_ERRORS = (StorageError, OSError, TimeoutError)  # what limits lets through of a store's
_ITEMS: dict[str, type[RateLimitItem]] = {
    "second": RateLimitItemPerSecond,
    "minute": RateLimitItemPerMinute,
    "hour": RateLimitItemPerHour,
    "day": RateLimitItemPerDay,
}


class Counters(Protocol):
    async def hit(self, key: str, rate: Rate, *, count: bool = True) -> float:
        """0.0 if one more request fits (counted, unless ``count`` is False), else the
        seconds until one would (always more than 0)."""
        ...


class MemoryCounters:
    """Sliding window counters in this process, bounded (least recently used dropped)."""

    def __init__(self, *, clock: Callable[[], float] = time.time, limit: int = MAX_MEMORY_KEYS):
        self._clock = clock
        self._limit = limit
        # key → [window number, count in that window, count in the window before]
        self._windows: OrderedDict[str, list[int]] = OrderedDict()

    async def hit(self, key: str, rate: Rate, *, count: bool = True) -> float:
        now = self._clock()
        period = rate.seconds
        window = int(now // period)
        state = self._windows.get(key)
        if state is None:
            state = self._windows[key] = [window, 0, 0]
            if len(self._windows) > self._limit:
                self._windows.popitem(last=False)
        else:
            self._windows.move_to_end(key)
            if state[0] != window:  # shift: the current window becomes the previous one
                state[2] = state[1] if state[0] == window - 1 else 0
                state[0], state[1] = window, 0
        elapsed = now / period - window  # fraction of the current window gone by
        if state[2] * (1 - elapsed) + state[1] + 1 <= rate.amount:
            if count:
                state[1] += 1
            return 0.0
        return max(_wait(state[1], state[2], elapsed, rate), _MIN_WAIT)

    def __len__(self) -> int:
        return len(self._windows)


def _wait(current: int, previous: int, elapsed: float, rate: Rate) -> float:
    """Seconds until one more request fits under ``rate.amount`` (no new hits meanwhile)."""
    room = rate.amount - 1
    if current <= room and previous:
        # Later in this window: previous * (1 - f) + current <= room.
        fraction = 1 - (room - current) / previous
        return max(fraction - elapsed, 0.0) * rate.seconds
    # Only in the next window, where this window's count is the weighted one.
    fraction = 1 - room / current if current else 0.0
    return (1 - elapsed + max(fraction, 0.0)) * rate.seconds


class RedisCounters:
    """The same counters in Redis/Valkey (``limits``' sliding window, one script per hit)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        storage = RedisStorage(
            "async+" + store.url,
            implementation="redispy",
            connection_pool=store.pool,  # type: ignore[arg-type]  # limits types options narrowly
            wrap_exceptions=True,
            key_prefix="catalyst-ratelimit",
        )
        self._limiter = SlidingWindowCounterRateLimiter(storage)
        self._items: dict[Rate, RateLimitItem] = {}

    async def hit(self, key: str, rate: Rate, *, count: bool = True) -> float:
        item = self._items.get(rate)
        if item is None:
            item = self._items[rate] = _ITEMS[rate.period](rate.amount, namespace="rl")
        if self.store.down:
            raise StoreUnavailable(self.store.last_error or "the store is down")
        try:
            allowed = self._limiter.hit if count else self._limiter.test
            if await allowed(item, key):
                self.store.succeeded()
                return 0.0
        except (*_STORE_ERRORS, ValueError) as exc:  # (ValueError: limits' int() of a counter)
            raise self.store.refusal(getattr(exc, "storage_error", exc)) from None
        try:
            stats = await self._limiter.get_window_stats(item, key)
        except (*_STORE_ERRORS, ValueError) as exc:
            # Refused all the same: the store said so. Only the wait is not known: a window.
            self.store.refusal(getattr(exc, "storage_error", exc))  # (noted, not raised)
            return float(rate.seconds)
        self.store.succeeded()
        # At a window's edge limits may report the reset as now: a refusal is never "0".
        return max(stats.reset_time - time.time(), _MIN_WAIT)


@dataclass(frozen=True, slots=True)
class _Policy:
    rates: tuple[Rate, ...]
    names: tuple[str, ...]
    header: str  # RateLimit-Policy
    counting_order: tuple[int, ...]  # the rates' places, shortest window first


class RateLimiter:
    def __init__(
        self,
        routes: Iterable[Route],
        default: tuple[Rate, ...],
        counters: Counters,
        *,
        refuse_on_store_error: bool,
        metrics: Metrics,
        clock: Callable[[], float] = time.monotonic,
        log_every: float = STORE_ERROR_LOG_EVERY,
    ) -> None:
        self._counters = counters
        self._store = counters.store if isinstance(counters, RedisCounters) else None
        self._refuse = refuse_on_store_error
        self._metrics = metrics
        self._policies: dict[str, _Policy] = {}
        for route in routes:
            rates = default if route.rate_limit is None else route.rate_limit
            if rates:
                names = tuple(f"{rate.amount}-per-{rate.period}" for rate in rates)
                header = ", ".join(
                    f'"{name}";q={rate.amount};w={rate.seconds}'
                    for name, rate in zip(names, rates, strict=True)
                )
                order = tuple(sorted(range(len(rates)), key=lambda index: rates[index].seconds))
                self._policies[route.path] = _Policy(rates, names, header, order)
        self._refused = {path: metrics.rate_limited.labels(path) for path in self._policies}
        self._store_allowed = metrics.rate_limit_store_errors.labels("allowed")
        self._store_refused = metrics.rate_limit_store_errors.labels("refused")
        self._clock = clock
        self._logger = log.get_logger()
        self._log_every = log_every
        self._unlogged = 0  # store errors since the last ratelimit.store_error line
        self._log_after = float("-inf")  # no line before then (the clock's time)
        self._last_error = ""  # ... and the latest one's reason
        self._tell_held: asyncio.TimerHandle | None = None  # a line for those held back

    @property
    def active(self) -> bool:
        return bool(self._policies)

    def policy_header(self, route: str) -> str | None:
        policy = self._policies.get(route)
        return policy.header if policy else None

    async def check(self, route: str, sub: str) -> None:
        """Count this operator's request on ``route``; RateLimited if over a rate."""
        policy = self._policies.get(route)
        if policy is None:
            return
        key = route + "/" + sub.replace("%", "%25").replace("/", "%2F")
        keys = [f"{key}/{index}" for index in range(len(policy.rates))]
        store = self._store
        try:
            if store is None:
                await self._count(route, policy, keys)
            else:
                # One bound for all of a request's round trips (two a rate with several
                # rates), not only for each: a store that answers each just under its own
                # timeout took seconds (4 rates: 3.6 s). Past it, this request is a store
                # error; the store is not paused for everyone (a burst of this process's own
                # requests waiting for connections gets here too, the store being fine).
                try:
                    async with asyncio.timeout(COMMAND_TIMEOUT):
                        await self._count(route, policy, keys)
                except TimeoutError:
                    raise StoreUnavailable("the store's answers took too long") from None
        except StoreUnavailable as exc:
            self._note_store_error(exc)
            if self._refuse:
                self._store_refused.inc()
                raise RateLimitStoreUnavailable(str(exc)) from None
            self._store_allowed.inc()

    def _note_store_error(self, exc: StoreUnavailable) -> None:
        """Log a store error, throttled: the first at once, then one line per
        ``log_every`` at most, with the count of errors since the line before; those held
        back are told at the end of their window even if no error follows. (The store's own
        ``store.state`` line says when it goes down and comes back; an error about one key
        or this process's own congestion does not change that state, and is seen here
        only.)"""
        self._unlogged += 1
        self._last_error = str(exc)
        now = self._clock()
        if now >= self._log_after:
            self._log_store_errors(now)
        elif self._tell_held is None:
            self._tell_held = asyncio.get_running_loop().call_later(
                self._log_after - now, self._log_held
            )

    def close(self) -> None:
        """Shutdown: the store errors held back are told now (their timer would not run)."""
        if self._tell_held is not None:
            self._tell_held.cancel()
        self._log_held()

    def _log_held(self) -> None:
        self._tell_held = None
        if self._unlogged:
            self._log_store_errors(self._clock())

    def _log_store_errors(self, now: float) -> None:
        self._logger.warning(
            log.RATE_LIMIT_STORE_ERROR,
            reason=self._last_error,
            decision="refused" if self._refuse else "allowed",
            requests=self._unlogged,  # those since the line before, the latest included
        )
        self._unlogged = 0
        self._log_after = now + self._log_every

    async def _count(self, route: str, policy: _Policy, keys: list[str]) -> None:
        """Test every rate (several), then count the request in each; RateLimited if over."""
        if len(keys) > 1:
            # Every rate first, then count in all: a request one rate refuses must
            # not spend the others' budgets. Refused, it is told the longest wait of
            # the rates it is over: a client that waits that long is not refused again
            # by another (5/second;100/hour spent: not "1 s" for most of an hour).
            await self._refuse_if_over(route, policy, keys)
        # Counted shortest window first. With a shared store the test above and the
        # counts are separate round trips: a concurrent request may take a rate's last
        # room in between, and what was counted before its refusal stays counted. In
        # this order that is only room in the shorter windows, back within seconds; in
        # the order written, a burst refused by 3/second could spend all of 10/minute.
        for index in policy.counting_order:
            wait = await self._counters.hit(keys[index], policy.rates[index])
            if wait:
                if len(keys) > 1:  # the longest wait, if the store still answers
                    with contextlib.suppress(StoreUnavailable):
                        await self._refuse_if_over(route, policy, keys)
                self._refuse_over(route, policy, index, wait)

    async def _refuse_if_over(self, route: str, policy: _Policy, keys: list[str]) -> None:
        """RateLimited with the longest wait if any rate has no room (nothing counted). A
        store that fails after a rate was found without room: refused all the same."""
        waits: list[float] = []
        try:
            for index, rate in enumerate(policy.rates):
                waits.append(await self._counters.hit(keys[index], rate, count=False))
        except StoreUnavailable:
            if not any(waits):
                raise
        longest = max(range(len(waits)), key=waits.__getitem__)
        if waits[longest]:
            self._refuse_over(route, policy, longest, waits[longest])

    def _refuse_over(self, route: str, policy: _Policy, index: int, wait: float) -> None:
        self._refused[route].inc()
        reset = max(math.ceil(wait), 1)
        raise RateLimited(
            f"over {policy.rates[index]}",
            headers={
                "Retry-After": str(reset),
                "RateLimit-Policy": policy.header,
                "RateLimit": f'"{policy.names[index]}";r=0;t={reset}',
            },
        )
