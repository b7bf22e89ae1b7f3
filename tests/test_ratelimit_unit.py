"""The in-process rate-limit counters on a fake clock (reference.md: "Rate limits").

``MemoryCounters`` is the sliding window counter: the count of the current
window plus the previous window's, weighted by how much of it still overlaps
the last period. Windows are aligned to the clock (``now // period``), so a
fake clock that starts on a day boundary puts every hit exactly where a test
wants it: ``at(window, fraction)`` is "this far into that window". Nothing here
waits: the clock moves only when a test moves it.
"""

from __future__ import annotations

import asyncio

import pytest
from structlog.testing import capture_logs

from catalyst_proxy import log
from catalyst_proxy.config import Rate, parse_rate_limit
from catalyst_proxy.errors import RateLimited, RateLimitStoreUnavailable
from catalyst_proxy.metrics import Metrics
from catalyst_proxy.ratelimit import (
    MAX_MEMORY_KEYS,
    STORE_ERROR_LOG_EVERY,
    MemoryCounters,
    RateLimiter,
)
from catalyst_proxy.routes import DEFAULT_ROUTES
from catalyst_proxy.store import StoreUnavailable

from .support import eventually

T0 = 86_400.0 * 20_000  # a day boundary, so also a second, minute and hour boundary
EPSILON = 1e-3  # "just before" / "just after" a moment the counters compute
PER_MINUTE = Rate(3, "minute")
ROUTE = DEFAULT_ROUTES[0].path


class FakeClock:
    """The counters' ``time.time``: moves only when the test says so."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def at(self, window: int, fraction: float, period: float = 60) -> None:
        """Put the clock ``fraction`` of the way into window ``window`` (0 starts at T0)."""
        self.now = T0 + (window + fraction) * period

    def advance(self, seconds: float) -> None:
        self.now += seconds


async def hits(counters: MemoryCounters, count: int, rate: Rate = PER_MINUTE, key: str = "k"):
    """``count`` hits on ``key``; the waits they report (0.0 for each one allowed)."""
    return [await counters.hit(key, rate) for _ in range(count)]


# --- one window ------------------------------------------------------------------------------


async def test_the_amount_is_allowed_then_the_next_is_refused():
    """Within one window the first `amount` hits are allowed and the next one is refused."""
    clock = FakeClock()
    clock.at(0, 0.25)
    counters = MemoryCounters(clock=clock)
    waits = await hits(counters, 4)
    assert waits[:3] == [0.0, 0.0, 0.0]
    assert waits[3] > 0


async def test_keys_and_rates_count_apart():
    """Each key has its own budget: one key over its limit leaves another untouched."""
    clock = FakeClock()
    counters = MemoryCounters(clock=clock)
    assert (await hits(counters, 4, key="a"))[3] > 0
    assert await hits(counters, 3, key="b") == [0.0, 0.0, 0.0]


async def test_the_wait_is_when_the_next_hit_fits_after_a_full_window():
    """With the whole budget spent in this window, the reported wait is the moment the weighted
    count leaves room again: the end of the window plus 1/amount of the next (65 s here)."""
    clock = FakeClock()
    clock.at(0, 0.25)
    counters = MemoryCounters(clock=clock)
    wait = (await hits(counters, 4))[3]
    # 3 * (1 - f) + 0 + 1 <= 3 once f >= 1/3 of the next window: 45 s + 20 s.
    assert wait == pytest.approx(65.0)
    start = clock.now
    clock.now = start + wait - EPSILON
    assert await counters.hit("k", PER_MINUTE) > 0
    clock.now = start + wait + EPSILON
    assert await counters.hit("k", PER_MINUTE) == 0.0


async def test_a_budget_of_one_waits_for_the_end_of_the_next_window():
    """With `1/minute`, a hit's weight lasts until the end of the next window, so that is the
    wait reported (105 s from a quarter into this one)."""
    clock = FakeClock()
    clock.at(0, 0.25)
    counters = MemoryCounters(clock=clock)
    rate = Rate(1, "minute")
    assert (await hits(counters, 2, rate))[1] == pytest.approx(105.0)
    clock.at(1, 0.99)
    assert await counters.hit("k", rate) > 0
    clock.at(2, EPSILON)
    assert await counters.hit("k", rate) == 0.0


# --- the window before ----------------------------------------------------------------------


async def test_the_previous_window_is_weighted_by_its_overlap():
    """Halfway into the next window the previous window's 3 hits weigh 1.5: one more hit fits,
    the one after does not, and the wait reported ends when 2/3 of the window has gone by."""
    clock = FakeClock()
    clock.at(0, 0.5)
    counters = MemoryCounters(clock=clock)
    assert await hits(counters, 3) == [0.0, 0.0, 0.0]
    clock.at(1, 0.5)
    first, second = await hits(counters, 2)
    assert first == 0.0
    # 3 * (1 - f) + 1 + 1 <= 3 once f >= 2/3: 10 s after the half.
    assert second == pytest.approx(10.0)
    clock.at(1, 2 / 3)
    clock.advance(-EPSILON)
    assert await counters.hit("k", PER_MINUTE) > 0
    clock.advance(2 * EPSILON)
    assert await counters.hit("k", PER_MINUTE) == 0.0
    assert await counters.hit("k", PER_MINUTE) > 0  # 1 + 2 + 1 > 3


async def test_no_double_burst_at_a_window_edge():
    """A full budget spent at the very end of a window still counts (almost) whole just after
    the edge: the next window does not hand out a second full budget at once."""
    clock = FakeClock()
    clock.at(0, 0.999)
    counters = MemoryCounters(clock=clock)
    assert await hits(counters, 3) == [0.0, 0.0, 0.0]
    clock.at(1, 0.001)
    assert (await hits(counters, 1))[0] > 0


async def test_a_wait_ending_at_the_window_edge():
    """When only the rest of the previous window's weight is in the way, the wait ends exactly
    where the window does, and the next window counts this one's hits as the previous."""
    clock = FakeClock()
    clock.at(0, 0.5)
    counters = MemoryCounters(clock=clock)
    await hits(counters, 3)
    clock.at(1, 0.9)
    # 3 * 0.1 = 0.3: two more fit (0.3 + 2 + 1 > 3 for a third), and with the third the
    # previous window's weight has to go entirely: the wait is the 6 s left of this window.
    waits = await hits(counters, 3)
    assert waits[:2] == [0.0, 0.0]
    assert waits[2] == pytest.approx(6.0)
    clock.at(2, EPSILON)
    # Now the previous window is the one with 2 hits, weighing 2 * (1 - f): one fits, and
    # with it the next waits for f = 1/2.
    assert await hits(counters, 2) == [0.0, pytest.approx((0.5 - EPSILON) * 60)]


