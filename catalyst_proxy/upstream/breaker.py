"""Fail fast when the SME gateway cannot be connected to: the circuit breaker.

::

    closed ── N connection failures in a row ──> open ── cooldown over ──> half-open
      ^                                                                       │
      ├──────────────────── the one trial request connects ───────────────────┤
      │                                                                       │
      └── (open again) <───────────── the trial fails to connect ─────────────┘

Only connection-level failures count (refused, unreachable, no route, DNS,
connect timeout: the ``503 sme-gateway-unreachable`` kinds). An answer of any
status, and any failure after a connection was made, are not the breaker's
business: they never open it. A successful connection resets the count.

While open, every request is answered at once (``BreakerOpen``, with the
seconds left for ``Retry-After``) and no connection is attempted. After the
cooldown exactly one request may try; the others are still refused until it
either connects (closed) or fails (open again). A trial is safe to let
through: a connection that fails sends nothing. ``failures == 0`` disables
the breaker. Each process (each ``--workers`` worker) has its own.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from .failures import BreakerOpen

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half-open"
STATES = (CLOSED, OPEN, HALF_OPEN)


class Breaker:
    def __init__(
        self,
        failures: int,
        cooldown: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[str, int], None] | None = None,
    ) -> None:
        self._threshold = failures
        self._cooldown = cooldown
        self._clock = clock
        self._on_change = on_change
        self.state = CLOSED
        self.failures = 0  # connection failures in a row
        self._opened_at = 0.0
        self._trial = False  # the half-open trial is under way

    @property
    def enabled(self) -> bool:
        return self._threshold > 0

    def refresh(self) -> str:
        """The state now: an open breaker whose cooldown is over is half-open, whether or not
        a request has come to find that out (for /readyz and the metrics of a quiet worker)."""
        if self.state == OPEN and self._clock() >= self._opened_at + self._cooldown:
            self._move(HALF_OPEN)
        return self.state

    def seconds_left(self) -> float:
        """Of the cooldown, while open (0 otherwise)."""
        if self.state != OPEN:
            return 0.0
        return max(self._opened_at + self._cooldown - self._clock(), 0.0)

    def check(self) -> None:
        """Raise BreakerOpen if requests are being refused right now."""
        if self.state == CLOSED:
            return
        if self.state == OPEN:
            left = self._opened_at + self._cooldown - self._clock()
            if left > 0:
                raise BreakerOpen(max(math.ceil(left), 1))
            self._move(HALF_OPEN)
        if self._trial:
            raise BreakerOpen(1)

    def attempt(self) -> None:
        """Before a connection attempt: refused while open; claims the trial when half-open."""
        self.check()
        if self.state == HALF_OPEN:
            self._trial = True

    def success(self) -> None:
        self.failures = 0
        self._trial = False
        if self.state != CLOSED:
            self._move(CLOSED)

    def failure(self) -> None:
        if not self.enabled:
            return
        self._trial = False
        self.failures += 1
        if self.state == HALF_OPEN or (self.state == CLOSED and self.failures >= self._threshold):
            self._opened_at = self._clock()
            self._move(OPEN)

    def abandon(self) -> None:
        """The attempt ended without an outcome (its request was cancelled): allow another."""
        self._trial = False

    def _move(self, state: str) -> None:
        self.state = state
        if self._on_change is not None:
            self._on_change(state, self.failures)
