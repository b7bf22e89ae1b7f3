"""The gateway's hot path behind a bare httptools server: a measurement, not a product.

    python bench/lean.py --port P [--workers N]   (the environment of ``catalyst-proxy serve``)

``make bench-floor`` runs this as its ``lean-proxy`` row, to answer one question
with a number: how much of the latency the gateway adds at a fixed rate is
aiohttp's server (its parser's message objects, the request, the per-request
task, the response machinery) rather than the gateway's own work? This serves
``POST /api/v1/billing/purchase`` with exactly the gateway's work for a good
request, through the gateway's own parts (``create_app()``: the session cache
and verifier, the role, the bridge mint, the upstream head, the upstream
client and its pool, the answer's fields, the access-log line and the metrics,
deferred as the gateway defers them), on an asyncio ``Protocol`` around
httptools' request parser, one task per request.

What it leaves out, and a server must have: every refusal but 401 and 502
(no 413/415/429, no limits on heads or bodies, no ``Expect``, no request
bodies that are not whole, no streaming, no idempotency, no graceful drain, no
cancellation on disconnect). It is the floor of a server built for this one
job, not a server. Bench-only: nothing here is in the wheel.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import httptools  # noqa: E402
import loadgen  # noqa: E402
import orjson  # noqa: E402
from aiohttp import web  # noqa: E402

from catalyst_proxy import headers as hdrs  # noqa: E402
from catalyst_proxy import log  # noqa: E402
from catalyst_proxy.answer import http_date  # noqa: E402
from catalyst_proxy.app import PARTS, Parts, create_app  # noqa: E402
from catalyst_proxy.bridge import map_role, mint  # noqa: E402
from catalyst_proxy.config import Settings  # noqa: E402
from catalyst_proxy.errors import ProxyError  # noqa: E402
from catalyst_proxy.ids import hex_id  # noqa: E402
from catalyst_proxy.upstream import UpstreamFailure  # noqa: E402

ROUTE = "/api/v1/billing/purchase"
ROUTE_BYTES = ROUTE.encode()
UPSTREAM_TARGET = b"/api/billing/purchase"
_ANSWER = b"HTTP/1.1 %d OK\r\n%sServer: catalyst-proxy\r\nDate: %s\r\nContent-Length: %d\r\n\r\n%s"
_REFUSED = b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"


class _Lean(asyncio.Protocol):
    """One client connection: httptools parses; a task per complete request."""

    def __init__(self, parts: Parts, loop: asyncio.AbstractEventLoop) -> None:
        self._parts = parts
        self._loop = loop
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._body: list[bytes] = []
        self._ready: list[tuple[bytes, list[tuple[bytes, bytes]], bytes]] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        sock = transport.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    # httptools' callbacks: record only
    def on_url(self, url: bytes) -> None:
        self._url = url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        self._ready.append((self._url, self._headers, b"".join(self._body)))
        self._headers, self._body = [], []

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            assert self._transport is not None
            self._transport.close()
            return
        for url, headers, body in self._ready:
            self._loop.create_task(self._handle(url, headers, body))
        self._ready.clear()

    async def _handle(self, url: bytes, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        transport = self._transport
        assert transport is not None
        if url != ROUTE_BYTES:  # anything else: "up" (floor.py waits for a 200 on /)
            transport.write(_REFUSED % (200, b"OK", 2, b"{}"))
            return
        parts = self._parts
        started = time.perf_counter()
        request_id = hex_id()
        token = ""
        for name, value in headers:
            if name.lower() == b"authorization" and value[:7].lower() == b"bearer ":
                token = value[7:].decode().strip()
        try:
            auth = parts.authenticator
            operator = auth.remembered(token) or await auth.verify(token)
        except ProxyError as exc:
            transport.write(_refusal(exc))
            return
        role = operator.derived.get("role")
        if role is None:
            role = operator.derived["role"] = map_role(
                operator.claims, parts.settings.operator_email
            )
        secret = parts.secret.get()
        assert secret is not None
        bridge = mint(secret, sub=operator.sub, email=operator.email, role=role)
        head = hdrs.upstream_request_head(
            headers, bridge_token=bridge, request_id=request_id, peer="127.0.0.1", scheme="http"
        )
        sent = time.perf_counter()
        try:
            upstream = await parts.client.request(b"POST", UPSTREAM_TARGET, head, body, None)
        except UpstreamFailure:
            transport.write(_REFUSED % (502, b"Bad Gateway", 2, b"{}"))
            return
        upstream_seconds = time.perf_counter() - sent
        if upstream.complete:  # the bench's answers are small: they arrive whole
            data = upstream.body()
        else:
            pieces = []
            while piece := await upstream.read():
                pieces.append(piece)
            data = b"".join(pieces)
        fields, _ = hdrs.answer_fields(upstream.headers, request_id, upstream.status)
        lines = b"".join([b"%s: %s\r\n" % field for field in fields])
        transport.write(_ANSWER % (upstream.status, lines, http_date(), len(data), data))
        status = upstream.status
        upstream.release()
        duration = time.perf_counter() - started
        self._loop.call_soon(
            _account, parts, request_id, status, duration, upstream_seconds, operator, role
        )


def _refusal(exc: ProxyError) -> bytes:
    data = orjson.dumps(exc.body())
    return _REFUSED % (exc.status, b"Refused", len(data), data)


def _account(
    parts: Parts,
    request_id: str,
    status: int,
    duration: float,
    upstream_seconds: float,
    operator: object,
    role: str,
) -> None:
    """The gateway's deferred accounting: the metrics and the access-log line."""
    parts.metrics.request_done(ROUTE, "POST", status, duration)
    parts.metrics.upstream_done(ROUTE, upstream_seconds)
    log.access(
        {
            "request_id": request_id,
            "method": "POST",
            "path": ROUTE,
            "route": ROUTE,
            "status": status,
            "duration_ms": round(duration * 1000, 3),
            "upstream_status": status,
            "upstream_ms": round(upstream_seconds * 1000, 3),
            "sub": getattr(operator, "sub", None),
            "email": getattr(operator, "email", None),
            "role": role,
            "error": None,
            "idempotency": None,
        }
    )


async def _serve(port: int) -> None:
    settings = Settings.from_env(os.environ)
    log.configure(fmt=settings.log_format, level=settings.log_level)
    app = create_app(settings)
    runner = web.AppRunner(app)
    await runner.setup()  # the app's lifecycle: the upstream pool, the key set
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(1024)
    server = await loop.create_server(lambda: _Lean(app[PARTS], loop), sock=sock)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    server.close()
    await runner.cleanup()
    log.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(argv)
    children = []
    for _ in range(args.workers):
        pid = os.fork()
        if pid == 0:
            loadgen.run(_serve(args.port))
            os._exit(0)
        children.append(pid)

    def forward(signum: int, _frame: object) -> None:
        for pid in children:
            os.kill(pid, signum)

    signal.signal(signal.SIGTERM, forward)
    for pid in children:
        os.waitpid(pid, 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
