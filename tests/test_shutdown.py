"""Graceful shutdown (reference.md: Operations; issue 3; issue 4 §10), on a real subprocess."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from catalyst_proxy import runner
from catalyst_proxy.app import create_app
from catalyst_proxy.config import Settings
from catalyst_proxy.idempotency.guard import CLOSE_LEAST, CLOSE_PATIENCE
from catalyst_proxy.server import serve

from .rawhttp import partial_answer, raw_client, read_response, request_bytes
from .redis_server import RedisServer
from .serve_proc import ServeProcess
from .support import start_app

PURCHASE = "/api/v1/billing/purchase"
BRIDGE = "shutdown-test-bridge-secret-0123456789abcdef"
IN_FLIGHT = 50


class SlowUpstream:
    """Holds each request until ``release`` is set (or ``hold`` seconds pass), then answers."""

    def __init__(self, expected: int, hold: float = 60.0) -> None:
        self.expected = expected
        self.hold = hold
        self.release = asyncio.Event()
        self.all_arrived = asyncio.Event()
        self.arrived = 0
        self.answered = 0
        self.cancelled = 0
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.arrived += 1
        if self.arrived >= self.expected:
            self.all_arrived.set()
        try:
            await asyncio.wait_for(self.release.wait(), self.hold)
        except TimeoutError:
            pass
        except asyncio.CancelledError:
            self.cancelled += 1  # the gateway gave up on this request
            raise
        self.answered += 1
        order = json.loads(body)["n"]
        return web.json_response(
            {"order_id": f"ord_{order}", "paid_by_credit": False, "session_url": None}
        )


@pytest.fixture
async def slow() -> AsyncIterator[SlowUpstream]:
    upstream = SlowUpstream(IN_FLIGHT)
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", upstream.handle)
    runner, upstream.url = await start_app(app, access_log=None, handler_cancellation=True)
    yield upstream
    upstream.release.set()
    await runner.cleanup()


async def start_server(
    upstream: str, public_key_file: Path, grace: float, **extra: str
) -> ServeProcess:
    env = {
        **extra,
        "CATALYST_SME_GATEWAY_URL": upstream,
        "CATALYST_SESSION_PUBLIC_KEY_FILE": str(public_key_file),
        "CATALYST_SME_JWT_SECRET": BRIDGE,
        "CATALYST_UPSTREAM_TIMEOUT_SECONDS": "30",
        "CATALYST_SHUTDOWN_GRACE_SECONDS": str(grace),
    }
    return await ServeProcess(["serve", "--host", "127.0.0.1", "--port", "0"], env).start()


async def purchase(
    http: aiohttp.ClientSession, base: str, auth: dict[str, str], n: int
) -> tuple[int, dict[str, object]] | BaseException:
    """One purchase; its (status, JSON body), or the exception if the connection broke."""
    try:
        async with http.post(base + PURCHASE, headers=auth, json={"n": n}) as resp:
            return resp.status, await resp.json()
    except aiohttp.ClientError as exc:
        return exc


async def in_flight_at_sigterm(
    server: ServeProcess,
    slow: SlowUpstream,
    http: aiohttp.ClientSession,
    base: str,
    auth: dict[str, str],
    n: int,
) -> asyncio.Task[tuple[int, dict[str, object]] | BaseException]:
    """One purchase held at the upstream, then SIGTERM; returns (with the purchase still in
    flight) once the drain has begun."""
    slow.expected = 1
    call = asyncio.create_task(purchase(http, base, auth, n))
    await slow.all_arrived.wait()
    server.signal(signal.SIGTERM)
    await server.wait_for_event("shutdown.begin")
    return call


async def connection_refused(base: str) -> bool:
    host, port = base.removeprefix("http://").rsplit(":", 1)
    try:
        _, writer = await asyncio.open_connection(host, int(port))
    except ConnectionRefusedError:
        return True
    writer.close()
    return False


async def test_sigterm_drains_fifty_in_flight_purchases(slow, public_key_file, bearer):
    """On SIGTERM: readiness fails at once, no new connections, all 50 answered, exit 0 in grace."""
    grace = 8.0
    server = await start_server(slow.url, public_key_file, grace)
    try:
        base = await server.wait_listening()
        auth = bearer()
        connector = aiohttp.TCPConnector(limit=0, force_close=False)
        async with aiohttp.ClientSession(connector=connector) as http:
            async with http.get(base + "/readyz") as resp:
                assert resp.status == 200
            calls = [asyncio.create_task(purchase(http, base, auth, n)) for n in range(IN_FLIGHT)]
            await slow.all_arrived.wait()
            assert slow.arrived == IN_FLIGHT

            terminated = time.monotonic()
            server.signal(signal.SIGTERM)
            begin = await server.wait_for_event("shutdown.begin")
            assert begin["level"] == "info"
            assert slow.answered == 0  # readiness failed while all 50 were still in flight
            assert await connection_refused(base)

            slow.release.set()
            results = await asyncio.gather(*calls)
            status = await server.wait(timeout=grace + 5)
            elapsed = time.monotonic() - terminated
    finally:
        await server.stop()

    assert status == 0
    assert elapsed < grace
    assert [r if isinstance(r, BaseException) else r[0] for r in results] == [200] * IN_FLIGHT
    orders = {r[1]["order_id"] for r in results if not isinstance(r, BaseException)}
    assert orders == {f"ord_{n}" for n in range(IN_FLIGHT)}
    assert slow.arrived == slow.answered == IN_FLIGHT  # each purchase reached the upstream once
    events = [line["event"] for line in server.json_lines()]
    assert events.count("request") == IN_FLIGHT + 1
    # the purchases' lines come after the drain began (their answers were held until then),
    # and every line before the last, shutdown.done: none is lost at the exit
    assert events[events.index("shutdown.begin") :].count("request") == IN_FLIGHT
    assert events[-1] == "shutdown.done"


async def test_readiness_is_503_on_an_open_connection_during_the_drain(
    slow, public_key_file, bearer
):
    """A request that arrives on a connection still open during the drain never gets 200 ready."""
    server = await start_server(slow.url, public_key_file, 5.0)
    try:
        base = await server.wait_listening()
        async with aiohttp.ClientSession() as http:
            call = await in_flight_at_sigterm(server, slow, http, base, bearer(), 0)
            try:
                async with http.get(base + "/readyz") as resp:
                    ready_status: int | None = resp.status
            except aiohttp.ClientError:
                ready_status = None  # refused: the listener is closed, which is also not ready
            assert ready_status in (None, 503)
            slow.release.set()
            result = await call
        assert await server.wait(timeout=10) == 0
    finally:
        await server.stop()
    assert not isinstance(result, BaseException)
    assert result[0] == 200


@pytest.mark.parametrize("shape", ["whole", "streamed"])
async def test_an_answer_given_during_the_drain_says_connection_close(
    public_key_file, bearer, shape
):
    """An answer that goes out after SIGTERM (its request was in flight) says Connection: close,
    whole or streamed: the client knows not to send another request on that connection,
    which the gateway closes after it (it would go unanswered, its outcome unknown)."""
    release = asyncio.Event()
    arrived = asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        await request.read()
        arrived.set()
        await release.wait()
        if shape == "whole":
            return web.json_response({"order_id": "ord_1"})
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        await response.write(b'{"order_id": ')
        await asyncio.sleep(0.05)  # the rest comes later: the gateway streams the answer
        await response.write(b'"ord_1"}')
        return response

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner, url = await start_app(app, access_log=None)
    server = await start_server(url, public_key_file, 5.0)
    try:
        reader, writer = await raw_client(await server.wait_listening())
        body = b'{"n": 1}'
        headers = [*bearer().items(), ("Content-Length", str(len(body)))]
        writer.write(request_bytes("POST", PURCHASE, headers, body))
        await asyncio.wait_for(arrived.wait(), 10)
        server.signal(signal.SIGTERM)
        await server.wait_for_event("shutdown.begin")
        release.set()
        answer = await asyncio.wait_for(read_response(reader), 10)
        assert answer is not None
        assert (answer.status, answer.complete) == (200, True)
        assert answer.headers.get("Connection", "").lower() == "close"
        assert await asyncio.wait_for(reader.read(), 10) == b""  # and closed after it
        writer.close()
        assert await server.wait(timeout=10) == 0
    finally:
        await server.stop()
        await runner.cleanup()


async def test_upstream_hanging_past_the_grace(public_key_file, bearer):
    """An upstream that outlasts the grace ends in closed client connections, never an answer."""
    upstream = SlowUpstream(expected=5, hold=60.0)
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", upstream.handle)
    runner, upstream.url = await start_app(app, access_log=None, handler_cancellation=True)
    grace = 1.0
    server = await start_server(upstream.url, public_key_file, grace)
    try:
        base = await server.wait_listening()
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
            calls = [asyncio.create_task(purchase(http, base, bearer(), n)) for n in range(5)]
            await upstream.all_arrived.wait()
            terminated = time.monotonic()
            server.signal(signal.SIGTERM)
            results = await asyncio.gather(*calls)
            status = await server.wait(timeout=grace + 10)
            elapsed = time.monotonic() - terminated
    finally:
        await server.stop()
        upstream.release.set()
        await runner.cleanup()

    assert status == 0
    assert grace <= elapsed < grace + 1.0, elapsed  # the grace, then cancel and close promptly
    for result in results:
        assert isinstance(result, aiohttp.ClientError), result  # closed, never a made-up answer
    assert upstream.answered == 0
    events = [line["event"] for line in server.json_lines()]
    assert events[-1] == "shutdown.done"
    assert "Traceback" not in server.output
    cut = [(line["status"], line["error"]) for line in server.json_lines()
           if line["event"] == "request" and line.get("path") == PURCHASE]  # fmt: skip
    assert cut == [(503, "shutdown-grace-exceeded")] * 5  # the server cut them, not the clients


async def test_an_answer_framed_by_the_close_cut_at_the_grace_ends_in_a_reset(
    upstream, public_key_file, bearer
):
    """An HTTP/1.0 client whose answer has no length (the SME gateway's is chunked) knows its
    end only by the connection's end: cut when the grace runs out, it ends in a reset (RST),
    never the FIN that would make the part it got look like the whole answer."""
    up = await upstream(partial_answer(b'{"a":1}', b'{"a":1', chunked=True, then="stall"))
    server = await start_server(up.url, public_key_file, 0.5)
    try:
        base = await server.wait_listening()
        reader, writer = await raw_client(base)
        token = bearer()["Authorization"]
        writer.write(f"POST {PURCHASE} HTTP/1.0\r\nAuthorization: {token}\r\n"
                     "Content-Length: 2\r\n\r\n{}".encode())  # fmt: skip
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.0 200") or head.startswith(b"HTTP/1.1 200"), head
        assert b"content-length" not in head.lower()
        assert await reader.readexactly(6) == b'{"a":1'
        server.signal(signal.SIGTERM)
        with pytest.raises(ConnectionResetError):
            await reader.read()  # the grace runs out: a reset, not a clean end
        writer.close()
        assert await server.wait(timeout=10) == 0
    finally:
        await server.stop()
    cut = [(line["status"], line["error"]) for line in server.json_lines()
           if line["event"] == "request" and line.get("path") == PURCHASE]  # fmt: skip
    assert cut == [(503, "shutdown-grace-exceeded")]


async def test_record_updates_the_store_refuses_are_retried_only_within_the_grace(
    slow, public_key_file, bearer, redis_server: RedisServer, redis_url: str
):
    """A key's release that the shared store cannot take (Redis stalled) is retried during
    shutdown only within what is left of the grace (at least CLOSE_LEAST), not for
    CLOSE_PATIENCE past it: the process exits 0 in the time a pod is given."""
    grace = 1.0
    server = await start_server(slow.url, public_key_file, grace, CATALYST_REDIS_URL=redis_url)
    try:
        base = await server.wait_listening()
        await server.wait_for_line(lambda line: '"store.state"' in line and '"ok"' in line)
        headers = {**bearer(), "Idempotency-Key": "shutdown-1"}
        with redis_server.stalled():  # the reservation times out: taken back, in the background
            async with (
                aiohttp.ClientSession() as http,
                http.post(base + PURCHASE, headers=headers, json={"n": 1}) as resp,
            ):
                refused = resp.status, await resp.json(), resp.headers["X-Catalyst-Forwarded"]
            terminated = time.monotonic()
            server.signal(signal.SIGTERM)
            status = await server.wait(timeout=grace + CLOSE_PATIENCE + 10)
            elapsed = time.monotonic() - terminated
    finally:
        await server.stop()

    assert refused[:2] == (503, {"error": "idempotency-store-unavailable"})
    assert refused[2] == "no"  # the key is to be released: the release is what is retried
    assert slow.arrived == 0
    assert status == 0
    assert elapsed < grace + CLOSE_LEAST + 1.0 < CLOSE_PATIENCE, elapsed
    assert [line["event"] for line in server.json_lines()][-1] == "shutdown.done"


async def test_an_idle_keep_alive_connection_does_not_hold_the_drain(public_key_file, bearer):
    """A client connection left open and idle after its answer (an ingress's keep-alive pool)
    is closed when the drain begins: the gateway exits at once, not at the end of the grace,
    and says nothing about the grace being exceeded."""
    grace = 30.0
    server = await start_server("http://127.0.0.1:9", public_key_file, grace)
    try:
        reader, writer = await raw_client(await server.wait_listening())
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n")
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200 ")
        server.signal(signal.SIGTERM)  # the connection is idle, and kept open by the client
        assert await server.wait(timeout=grace / 3) == 0
        writer.close()
    finally:
        await server.stop()
    events = [line.get("event") for line in server.json_lines()]
    assert "shutdown.done" in events
    assert "shutdown.grace_exceeded" not in events


async def test_a_second_signal_during_the_drain_does_not_cut_it_short(
    slow, public_key_file, bearer
):
    """SIGTERM, then SIGTERM and SIGINT again while a purchase is in flight (a signal to the
    whole process group reaches a worker twice): the purchase still completes, and the
    process exits 0 once the drain is over."""
    server = await start_server(slow.url, public_key_file, 30.0)
    try:
        base = await server.wait_listening()
        async with aiohttp.ClientSession() as http:
            call = await in_flight_at_sigterm(server, slow, http, base, bearer(), 7)
            server.signal(signal.SIGTERM)
            server.signal(signal.SIGINT)
            slow.release.set()
            result = await call
        assert await server.wait(timeout=10) == 0
    finally:
        await server.stop()
    assert result == (200, {"order_id": "ord_7", "paid_by_credit": False, "session_url": None})


async def test_a_request_read_as_the_drain_begins_is_answered(public_key_file, bearer):
    """A purchase whose bytes arrive on a kept-alive connection in the same loop turn as the
    stop (its request read, its handler not started yet) is answered and forwarded, not cut
    off with the idle connections the drain closes."""
    received: list[bytes] = []

    async def upstream_handler(request: web.Request) -> web.Response:
        received.append(await request.read())
        return web.json_response({"order_id": "ord_9", "paid_by_credit": False,
                                  "session_url": None})  # fmt: skip

    upstream = web.Application()
    upstream.router.add_route("*", "/{tail:.*}", upstream_handler)
    up_runner, up_url = await start_app(upstream, access_log=None)
    settings = Settings(gateway_url=up_url, public_key_file=str(public_key_file),
                        bridge_secret=BRIDGE.encode(), shutdown_grace_seconds=10)  # fmt: skip
    stop = asyncio.Event()
    ready: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    real_parse = runner._parse  # aiohttp's data_received, as our protocol handler calls it

    def data_received(handler: RequestHandler, data: bytes) -> None:  # type: ignore[type-arg]
        real_parse(handler, data)
        if b"X-Stop-Now" in data:
            stop.set()  # the stop is seen in the very turn the request was read

    body = b'{"n": 9}'
    headers = [*bearer().items(), ("X-Stop-Now", "1"), ("Content-Length", str(len(body)))]
    serving = asyncio.create_task(
        serve(create_app(settings), "127.0.0.1", 0, on_ready=ready.set_result, stop=stop)
    )
    try:
        port = await asyncio.wait_for(ready, 10)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n")
        first = await asyncio.wait_for(read_response(reader), 5)
        assert first is not None
        assert first.status == 200
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(runner, "_parse", data_received)
            writer.write(request_bytes("POST", PURCHASE, headers, body))
            answer = await asyncio.wait_for(read_response(reader), 10)
        writer.close()
        await asyncio.wait_for(serving, 15)
    finally:
        serving.cancel()
        await up_runner.cleanup()
    assert answer is not None
    assert (answer.status, answer.complete) == (200, True)
    assert received == [body]


async def test_a_client_still_uploading_a_refused_body_finishes_its_upload(public_key_file):
    """A purchase refused early (401, no token) while its client still uploads a large body:
    aiohttp reads the rest and drops it. A SIGTERM then does not cut that read off (a client
    that sends the whole body before reading would get a reset): the upload completes and
    the process exits 0 once it has."""
    server = await start_server("http://127.0.0.1:9", public_key_file, 30.0)
    total, piece = 4_000_000, b"x" * 65536
    try:
        reader, writer = await raw_client(await server.wait_listening())
        writer.write(
            b"POST %s HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % (PURCHASE.encode(), total) + piece
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 401 ")  # answered early; the body is still coming
        server.signal(signal.SIGTERM)
        await server.wait_for_event("shutdown.begin")
        sent = len(piece)
        while sent < total:
            writer.write(piece[: total - sent])
            await writer.drain()  # a reset would raise here
            sent += min(len(piece), total - sent)
        assert await server.wait(timeout=20) == 0
        writer.close()
    finally:
        await server.stop()
