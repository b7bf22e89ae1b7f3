"""``make soak``: a long mixed load against the gateway, looking for leaks (issue 4, section 9).

The gateway runs as a subprocess under ``python -X dev`` (ResourceWarnings and
asyncio's debug checks on; its stderr goes to a file that is scanned at the
end), ``serve --workers 1``, JSON logging on, metrics on. The upstream is an
aiohttp app inside this process that counts, per kind of request, the uploads
it received completely and the ones that broke off. Kinds of request, mixed at
random, paced to ``--rate`` per second over ``--concurrency`` clients:

* ``good``: a valid operator token, a random body (100 B .. 64 KiB); the
  upstream answers 200 with the byte count it read, which must match;
* ``bad-token``: expired, wrong key, HS256, junk, or none: 401, never upstream;
* ``upstream-5xx``: the upstream answers 503; it must come back verbatim;
* ``upstream-reset``: the upstream sends its headers and part of the body,
  then resets the connection: the client must see an aborted transfer;
* ``client-abort``: a raw socket declares a body of 4 KiB .. 512 KiB, sends a
  random part of it, waits 0..100 ms and goes away (RST or FIN): the upstream
  must never see that upload complete.

Measured: the gateway's RSS (every ``--sample-interval`` s; the slope is a
least-squares fit over the samples after ``--warmup``), its open file
descriptors before the load and after it has settled, its
``catalyst_proxy_requests_in_flight`` gauge before and after, the
ResourceWarning lines in its stderr, and its exit status on SIGTERM. Prints a
markdown summary; exits 1 if a threshold is exceeded.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import random
import re
import socket
import struct
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from aiohttp import web

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import common  # noqa: E402

KINDS = {  # kind -> weight
    "good": 50,
    "bad-token": 15,
    "upstream-5xx": 10,
    "upstream-reset": 10,
    "client-abort": 15,
}
UPSTREAM_5XX_BODY = b'{"error":"maintenance","detail":"soak upstream says no"}'
RESET_DECLARED, RESET_SENT = 4096, 1000
ID = re.compile(r"^soak-([a-z0-9-]+?)-(\d+)-L(\d+)$")


# ------------------------------------------------------------------ the upstream


class Upstream:
    """An aiohttp SME stand-in that counts complete and incomplete uploads per kind."""

    def __init__(self, material: common.Material) -> None:
        self.material = material
        self.complete: collections.Counter[str] = collections.Counter()
        self.incomplete: collections.Counter[str] = collections.Counter()
        self.aborted_completed: list[str] = []
        self.bridge_bad = 0
        self.bridge_checked = 0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        rid = request.headers.get("X-Request-ID", "")
        found = ID.match(rid)
        kind = found.group(1) if found else "unknown"
        auth = request.headers.get("Authorization", "")
        if random.random() < 0.05 or not auth.startswith("Bearer "):  # sample: HS256 is cheap
            self.bridge_checked += 1
            if common.verify_bridge(auth.removeprefix("Bearer "), self.material):
                self.bridge_bad += 1
        got = 0
        try:
            async for chunk in request.content.iter_any():
                got += len(chunk)
        except asyncio.CancelledError:
            self.incomplete[kind] += 1
            raise
        except Exception:  # the body broke off (connection lost, bad chunking)
            self.incomplete[kind] += 1
            raise
        self.complete[kind] += 1
        if kind == "client-abort":
            self.aborted_completed.append(f"{rid} ({got} bytes)")
        if kind == "upstream-5xx":
            return web.Response(status=503, body=UPSTREAM_5XX_BODY, content_type="application/json")
        if kind == "upstream-reset":
            resp = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
            resp.content_length = RESET_DECLARED
            await resp.prepare(request)
            await resp.write(b"{" + b"x" * (RESET_SENT - 1))
            await asyncio.sleep(0.005)
            transport = request.transport
            if transport is not None:
                sock = transport.get_extra_info("socket")
                if sock is not None:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                transport.abort()
            raise asyncio.CancelledError  # nothing more to send; aiohttp drops the request
        return web.json_response({"ok": True, "bytes": got})


# ------------------------------------------------------------------ the clients


class Load:
    def __init__(self, args: argparse.Namespace, material: common.Material, port: int) -> None:
        self.args = args
        self.material = material
        self.port = port
        self.url = f"http://127.0.0.1:{port}/api/v1/billing/purchase"
        self.sent: collections.Counter[str] = collections.Counter()
        self.outcomes: dict[str, collections.Counter[str]] = collections.defaultdict(
            collections.Counter
        )
        self.unexpected: collections.Counter[str] = collections.Counter()
        self.examples: dict[str, str] = {}
        self.seq = 0
        self.next_slot = 0.0
        self.stop_at = 0.0
        kinds = list(KINDS)
        self.choices = random.choices(kinds, [KINDS[k] for k in kinds], k=10_000)

    def note(self, kind: str, outcome: str, expected: bool) -> None:
        self.outcomes[kind][outcome] += 1
        if not expected:
            self.unexpected[kind] += 1
            self.examples.setdefault(f"{kind}: {outcome}", "")

    async def pace(self) -> bool:
        now = time.monotonic()
        self.next_slot = max(self.next_slot + 1 / self.args.rate, now)
        if self.next_slot >= self.stop_at:
            return False
        await asyncio.sleep(self.next_slot - now)
        return True

    async def client(self, session: aiohttp.ClientSession) -> None:
        while await self.pace():
            self.seq += 1
            kind = self.choices[self.seq % len(self.choices)]
            self.sent[kind] += 1
            try:
                if kind == "client-abort":
                    await self.abort_upload(self.seq)
                else:
                    await self.http(session, kind, self.seq)
            except Exception as exc:  # every failure is an outcome to report
                self.note(kind, f"client error {type(exc).__name__}", False)

    async def http(self, session: aiohttp.ClientSession, kind: str, seq: int) -> None:
        size = random.randint(100, 64 * 1024) if kind == "good" else random.randint(10, 2000)
        body = b'{"pad":"' + b"x" * (size - 10) + b'"}'
        headers = {"Content-Type": "application/json", "X-Request-ID": f"soak-{kind}-{seq}-L{size}"}
        if kind == "bad-token":
            _name, token = random.choice([*self.material.bad_tokens.items(), ("none", "")])
            if token:
                headers["Authorization"] = f"Bearer {token}"
        else:
            headers["Authorization"] = f"Bearer {random.choice(self.material.operators).token}"
        async with session.post(self.url, data=body, headers=headers) as resp:
            try:
                data = await resp.read()
            except aiohttp.ClientPayloadError:
                self.note(kind, f"{resp.status} aborted transfer", kind == "upstream-reset")
                return
        status = resp.status
        if kind == "good":
            ok = status == 200 and data == b'{"ok": true, "bytes": %d}' % size
            self.note(kind, f"{status}" + ("" if ok else " wrong body"), ok)
        elif kind == "bad-token":
            self.note(kind, str(status), status == 401)
        elif kind == "upstream-5xx":
            ok = status == 503 and data == UPSTREAM_5XX_BODY
            self.note(kind, f"{status}" + ("" if ok else " wrong body"), ok)
        else:  # upstream-reset answered cleanly: a short answer passed off as complete
            self.note(kind, f"{status} clean answer of {len(data)} bytes", False)

    async def abort_upload(self, seq: int) -> None:
        declared = random.randint(4096, 512 * 1024)
        offset = random.randrange(declared)
        token = random.choice(self.material.operators).token
        head = (
            f"POST /api/v1/billing/purchase HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n"
            f"Authorization: Bearer {token}\r\nContent-Type: application/json\r\n"
            f"X-Request-ID: soak-client-abort-{seq}-L{declared}\r\n"
            f"Content-Length: {declared}\r\n\r\n"
        ).encode()
        _reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        try:
            writer.write(head)
            sent = 0
            while sent < offset:
                n = min(16384, offset - sent)
                writer.write(b"y" * n)
                sent += n
                await writer.drain()
            await asyncio.sleep(random.random() * 0.1)
            rst = random.random() < 0.5
            if rst:
                sock = writer.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                writer.transport.abort()
            else:
                writer.close()
            self.note("client-abort", "reset sent" if rst else "closed", True)
        finally:
            if not writer.is_closing():
                writer.transport.abort()


# ------------------------------------------------------------------ gateway readings


def in_flight(port: int) -> float:
    _, text = common.http_get(f"http://127.0.0.1:{port}/metrics")
    total = 0.0
    for line in text.decode().splitlines():
        if line.startswith("catalyst_proxy_requests_in_flight"):
            total += float(line.rsplit(" ", 1)[1])
    return total


MIN_WARMUP = 120.0  # s: the RSS slope is judged only after this much warm-up ...
MIN_SLOPE_SPAN = 120.0  # ... and over at least this long


def slope_mb_per_min(samples: list[tuple[float, int]]) -> float:
    """Least-squares slope of RSS (kB) over time (s), in MB per minute."""
    if len(samples) < 3:
        return float("nan")
    xs = [t for t, _ in samples]
    ys = [kb / 1024 for _, kb in samples]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    cov = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
    return cov / var * 60 if var else float("nan")


async def soak(args: argparse.Namespace, work: Path) -> tuple[str, bool]:
    material = common.make_material(work, 16)
    git = common.git_state()  # the code the gateway is started with
    gw_port, up_port = args.port_base, args.port_base + 1

    upstream = Upstream(material)
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", upstream.handle)
    runner = web.AppRunner(app, access_log=None, keepalive_timeout=2.0, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", up_port)
    await site.start()

    env = common.gateway_env(material, f"http://127.0.0.1:{up_port}")
    stderr_file = work / "gateway.stderr"
    gateway = common.start(
        [sys.executable, "-X", "dev", "-m", "catalyst_proxy", "serve", "--host", "127.0.0.1",
         "--port", str(gw_port)],
        work / "gateway.log",
        env,
        err=stderr_file,
    )  # fmt: skip
    try:
        await asyncio.to_thread(common.wait_http, f"http://127.0.0.1:{gw_port}/readyz", gateway, 60)
        pid = gateway.pid
        await asyncio.sleep(1)
        start = {
            "rss": common.status_kb(pid, "VmRSS"),
            "fds": common.fd_count(pid),
            "in_flight": await asyncio.to_thread(in_flight, gw_port),
        }
        load = Load(args, material, gw_port)
        t0 = time.monotonic()
        load.next_slot = t0
        load.stop_at = t0 + args.seconds
        samples: list[tuple[float, int, int]] = []

        async def sampler() -> None:
            while time.monotonic() < load.stop_at:
                samples.append(
                    (time.monotonic() - t0, common.status_kb(pid, "VmRSS"), common.fd_count(pid))
                )
                await asyncio.sleep(args.sample_interval)

        connector = aiohttp.TCPConnector(limit=args.concurrency)
        timeout = aiohttp.ClientTimeout(total=15)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            cpu0 = common.cpu_seconds([pid])
            await asyncio.gather(
                sampler(), *(load.client(session) for _ in range(args.concurrency))
            )
            cpu1 = common.cpu_seconds([pid])
        elapsed = time.monotonic() - t0
        end_rss_loaded = common.status_kb(pid, "VmRSS")
        # Settle: idle upstream keep-alives close after 2 s; give descriptors time to go.
        deadline = time.monotonic() + args.settle
        while time.monotonic() < deadline and common.fd_count(pid) > start["fds"] + args.fd_slack:
            await asyncio.sleep(0.5)
        await asyncio.sleep(1)
        end = {
            "rss": common.status_kb(pid, "VmRSS"),
            "fds": common.fd_count(pid),
            "in_flight": await asyncio.to_thread(in_flight, gw_port),
        }
        peak_rss = common.status_kb(pid, "VmHWM")
    finally:
        exit_status = await asyncio.to_thread(common.stop, gateway, 30)
        await runner.cleanup()

    stderr = stderr_file.read_text(errors="replace")
    resource_warnings = sum("ResourceWarning" in line for line in stderr.splitlines())
    tracebacks = stderr.count("Traceback (most recent call last)")
    slow_callbacks = len(re.findall(r"Executing .* took [0-9.]+ seconds", stderr))
    warm = [(t, rss) for t, rss, _ in samples if t >= args.warmup]
    slope = slope_mb_per_min(warm)
    total = sum(load.sent.values())
    # Under -X dev the heap grows for the first ~90 s (the debug allocator, caches filling):
    # a slope over less than MIN_SLOPE_SPAN s after a warm-up that short says nothing.
    judged = args.warmup >= MIN_WARMUP and args.seconds - args.warmup >= MIN_SLOPE_SPAN
    slope_bound = (
        f"≤ {args.max_slope}"
        if judged
        else (f"not judged: needs --seconds ≥ {MIN_WARMUP + MIN_SLOPE_SPAN:g}")
    )

    checks = [
        ("RSS slope after warm-up, MB/min", f"{slope:+.3f}", slope_bound,
         slope <= args.max_slope or not judged),
        ("open file descriptors (before load / after settling)",
         f"{start['fds']} / {end['fds']}", f"≤ before + {args.fd_slack}",
         end["fds"] <= start["fds"] + args.fd_slack),
        ("requests in flight gauge (before / after)",
         f"{start['in_flight']:g} / {end['in_flight']:g}", "after ≤ before",
         end["in_flight"] <= start["in_flight"]),
        ("aborted uploads completed upstream", str(len(upstream.aborted_completed)), "0",
         not upstream.aborted_completed),
        ("bad-token requests that reached the upstream",
         str(upstream.complete["bad-token"] + upstream.incomplete["bad-token"]), "0",
         not (upstream.complete["bad-token"] + upstream.incomplete["bad-token"])),
        ("sampled bridge tokens that do not verify",
         f"{upstream.bridge_bad} of {upstream.bridge_checked}", "0", upstream.bridge_bad == 0),
        ("ResourceWarning lines in the gateway's stderr", str(resource_warnings), "0",
         resource_warnings <= args.max_resource_warnings),
        ("unexpected outcomes (see the mix)", str(sum(load.unexpected.values())), "0",
         not load.unexpected),
        ("gateway exit status on SIGTERM", str(exit_status), "0", exit_status == 0),
    ]  # fmt: skip
    ok = all(c[3] for c in checks)
    stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    out = [
        f"catalyst-proxy `make soak` — {stamp} — gateway: {common.describe_git(git)}, "
        f"`python -X dev -m catalyst_proxy serve` (1 worker) — {elapsed:.0f} s, "
        f"{total:,} requests ({total / elapsed:.0f}/s over {args.concurrency} clients), "
        f"gateway CPU {(cpu1 - cpu0) / max(total, 1) * 1e6:.0f} µs/request (debug mode)",
        "",
        "| kind | sent | outcomes at the client | upstream saw complete / broken off |",
        "|---|---|---|---|",
    ]
    for kind in KINDS:
        mix = ", ".join(f"{k}: {v:,}" for k, v in sorted(load.outcomes[kind].items()))
        out.append(
            f"| {kind} | {load.sent[kind]:,} | {mix} "
            f"| {upstream.complete[kind]:,} / {upstream.incomplete[kind]:,} |"
        )
    first = samples[0] if samples else (0, 0, 0)
    warm_first = warm[0] if warm else (0, 0)
    out += [
        "",
        "| memory | MB |",
        "|---|---|",
        f"| RSS before the load | {start['rss'] / 1024:.1f} |",
        f"| RSS at the first sample / at the end of warm-up ({args.warmup:g} s) | "
        f"{first[1] / 1024:.1f} / {warm_first[1] / 1024:.1f} |",
        f"| RSS at the end of the load / after settling | {end_rss_loaded / 1024:.1f} / "
        f"{end['rss'] / 1024:.1f} |",
        f"| peak RSS (VmHWM) | {peak_rss / 1024:.1f} |",
        f"| samples | {len(samples)} every {args.sample_interval:g} s, "
        f"{len(warm)} after warm-up; fds during the load {min(s[2] for s in samples)}"
        f"..{max(s[2] for s in samples)} |",
        "",
        "| check | value | threshold | verdict |",
        "|---|---|---|---|",
    ]
    out += [
        f"| {name} | {value} | {limit} | {'ok' if good else 'FAIL'} |"
        for name, value, limit, good in checks
    ]
    out += [
        "",
        f"Gateway stderr: {resource_warnings} ResourceWarning lines, {tracebacks} tracebacks, "
        f"{slow_callbacks} asyncio slow-callback warnings (debug mode, > 100 ms). "
        f"Work dir: {work}.",
    ]
    if upstream.aborted_completed:
        out.append(f"Aborted uploads completed upstream, first: {upstream.aborted_completed[:5]}")
    if load.examples:
        out.append(f"Unexpected outcomes: {sorted(load.examples)}")
    return "\n".join(out), ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--seconds", type=float, default=float(os.environ.get("SOAK_SECONDS", "600"))
    )
    parser.add_argument("--rate", type=float, default=150, help="requests per second [150]")
    parser.add_argument("--concurrency", type=int, default=16, help="concurrent clients [16]")
    parser.add_argument("--sample-interval", type=float, default=5, help="RSS/fd sampling [5]")
    parser.add_argument(
        "--warmup",
        type=float,
        help="seconds left out of the RSS slope [min(120, seconds/5)];"
        " the slope is judged only after 120 s of warm-up and over 120 s more",
    )
    parser.add_argument("--max-slope", type=float, default=1.0, help="MB/min [1.0]")
    parser.add_argument("--fd-slack", type=int, default=2, help="extra fds allowed at the end [2]")
    parser.add_argument("--max-resource-warnings", type=int, default=0)
    parser.add_argument("--settle", type=float, default=20, help="wait for fds to settle [20]")
    parser.add_argument(
        "--port-base",
        type=int,
        default=int(os.environ.get("SOAK_PORT_BASE", "19082")),
        help="gateway on this port, upstream on +1 [$SOAK_PORT_BASE or 19082]",
    )
    parser.add_argument("--workdir", help="keep keys and the gateway's logs here [a temp dir]")
    args = parser.parse_args(argv)
    if args.warmup is None:
        args.warmup = min(120.0, args.seconds / 5)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="catalyst-soak-"))
    work.mkdir(parents=True, exist_ok=True)
    text, ok = asyncio.run(soak(args, work))
    print(text)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
