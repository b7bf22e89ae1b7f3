"""The circuit breaker alone (``upstream/breaker.py``), on a fake clock.

The end-to-end behaviour over real sockets is ``test_breaker.py``; here each
rule of the state machine is checked directly: what opens it, what the
cooldown and ``Retry-After`` are, the one trial, abandoning it, and ``0``.
"""

from __future__ import annotations

import pytest

from catalyst_proxy.upstream import Breaker, BreakerOpen
from catalyst_proxy.upstream.breaker import CLOSED, HALF_OPEN, OPEN

COOLDOWN = 5.0


class FakeClock:
    """A monotonic clock that moves only when the test says so."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Recorder:
    """The ``on_change`` callback: every (state, failures_in_a_row) it was told."""

    def __init__(self) -> None:
        self.moves: list[tuple[str, int]] = []

    def __call__(self, state: str, failures: int) -> None:
        self.moves.append((state, failures))


def breaker(failures: int = 3, cooldown: float = COOLDOWN) -> tuple[Breaker, FakeClock, Recorder]:
    clock, moves = FakeClock(), Recorder()
    return Breaker(failures, cooldown, clock=clock, on_change=moves), clock, moves


def refused(b: Breaker) -> int:
    """The ``Retry-After`` of the BreakerOpen that ``attempt()`` raises (fails if it does not)."""
    with pytest.raises(BreakerOpen) as caught:
        b.attempt()
    return caught.value.retry_after


def open_breaker(b: Breaker, failures: int = 3) -> None:
    for _ in range(failures):
        b.attempt()
        b.failure()
    assert b.state == OPEN


def test_starts_closed_and_lets_attempts_through():
    """A new breaker is closed, counts nothing, and lets every attempt through."""
    b, _, moves = breaker()
    assert (b.state, b.failures, b.seconds_left()) == (CLOSED, 0, 0.0)
    for _ in range(10):
        b.check()
        b.attempt()
    assert moves.moves == []


def test_opens_after_the_threshold_of_failures_in_a_row_and_not_before():
    """N-1 connection failures in a row leave it closed; the Nth opens it."""
    b, _, moves = breaker(failures=3)
    for count in (1, 2):
        b.attempt()
        b.failure()
        assert (b.state, b.failures) == (CLOSED, count)
        b.check()  # still letting requests through
    b.attempt()
    b.failure()
    assert (b.state, b.failures) == (OPEN, 3)
    assert moves.moves == [(OPEN, 3)]


def test_one_failure_opens_a_breaker_whose_threshold_is_one():
    """With a threshold of 1, the first connection failure opens it."""
    b, _, _ = breaker(failures=1)
    b.attempt()
    b.failure()
    assert b.state == OPEN


def test_a_successful_connection_resets_the_count():
    """Failures separated by one successful connection are not in a row: the count starts over."""
    b, _, moves = breaker(failures=3)
    for _ in range(2):
        b.attempt()
        b.failure()
    b.attempt()
    b.success()
    assert (b.state, b.failures) == (CLOSED, 0)
    for _ in range(2):
        b.attempt()
        b.failure()
    assert (b.state, b.failures) == (CLOSED, 2)
    b.attempt()
    b.failure()
    assert b.state == OPEN
    assert moves.moves == [(OPEN, 3)]  # the success while closed was no transition


def test_while_open_every_attempt_is_refused_with_the_seconds_left_rounded_up():
    """While open, check() and attempt() raise BreakerOpen whose retry_after is the cooldown
    left, rounded up, and at least 1."""
    b, clock, _ = breaker(failures=1, cooldown=COOLDOWN)
    open_breaker(b, failures=1)
    expected = [(0.0, 5), (0.001, 5), (1.0, 4), (2.5, 3), (4.0, 1), (4.2, 1), (4.999, 1)]
    start = clock.now
    for offset, retry_after in expected:
        clock.now = start + offset
        assert refused(b) == retry_after, offset
        with pytest.raises(BreakerOpen):
            b.check()
        assert b.seconds_left() == pytest.approx(COOLDOWN - offset)
        assert b.state == OPEN


def test_retry_after_is_at_least_one_second_for_a_fractional_cooldown():
    """A cooldown under a second still says Retry-After: 1, never 0."""
    b, clock, _ = breaker(failures=1, cooldown=0.25)
    open_breaker(b, failures=1)
    clock.advance(0.1)
    assert refused(b) == 1


def test_after_the_cooldown_exactly_one_trial_is_let_through():
    """Once the cooldown is over the breaker is half-open: the first attempt is the trial and
    every other one is refused (Retry-After 1) while it is under way."""
    b, clock, moves = breaker(failures=1)
    open_breaker(b, failures=1)
    clock.advance(COOLDOWN)
    b.attempt()  # the trial
    assert b.state == HALF_OPEN
    assert moves.moves == [(OPEN, 1), (HALF_OPEN, 1)]
    for _ in range(5):
        assert refused(b) == 1
        with pytest.raises(BreakerOpen):
            b.check()
    clock.advance(3600)  # however long the trial takes
    assert refused(b) == 1
    assert b.state == HALF_OPEN


def test_the_cooldown_ends_exactly_at_its_length():
    """Just before the cooldown ends the breaker still refuses; at its end it lets a trial go."""
    b, clock, _ = breaker(failures=1)
    open_breaker(b, failures=1)
    clock.advance(COOLDOWN - 0.001)
    assert refused(b) == 1
    clock.advance(0.001)
    b.attempt()
    assert b.state == HALF_OPEN


def test_a_trial_that_connects_closes_the_breaker_and_resets_the_count():
    """A successful trial closes the breaker, resets the count, and lets everyone through."""
    b, clock, moves = breaker(failures=2)
    open_breaker(b, failures=2)
    clock.advance(COOLDOWN)
    b.attempt()
    b.success()
    assert (b.state, b.failures, b.seconds_left()) == (CLOSED, 0, 0.0)
    assert moves.moves == [(OPEN, 2), (HALF_OPEN, 2), (CLOSED, 0)]
    for _ in range(5):
        b.attempt()  # concurrent attempts again, no trial rule
    b.failure()
    assert b.state == CLOSED  # the count started over: one failure is below the threshold


def test_a_trial_that_fails_opens_the_breaker_again_for_a_whole_cooldown():
    """A failed trial opens the breaker again, with the cooldown counted from that failure."""
    b, clock, moves = breaker(failures=1)
    open_breaker(b, failures=1)
    clock.advance(COOLDOWN + 7)  # the trial comes late
    b.attempt()
    clock.advance(0.75)  # and takes a while to fail
    b.failure()
    assert b.state == OPEN
    assert b.seconds_left() == pytest.approx(COOLDOWN)
    assert refused(b) == 5
    assert moves.moves == [(OPEN, 1), (HALF_OPEN, 1), (OPEN, 2)]
    clock.advance(COOLDOWN)
    b.attempt()  # the next trial
    assert b.state == HALF_OPEN


def test_an_abandoned_trial_lets_the_next_request_be_the_trial():
    """A trial whose request was cancelled (no outcome) frees the trial for the next request,
    and the breaker stays half-open."""
    b, clock, moves = breaker(failures=1)
    open_breaker(b, failures=1)
    clock.advance(COOLDOWN)
    b.attempt()
    assert refused(b) == 1
    b.abandon()
    assert b.state == HALF_OPEN
    b.attempt()  # the new trial
    assert refused(b) == 1
    b.success()
    assert b.state == CLOSED
    assert moves.moves == [(OPEN, 1), (HALF_OPEN, 1), (CLOSED, 0)]


def test_abandon_while_closed_changes_nothing():
    """An attempt cancelled while the breaker is closed neither counts nor resets the count."""
    b, _, moves = breaker(failures=3)
    b.attempt()
    b.failure()
    b.attempt()
    b.abandon()
    assert (b.state, b.failures) == (CLOSED, 1)
    assert moves.moves == []


def test_a_connection_made_by_an_attempt_started_before_it_opened_closes_it():
    """An attempt that began while closed and connects after the breaker opened closes it:
    the upstream is reachable after all."""
    b, _, moves = breaker(failures=2)
    b.attempt()
    b.attempt()
    b.attempt()  # three concurrent attempts while closed
    b.failure()
    b.failure()
    assert b.state == OPEN
    b.success()  # the third one connected
    assert (b.state, b.failures) == (CLOSED, 0)
    assert moves.moves == [(OPEN, 2), (CLOSED, 0)]


def test_zero_failures_disables_the_breaker():
    """With a threshold of 0 the breaker never opens, however many failures, and never refuses."""
    b, clock, moves = breaker(failures=0)
    assert not b.enabled
    for _ in range(1000):
        b.attempt()
        b.failure()
        b.check()
    clock.advance(3600)
    b.attempt()
    assert b.state == CLOSED
    assert b.seconds_left() == 0.0
    assert moves.moves == []


def test_the_default_clock_is_real_monotonic_time():
    """Without a clock argument the breaker runs on time.monotonic (a whole cooldown is left just
    after opening)."""
    b = Breaker(1, 60.0)
    b.attempt()
    b.failure()
    assert 59.0 < b.seconds_left() <= 60.0
    assert refused(b) == 60


def test_refresh_reports_half_open_once_the_cooldown_is_over_without_a_request():
    """What /readyz and the metrics read: an open breaker whose cooldown is over is half-open
    (the move is made and told, once), with no request needed to find that out; before the
    cooldown is over it stays open, and refresh() moves nothing else."""
    b, clock, moves = breaker()
    assert b.refresh() == CLOSED
    open_breaker(b)
    clock.advance(COOLDOWN - 0.1)
    assert b.refresh() == OPEN
    clock.advance(0.1)
    assert b.refresh() == HALF_OPEN
    assert b.refresh() == HALF_OPEN
    assert moves.moves == [(OPEN, 3), (HALF_OPEN, 3)]
    b.attempt()  # the one trial, as after a lazy move
    assert refused(b) == 1