async def test_a_window_with_no_hits_between_forgets_the_old_count():
    """Hits two windows ago weigh nothing: the whole budget is back."""
    clock = FakeClock()
    clock.at(0, 0.9)
    counters = MemoryCounters(clock=clock)
    assert (await hits(counters, 4))[3] > 0
    clock.at(2, 0.0)
    waits = await hits(counters, 4)
    assert waits[:3] == [0.0, 0.0, 0.0]
    assert waits[3] > 0


async def test_refused_hits_are_not_counted():
    """A refused hit spends nothing: however many were refused, the next window weighs only
    the hits that were allowed."""
    clock = FakeClock()
    clock.at(0, 0.0)
    counters = MemoryCounters(clock=clock)
    waits = await hits(counters, 50)
    assert waits.count(0.0) == 3
    clock.at(1, 1 / 3 + EPSILON)  # 3 allowed hits weigh just under 2 now: one fits
    assert await counters.hit("k", PER_MINUTE) == 0.0


# --- the bound ---------------------------------------------------------------------------


async def test_the_least_recently_used_counter_goes_first():
    """Over `limit` keys the least recently used one is dropped (and starts afresh); a key
    used since stays, its count intact."""
    clock = FakeClock()
    counters = MemoryCounters(clock=clock, limit=2)
    rate = Rate(1, "minute")
    assert await counters.hit("a", rate) == 0.0
    assert await counters.hit("b", rate) == 0.0
    assert await counters.hit("a", rate) > 0  # refused, but used: "b" is now the oldest
    assert await counters.hit("c", rate) == 0.0
    assert len(counters) == 2
    assert await counters.hit("a", rate) > 0  # kept, still over its limit
    assert await counters.hit("b", rate) == 0.0  # dropped: a fresh budget ("c" goes now)
    assert len(counters) == 2
    assert await counters.hit("c", rate) == 0.0  # dropped in turn
    assert await counters.hit("a", rate) == 0.0  # and now "a" was the oldest


async def test_the_default_bound():
    """By default the process keeps at most MAX_MEMORY_KEYS counters, however many operators."""
    counters = MemoryCounters(clock=FakeClock())
    for index in range(MAX_MEMORY_KEYS + 10):
        await counters.hit(f"op-{index}", PER_MINUTE)
    assert len(counters) == MAX_MEMORY_KEYS


