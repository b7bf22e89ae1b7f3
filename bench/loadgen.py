"""An open-loop, fixed-rate HTTP/1.1 load generator (what Debian's wrk lacks: wrk2's -R).

Requests are due at ``t0 + i / rate``, whatever the target does: a slow answer
does not delay the next request (open loop). They go out on a pool of keep-alive
connections (32 by default). Latency is measured

* from the moment the request was *due* when it had to wait for a free
  connection (the target fell behind: the wait is the target's fault, so it is
  counted; this is the correction for coordinated omission);
* from the moment it was *sent* otherwise, so the event loop's timer slack
  (about 1 ms granularity in both asyncio and uvloop) is not charged to the target.

Timestamps use ``time.perf_counter()`` (uvloop's ``loop.time()`` has millisecond
resolution); the end of a response is stamped in ``data_received``, before any
task is scheduled. Requests are prebuilt bytes; the response parser handles
``Content-Length`` and chunked bodies, one request at a time per connection.
With ``idempotency_prefix`` every request also carries ``Idempotency-Key:
<prefix>-<index>``, a key never sent before, joined in as the request goes out.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


def build_requests(
    host: str, port: int, path: str, tokens: Sequence[str], body: bytes
) -> list[bytes]:
    """One prebuilt POST per token (an empty token list: one request without Authorization)."""
    out = []
    for token in tokens or [""]:
        auth = f"Authorization: Bearer {token}\r\n" if token else ""
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\n{auth}"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        out.append(head.encode() + body)
    return out


class _Conn(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.waiter: asyncio.Future[tuple[int, float]] | None = None
        self.closed = False
        self.status = 0
        self.length: int | None = None  # body bytes still expected (Content-Length)
        self.chunked = False
        self.in_body = False
        self.keep_alive = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("connection closed mid-response"))

    def send(self, data: bytes) -> asyncio.Future[tuple[int, float]]:
        assert self.transport is not None
        self.waiter = asyncio.get_running_loop().create_future()
        self.buf.clear()
        self.in_body = False
        self.transport.write(data)
        return self.waiter

    def _done(self) -> None:
        now = time.perf_counter()
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result((self.status, now))

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.in_body:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buf[:end]).lower()
            del self.buf[: end + 4]
            self.status = int(head[9:12])
            self.chunked = b"\r\ntransfer-encoding: chunked" in head
            self.keep_alive = b"\r\nconnection: close" not in head
            self.length = None
            marker = head.find(b"\r\ncontent-length:")
            if marker >= 0:
                line_end = head.find(b"\r\n", marker + 2)
                self.length = int(head[marker + 17 : line_end if line_end > 0 else None])
            self.in_body = True
        if self.chunked:
            if self._chunked_complete():
                self._done()
        elif self.length is not None and len(self.buf) >= self.length:
            self._done()
        # (no length, not chunked: ends at connection close; our targets never do that)

    def _chunked_complete(self) -> bool:
        pos = 0
        buf = self.buf
        while True:
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                return False
            size = int(bytes(buf[pos:eol]).split(b";")[0], 16)
            if size == 0:
                return buf.find(b"\r\n", eol + 2) >= 0  # the empty line after the last chunk
            pos = eol + 2 + size + 2
            if pos > len(buf):
                return False


@dataclass
class RateResult:
    rate: float
    duration: float
    sent: int = 0  # every request sent, warm-up included
    recorded: int = 0
    statuses: collections.Counter[int] = field(default_factory=collections.Counter)
    errors: int = 0
    waited: int = 0  # recorded requests that had to wait for a free connection
    late_ms_max: float = 0.0  # the generator's own worst lateness (timer slack, GC)
    latencies_us: list[float] = field(default_factory=list)

    def percentile(self, q: float) -> float:
        if not self.latencies_us:
            return float("nan")
        ordered = sorted(self.latencies_us)
        index = min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))
        return ordered[index]

    def summary(self) -> dict[str, Any]:
        return {
            "rate": self.rate,
            "duration": self.duration,
            "sent": self.sent,
            "recorded": self.recorded,
            "statuses": dict(self.statuses),
            "errors": self.errors,
            "waited": self.waited,
            "late_ms_max": round(self.late_ms_max, 3),
            **{
                f"p{str(q).replace('.', '')}_us": round(self.percentile(q), 1)
                for q in (50, 90, 99, 99.9)
            },
            "max_us": round(max(self.latencies_us, default=float("nan")), 1),
        }


async def fixed_rate(
    host: str,
    port: int,
    requests: Sequence[bytes],
    *,
    rate: float = 500,
    duration: float = 10,
    warmup: float = 2,
    conns: int = 32,
    timeout: float = 10,
    idempotency_prefix: str | None = None,
) -> RateResult:
    """Send ``requests`` round-robin at ``rate``/s for ``warmup`` + ``duration`` seconds.

    With ``idempotency_prefix``, request ``i`` gets ``Idempotency-Key: <prefix>-<i>``
    after its request line: every request is a first use of its key.
    """
    loop = asyncio.get_running_loop()
    result = RateResult(rate, duration)
    idle: asyncio.Queue[_Conn] = asyncio.Queue()

    async def connect() -> _Conn:
        _, proto = await loop.create_connection(_Conn, host, port)
        return proto

    for conn in await asyncio.gather(*(connect() for _ in range(conns))):
        idle.put_nowait(conn)

    warm = int(warmup * rate)
    total = warm + int(duration * rate)

    def request(index: int) -> bytes:
        data = requests[index % len(requests)]
        if idempotency_prefix is None:
            return data
        line_end = data.index(b"\r\n") + 2
        key = f"Idempotency-Key: {idempotency_prefix}-{index}\r\n".encode()
        return data[:line_end] + key + data[line_end:]

    async def one(index: int, due: float) -> None:
        data = request(index)  # before the clock starts
        try:
            conn = idle.get_nowait()
            waited = False
        except asyncio.QueueEmpty:
            conn = await idle.get()
            waited = True
        if conn.closed:
            conn = await connect()
        sent = time.perf_counter()
        start = due if waited else sent
        try:
            status, end = await asyncio.wait_for(conn.send(data), timeout)
        except (ConnectionError, TimeoutError, OSError):
            if index >= warm:
                result.errors += 1
            if conn.transport is not None:
                conn.transport.abort()
            idle.put_nowait(await connect())
            return
        if not conn.keep_alive and conn.transport is not None:
            conn.transport.close()
            conn = await connect()
        idle.put_nowait(conn)
        if index >= warm:
            result.recorded += 1
            result.statuses[status] += 1
            result.waited += waited
            result.latencies_us.append((end - start) * 1e6)

    tasks = []
    t0 = time.perf_counter() + 0.05
    for index in range(total):
        due = t0 + index / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if index >= warm:
            result.late_ms_max = max(result.late_ms_max, (time.perf_counter() - due) * 1e3)
        tasks.append(asyncio.create_task(one(index, due)))
        result.sent += 1
    await asyncio.gather(*tasks)
    while not idle.empty():
        conn = idle.get_nowait()
        if conn.transport is not None:
            conn.transport.close()
    return result


def run(coro: Any) -> Any:
    """Run ``coro`` on uvloop when it is installed (as the gateway does), else asyncio."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)
