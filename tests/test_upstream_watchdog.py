"""The upstream watchdog's spin: on while it catches answers, off while it only burns CPU."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from catalyst_proxy.upstream.connection import Connection
from catalyst_proxy.upstream.watchdog import PROBE_EVERY, RECHECK, SPIN_MISSES, Watchdog

SPIN = 0.002  # long enough for a loop turn or two to fall inside it on a loaded machine


class Wait:
    """A wait on the SME gateway as the watchdog sees it; records its expiry."""

    expired = False

    def expire(self, deadline: float) -> None:
        self.expired = True


async def _until_the_spin_ends(watchdog: Watchdog) -> None:
    while watchdog.spinning:
        await asyncio.sleep(0)  # one loop turn: the spin is a chain of loop callbacks


async def _answered_during_the_spin(watchdog: Watchdog) -> None:
    wait = Wait()
    watchdog.watch(wait, deadline=asyncio.get_running_loop().time() + 10)
    assert watchdog.spinning
    await asyncio.sleep(0)  # the answer comes in on the next loop turn, inside the spin
    watchdog.unwatch(wait)
    await _until_the_spin_ends(watchdog)


async def _outlasting_the_spin(watchdog: Watchdog) -> bool:
    """A wait still unanswered when the spin ends; whether it was spun for at all."""
    wait = Wait()
    watchdog.watch(wait, deadline=asyncio.get_running_loop().time() + 10)
    spun = watchdog.spinning
    await _until_the_spin_ends(watchdog)
    watchdog.unwatch(wait)
    return spun


async def _spun_for(watchdog: Watchdog, waits: int) -> list[bool]:
    return [await _outlasting_the_spin(watchdog) for _ in range(waits)]


async def test_spinning_stops_after_fruitless_spins_and_only_probes_then() -> None:
    """An upstream slower than the spin: SPIN_MISSES spins, then one every PROBE_EVERY waits."""
    watchdog = Watchdog(asyncio.get_running_loop(), spin=SPIN)
    try:
        assert await _spun_for(watchdog, SPIN_MISSES) == [True] * SPIN_MISSES
        spun = await _spun_for(watchdog, 3 * PROBE_EVERY)
        assert sum(spun) == 3  # the probes, ...
        assert [i for i, s in enumerate(spun) if s] == [PROBE_EVERY - 1, 2 * PROBE_EVERY - 1,
                                                        3 * PROBE_EVERY - 1]  # fmt: skip
    finally:
        watchdog.close()


async def test_one_answered_probe_turns_spinning_back_on() -> None:
    """The upstream became quick again: the probe that catches an answer restores the spin."""
    watchdog = Watchdog(asyncio.get_running_loop(), spin=SPIN)
    try:
        for _ in range(SPIN_MISSES):
            await _outlasting_the_spin(watchdog)
        for _ in range(PROBE_EVERY - 1):  # not spun for
            assert not await _outlasting_the_spin(watchdog)
        await _answered_during_the_spin(watchdog)  # the probe, and it catches the answer
        assert await _spun_for(watchdog, SPIN_MISSES) == [True] * SPIN_MISSES
    finally:
        watchdog.close()


async def test_answers_caught_by_the_spin_keep_it_on() -> None:
    """Misses short of SPIN_MISSES, each followed by an answered spin, never stop the spin."""
    watchdog = Watchdog(asyncio.get_running_loop(), spin=SPIN)
    try:
        for _ in range(10):
            for _ in range(SPIN_MISSES - 1):
                assert await _outlasting_the_spin(watchdog)
            await _answered_during_the_spin(watchdog)
    finally:
        watchdog.close()


async def test_a_wait_past_its_deadline_expires_and_is_no_answer() -> None:
    """The deadline tick expires an overdue wait; an expiry does not count as a caught answer."""
    loop = asyncio.get_running_loop()
    watchdog = Watchdog(loop, tick=0.001, spin=SPIN)
    try:
        for _ in range(SPIN_MISSES):
            wait = Wait()
            watchdog.watch(wait, deadline=loop.time())  # due at once
            async with asyncio.timeout(5):
                while not wait.expired:
                    await asyncio.sleep(0.001)  # the tick's own period: the event under test
            await _until_the_spin_ends(watchdog)
            watchdog.unwatch(wait)
        assert not await _outlasting_the_spin(watchdog)
    finally:
        watchdog.close()


class LoopClock:
    """The watchdog's side of an event loop, with a clock that moves only when told: ``now``,
    and the timers asked for (the test runs them, as the loop's looks)."""

    def __init__(self) -> None:
        self.now = 0.0
        self.timers: list[float] = []

    def time(self) -> float:
        return self.now

    def call_later(self, delay: float, callback: object, *args: object) -> asyncio.TimerHandle:
        self.timers.append(self.now + delay)
        return asyncio.get_running_loop().call_later(3600, lambda: None)  # cancelled by close()

    def call_soon(self, callback: object, *args: object) -> None:
        raise AssertionError("no spin here")

    def look(self, watchdog: Watchdog, at: float) -> None:
        """The clock moved to ``at``, and the watchdog's look that the loop runs then."""
        self.now = at
        watchdog._check()


@pytest.fixture
async def stepped() -> AsyncIterator[tuple[LoopClock, Watchdog]]:
    """A watchdog (no spin) on a ``LoopClock``, closed after the test."""
    clock = LoopClock()
    watchdog = Watchdog(clock, spin=0)  # type: ignore[arg-type]
    yield clock, watchdog
    watchdog.close()


async def test_a_deadline_passed_since_the_last_look_expires_at_the_next(
    stepped: tuple[LoopClock, Watchdog],
) -> None:
    """A wait expires at a look only if its deadline had passed by the look before (the loop
    has read its sockets since: an answer that came in time during a stall is read first).
    One whose deadline passed since the last look gets another look, RECHECK later; a wait
    that fell due during a stall is not expired by a look meant for another."""
    clock, watchdog = stepped
    first, second = Wait(), Wait()
    watchdog.watch(first, deadline=5.0)
    watchdog.watch(second, deadline=6.5)
    clock.look(watchdog, at=6.0)
    assert not first.expired  # due since the last look (at 0): read first
    assert clock.timers[-1] == 6.0 + RECHECK
    clock.look(watchdog, at=7.0)  # (a stall: the next look comes late)
    assert first.expired
    assert not second.expired  # fell due during the stall, after the look at 6
    clock.look(watchdog, at=7.0 + RECHECK)
    assert second.expired


async def test_waiting_again_with_the_same_deadline_gets_no_new_look(
    stepped: tuple[LoopClock, Watchdog],
) -> None:
    """A connection that waits again with the same deadline (a head trickling in, a byte at a
    time) is expired on the deadline's looks, not given a new second look with each wait:
    the budget holds, a tick or two late at most."""
    clock, watchdog = stepped
    wait = Wait()
    watchdog.watch(wait, deadline=5.0)
    clock.look(watchdog, at=5.5)
    assert not wait.expired
    watchdog.unwatch(wait)  # a byte came: the wait ends, and begins again
    watchdog.watch(wait, deadline=5.0)
    clock.look(watchdog, at=5.5 + RECHECK)
    assert wait.expired


async def test_a_deadline_expired_while_news_woke_the_wait_stays_expired() -> None:
    """A read that woke a wait in the loop turn of the watchdog's expiry (which then found it
    woken) does not save the deadline: the next wait for it (a head still incomplete) ends
    at once, rather than as a new wait with a new look for every byte a head trickles."""
    loop = asyncio.get_running_loop()
    watchdog = Watchdog(loop, spin=0)
    connection = Connection(loop, lambda _: None, watchdog)
    deadline = loop.time() - 1
    try:
        first = asyncio.ensure_future(connection._wait(deadline))
        await asyncio.sleep(0)  # one loop turn: the wait is watched
        connection._wake()  # a byte came ...
        connection.expire(deadline)  # ... and the watchdog's look, in the same turn
        assert await first is True
        again = asyncio.ensure_future(connection._wait(deadline))
        await asyncio.sleep(0)  # one loop turn, no look of the watchdog's in it
        assert again.done()
        assert again.result() is False
    finally:
        watchdog.close()
