"""The waiting room of connections waiting on the SME gateway: deadlines and a short spin.

- Deadlines: every request waits for a response head, within the budget. One
  event-loop timer per wait (``call_at`` and ``cancel``) measured ~2 µs a
  request under uvloop; here a wait is one dict entry, and one timer ticking
  every ``TICK`` while anything waits expires the overdue ones: a deadline
  fires at most ``TICK`` late, which against budgets of seconds is noise.
  A wait expires at a look only if its deadline had passed by the look before:
  the loop has read its sockets since then. (It runs its timers before it
  reads, so after a stall past a deadline, a paused process, a starved CPU, a
  VM held, an answer that was in the socket in time would otherwise read as a
  timeout, and a purchase done as "outcome unknown".) A deadline that passed
  since the last look gets another look a short timer later. The rule is the
  deadline's, not the wait's: a connection that waits again (a head that
  trickles in) with the same deadline is not given a new second look.
- Spin: the SME gateway usually answers within a few hundred microseconds.
  Blocking in the kernel at once costs a sleep and a wake-up per answer (in a
  VM, a halted vCPU's wake-up is tens of microseconds); for up to ``SPIN``
  after a wait begins the loop instead keeps polling, yielding the CPU
  (``sched_yield``) on each turn so the upstream, if it shares the machine,
  runs. One spinner per pool, however many wait. Measured at 500 requests/s
  (2 workers): the hop's added median latency 0.42 → 0.36 ms, p99 0.53 →
  0.51 ms, CPU per request no higher (the wake-ups it saves cost as much).
- The spin adapts, as an adaptive mutex does: a spin that ends without any
  wait having been answered is a miss. After ``SPIN_MISSES`` of them in a row
  (an SME gateway a network hop away, answering in milliseconds) the spin is
  off and would only burn ``SPIN`` of CPU per request; every ``PROBE_EVERY``
  th wait still spins, and one answered spin turns it back on.
"""

from __future__ import annotations

import asyncio
import os
from typing import Protocol

TICK = 0.01
RECHECK = 0.001  # s: a timer this far out runs after the loop's next read of its sockets
SPIN = 0.0002
SPIN_MISSES = 4  # fruitless spins in a row before spinning stops
PROBE_EVERY = 32  # with spinning stopped, every 32nd wait spins anyway


class Waiter(Protocol):
    def expire(self, deadline: float) -> None:
        """``deadline`` (the wait's) passed: wake the wait with "timed out"."""


class Watchdog:
    def __init__(
        self, loop: asyncio.AbstractEventLoop, tick: float = TICK, spin: float = SPIN
    ) -> None:
        self._loop = loop
        self._tick = tick
        self._spin = spin
        self._waiting: dict[Waiter, float] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._spin_until = 0.0  # 0: not spinning
        self._credit = SPIN_MISSES  # misses left before spinning stops
        self._skipped = 0  # waits not spun for since spinning stopped
        self._answered = False  # a wait ended during the current spin
        self._last_look = 0.0  # the loop's time at the last look (or when the looks began)

    @property
    def spinning(self) -> bool:
        return bool(self._spin_until)

    def watch(self, waiter: Waiter, deadline: float) -> None:
        self._waiting[waiter] = deadline
        if self._timer is None:
            self._last_look = self._loop.time()
            self._timer = self._loop.call_later(self._tick, self._check)
        if not self._spin_until and self._spin and self._worth_spinning():
            self._spin_until = self._loop.time() + self._spin
            self._answered = False
            self._loop.call_soon(self._spin_once)

    def unwatch(self, waiter: Waiter) -> None:
        if self._waiting.pop(waiter, None) is not None and self._spin_until:
            self._answered = True

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _worth_spinning(self) -> bool:
        if self._credit > 0:
            return True
        self._skipped += 1
        if self._skipped < PROBE_EVERY:
            return False
        self._skipped = 0
        return True  # a probe: has the SME gateway become quick again?

    def _spin_once(self) -> None:
        if not self._waiting or self._loop.time() >= self._spin_until:
            self._spin_until = 0.0
            self._credit = SPIN_MISSES if self._answered else max(self._credit - 1, 0)
            return
        os.sched_yield()  # let whoever we wait for run on this CPU
        self._loop.call_soon(self._spin_once)

    def _check(self) -> None:
        now = self._loop.time()
        read_since, self._last_look = self._last_look, now
        expired: list[tuple[Waiter, float]] = []
        due = False  # a deadline passed since the last look: look again, after a read
        for waiter, deadline in self._waiting.items():
            if deadline <= read_since:
                expired.append((waiter, deadline))
            elif deadline <= now:
                due = True
        for waiter, deadline in expired:
            del self._waiting[waiter]
            waiter.expire(deadline)
        if due:
            self._timer = self._loop.call_later(RECHECK, self._check)
        else:
            self._timer = self._loop.call_later(self._tick, self._check) if self._waiting else None
