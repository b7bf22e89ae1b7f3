"""``make bench-floor``: what the server alone costs in latency at a fixed rate, before proxying.

    python bench/floor.py [--rounds 5] [--duration 5] [--rate 500] [--workers 1]
    python bench/floor.py serve aiohttp|raw PORT     (one of the two floors, by itself)

The added p50 at 500 requests/s is the one issue-8 target the gateway has not
met. This measures where the floor is: next to ``make bench``'s direct hit,
go-reference and gateway rows (the same nginx upstream, tokens and body), two
servers that answer every request at once with the upstream's fixed body and
do nothing else, on uvloop:

* ``floor-raw``: an asyncio ``Protocol`` on httptools' request parser, one
  ``write()`` per answer (what a server costs when it does nothing but parse);
* ``floor-aiohttp``: aiohttp's low-level ``web.Server`` (the gateway's server:
  its protocol, request, per-request task, response and writer), the handler
  reading the body and returning a ``web.Response``;

and, with the gateway's ``--workers``, ``lean-proxy`` (``bench/lean.py``): the
gateway's own work for a good purchase (session cache, role, mint, upstream
head, our upstream client, the answer's fields, the deferred access line and
metrics) behind the bare httptools protocol instead of aiohttp's server, the
floor of a server built for this one job (it is not one: see its docstring).

Each round measures every row in turn with ``bench/loadgen.py`` (open loop, 32
keep-alive connections), and the table gives the medians over the rounds of
each row's p50 and p99 and of its p50 minus the direct hit's in the same
round. The gap between the two floors is what aiohttp's server alone adds to
every answer at this rate. Nothing is checked but the statuses (every answer
200); ``make bench`` is the run that checks the answers. See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import common  # noqa: E402
import loadgen  # noqa: E402

import bench  # noqa: E402

FLOORS = ("floor-raw", "floor-aiohttp")
# past every make bench row's port
OFFSETS = {"floor-raw": 20, "floor-aiohttp": 21, "lean-proxy": 22}
ROWS = ("direct", "floor-raw", "floor-aiohttp", "lean-proxy", "go-reference", "gateway")
_ANSWER = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
ANSWER = _ANSWER % (len(bench.UPSTREAM_BODY), bench.UPSTREAM_BODY)  # the raw floor's, whole


# ---------------------------------------------------------------- the two floors


class _RawFloor(asyncio.Protocol):
    """httptools parses; every complete request gets the fixed answer, written after the parse."""

    def __init__(self) -> None:
        import httptools

        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._complete = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass

    def on_message_complete(self) -> None:  # httptools' callback: count only
        self._complete += 1

    def data_received(self, data: bytes) -> None:
        import httptools

        assert self._transport is not None
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            self._transport.close()
            return
        if self._complete:
            self._transport.write(ANSWER * self._complete)
            self._complete = 0


async def _serve(kind: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    if kind == "raw":
        await loop.create_server(_RawFloor, "127.0.0.1", port, backlog=1024)
    else:
        from aiohttp import web

        async def answer(request: web.BaseRequest) -> web.Response:
            await request.read()
            return web.Response(body=bench.UPSTREAM_BODY, content_type="application/json")

        await loop.create_server(web.Server(answer, access_log=None), "127.0.0.1", port,
                                 backlog=1024)  # fmt: skip
    await asyncio.Event().wait()  # until SIGTERM


# ---------------------------------------------------------------- the measurement


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:
        kind, port = argv[1], int(argv[2])
        if kind not in ("raw", "aiohttp"):
            raise SystemExit(f"floor: serve raw|aiohttp PORT, not {kind!r}")
        loadgen.run(_serve(kind, port))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="turns over every row [5]")
    parser.add_argument("--duration", type=float, default=5, help="recorded s per row per turn [5]")
    parser.add_argument("--rate", type=float, default=500, help="requests/s [500]")
    parser.add_argument("--workers", type=int, default=1, help="the gateway row's workers [1]")
    parser.add_argument(
        "--port-base", type=int, default=19480, help="as make bench's, another default [19480]"
    )
    args = parser.parse_args(argv)
    bench.ensure_tools([row for row in bench.ROWS if row.name in ROWS])
    # make bench's own options, so that every setting this tool does not name is its default
    run = bench.Bench(bench.parser().parse_args([
        "--targets", "direct,go-reference,gateway", "--port-base", str(args.port_base),
        "--workers", str(args.workers),
    ]))  # fmt: skip
    try:
        targets = {t.name: t for t in run.start()}
        for name in (*FLOORS, "lean-proxy"):
            port = args.port_base + OFFSETS[name]
            if not bench.port_free(port):
                raise SystemExit(f"floor: port {port} in use: choose another --port-base")
            if name == "lean-proxy":  # the gateway's environment, workers and path
                argv = [str(HERE / "lean.py"), "--port", str(port), "--workers", str(args.workers)]
                env = common.gateway_env(run.material, f"http://127.0.0.1:{run.up_port}")
                path = bench.GATEWAY_PATH
            else:
                argv = [str(HERE / "floor.py"), "serve", name.split("-")[1], str(port)]
                env, path = None, bench.UPSTREAM_PATH
            proc = common.start([sys.executable, *argv], run.work / f"{name}.log", env)
            run.procs.append(proc)
            common.wait_http(f"http://127.0.0.1:{port}/", proc, 10)
            targets[name] = bench.Target(name, "127.0.0.1", port, path, proc.pid,
                                         jwt=name == "lean-proxy")  # fmt: skip
        tokens = [op.token for op in run.material.operators]
        p50: dict[str, list[float]] = {name: [] for name in ROWS}
        p99: dict[str, list[float]] = {name: [] for name in ROWS}
        problems: list[str] = []
        for turn in range(args.rounds):
            for name in ROWS if turn % 2 == 0 else ROWS[::-1]:
                target = targets[name]
                requests = loadgen.build_requests(target.host, target.port, target.path, tokens,
                                                  run.body)  # fmt: skip
                result = loadgen.run(loadgen.fixed_rate(
                    target.host, target.port, requests, rate=args.rate,
                    duration=args.duration, warmup=2, conns=32,
                ))  # fmt: skip
                if result.errors or set(result.statuses) != {200}:
                    problems.append(f"{name}, round {turn + 1}: statuses "
                                    f"{dict(result.statuses)}, {result.errors} errors")  # fmt: skip
                p50[name].append(result.percentile(50) / 1000)
                p99[name].append(result.percentile(99) / 1000)
            print(f"[floor] round {turn + 1}: "
                  + ", ".join(f"{name} {values[-1]:.3f}" for name, values in p50.items()),
                  file=sys.stderr, flush=True)  # fmt: skip
    finally:
        run.stop()
        run.forget_work()  # (a temp dir: these tools take no --workdir)
    print(report(p50, p99, args))
    for problem in problems:
        print(f"PROBLEM: {problem}")
    return 1 if problems else 0


def report(
    p50: dict[str, list[float]], p99: dict[str, list[float]], args: argparse.Namespace
) -> str:
    lines = [
        f"Latency at {args.rate:g} requests/s (bench/loadgen.py, 32 connections), "
        f"{args.rounds} rounds of {args.duration:g} s per row, rows in turn; medians over the "
        f"rounds; the gateway with --workers {args.workers}:",
        "",
        "| row | p50 ms | p99 ms | p50 minus direct's, ms (quartiles) |",
        "|---|---|---|---|",
    ]
    for name in ROWS:
        added = [value - direct for value, direct in zip(p50[name], p50["direct"], strict=True)]
        q1, _, q3 = statistics.quantiles(added, n=4) if len(added) > 1 else (added * 3)
        lines.append(f"| {name} | {statistics.median(p50[name]):.3f} "
                     f"| {statistics.median(p99[name]):.2f} "
                     f"| {statistics.median(added):.3f} ({q1:.3f} to {q3:.3f}) |")  # fmt: skip
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    lines.append(f"\nMachine: load average {load} at the end; gateway: {common.git_state()}.")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
