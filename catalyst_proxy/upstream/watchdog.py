"""Deadlines for connections waiting on the SME gateway, kept by one timer per pool.

Every request waits for a response head, within the budget. One event-loop
timer per wait (``call_at`` and ``cancel``) measured ~2 µs a request under
uvloop; here a wait is one dict entry, and one timer ticking every ``TICK``
while anything waits expires the overdue ones: a deadline fires at most
``TICK`` late, which against budgets of seconds is noise.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

TICK = 0.01


class Waiter(Protocol):
    def expire(self) -> None:
        """The deadline passed: wake the wait with "timed out"."""


class Watchdog:
    def __init__(self, loop: asyncio.AbstractEventLoop, tick: float = TICK) -> None:
        self._loop = loop
        self._tick = tick
        self._waiting: dict[Waiter, float] = {}
        self._timer: asyncio.TimerHandle | None = None

    def watch(self, waiter: Waiter, deadline: float) -> None:
        self._waiting[waiter] = deadline
        if self._timer is None:
            self._timer = self._loop.call_later(self._tick, self._check)

    def unwatch(self, waiter: Waiter) -> None:
        self._waiting.pop(waiter, None)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _check(self) -> None:
        now = self._loop.time()
        overdue = [waiter for waiter, deadline in self._waiting.items() if deadline <= now]
        for waiter in overdue:
            del self._waiting[waiter]
            waiter.expire()
        self._timer = self._loop.call_later(self._tick, self._check) if self._waiting else None
