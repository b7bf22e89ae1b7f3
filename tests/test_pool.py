"""The pool's waiting room at the edge of a request's budget (reference.md "The upstream exchange").

A request that waited in line for a connection and whose budget ran out as its
turn came is refused as overloaded: it never tries a connect that cannot
succeed in time, and the SME gateway is not counted as unreachable for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket

import pytest
import uvloop  # a dependency on Linux (pyproject.toml): its race test is never skipped

from catalyst_proxy.upstream import Breaker
from catalyst_proxy.upstream.client import Client
from catalyst_proxy.upstream.failures import ConnectFailed, PoolOverloaded
from catalyst_proxy.upstream.pool import Pool

from .support import eventually
from .test_breaker import black_hole


async def test_a_turn_that_comes_as_the_budget_runs_out_is_overloaded_not_unreachable() -> None:
    """The only connection is busy; a request waits with its budget all but spent; the busy
    exchange ends and hands the request the right to connect before its timer fires: it is
    refused with PoolOverloaded, the breaker counts nothing, and the next request connects."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(asyncio.Protocol, "127.0.0.1", 0)  # accepts, says nothing
    port = server.sockets[0].getsockname()[1]
    breaker = Breaker(1, 60.0)  # one connection failure would open it
    pool = Pool("127.0.0.1", port, tls=None, max_connections=1, max_pending=10,
                idle_seconds=15, breaker=breaker)  # fmt: skip
    try:
        busy = await pool.acquire(loop.time() + 5)
        waiting = asyncio.create_task(pool.acquire(loop.time()))  # no budget left
        await asyncio.sleep(0)  # it runs up to its wait in line (this turn, before us)
        assert pool.waiting == 1
        busy.abort()  # its place goes to the one in line, before its timer can fire
        with pytest.raises(PoolOverloaded):
            await waiting
        assert (breaker.state, breaker.failures) == ("closed", 0)
        fresh = await pool.acquire(loop.time() + 5)
        fresh.abort()
    finally:
        pool.close()
        server.close()
        await server.wait_closed()


