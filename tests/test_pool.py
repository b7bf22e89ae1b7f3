"""The pool's waiting room at the edge of a request's budget (CONTRACT "The upstream exchange").

A request that waited in line for a connection and whose budget ran out as its
turn came is refused as overloaded: it never tries a connect that cannot
succeed in time, and the SME gateway is not counted as unreachable for it.
"""

from __future__ import annotations

import asyncio

import pytest

from catalyst_proxy.upstream import Breaker
from catalyst_proxy.upstream.failures import PoolOverloaded
from catalyst_proxy.upstream.pool import Pool


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