# --- the limiter's answer on these counters ------------------------------------------------


def limiter(spec: str, clock: FakeClock, metrics: Metrics | None = None) -> RateLimiter:
    return RateLimiter(
        DEFAULT_ROUTES,
        parse_rate_limit(spec),
        MemoryCounters(clock=clock),
        refuse_on_store_error=False,
        metrics=metrics or Metrics(),
    )


async def outcomes(rate_limiter: RateLimiter, count: int, sub: str = "op-1") -> list[str]:
    """``ok`` or the refusal's RateLimit field, for ``count`` checks in a row."""
    out = []
    for _ in range(count):
        try:
            await rate_limiter.check(ROUTE, sub)
        except RateLimited as refused:
            out.append(refused.headers["RateLimit"])
        else:
            out.append("ok")
    return out


async def test_the_refusal_headers_carry_the_wait_in_whole_seconds():
    """A refusal is 429 rate-limited whose Retry-After and RateLimit `t` are the counters'
    wait in whole seconds, with the route's policy."""
    clock = FakeClock()
    clock.at(0, 0.25)
    rate_limiter = limiter("4/minute", clock)
    assert await outcomes(rate_limiter, 4) == ["ok"] * 4
    with pytest.raises(RateLimited) as caught:
        await rate_limiter.check(ROUTE, "op-1")
    assert (caught.value.status, caught.value.code) == (429, "rate-limited")
    # (1 - 1/4) of this window + 1/4 of the next = 60 s
    assert caught.value.headers == {
        "Retry-After": "60",
        "RateLimit-Policy": '"4-per-minute";q=4;w=60',
        "RateLimit": '"4-per-minute";r=0;t=60',
    }


async def test_a_wait_under_a_second_is_reported_as_one():
    """Retry-After is never 0: a wait of 0.3 s is announced as 1 s."""
    clock = FakeClock()
    clock.at(0, 0.0)
    rate_limiter = limiter("4/minute", clock)
    assert await outcomes(rate_limiter, 4) == ["ok"] * 4
    clock.at(1, 0.745)  # 4 * 0.255 = 1.02 left of the previous window: two more fit
    assert await outcomes(rate_limiter, 2) == ["ok", "ok"]
    with pytest.raises(RateLimited) as caught:  # the third waits for f = 0.75: 0.3 s
        await rate_limiter.check(ROUTE, "op-1")
    assert caught.value.headers["Retry-After"] == "1"
    assert caught.value.headers["RateLimit"] == '"4-per-minute";r=0;t=1'


async def test_each_rate_of_a_policy_is_enforced_and_named():
    """With several rates the policy lists them all and a refusal names the one exceeded."""
    clock = FakeClock()
    rate_limiter = limiter("5/second;7/hour", clock)
    assert rate_limiter.policy_header(ROUTE) == ('"5-per-second";q=5;w=1, "7-per-hour";q=7;w=3600')
    assert await outcomes(rate_limiter, 6) == ["ok"] * 5 + ['"5-per-second";r=0;t=2']
    clock.advance(5)
    got = await outcomes(rate_limiter, 3)
    assert got[:2] == ["ok", "ok"]
    assert got[2].startswith('"7-per-hour";r=0;t=')
    assert 1 <= int(got[2].rpartition("=")[2]) <= 2 * 3600


@pytest.mark.parametrize("spec", ["2/second;3/minute", "3/minute;2/second"])
async def test_a_request_over_several_rates_is_told_the_longest_wait(spec):
    """A request over more than one rate is told the wait of the one that frees last (its
    name in RateLimit, its wait in Retry-After), whatever their order: a client that waits
    the time it is told is not refused again by the other rate."""
    clock = FakeClock()
    clock.at(0, 0.0)
    rate_limiter = limiter(spec, clock)
    assert await outcomes(rate_limiter, 1) == ["ok"]
    clock.advance(2.5)
    assert await outcomes(rate_limiter, 2) == ["ok", "ok"]  # the minute's 3 spent
    with pytest.raises(RateLimited) as caught:  # over the second's 2 and the minute's 3
        await rate_limiter.check(ROUTE, "op-1")
    wait = int(caught.value.headers["Retry-After"])
    assert wait > 2
    assert caught.value.headers["RateLimit"] == f'"3-per-minute";r=0;t={wait}'
    clock.advance(wait + EPSILON)
    assert await outcomes(rate_limiter, 1) == ["ok"]