async def test_a_turn_with_less_than_a_tenth_of_the_budget_left_is_overloaded() -> None:
    """With a budget of 1 s, a request whose turn in line comes with 50 ms left (under the
    floor, a tenth of the budget) is refused as overloaded, nothing connected or sent: written
    then, its answer could hardly come in time (a 504, "outcome unknown" for a purchase)."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(asyncio.Protocol, "127.0.0.1", 0)  # accepts, says nothing
    port = server.sockets[0].getsockname()[1]
    breaker = Breaker(1, 60.0)
    pool = Pool("127.0.0.1", port, tls=None, max_connections=1, max_pending=10,
                idle_seconds=15, breaker=breaker, budget=1.0)  # fmt: skip
    try:
        busy = await pool.acquire(loop.time() + 5)
        waiting = asyncio.create_task(pool.acquire(loop.time() + 0.05))
        await asyncio.sleep(0)  # it runs up to its wait in line (this turn, before us)
        assert pool.waiting == 1
        busy.abort()  # its place goes to the one in line, with ~50 ms of its budget left
        with pytest.raises(PoolOverloaded):
            await waiting
        assert (breaker.state, breaker.failures, pool.open) == ("closed", 0, 0)
    finally:
        pool.close()
        server.close()
        await server.wait_closed()


async def test_a_connect_after_a_wait_in_line_that_times_out_counts_in_the_breaker() -> None:
    """A request waits in line while the only connection attempt hangs (a host that drops
    SYNs); the attempt is given up and the request's turn comes with 0.3 s of its 1 s budget
    left (over the floor): its own connect times out too, and that counts: ConnectFailed
    (503 unreachable), and the breaker, which one failure opens, opens. With a full pool every
    connect comes after a wait: sparing those, a gateway gone dark never opened it."""
    loop = asyncio.get_running_loop()
    breaker = Breaker(1, 60.0)
    with black_hole() as hole:
        pool = Pool("127.0.0.1", hole.port, tls=None, max_connections=1, max_pending=10,
                    idle_seconds=15, breaker=breaker, budget=1.0)  # fmt: skip
        try:
            first = asyncio.create_task(pool.acquire(loop.time() + 5))
            await eventually(lambda: hole.attempts() == 1)
            waiting = asyncio.create_task(pool.acquire(loop.time() + 0.3))
            await eventually(lambda: pool.waiting == 1)
            first.cancel()  # given up (its client left): the slot goes to the one in line
            with contextlib.suppress(asyncio.CancelledError):
                await first
            with pytest.raises(ConnectFailed):
                await waiting
            assert breaker.state == "open"
        finally:
            pool.close()


async def test_a_connection_handed_over_as_the_budget_runs_out_is_passed_on_unused() -> None:
    """The only connection is busy; a request waits with its budget all but spent; the busy
    exchange ends and the connection is handed to it: it is refused with PoolOverloaded
    before a byte is written, and the connection, unused, serves the next request."""
    requests: list[bytes] = []

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while head := await reader.readuntil(b"\r\n\r\n"):
                requests.append(head)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    loop = asyncio.get_running_loop()
    client = Client(f"http://127.0.0.1:{port}", timeout=5.0, max_connections=1, max_pending=10,
                    idle_seconds=15, breaker=Breaker(5, 5.0))  # fmt: skip
    await client.start()
    try:
        busy = await client.request(b"GET", b"/first", b"", None, None)
        assert busy.complete
        assert busy.body() == b"ok"
        waiting = asyncio.create_task(client.pool.acquire(loop.time()))  # no budget left
        await asyncio.sleep(0)  # it runs up to its wait in line (this turn, before us)
        assert client.pool.waiting == 1
        busy.release()  # the connection goes to the one in line
        with pytest.raises(PoolOverloaded):
            await waiting
        assert client.pool.idle == 1  # passed on unused
        nxt = await client.request(b"GET", b"/next", b"", None, None)
        assert nxt.body() == b"ok"
        nxt.release()
        assert [head.split(b" ")[1] for head in requests] == [b"/first", b"/next"]
        assert client.pool.open == 1
    finally:
        await client.close()
        server.close()
        await server.wait_closed()


def test_a_connect_cancelled_as_it_completes_leaves_no_socket_open() -> None:
    """Under uvloop, a request cancelled (its client gone, or its deadline) in the very loop
    pass its new connection is made: uvloop closes the transport without calling the
    protocol's ``connection_lost()``. The connection's second descriptor of the socket (kept
    to read an early answer after a reset) must not outlive it: no descriptor stays open in
    the gateway, and every connection the upstream accepted is closed from our side."""
    trials = 50

    def descriptors() -> int:
        return len(os.listdir("/proc/self/fd"))

    async def scenario() -> tuple[int, int, int, int]:
        loop = asyncio.get_running_loop()
        accepted = 0
        ended = asyncio.Event()
        closed = 0

        writers: list[asyncio.StreamWriter] = []

        async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal accepted, closed
            accepted += 1
            writers.append(writer)
            await reader.read()  # our side's close
            writer.close()
            await writer.wait_closed()
            closed += 1
            if closed == trials:
                ended.set()

        server = await asyncio.start_server(hold, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        pool = Pool("127.0.0.1", port, tls=None, max_connections=trials, max_pending=10,
                    idle_seconds=15, breaker=Breaker(1000, 60.0))  # fmt: skip
        before = descriptors()
        cancelled = 0
        for _ in range(trials):
            wake, nudge = socket.socketpair()
            task = loop.create_task(pool.acquire(loop.time() + 5))
            await asyncio.sleep(0)  # the connect is on its way
            nudge.send(b"x")  # ready in the same poll as the connect's completion

            def cancel(task: asyncio.Task[object] = task, wake: socket.socket = wake) -> None:
                loop.remove_reader(wake.fileno())
                task.cancel()

            loop.add_reader(wake.fileno(), cancel)
            try:
                (await task).abort()  # (the connect won the race this time)
            except asyncio.CancelledError:
                cancelled += 1
            wake.close()
            nudge.close()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(10):
                await ended.wait()
        left = descriptors() - before
        for writer in writers:  # those still open (a failure): let their handlers end
            writer.transport.abort()
        pool.close()
        server.close()
        await server.wait_closed()
        return cancelled, accepted, closed, left

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        cancelled, accepted, closed, left = runner.run(scenario())
    assert cancelled > 0  # the race was run, not only the connects that won it
    assert accepted == closed == trials
    assert left == 0
