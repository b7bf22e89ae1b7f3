"""``make bench``'s calibration row: the gateway with a known amount of CPU added to each request.

    python bench/burn.py serve --host 127.0.0.1 --port P   (CATALYST_BENCH_BURN_US=15)

Runs ``catalyst-proxy`` unchanged except that every proxied request first spins
for ``CATALYST_BENCH_BURN_US`` microseconds on the CPU (no memory, no system
call: a ``perf_counter`` loop) before the proxy's own work. ``make bench``
loads it exactly as ``gateway-keys-off`` and reports what that known cost reads
as, at saturation and at the fixed rate: on a small shared machine a cost
added to each request does not add up linearly in CPU time per request at
saturation (the processes that share the cores wake and sleep differently as
the gateway slows), and a row of known cost measures by how much, in the same
run as the rows it is read against. Bench-only: nothing here is in the wheel.
"""

from __future__ import annotations

import os
import sys
import time

from aiohttp import web

from catalyst_proxy import cli
from catalyst_proxy.dispatch import RequestInfo
from catalyst_proxy.proxy import Proxy
from catalyst_proxy.routes import Match

BURN_SECONDS = float(os.environ.get("CATALYST_BENCH_BURN_US", "0")) / 1e6
_handle = Proxy.handle


async def _burning_handle(
    self: Proxy, request: web.BaseRequest, info: RequestInfo, match: Match, query: str
) -> web.StreamResponse:
    until = time.perf_counter() + BURN_SECONDS
    while time.perf_counter() < until:
        pass
    return await _handle(self, request, info, match, query)


if __name__ == "__main__":
    Proxy.handle = _burning_handle  # type: ignore[method-assign]
    cli.main(sys.argv[1:])
