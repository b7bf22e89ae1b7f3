"""The bounded keep-alive pool of connections to the SME gateway (one per process).

- At most ``max_connections`` connections exist at once (open, or being
  opened). A request that finds none free waits in line, at most
  ``max_pending`` of them at a time (``0``: nobody waits); the next one, and
  any request whose time budget runs out while it waits (or is all but spent
  when its turn comes), is refused with ``PoolOverloaded``: nothing was sent,
  so it is safe to retry.
- Idle connections are reused most recently used first (warm ones stay warm,
  surplus ones age out) and closed after ``idle_seconds``. One that closed or
  aged while idle is dropped before use, never after: a request is written on
  exactly one connection.
- A free place goes to the first request in line: either an idle connection
  handed over directly, or the right to open a new one ("a slot").
- New connections go through the breaker: while it is open nothing connects.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
import ssl
from collections import deque
from typing import Final

from .breaker import CLOSED, OPEN, Breaker
from .connection import Connection
from .failures import BreakerOpen, ConnectFailed, PoolOverloaded
from .watchdog import Watchdog


class _Slot:
    """Handed to a waiter: the right to open one new connection."""


SLOT: Final = _Slot()
# A waiter whose turn comes (a connection, or the right to open one) with less of its budget
# left than its floor has, in effect, spent its budget waiting: 503 overloaded, nothing sent.
# Written with next to no time left for the answer it would be a 504 (for a keyed purchase,
# "outcome unknown" where a safe refusal was possible); a connect that could not succeed in
# time would read as the SME gateway unreachable, and count against it in the breaker. The
# floor is a tenth of the budget, at most a quarter of a second (at least a millisecond).
# A connect given at least the floor that then times out counts as the SME gateway's, waited
# or not: one on its network answers a SYN in milliseconds, and with a full pool every
# connect comes after a wait (sparing those, a gateway gone dark never opened the breaker).
FLOOR_SHARE: Final = 0.1
FLOOR_MOST: Final = 0.25
CONNECT_FLOOR: Final = 0.001


# A connect that failed for want of this process's or this host's resources, not the SME
# gateway's fault: overloaded (nothing sent, safe to retry), and not counted by the breaker
# (which would refuse everyone for its cooldown after the flood is gone).
_OUR_LIMITS: Final = {
    errno.EMFILE: "file descriptors",
    errno.ENFILE: "file descriptors (the host's)",
    errno.ENOBUFS: "socket buffers",
    errno.ENOMEM: "memory",
    errno.EADDRNOTAVAIL: "local ports",
}
_TIMEOUT: Final = object()  # the waiter's budget ran out
_RECHECK: Final = object()  # the breaker opened: look again (and be refused)


def _expire(waiter: asyncio.Future[object]) -> None:
    if not waiter.done():
        waiter.set_result(_TIMEOUT)


class Pool:
    def __init__(
        self,
        host: str,
        port: int,
        *,
        tls: ssl.SSLContext | None,
        max_connections: int,
        max_pending: int,
        idle_seconds: float,
        breaker: Breaker,
        budget: float | None = None,
    ) -> None:
        """``budget``: the requests' time budget (None: a floor of CONNECT_FLOOR)."""
        self._host = host
        self._floor = CONNECT_FLOOR  # see FLOOR_SHARE
        if budget is not None:
            self._floor = max(min(budget * FLOOR_SHARE, FLOOR_MOST), CONNECT_FLOOR)
        self._port = port
        self._tls = tls
        self._max = max_connections
        self._max_pending = max_pending
        self._idle_seconds = idle_seconds
        self.breaker = breaker
        self.loop = self._loop = asyncio.get_running_loop()
        self._watchdog = Watchdog(self._loop)
        self._idle: list[Connection] = []  # oldest first; reuse takes the newest
        self._slots = 0  # connections open or being opened, and slots handed to waiters
        self.open = 0  # connections actually open (a gauge)
        self._waiters: deque[asyncio.Future[object]] = deque()
        self._sweep: asyncio.TimerHandle | None = None
        self._closed = False

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    @property
    def idle(self) -> int:
        return len(self._idle)

    def acquire_idle(self) -> Connection | None:
        """An idle connection reserved for one request, when one is there (no await: the
        common case); None otherwise. BreakerOpen while the breaker is open."""
        self.breaker.check()
        return self._take_idle()

    async def acquire(self, deadline: float) -> Connection:
        """A connection reserved for one request; PoolOverloaded, BreakerOpen or ConnectFailed."""
        while True:
            self.breaker.check()
            conn = self._take_idle()
            if conn is not None:
                return conn
            if self._slots < self._max:
                self._slots += 1
                return await self._connect(deadline)
            granted = await self._wait(deadline)
            if deadline - self._loop.time() < self._floor:  # handed over too late to use
                self._pass_on(granted)
                raise PoolOverloaded("the time budget ran out waiting for an upstream connection")
            if granted is SLOT:
                return await self._connect(deadline)
            if isinstance(granted, Connection) and granted.reserve():
                return granted
            # It closed while handed over (its place went on to the next in line), or the
            # breaker opened: start again.

    def release(self, conn: Connection) -> None:
        """After an exchange: a reusable connection goes to the next in line, or to the idle set."""
        if conn.finish():
            self._hand_over(conn)
        # else it closed, and _closed_connection() passed its place on

    def close(self) -> None:
        """Close every idle connection; busy ones close when their exchange ends."""
        self._closed = True
        self._watchdog.close()
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        self.close_idle()

    def close_idle(self) -> None:
        for conn in list(self._idle):
            conn.close()

    # --- internals --------------------------------------------------------------------------

    def _take_idle(self) -> Connection | None:
        now = self._loop.time()
        while self._idle:
            conn = self._idle.pop()
            if now - conn.idle_since < self._idle_seconds and conn.reserve():
                return conn
            conn.close()  # aged out, or found closed: dropped before a byte was written
        return None

    async def _wait(self, deadline: float) -> object:
        """Wait in line for a connection or a slot until ``deadline``."""
        if len(self._waiters) >= self._max_pending:
            raise PoolOverloaded("too many requests waiting for an upstream connection")
        waiter: asyncio.Future[object] = self._loop.create_future()
        self._waiters.append(waiter)
        timer = self._loop.call_at(deadline, _expire, waiter)
        try:
            granted = await waiter
        except asyncio.CancelledError:
            # The client went away. Whatever was handed to us in the meantime goes on.
            if waiter.done() and not waiter.cancelled():
                self._pass_on(waiter.result())
            raise
        finally:
            timer.cancel()
            if not waiter.done() or waiter.cancelled() or waiter.result() is _TIMEOUT:
                self._discard_waiter(waiter)
        if granted is _TIMEOUT:
            raise PoolOverloaded("the time budget ran out waiting for an upstream connection")
        return granted

    def _discard_waiter(self, waiter: asyncio.Future[object]) -> None:
        with contextlib.suppress(ValueError):
            self._waiters.remove(waiter)

    def _pass_on(self, granted: object) -> None:
        if granted is SLOT:
            self._free_slot()
        elif isinstance(granted, Connection) and granted.is_idle:
            self._hand_over(granted)  # never used: on to the next in line

    def _hand_over(self, conn: Connection) -> None:
        """An IDLE connection: to the first in line, else to the idle set.

        Not while the breaker is open or half-open: a request sent on an old
        connection would neither be the trial nor close the breaker.
        """
        if self._closed or self.breaker.state != CLOSED:
            conn.close()
            return
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return
        self._idle.append(conn)
        self._schedule_sweep()

    async def _connect(self, deadline: float) -> Connection:
        """Open a new connection on a slot already counted; the slot is freed on failure."""
        try:
            self.breaker.attempt()
        except BreakerOpen:
            self._free_slot()
            raise
        made: list[Connection] = []

        def protocol() -> Connection:
            conn = Connection(self._loop, self._closed_connection, self._watchdog)
            made.append(conn)
            return conn

        try:
            async with asyncio.timeout_at(deadline):
                _, conn = await self._loop.create_connection(
                    protocol, self._host, self._port, ssl=self._tls
                )
        except asyncio.CancelledError:
            _give_up(made)
            self.breaker.abandon()
            self._free_slot()
            raise
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            _give_up(made)
            self._free_slot()
            lacking = _OUR_LIMITS.get(getattr(exc, "errno", None) or 0)
            if lacking is not None:
                self.breaker.abandon()
                raise PoolOverloaded(f"this process is out of {lacking}") from None
            self.breaker.failure()
            if self.breaker.state == OPEN:
                self._breaker_opened()
            kind = "connect timeout" if isinstance(exc, TimeoutError) else type(exc).__name__
            raise ConnectFailed(f"{kind}: {_describe(exc)}") from None
        self.breaker.success()
        self.open += 1
        conn.pooled = True
        _no_delay(conn)
        conn.connected()
        return conn

    def _breaker_opened(self) -> None:
        """Nothing waits for a connection that will not be made, and idle ones may be dead."""
        self.close_idle()
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(_RECHECK)
        self._waiters.clear()

    def _closed_connection(self, conn: Connection) -> None:
        """A pooled connection closed (either side): its place goes to the next in line."""
        if not conn.pooled:
            return  # never counted: its attempt's failure path freed the slot
        conn.pooled = False
        self.open -= 1
        with contextlib.suppress(ValueError):
            self._idle.remove(conn)
        self._free_slot()

    def _free_slot(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(SLOT)
                return
        self._slots -= 1

    def _schedule_sweep(self) -> None:
        if self._sweep is None and self._idle:
            when = self._idle[0].idle_since + self._idle_seconds
            self._sweep = self._loop.call_at(when, self._expire_idle)

    def _expire_idle(self) -> None:
        self._sweep = None
        now = self._loop.time()
        while self._idle and now - self._idle[0].idle_since >= self._idle_seconds:
            self._idle[0].close()  # removes itself from _idle
        self._schedule_sweep()


def _give_up(made: list[Connection]) -> None:
    """A connect given up (cancelled, or its deadline) may have made its connection already,
    in the same loop pass: uvloop then closes the transport without ever calling the
    protocol's ``connection_lost()``, so what the connection holds is let go here."""
    for conn in made:
        conn.discard()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "no connection within the time budget"
    if isinstance(exc, socket.gaierror):
        return "the name does not resolve"
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


def _no_delay(conn: Connection) -> None:
    transport = conn.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