@pytest.mark.parametrize("spec", ["1/minute;3/hour", "3/hour;1/minute"])
async def test_a_request_refused_by_one_rate_spends_nothing_of_the_others(spec):
    """A request refused by one of the route's rates is not counted against the others, so
    the order the rates are written in does not matter: after one request served and two
    refused by the minute, two minutes later the hour still has room."""
    clock = FakeClock()
    clock.at(0, 0.0)
    rate_limiter = limiter(spec, clock)
    assert await outcomes(rate_limiter, 3) == ["ok"] + ['"1-per-minute";r=0;t=120'] * 2
    clock.advance(2 * 60 + EPSILON)
    assert await outcomes(rate_limiter, 1) == ["ok"]


class RoundTripCounters(MemoryCounters):
    """The in-process counters with a shared store's timing: every hit suspends once, as a
    round trip to Redis does, so that concurrent requests interleave between them."""

    async def hit(self, key: str, rate: Rate, *, count: bool = True) -> float:
        await asyncio.sleep(0)  # one loop turn: the reply is not back yet
        return await super().hit(key, rate, count=count)


@pytest.mark.parametrize("spec", ["10/minute;3/second", "3/second;10/minute"])
async def test_a_burst_refused_by_a_short_rate_does_not_spend_a_long_one(spec):
    """20 concurrent requests against 3/second and 10/minute on a store with round trips:
    3 served. Those the second refuses must not have been counted against the minute
    (counted in the order written, 10/minute first, they spent all of it, and the operator
    was locked out for a minute after 3 requests): 2.5 s later 3 more are served. And every
    refusal names a rate the request is over, with its longest wait."""
    clock = FakeClock()
    clock.at(0, 0.0)
    rate_limiter = RateLimiter(DEFAULT_ROUTES, parse_rate_limit(spec),
                               RoundTripCounters(clock=clock), refuse_on_store_error=False,
                               metrics=Metrics())  # fmt: skip
    burst = await asyncio.gather(*(outcomes(rate_limiter, 1) for _ in range(20)))
    assert sorted(burst) == [['"3-per-second";r=0;t=2']] * 17 + [["ok"]] * 3
    clock.advance(2.5)  # the second's window and the one before it: past
    assert await outcomes(rate_limiter, 3) == ["ok"] * 3


class RetestFails(RoundTripCounters):
    """Round-trip counters whose store fails every test made once a counted hit was refused:
    a store that goes down between the count and the query for the wait."""

    refused = False

    async def hit(self, key: str, rate: Rate, *, count: bool = True) -> float:
        if not count and self.refused:
            raise StoreUnavailable("the store went away")
        wait = await super().hit(key, rate, count=count)
        self.refused = self.refused or bool(count and wait)
        return wait


async def test_a_request_the_store_refused_stays_refused_if_the_store_then_fails():
    """A count the store refused, followed by a store error while asking for the longest wait:
    still 429 (the store said no), never served as if the store were down (``allow``)."""
    clock = FakeClock()
    clock.at(0, 0.0)
    rate_limiter = RateLimiter(DEFAULT_ROUTES, parse_rate_limit("3/second;10/minute"),
                               RetestFails(clock=clock), refuse_on_store_error=False,
                               metrics=Metrics())  # fmt: skip
    burst = await asyncio.gather(*(outcomes(rate_limiter, 1) for _ in range(20)))
    assert sum(result == ["ok"] for result in burst) == 3


class FailsAfterARefusal(MemoryCounters):
    """Counters whose store fails at the next question once one test has found no room."""

    refused = False

    async def hit(self, key: str, rate: Rate, *, count: bool = True) -> float:
        if self.refused:
            raise StoreUnavailable("the store went away")
        wait = await super().hit(key, rate, count=count)
        self.refused = bool(not count and wait)
        return wait


async def test_a_rate_found_full_stays_a_refusal_if_the_store_fails_on_the_next_rate():
    """The test of every rate before counting: one rate found without room, then a store
    error on the next: 429 all the same (the store said no), never served as if the store
    were down (``allow``)."""
    clock = FakeClock()
    clock.at(0, 0.0)
    counters = FailsAfterARefusal(clock=clock)
    rate_limiter = RateLimiter(DEFAULT_ROUTES, parse_rate_limit("3/second;100/minute"), counters,
                               refuse_on_store_error=False, metrics=Metrics())  # fmt: skip
    assert await outcomes(rate_limiter, 3) == ["ok"] * 3
    assert await outcomes(rate_limiter, 1) == ['"3-per-second";r=0;t=2']


class DownCounters:
    """Counters whose store cannot answer at all (every hit a store error)."""

    async def hit(self, key: str, rate: Rate, *, count: bool = True) -> float:
        raise StoreUnavailable("a value the gateway cannot use is stored under this key")


@pytest.mark.parametrize("refuse", [False, True], ids=["allow", "refuse"])
async def test_store_errors_are_logged_throttled_with_their_count(refuse):
    """Every store error is logged (the contract: `allow` is "counted in the metrics and
    logged"), also one the store's state never shows (a key's own error reply): the first
    at once, then at most one line per STORE_ERROR_LOG_EVERY seconds, whose `requests`
    says how many met an error since the line before; nothing of the operator in it."""
    clock = FakeClock(0.0)
    metrics = Metrics()
    rate_limiter = RateLimiter(DEFAULT_ROUTES, parse_rate_limit("3/minute"), DownCounters(),
                               refuse_on_store_error=refuse, metrics=metrics,
                               clock=clock)  # fmt: skip

    async def errors(count: int) -> None:
        for _ in range(count):
            try:
                await rate_limiter.check(ROUTE, "op-secretive")
            except RateLimitStoreUnavailable:
                assert refuse
            else:
                assert not refuse

    with capture_logs() as logs:
        await errors(5)
        clock.now += STORE_ERROR_LOG_EVERY - EPSILON
        await errors(3)
        clock.now += EPSILON
        await errors(2)
    lines = [line for line in logs if line["event"] == log.RATE_LIMIT_STORE_ERROR]
    decision = "refused" if refuse else "allowed"
    # The first error at once; the next line at the first error STORE_ERROR_LOG_EVERY later,
    # counting the 4 + 3 held back and itself; the last one waits for the next line.
    assert [(line["requests"], line["decision"], line["log_level"]) for line in lines] == [
        (1, decision, "warning"),
        (4 + 3 + 1, decision, "warning"),
    ]
    assert all(line["reason"].startswith("a value the gateway cannot") for line in lines)
    assert not any("op-secretive" in repr(line) for line in logs)


async def test_store_errors_held_back_are_logged_at_the_end_of_their_window():
    """Store errors held back by the throttle are told even when no error follows them (an
    outage that ends, or a burst): one line at the end of their window, with their count, so
    that the lines' counts add up to the errors (as the metric counts them)."""
    loop = asyncio.get_running_loop()
    rate_limiter = RateLimiter(DEFAULT_ROUTES, parse_rate_limit("3/minute"), DownCounters(),
                               refuse_on_store_error=False, metrics=Metrics(), clock=loop.time,
                               log_every=0.05)  # fmt: skip

    def lines() -> list[int]:
        return [line["requests"] for line in logs if line["event"] == log.RATE_LIMIT_STORE_ERROR]

    with capture_logs() as logs:
        for _ in range(4):
            await rate_limiter.check(ROUTE, "op-1")
        assert lines() == [1]  # the other three held back, and no error comes after them
        await eventually(lambda: lines() == [1, 3])
        await rate_limiter.check(ROUTE, "op-1")  # (within the window the last line began)
        await eventually(lambda: len(lines()) == 3)
    assert lines() == [1, 3, 1]
    assert sum(lines()) == 5  # every error, as the metric counts them


async def test_operators_and_routes_have_their_own_budgets():
    """The limiter keys counters by route and operator: neither shares another's budget."""
    clock = FakeClock()
    rate_limiter = limiter("1/minute", clock)
    assert await outcomes(rate_limiter, 2) == ["ok", '"1-per-minute";r=0;t=120']
    assert await outcomes(rate_limiter, 1, sub="op-2") == ["ok"]
    await rate_limiter.check(DEFAULT_ROUTES[1].path, "op-1")  # another row: allowed
    # A sub that looks like a key separator is still one operator of its own.
    assert await outcomes(rate_limiter, 1, sub="op-1/0") == ["ok"]


def test_the_policy_header_is_the_structured_field_list():
    """RateLimit-Policy lists `"N-per-PERIOD";q=N;w=SECONDS` items, comma-separated, in order."""
    rate_limiter = limiter("30 per minute; 500/hours ;2/DAY", FakeClock())
    assert rate_limiter.policy_header(ROUTE) == (
        '"30-per-minute";q=30;w=60, "500-per-hour";q=500;w=3600, "2-per-day";q=2;w=86400'
    )
