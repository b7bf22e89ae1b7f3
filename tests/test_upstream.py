"""The upstream client, end to end (reference.md: "The upstream exchange").

The keep-alive pool (reuse, stale and misbehaving connections, its bounds, the
waiting room, idle closing), framing the upstream gets wrong or unusual, at most
once when the upstream hangs up mid-request, back-pressure both ways (measured
on a child process, where the gateway's memory is its own), and what every
answer says in ``X-Catalyst-Forwarded``.

Everything runs over real sockets on 127.0.0.1 against the whole gateway; the
client itself is never imported. What the upstream saw comes from an
``HTTPUpstream`` (or a ``RawUpstream`` script) that records every byte it is
sent and counts the connections open at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import re
import socket
import struct
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import jwt
import pytest
from aiohttp import web

from catalyst_proxy import proxy as proxy_module
from catalyst_proxy import runner as runner_module
from catalyst_proxy.app import Tuning
from catalyst_proxy.devtools.keys import operator_token
from catalyst_proxy.upstream.client import _host_field

from .conftest import BRIDGE_SECRET, RunningGateway
from .rawhttp import (
    RawResponse,
    Respond,
    Seen,
    answer,
    exchange,
    never_answer,
    parse_head,
    partial_answer,
    raw_client,
    read_response,
    request_bytes,
    write_then_close,
)
from .serve_proc import ServeProcess
from .support import (
    RawUpstream,
    eventually,
    free_socket,
    memory,
    read_chunked,
    read_request,
    reset_peak,
    start_app,
)

PURCHASE = "/api/v1/billing/purchase"
FORWARDED = "X-Catalyst-Forwarded"
CONNECTIONS = "catalyst_proxy_upstream_connections"
WAITING = "catalyst_proxy_upstream_waiting"
IN_FLIGHT = "catalyst_proxy_requests_in_flight"
KiB, MiB = 1 << 10, 1 << 20


# --- helpers ---------------------------------------------------------------------------------


def body_for(request_id: str) -> bytes:
    return json.dumps({"for": request_id}).encode()


def final(status: int, body: bytes) -> bytes:
    """A complete keep-alive JSON answer with a Content-Length."""
    head = b"HTTP/1.1 %d Final\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
    return head % (status, len(body)) + body


def ok_for(request_id: str) -> bytes:
    """A keep-alive 200 whose body names the request it answers."""
    return final(200, body_for(request_id))


def rid_of(seen: Seen) -> str:
    return seen.headers.get("X-Request-ID", "")


def error_of(response: RawResponse) -> str | None:
    """The JSON ``error`` of an answer, or None if it has none (an upstream answer, say)."""
    with contextlib.suppress(ValueError):
        value = json.loads(response.body)
        if isinstance(value, dict):
            return value.get("error")
    return None


def purchase(
    auth: dict[str, str],
    request_id: str,
    body: bytes = b'{"sku": "starter"}',
    extra: list[tuple[str, str]] | None = None,
) -> bytes:
    """A purchase as exact bytes, with a declared length and the given X-Request-ID."""
    headers = [*auth.items(), ("X-Request-ID", request_id), ("Content-Length", str(len(body)))]
    return request_bytes("POST", PURCHASE, headers + (extra or []), body)


def scripted(replies: dict[str, bytes] | None = None) -> Respond:
    """A keep-alive ``respond`` writing ``replies[X-Request-ID]``, by default ``ok_for(id)``."""

    async def respond(
        seen: Seen, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        writer.write((replies or {}).get(rid_of(seen), ok_for(rid_of(seen))))
        await writer.drain()
        return True

    return respond


async def only_answer(url: str, data: bytes, *, timeout: float = 10.0) -> RawResponse:
    """The one answer to ``data`` sent on a new client connection."""
    responses = await exchange(url, data, timeout=timeout)
    assert len(responses) == 1, "the gateway closed the connection without an answer"
    return responses[0]


class WireClient:
    """A client connection read straight off its socket: every byte that arrived is kept (an
    answer followed by a reset included: asyncio's StreamReader raises a reset before handing
    out what it already holds), answers are read strictly by ``read_response``, and a test can
    wait for bytes to arrive."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.received = bytearray()
        self.stream = asyncio.StreamReader(limit=MiB)  # sees data and EOF, never an error
        self.ended = False  # the gateway closed or reset the connection
        self._changed = asyncio.Event()
        self._tasks = [asyncio.create_task(self._pump())]

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(cls, url: str) -> AsyncIterator[WireClient]:
        parts = urlsplit(url)
        assert parts.hostname is not None
        assert parts.port is not None
        sock = socket.socket()
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, (parts.hostname, parts.port))
            client = cls(sock)
            try:
                yield client
            finally:
                for task in client._tasks:
                    task.cancel()
                await asyncio.gather(*client._tasks, return_exceptions=True)
        finally:
            sock.close()

    async def _pump(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while piece := await loop.sock_recv(self.sock, 64 * KiB):
                self.received += piece
                self.stream.feed_data(piece)
                self._touch()
        except ConnectionError:
            pass
        finally:
            self.ended = True
            self.stream.feed_eof()
            self._touch()

    def _touch(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def send(self, data: bytes) -> None:
        """Write ``data`` in the background (once per client); a gateway that hangs up mid-way
        just ends it."""

        async def send() -> None:
            with contextlib.suppress(ConnectionError):
                await asyncio.get_running_loop().sock_sendall(self.sock, data)

        self._tasks.append(asyncio.create_task(send()))

    async def until(self, predicate: Callable[[bytes], bool], timeout: float = 5.0) -> None:
        """Wait until ``predicate(every byte received so far)`` holds."""
        async with asyncio.timeout(timeout):
            while not predicate(bytes(self.received)):
                assert not self.ended, "the connection ended first"
                await self._changed.wait()

    async def answer(self, timeout: float = 10.0) -> RawResponse | None:
        """The next answer, or None if the connection ended before one began."""
        async with asyncio.timeout(timeout):
            return await read_response(self.stream)


async def answer_through_reset(url: str, data: bytes, *, timeout: float = 10.0) -> RawResponse:
    """The one answer to ``data`` on a new connection, even if a reset follows it."""
    async with WireClient.connect(url) as client:
        client.send(data)
        response = await client.answer(timeout)
    assert response is not None, "the gateway closed the connection without an answer"
    return response


async def settle(gw: RunningGateway) -> None:
    """One round trip through the gateway: whatever reached its sockets before has been read."""
    status, _, _ = await gw.request("GET", "/healthz")
    assert status == 200


def gauge(metrics: str, name: str) -> float:
    match = re.search(rf"^{name} (\S+)$", metrics, re.MULTILINE)
    assert match is not None, f"{name} is not exported"
    return float(match.group(1))


def closed_port_url() -> str:
    """A 127.0.0.1 URL nothing listens on (bound, never listened: connections are refused)."""
    sock = free_socket()
    port = sock.getsockname()[1]
    sock.close()
    return f"http://127.0.0.1:{port}"


# --- the pool: stale connections, hang-ups, misbehaviour ---------------------------------------


@pytest.mark.parametrize(
    ("base_url", "field"),
    [
        ("http://127.0.0.1:8080", b"127.0.0.1:8080"),
        ("http://" + "k" * 63 + ":8080", b"k" * 63 + b":8080"),  # the port is not a label
        ("http://[::1]:8080/base", b"[::1]:8080"),
        ("https://b\u00fccher.example", b"xn--bcher-kva.example"),  # no port named: none sent
        ("http://Gateway.SVC:80", b"gateway.svc:80"),
    ],
)
def test_the_host_field_is_the_base_urls_host_and_port(base_url, field):
    """The Host field the client sends: the base URL's host, IDNA-encoded (an IPv6 address in
    brackets), and its port when it names one. (The whole netloc went through IDNA: a
    63-character label followed by its port was "label too long", a traceback at start-up.)"""
    parts = urlsplit(base_url)
    assert parts.hostname is not None
    assert _host_field(parts.hostname, parts.port) == field


async def test_connection_the_upstream_closed_while_pooled_is_never_used_again(
    gateway, bearer, upstream
):
    """A pooled connection the upstream closed between two requests is dropped: the second
    request goes out once, on a new connection, and gets its answer."""

    async def answer_then_hang_up(
        seen: Seen, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        # Keep-alive is implied (HTTP/1.1, no "Connection: close") and broken once answered.
        writer.write(ok_for(rid_of(seen)))
        await writer.drain()
        writer.close()
        await writer.wait_closed()  # the close is on the wire before `closed` is set
        return False

    up = await upstream(answer_then_hang_up)
    gw = await gateway(upstream=up.url)
    first = await only_answer(gw.url, purchase(bearer(), "first"))
    assert (first.status, first.body) == (200, body_for("first"))
    await up.all_closed()
    await settle(gw)  # the upstream's close has reached the gateway and been read
    second = await only_answer(gw.url, purchase(bearer(), "second"))
    assert (second.status, second.body, second.complete) == (200, body_for("second"), True)
    assert up.connections == 2
    assert [(seen.connection, rid_of(seen), seen.complete) for seen in up.requests] == [
        (0, "first", True),
        (1, "second", True),
    ]


HANG_UPS = {
    # moment: (request body, body bytes the upstream reads before hanging up)
    "after-the-head": (b'{"sku": "starter"}', 0),
    "after-some-body": (os.urandom(768 * KiB), 64 * KiB),
}


@pytest.mark.parametrize("connection", ["new", "reused"])
@pytest.mark.parametrize("moment", HANG_UPS)
async def test_upstream_hanging_up_as_the_request_is_written_is_502_and_never_resent(
    gateway, bearer, upstream, moment, connection
):
    """An upstream that hangs up while the request is being written (after its head, or after
    some of its body), on a new or a reused connection, is 502 sme-gateway-bad-response: the
    upstream saw the request once, and it was never resent on another connection."""
    body, read = HANG_UPS[moment]
    up = await upstream(scripted(), cut=lambda seen: read if rid_of(seen) == "victim" else None)
    gw = await gateway(upstream=up.url)
    if connection == "reused":
        warm = await only_answer(gw.url, purchase(bearer(), "warm"))
        assert (warm.status, warm.body) == (200, body_for("warm"))
    response = await answer_through_reset(gw.url, purchase(bearer(), "victim", body))
    assert (response.status, error_of(response)) == (502, "sme-gateway-bad-response")
    # Whether the gateway got the whole request out before the hang-up is a race it cannot
    # see the end of: "no" and "unknown" are both honest; "yes" or nothing never is.
    assert response.headers.getall(FORWARDED, []) in (["no"], ["unknown"])
    await up.all_closed()
    assert [rid_of(seen) for seen in up.requests] == ["warm"] * (connection == "reused") + [
        "victim"
    ]
    victim = up.requests[-1]
    assert not victim.complete
    assert bytes(victim.body) == body[: len(victim.body)]
    assert up.connections == 1  # the victim went out on the first connection and on no other


FIRST_CHUNK = b"5\r\nhello\r\n"


def broken_chunks(broken: bytes, then: str, mid_body: asyncio.Event) -> Respond:
    """A ``respond`` that starts a chunked 200 with FIRST_CHUNK, writes ``broken`` once
    ``mid_body`` is set, then closes (``then="close"``) or keeps the connection busy with a byte
    every TRICKLE seconds until the peer leaves."""
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
    head += b"Transfer-Encoding: chunked\r\n\r\n"

    async def respond(
        seen: Seen, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        writer.write(head + FIRST_CHUNK)
        await writer.drain()
        await mid_body.wait()
        writer.write(broken)
        await writer.drain()
        while then == "trickle":
            try:
                # The upstream's pace: a byte every TRICKLE s, well within the per-piece
                # budget, so only reading the framing (not a timeout) can end this.
                if not await asyncio.wait_for(reader.read(1), TRICKLE):
                    return False  # the gateway hung up
            except TimeoutError:
                writer.write(b"x")
                await writer.drain()
        return False

    return respond


FRAMING_BUDGET = 1.0
TRICKLE = 0.1
BROKEN_CHUNKS = {
    # case: (bytes after FIRST_CHUNK, the good body data in all, what the upstream does next)
    "bad-chunk-size": (b"zz\r\n", b"hello", "trickle"),
    "chunk-size-overflow": (b"f" * 20 + b"\r\n", b"hello", "trickle"),
    "no-crlf-after-chunk": (b"5\r\nworldXX", b"helloworld", "trickle"),
    "chunk-cut-short-then-close": (b"a\r\nwor", b"hellowor", "close"),
    "trailer-garbage": (b"0\r\nthis is not a header\r\n\r\n", b"hello", "trickle"),
}


@pytest.mark.parametrize("case", BROKEN_CHUNKS)
async def test_broken_chunk_framing_aborts_the_transfer_within_the_budget(
    gateway, bearer, upstream, case
):
    """Chunk framing that breaks mid-body (a bad or overflowing size, no CRLF after a chunk, a
    chunk cut short, garbage in the trailers) ends the client's transfer aborted within the
    budget, never as a clean short answer, and the upstream connection is closed."""
    broken, good, then = BROKEN_CHUNKS[case]
    mid_body = asyncio.Event()
    up = await upstream(broken_chunks(broken, then, mid_body))
    gw = await gateway(upstream=up.url, upstream_timeout_seconds=FRAMING_BUDGET)
    request = purchase(bearer(), case)
    async with WireClient.connect(gw.url) as client:
        client.send(request + request)  # the second one must never be answered
        await client.until(lambda received: b"hello" in received)
        mid_body.set()  # the answer has begun on the client's side: now the framing breaks
        started = time.monotonic()
        try:
            response = await client.answer(timeout=FRAMING_BUDGET + 3)
        except TimeoutError:
            pytest.fail(f"the transfer was still going {FRAMING_BUDGET + 3} s after the break")
        elapsed = time.monotonic() - started
        after = await client.answer(timeout=5)
    assert response is not None
    assert response.status == 200
    assert not response.complete
    assert response.body.startswith(b"hello")
    assert good.startswith(response.body)  # only good data got through, never a stray byte
    assert elapsed < FRAMING_BUDGET + 0.5
    assert after is None  # the connection ended with the aborted answer: nothing after it
    await up.all_closed()  # the gateway hung up on the broken connection: it is not reused
    assert len(up.requests) == 1


UNSOLICITED_BODY = b'{"for": "nobody asked for this"}'
UNSOLICITED = final(200, UNSOLICITED_BODY)


@pytest.mark.parametrize("when", ["with-the-answer", "while-idle"])
async def test_unsolicited_second_answer_never_reaches_the_next_request(
    gateway, bearer, upstream, when
):
    """An unsolicited second answer on a keep-alive connection (written with the real one, or
    later while the connection is idle) is never delivered: the next request gets its own
    answer on a new connection, and the connection that misbehaved is closed."""
    delivered, extra_sent = asyncio.Event(), asyncio.Event()

    async def respond(
        seen: Seen, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        if rid_of(seen) == "first":
            if when == "with-the-answer":
                writer.write(ok_for("first") + UNSOLICITED)  # one write: they arrive together
            else:
                writer.write(ok_for("first"))
                await writer.drain()
                await delivered.wait()
                writer.write(UNSOLICITED)
            await writer.drain()
            extra_sent.set()
        else:
            writer.write(ok_for(rid_of(seen)))
            await writer.drain()
        return True  # and carry on as if all were well

    up = await upstream(respond)
    gw = await gateway(upstream=up.url)
    first = await only_answer(gw.url, purchase(bearer(), "first"))
    assert (first.status, first.body, first.complete) == (200, body_for("first"), True)
    delivered.set()
    async with asyncio.timeout(5):
        await extra_sent.wait()
    if when == "while-idle":
        await settle(gw)  # the unsolicited bytes are on the wire: the gateway has read them
    second = await only_answer(gw.url, purchase(bearer(), "second"))
    assert (second.status, second.body, second.complete) == (200, body_for("second"), True)
    assert [(seen.connection, rid_of(seen)) for seen in up.requests] == [
        (0, "first"),
        (1, "second"),
    ]
    try:
        async with asyncio.timeout(5):
            await up.closed[0].wait()
    except TimeoutError:
        pytest.fail("the connection that spoke out of turn was left open")


@pytest.mark.parametrize("arrival", ["unsolicited-answer", "close"])
async def test_what_reached_an_idle_connection_unread_drops_it_before_a_byte_is_written(
    gateway, bearer, upstream, arrival
):
    """An unsolicited answer or a close that reached a pooled connection's socket while the
    gateway was busy (the event loop has not read it yet) drops the connection before the
    next request is written on it: that request goes out once, on a new connection, and gets
    its own answer, never the stray one.

    The moment is set up exactly: the upstream's bytes (or FIN) are written straight into
    the kernel and the pool is asked for a connection in the same step, before the loop
    turns (the race the test above cannot pin down from outside)."""
    writers: list[asyncio.StreamWriter] = []

    async def respond(
        seen: Seen, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        writers.append(writer)
        writer.write(ok_for(rid_of(seen)))
        await writer.drain()
        return True

    up = await upstream(respond)
    gw = await gateway(upstream=up.url)
    first = await only_answer(gw.url, purchase(bearer(), "first"))
    assert (first.status, first.body) == (200, body_for("first"))
    pool = gw.parts.client.pool
    assert pool.idle == 1
    transport = writers[0].transport
    if arrival == "unsolicited-answer":
        transport.write(UNSOLICITED)  # an idle transport sends at once: no loop turn needed
        assert transport.get_write_buffer_size() == 0  # in the gateway's socket already
    else:
        transport.get_extra_info("socket").shutdown(socket.SHUT_WR)  # the FIN, likewise
    assert pool.acquire_idle() is None  # dropped, not reserved
    assert pool.idle == 0
    second = await only_answer(gw.url, purchase(bearer(), "second"))
    assert (second.status, second.body, second.complete) == (200, body_for("second"), True)
    assert [(seen.connection, rid_of(seen)) for seen in up.requests] == [
        (0, "first"),
        (1, "second"),
    ]


# --- framing the upstream may use --------------------------------------------------------------


CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
EARLY_HINTS = b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload; as=style\r\n\r\n"
UNUSUAL = {
    # case: (what the upstream writes, the status, body and headers the client must get)
    "100-then-200": (CONTINUE + final(200, b'{"n": 1}'), 200, b'{"n": 1}', {}),
    "103-103-then-201": (EARLY_HINTS * 2 + final(201, b'{"n": 2}'), 201, b'{"n": 2}', {}),
    "100-103-then-409": (CONTINUE + EARLY_HINTS + final(409, b'{"n": 3}'), 409, b'{"n": 3}', {}),
    "204": (b"HTTP/1.1 204 No Content\r\n\r\n", 204, b"", {}),
    "100-then-204": (CONTINUE + b"HTTP/1.1 204 No Content\r\n\r\n", 204, b"", {}),
    "304": (
        b'HTTP/1.1 304 Not Modified\r\nETag: "v7"\r\nCache-Control: max-age=60\r\n\r\n',
        304,
        b"",
        {"ETag": '"v7"', "Cache-Control": "max-age=60"},
    ),
}


@pytest.mark.parametrize("case", UNUSUAL)
async def test_interim_and_bodiless_answers_arrive_complete_and_the_connection_stays_usable(
    gateway, bearer, upstream, case
):
    """100 and 103 interim answers are skipped and the final answer arrives complete; a 204 or
    304 arrives with no body; either way the pooled connection serves the next request."""
    reply, status, body, headers = UNUSUAL[case]
    up = await upstream(scripted({"first": reply}))
    gw = await gateway(upstream=up.url)
    response = await only_answer(gw.url, purchase(bearer(), "first"))
    assert (response.status, response.body, response.complete) == (status, body, True)
    for name, value in headers.items():
        assert response.headers[name] == value
    nxt = await only_answer(gw.url, purchase(bearer(), "next"))
    assert (nxt.status, nxt.body, nxt.complete) == (200, body_for("next"), True)
    assert [(seen.connection, rid_of(seen)) for seen in up.requests] == [(0, "first"), (0, "next")]


async def test_answer_delimited_by_close_arrives_whole_and_its_connection_is_not_reused(
    gateway, bearer, upstream
):
    """An answer with no length, ended by the upstream closing the connection, arrives whole
    and complete; the next request goes out on a new connection."""
    payload = os.urandom(300 * KiB)

    async def respond(
        seen: Seen, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        if rid_of(seen) != "delimited":
            return await scripted()(seen, reader, writer)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n\r\n" + payload)
        await writer.drain()
        return False  # the close is the end of the body

    up = await upstream(respond)
    gw = await gateway(upstream=up.url)
    response = await only_answer(gw.url, purchase(bearer(), "delimited"))
    assert (response.status, response.complete) == (200, True)
    assert response.sha256 == hashlib.sha256(payload).hexdigest()
    nxt = await only_answer(gw.url, purchase(bearer(), "next"))
    assert (nxt.status, nxt.body) == (200, body_for("next"))
    assert [(seen.connection, rid_of(seen)) for seen in up.requests] == [
        (0, "delimited"),
        (1, "next"),
    ]


async def test_answer_delimited_by_close_but_ended_by_a_reset_is_aborted_not_complete(
    gateway, bearer, upstream
):
    """An answer with no length whose connection the upstream resets (RST) instead of closing
    is cut short, not complete: the client's transfer is aborted after the bytes that came."""
    sent = b'{"order_id": "o-1", "paid_by'

    async def respond(
        seen: Seen, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n" + sent)
        await writer.drain()
        sock = writer.transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()  # with linger 0: a reset
        return False

    up = await upstream(respond)
    gw = await gateway(upstream=up.url)
    response = await only_answer(gw.url, purchase(bearer(), "reset"))
    assert response.status == 200
    assert not response.complete
    assert sent.startswith(response.body)


TRAILERS = b'Location: https://elsewhere.example/\r\nETag: "trailer"\r\nX-Request-ID: t\r\n'


async def test_trailer_fields_never_become_the_answers_header_fields(gateway, bearer, upstream):
    """Trailer fields after a chunked body are read and dropped: the client gets the body and
    the head's fields only, and the connection serves the next request."""
    chunked = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked"
    reply = chunked + b"\r\n\r\n2\r\nok\r\n0\r\n" + TRAILERS + b"\r\n"
    up = await upstream(scripted({"first": reply}))
    gw = await gateway(upstream=up.url)
    response = await only_answer(gw.url, purchase(bearer(), "first"))
    assert (response.status, response.body, response.complete) == (200, b"ok", True)
    assert "Location" not in response.headers
    assert "ETag" not in response.headers
    assert response.headers.getall("X-Request-ID") == ["first"]
    nxt = await only_answer(gw.url, purchase(bearer(), "next"))
    assert (nxt.status, nxt.body) == (200, body_for("next"))
    assert [(seen.connection, rid_of(seen)) for seen in up.requests] == [(0, "first"), (0, "next")]


async def test_trailers_without_end_abort_the_transfer_and_are_never_all_read(
    gateway, bearer, upstream
):
    """An upstream that sends trailer fields without end (past the head's limit) has the
    client's transfer aborted at that limit and its connection closed: the gateway stops
    reading long before the upstream has written its ~100 MB of trailers (it never
    collects them)."""
    pad = b"X-Pad: " + b"p" * 1000 + b"\r\n"
    lines = 100 * 1024
    written = 0
    chunked = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked"

    async def respond(
        seen: Seen, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        nonlocal written
        writer.write(chunked + b"\r\n\r\n2\r\nok\r\n0\r\n")
        for _ in range(lines):
            writer.write(pad)
            await writer.drain()
            written += 1
        return False

    up = await upstream(respond)
    gw = await gateway(upstream=up.url, upstream_timeout_seconds=FRAMING_BUDGET)
    response = await answer_through_reset(gw.url, purchase(bearer(), "flood"), timeout=10)
    assert response.status == 200
    assert not response.complete
    assert response.body in (b"", b"ok")
    await up.all_closed()
    assert written < lines // 10  # what the kernel's buffers held, not the whole flood


async def test_an_answer_chunked_with_an_empty_coding_element_passes(gateway, bearer, upstream):
    """`Transfer-Encoding: , chunked` from the upstream is chunked (RFC 9110 5.6.1.2: empty
    list elements are ignored): the answer arrives whole, not as a 502."""
    reply = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: , chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"
    up = await upstream(scripted({"first": reply}))
    gw = await gateway(upstream=up.url)
    response = await only_answer(gw.url, purchase(bearer(), "first"))
    assert (response.status, response.body, response.complete) == (200, b"ok", True)


NOT_PASSED_ON = {
    # case: what the upstream answers; the gateway can pass none of them on unchanged
    "status-099": b"HTTP/1.1 099 Odd\r\nContent-Length: 2\r\n\r\nok",
    "status-000": b"HTTP/1.1 000 Odd\r\nContent-Length: 2\r\n\r\nok",
    "gzip-then-chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
    b"2\r\nok\r\n0\r\n\r\n",
    "gzip-only": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nConnection: close\r\n\r\nok",
    # chunked, then an empty element: llhttp frames it by the connection's end, not by chunks
    "chunked-then-empty": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, \r\n\r\n"
    b"2\r\nok\r\n0\r\n\r\n",
    # white space after it, or a byte str.strip() takes for white space (NBSP, NEL): the same
    "chunked-then-blanks": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked \t\r\n\r\n"
    b"2\r\nok\r\n0\r\n\r\n",
    "chunked-then-nbsp": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\xa0\r\n\r\n"
    b"2\r\nok\r\n0\r\n\r\n",
    "nel-then-chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: \x85chunked\r\n\r\n"
    b"2\r\nok\r\n0\r\n\r\n",
}


@pytest.mark.parametrize("case", NOT_PASSED_ON)
async def test_a_status_under_100_or_a_transfer_coding_besides_chunked_is_502(
    gateway, bearer, upstream, case
):
    """A status code under 100, or a transfer coding other than chunked (which the gateway
    would have to decode, or else pass coded bytes off as the body), is a bad response: 502
    ``sme-gateway-bad-response``, and the next request goes out on a new connection."""
    up = await upstream(scripted({"odd": NOT_PASSED_ON[case]}))
    gw = await gateway(upstream=up.url)
    response = await only_answer(gw.url, purchase(bearer(), "odd"))
    assert (response.status, error_of(response)) == (502, "sme-gateway-bad-response")
    assert response.headers[FORWARDED] == "unknown"
    nxt = await only_answer(gw.url, purchase(bearer(), "next"))
    assert (nxt.status, nxt.body) == (200, body_for("next"))
    assert [(seen.connection, rid_of(seen)) for seen in up.requests] == [(0, "odd"), (1, "next")]


def chunks_of(received: bytes) -> list[bytes]:
    """The chunks of a chunked answer as received (head, chunks, the final chunk)."""
    _, _, rest = received.partition(b"\r\n\r\n")
    chunks = []
    while True:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            return chunks
        chunks.append(rest[:size])
        assert rest[size : size + 2] == b"\r\n"
        rest = rest[size + 2 :]


async def test_an_answer_in_one_byte_chunks_is_passed_on_in_large_pieces(gateway, bearer, upstream):
    """An answer the SME gateway sends in one-byte chunks reaches the client intact, in pieces
    of many kilobytes: not a write, a chunk to the client (six bytes on the wire for one) and a
    timer per byte, which held the worker's loop for seconds and its memory by 100 MB."""
    payload = os.urandom(100 * KiB)

    async def respond(
        seen: Seen, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for start in range(0, len(payload), 4 * KiB):
            block = payload[start : start + 4 * KiB]
            writer.write(b"".join(b"1\r\n%s\r\n" % block[i : i + 1] for i in range(len(block))))
            await writer.drain()
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        return True

    up = await upstream(respond)
    gw = await gateway(upstream=up.url)
    reader, writer = await raw_client(gw.url)
    try:
        writer.write(
            purchase(bearer(), "tiny").replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n", 1)
        )
        received, ending = await read_to_the_end(reader, timeout=20)
    finally:
        writer.close()
    assert ending == "eof"
    chunks = chunks_of(received)
    assert b"".join(chunks) == payload
    assert len(chunks) < len(payload) // 256  # ~100,000 before: one per byte


INTERIM_WITH_A_BODY = {
    "110-with-a-length": b"HTTP/1.1 110 Weird\r\nContent-Length: 5\r\n\r\nEVIL!",
    "150-chunked": b"HTTP/1.1 150 X\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nEVIL!\r\n0\r\n\r\n",
    "150-chunked-trailers": b"HTTP/1.1 150 X\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n"
    b'Location: https://evil.example/\r\nETag: "from-1xx"\r\n\r\n',
}


@pytest.mark.parametrize("case", INTERIM_WITH_A_BODY)
async def test_an_interim_answer_with_a_body_is_502_never_part_of_the_final_one(
    gateway, bearer, upstream, case
):
    """A 1xx answer has no content (RFC 9110 §15.2). One that comes with a body or trailers
    (llhttp frames a 1xx besides 100-103 like any answer) is a bad response, 502, and none
    of its bytes or fields reach the client as part of the final answer."""
    reply = INTERIM_WITH_A_BODY[case] + final(201, b'{"ok": "whole"}')
    up = await upstream(scripted({"odd": reply}))
    gw = await gateway(upstream=up.url)
    response = await only_answer(gw.url, purchase(bearer(), "odd"))
    assert (response.status, error_of(response)) == (502, "sme-gateway-bad-response")
    assert response.headers[FORWARDED] == "unknown"
    assert "Location" not in response.headers
    assert b"EVIL" not in response.body
    nxt = await only_answer(gw.url, purchase(bearer(), "next"))
    assert (nxt.status, nxt.body) == (200, body_for("next"))


@pytest.mark.parametrize("version", ["1.0", "1.1"])
async def test_a_cut_answer_ends_in_a_reset_only_when_framed_by_the_close(
    gateway, bearer, upstream, version
):
    """To an HTTP/1.0 client an answer of unknown length is framed by the connection's end;
    when the upstream breaks off mid-body, that end is a reset, so the client cannot take the
    cut answer for a whole one (a FIN would say "complete"). An HTTP/1.1 client gets it
    chunked: the missing last chunk says "cut", and a FIN lets it keep every byte sent."""
    up = await upstream(partial_answer(b"x" * 1000, b"x" * 400, chunked=True))
    gw = await gateway(upstream=up.url, upstream_timeout_seconds=FRAMING_BUDGET)
    request = purchase(bearer(), "cut").replace(
        b" HTTP/1.1\r\n", f" HTTP/{version}\r\n".encode(), 1
    )
    reader, writer = await raw_client(gw.url)
    try:
        writer.write(request)
        received, ending = await read_to_the_end(reader, timeout=FRAMING_BUDGET + 3)
    finally:
        writer.close()
    assert b"\r\nContent-Length:" not in received
    if version == "1.0":
        assert ending == "reset"
        assert received.startswith(b"HTTP/1.0 200 ") or not received  # a reset may drop bytes
        assert b"chunked" not in received
    else:
        assert ending == "eof"
        assert received.startswith(b"HTTP/1.1 200 ")
        assert b"\r\nTransfer-Encoding: chunked\r\n" in received
        assert received.endswith(b"x" * 400 + b"\r\n")  # every byte sent, no last chunk


async def read_to_the_end(reader: asyncio.StreamReader, *, timeout: float) -> tuple[bytes, str]:
    """Every byte until the connection ends, and how it ended: ``eof`` (FIN) or ``reset``."""
    received = bytearray()
    async with asyncio.timeout(timeout):
        try:
            while piece := await reader.read(64 * KiB):
                received += piece
        except ConnectionResetError:
            return bytes(received), "reset"
    return bytes(received), "eof"


# --- the pool's bounds -------------------------------------------------------------------------

N = 1000
MAX_CONNECTIONS = 50


@pytest.fixture(scope="module")
def operators(rsa_key) -> list[str]:
    """1,000 owner tokens, sub op-0 .. op-999 (signed once for the module, ~1-2 ms each)."""
    return [
        operator_token(
            rsa_key, sub=f"op-{n}", email=f"op{n}@example.test", realm_roles=["catalyst-owner"]
        )
        for n in range(N)
    ]


def sub_of(seen: Seen) -> str:
    bridge = seen.headers["Authorization"].removeprefix("Bearer ")
    return str(jwt.decode(bridge, BRIDGE_SECRET, algorithms=["HS256"])["sub"])


def answer_orders(*, think: float = 0.0, release: asyncio.Event | None = None) -> Respond:
    """A keep-alive ``respond`` answering each purchase with an order named after its operator,
    after ``think`` seconds or once ``release`` is set."""

    async def respond(
        seen: Seen, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        if release is not None:
            await release.wait()
        if think:
            await asyncio.sleep(think)  # the SME gateway's think time, which keeps connections busy
        order = json.dumps({"order_id": f"ord-{sub_of(seen)}", "paid_by_credit": False,
                            "session_url": None}).encode()  # fmt: skip
        writer.write(final(200, order))
        await writer.drain()
        return True

    return respond


Client = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def open_clients(url: str, count: int) -> list[Client]:
    """``count`` open connections to the gateway."""
    clients = []
    for _ in range(count):
        # One after another: the gateway's listen backlog is 128, and a burst of 1,000
        # connects would spend seconds in SYN retransmits.
        clients.append(await raw_client(url))
    return clients


async def buy(client: Client, token: str, n: int) -> RawResponse:
    reader, writer = client
    writer.write(purchase({"Authorization": f"Bearer {token}"}, f"buy-{n}"))
    await writer.drain()
    response = await read_response(reader)
    assert response is not None, f"buy-{n}: the gateway closed the connection without an answer"
    return response


async def wind_down(
    tasks: list[asyncio.Task[RawResponse]],
    clients: list[Client],
    release: asyncio.Event | None = None,
) -> None:
    """Let what is still in flight finish before closing the clients: a failed run must not
    leave 1,000 handlers to be cancelled (and logged) at teardown."""
    if release is not None:
        release.set()
    if tasks:
        await asyncio.wait(tasks, timeout=20)
    for task in tasks:
        task.cancel()
    for _, writer in clients:
        writer.close()


def order_of(response: RawResponse) -> str:
    return str(json.loads(response.body)["order_id"])


@pytest.mark.slow
async def test_1000_concurrent_purchases_all_succeed_within_the_connection_bound(
    gateway, upstream, operators
):
    """1,000 concurrent purchases against an upstream with a 128-deep listen queue all get their
    own 200, each reaching the upstream once, which never has more than
    upstream_max_connections connections open at once."""
    up = await upstream(answer_orders(think=0.002), backlog=128)
    gw = await gateway(
        upstream=up.url, upstream_max_connections=MAX_CONNECTIONS, upstream_timeout_seconds=20
    )
    clients = await open_clients(gw.url, N)
    tasks = [
        asyncio.create_task(buy(c, t, n))
        for n, (c, t) in enumerate(zip(clients, operators, strict=True))
    ]
    try:
        async with asyncio.timeout(40):
            responses = await asyncio.gather(*tasks)
    finally:
        await wind_down(tasks, clients)
    assert Counter(response.status for response in responses) == {200: N}
    assert all(response.complete for response in responses)
    assert [order_of(response) for response in responses] == [f"ord-op-{n}" for n in range(N)]
    assert sorted(sub_of(seen) for seen in up.complete) == sorted(f"op-{n}" for n in range(N))
    assert len(up.requests) == N
    assert up.peak_connections <= MAX_CONNECTIONS
    assert up.peak_connections >= MAX_CONNECTIONS // 2  # the pool really was under pressure
    metrics = await gw.metrics_text()
    assert gauge(metrics, WAITING) == 0
    assert 1 <= gauge(metrics, CONNECTIONS) <= MAX_CONNECTIONS


@pytest.mark.slow
@pytest.mark.parametrize(("connections", "pending"), [(20, 50), (1, 0)])
async def test_requests_beyond_the_waiting_room_are_503_overloaded_and_never_sent(
    gateway, upstream, operators, connections, pending
):
    """With every connection busy and upstream_max_pending requests waiting (0: none), each of
    1,000 concurrent purchases beyond them gets 503 gateway-overloaded at once, with Retry-After:
    1 and X-Catalyst-Forwarded: no, and never reaches the upstream; the others all succeed."""
    release = asyncio.Event()
    up = await upstream(answer_orders(release=release), backlog=128)
    gw = await gateway(
        upstream=up.url,
        upstream_max_connections=connections,
        upstream_max_pending=pending,
        upstream_timeout_seconds=30,
    )
    refused = N - connections - pending
    clients = await open_clients(gw.url, N)
    tasks = [
        asyncio.create_task(buy(c, t, n))
        for n, (c, t) in enumerate(zip(clients, operators, strict=True))
    ]
    try:
        # The upstream holds every request it gets: only the overflow can be answered now,
        # and no more than `connections` requests may reach the upstream meanwhile.
        too_many = asyncio.create_task(up.until(lambda: len(up.requests) > connections, 15))
        try:
            async with asyncio.timeout(15):
                while sum(task.done() for task in tasks) < refused and not too_many.done():
                    await asyncio.wait(
                        [too_many, *(task for task in tasks if not task.done())],
                        return_when=asyncio.FIRST_COMPLETED,
                    )
                await up.until(lambda: len(up.requests) >= connections, timeout=15)
        except TimeoutError:
            pass
        finally:
            too_many.cancel()
        done = sum(task.done() for task in tasks)
        assert (done, len(up.requests)) == (refused, connections), (
            f"{done} answers of the {refused} expected while the upstream holds "
            f"{len(up.requests)} requests of the {connections} it may"
        )
        early = [task.result() for task in tasks if task.done()]
        held_metrics = await gw.metrics_text()
        assert len(up.requests) == connections  # the waiting ones are still waiting
        release.set()
        async with asyncio.timeout(20):
            results = await asyncio.gather(*tasks)
    finally:
        await wind_down(tasks, clients, release)
    for response in early:
        assert (response.status, error_of(response)) == (503, "gateway-overloaded")
        assert response.headers["Retry-After"] == "1"
        assert response.headers.getall(FORWARDED, []) == ["no"]
    assert Counter(response.status for response in results) == {
        200: connections + pending,
        503: refused,
    }
    answered = [f"op-{n}" for n, response in enumerate(results) if response.status == 200]
    assert all(order_of(results[int(sub[3:])]) == f"ord-{sub}" for sub in answered)
    assert sorted(sub_of(seen) for seen in up.complete) == sorted(answered)  # no 503 went out
    assert len(up.requests) == connections + pending
    assert up.peak_connections <= connections
    assert gauge(held_metrics, CONNECTIONS) == connections
    assert gauge(held_metrics, WAITING) == pending
    assert connections + pending <= gauge(held_metrics, IN_FLIGHT) <= connections + pending + 1


WAIT_BUDGET = 0.5


async def test_budget_running_out_while_waiting_for_a_connection_is_503_overloaded(
    gateway, bearer, upstream
):
    """A request whose budget runs out while it waits for the only connection (held by a slow
    answer) gets 503 gateway-overloaded with Retry-After: 1 and X-Catalyst-Forwarded: no, and
    nothing of it is sent; the connection then serves the next request."""
    release = asyncio.Event()

    async def respond(
        seen: Seen, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        if rid_of(seen) != "slow":
            return await scripted()(seen, reader, writer)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")  # fmt: skip
        while not release.is_set():
            writer.write(b"1\r\nx\r\n")
            await writer.drain()
            # A slow answer: a byte every quarter budget, each well within the per-piece bound.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(release.wait(), WAIT_BUDGET / 4)
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        return True

    up = await upstream(respond)
    gw = await gateway(
        upstream=up.url, upstream_max_connections=1, upstream_timeout_seconds=WAIT_BUDGET
    )
    slow_reader, slow_writer = await raw_client(gw.url)
    try:
        slow_writer.write(purchase(bearer(), "slow"))
        async with asyncio.timeout(5):
            head = await slow_reader.readuntil(b"\r\n\r\n")  # the one connection is taken
        assert head.startswith(b"HTTP/1.1 200")
        started = time.monotonic()
        waiter = await only_answer(gw.url, purchase(bearer(), "waiter"), timeout=WAIT_BUDGET + 3)
        waited = time.monotonic() - started
        release.set()
        slow_body = bytearray()
        async with asyncio.timeout(5):
            await read_chunked(slow_reader, slow_body)
    finally:
        release.set()
        slow_writer.close()
    assert (waiter.status, error_of(waiter)) == (503, "gateway-overloaded"), waiter.body
    assert waiter.headers["Retry-After"] == "1"
    assert waiter.headers.getall(FORWARDED, []) == ["no"]
    assert WAIT_BUDGET - 0.01 <= waited < WAIT_BUDGET + 1.0
    assert slow_body  # the slow answer went on undisturbed
    assert slow_body == b"x" * len(slow_body)
    after = await only_answer(gw.url, purchase(bearer(), "after"))
    assert (after.status, after.body) == (200, body_for("after"))
    assert [rid_of(seen) for seen in up.requests] == ["slow", "after"]
    assert up.connections == 1


IDLE = 0.4


async def test_idle_connection_closes_after_upstream_idle_seconds(gateway, bearer, upstream):
    """A pooled connection stays open while it is in use and closes once it has been idle for
    upstream_idle_seconds; the connections gauge follows, and the next request opens anew."""
    up = await upstream(scripted())
    gw = await gateway(upstream=up.url, upstream_idle_seconds=IDLE)
    for n in range(3):
        if n:
            await asyncio.sleep(IDLE / 4)  # a client back well within the idle time (its pace)
        response = await only_answer(gw.url, purchase(bearer(), f"call-{n}"))
        assert (response.status, response.body) == (200, body_for(f"call-{n}"))
    answered = time.monotonic()
    while_open = await gw.metrics_text()
    try:
        async with asyncio.timeout(IDLE + 2):
            await up.closed[0].wait()
    except TimeoutError:
        pytest.fail(f"the idle connection was still open {IDLE + 2} s after its last answer")
    idle_for = time.monotonic() - answered
    assert up.connections == 1  # the one connection served all three calls
    assert IDLE - 0.05 <= idle_for < IDLE + 1.0
    assert gauge(while_open, CONNECTIONS) == 1
    assert gauge(await gw.metrics_text(), CONNECTIONS) == 0
    again = await only_answer(gw.url, purchase(bearer(), "again"))
    assert (again.status, again.body) == (200, body_for("again"))
    assert up.connections == 2


# --- X-Catalyst-Forwarded and Expect -----------------------------------------------------------


@dataclass(frozen=True)
class Said:
    status: int
    forwarded: str
    error: str | None = None  # the gateway's own JSON error code; None: the upstream's answer


def own_body(status: int) -> bytes:
    return b'{"error": "the-sme-gateway-says-%d"}' % status


FORWARDED_CASES = {
    "upstream-200": Said(200, "yes"),
    "upstream-404": Said(404, "yes"),
    "upstream-500": Said(500, "yes"),
    "upstream-502": Said(502, "yes"),
    "upstream-503": Said(503, "yes"),
    "upstream-504": Said(504, "yes"),
    "upstream-breaks-off-mid-body": Said(200, "yes"),
    "no-token": Said(401, "no", "unauthenticated"),
    "unknown-path": Said(404, "no", "not-found"),
    "wrong-method": Said(405, "no", "method-not-allowed"),
    "missing-code": Said(400, "no", "missing-code"),
    "declared-too-large": Said(413, "no", "request-body-too-large"),
    "streamed-too-large": Said(413, "no", "request-body-too-large"),
    "encoded-body": Said(415, "no", "unsupported-content-encoding"),
    "bridge-unwired": Said(503, "no", "sme-jwt-bridge-unwired"),
    "unreachable": Said(503, "no", "sme-gateway-unreachable"),
    "hung-up-after-the-request": Said(502, "unknown", "sme-gateway-bad-response"),
    "garbage-after-the-request": Said(502, "unknown", "sme-gateway-bad-response"),
    "no-answer-in-time": Said(504, "unknown", "sme-gateway-timeout"),
}


def forwarded_case_upstream(case: str) -> Respond:
    if case == "upstream-breaks-off-mid-body":
        return partial_answer(b"x" * 1000, b"x" * 400, chunked=False)
    if case.startswith("upstream-"):
        status = FORWARDED_CASES[case].status
        return answer(status, own_body(status))
    return {
        "hung-up-after-the-request": write_then_close(b""),
        "garbage-after-the-request": write_then_close(b"HTTP/1.1 2OO OK\r\n\r\n"),
        "no-answer-in-time": never_answer,
    }.get(case, answer())


@pytest.mark.parametrize("case", FORWARDED_CASES)
async def test_every_answer_says_whether_the_request_reached_the_sme_gateway(
    gateway, bearer, upstream, case
):
    """X-Catalyst-Forwarded is "yes" on the upstream's own answers (any status), "no" on every
    answer made before or instead of the exchange, "unknown" on a 502/504 after the whole
    request was sent; exactly one such header, and "no" means nothing complete went upstream."""
    said = FORWARDED_CASES[case]
    up = await upstream(forwarded_case_upstream(case))
    overrides: dict[str, Any] = {"upstream_timeout_seconds": 0.3, "max_body_bytes": 64}
    overrides["upstream"] = closed_port_url() if case == "unreachable" else up.url
    if case == "bridge-unwired":
        overrides["bridge_secret"] = None
    gw = await gateway(**overrides)
    method, path, body = "POST", PURCHASE, b"{}"
    headers = [*bearer().items(), ("X-Request-ID", case)]
    framing = [("Content-Length", str(len(body)))]
    if case == "no-token":
        headers = headers[1:]
    elif case == "unknown-path":
        path = "/api/v1/billing/nothing-here"
    elif case == "wrong-method":
        method = "GET"
    elif case == "missing-code":
        path = "/api/v1/sme/billing/vouchers/revoke/%20"
    elif case == "declared-too-large":
        body = b"x" * 65
        framing = [("Content-Length", "65")]
    elif case == "streamed-too-large":  # 64 bytes, then the one too many: caught mid-stream
        body = b"40\r\n" + b"x" * 64 + b"\r\n1\r\nx\r\n0\r\n\r\n"
        framing = [("Transfer-Encoding", "chunked")]
    elif case == "encoded-body":
        headers.append(("Content-Encoding", "gzip"))
    response = await answer_through_reset(
        gw.url, request_bytes(method, path, headers + framing, body)
    )
    assert response.status == said.status
    if said.error is not None:
        assert error_of(response) == said.error
    elif case == "upstream-breaks-off-mid-body":
        assert not response.complete
    else:
        assert (response.body, response.complete) == (own_body(said.status), True)
    assert response.headers.getall(FORWARDED, []) == [said.forwarded]
    if said.forwarded == "no":
        assert up.complete == []
    else:
        assert [rid_of(seen) for seen in up.complete] == [case]


@pytest.mark.parametrize(
    ("case", "extra", "first_status"),
    [
        ("acceptable", [], 100),
        ("too-large", [("Content-Length", str(2 * MiB))], 413),
        ("encoded", [("Content-Encoding", "gzip")], 415),
    ],
)
async def test_expect_100_continue_invites_only_a_body_that_will_be_forwarded(
    gateway, bearer, upstream, case, extra, first_status
):
    """With Expect: 100-continue an acceptable body is invited (100), then forwarded once without
    the Expect header ("yes"); a body the gateway would refuse is refused before it is sent
    ("no"), and nothing reaches the upstream."""
    up = await upstream(scripted())
    gw = await gateway(upstream=up.url)
    payload = os.urandom(5000)
    headers = [*bearer().items(), ("X-Request-ID", case), ("Expect", "100-continue")]
    if not any(name == "Content-Length" for name, _ in extra):
        headers.append(("Content-Length", str(len(payload))))
    reader, writer = await raw_client(gw.url)
    try:
        writer.write(request_bytes("POST", PURCHASE, headers + extra))
        async with asyncio.timeout(5):
            first = await read_response(reader)
            assert first is not None
            assert first.status == first_status
            final_answer = first
            if first_status == 100:
                writer.write(payload)
                final_answer = await read_response(reader)
    finally:
        writer.close()
    assert final_answer is not None
    if first_status == 100:
        assert (final_answer.status, final_answer.body) == (200, body_for(case))
        assert final_answer.headers.getall(FORWARDED, []) == ["yes"]
        [seen] = up.requests
        assert seen.complete
        assert seen.sha256 == hashlib.sha256(payload).hexdigest()
        assert "Expect" not in seen.headers
    else:
        assert final_answer.headers.getall(FORWARDED, []) == ["no"]
        assert up.connections == 0


# --- back-pressure and memory, on a child process ----------------------------------------------

RSS_GROWTH_LIMIT = 20 * MiB
# How far the writing side may get ahead of the reading side. The loopback socket buffers
# between them (the gateway's own autotune up to net.ipv4.tcp_rmem/tcp_wmem's maximum) hold
# several MB on their own (5-8 MiB measured here); a gateway that buffered instead of
# pushing back would let the writer run 40 MiB (upload) or 190 MiB (download) ahead.
AHEAD_LIMIT = 16 * MiB
PIECE = 64 * KiB


StartChild = Callable[..., Awaitable[tuple[int, str]]]


@pytest.fixture
async def child_gateway(public_key_file) -> AsyncIterator[StartChild]:
    """Factory: ``await child_gateway(upstream_url, **env)`` runs ``catalyst-proxy serve`` as a
    child process; returns (pid, base URL)."""
    started: list[ServeProcess] = []

    async def start(upstream_url: str, **env: str) -> tuple[int, str]:
        proc = ServeProcess(
            ["serve", "--host", "127.0.0.1", "--port", "0"],
            {
                "CATALYST_SME_GATEWAY_URL": upstream_url,
                "CATALYST_SESSION_PUBLIC_KEY_FILE": str(public_key_file),
                "CATALYST_SME_JWT_SECRET": BRIDGE_SECRET.decode(),
                **env,
            },
        )
        started.append(await proc.start())
        url = await proc.wait_listening()
        assert proc.proc is not None
        return proc.proc.pid, url

    yield start
    for proc in started:
        await proc.stop()


async def small_buffer_client(url: str, option: int) -> Client:
    """A client connection whose own kernel buffer (SO_RCVBUF or SO_SNDBUF) is 64 KiB, so that
    what it has read or written is close to what left or reached the gateway."""
    parts = urlsplit(url)
    assert parts.hostname is not None
    assert parts.port is not None
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, option, PIECE)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (parts.hostname, parts.port))
    return await asyncio.open_connection(sock=sock, limit=PIECE)


@dataclass
class BigAnswer:
    """An upstream answering ``warm-up`` with a small body and anything else with ``size``
    bytes as fast as it may write; ``written`` counts what it got rid of (after each drain)."""

    size: int
    piece: bytes
    written: int = 0

    async def script(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head, _ = await read_request(reader)
            if b"X-Request-ID: warm-up" in head:
                writer.write(final(200, self.piece))
                await writer.drain()
                continue
            # Its own kernel buffer small, so `written` is close to what reached the gateway.
            writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, PIECE)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                         b"Content-Length: %d\r\n\r\n" % self.size)  # fmt: skip
            for _ in range(self.size // len(self.piece)):
                writer.write(self.piece)
                await writer.drain()
                self.written += len(self.piece)
            return


@pytest.mark.slow
async def test_200_mb_answer_to_a_slow_reader_holds_the_upstream_back_in_flat_memory(
    child_gateway, bearer
):
    """A 200 MB answer to a client reading at about 1 MB/s (then fast) arrives intact while the
    gateway's RSS grows by less than 20 MB and the upstream is held back to a few MB ahead of
    the client."""
    size, slow_seconds, ahead_limit = 200 * MiB, 3.0, AHEAD_LIMIT
    upstream_side = BigAnswer(size, os.urandom(PIECE))
    expected = hashlib.sha256()
    for _ in range(size // PIECE):
        expected.update(upstream_side.piece)
    raw = await RawUpstream(upstream_side.script).start()
    try:
        # A budget well under the slow phase: it bounds each wait for the upstream, not the whole.
        pid, url = await child_gateway(raw.url, CATALYST_UPSTREAM_TIMEOUT_SECONDS="1")
        warm = await only_answer(url, purchase(bearer(), "warm-up"))
        assert (warm.status, warm.body) == (200, upstream_side.piece)
        baseline = memory(pid)["VmRSS"]
        reset_peak(pid)
        reader, writer = await small_buffer_client(url, socket.SO_RCVBUF)
        digest, got, ahead = hashlib.sha256(), 0, 0
        try:
            async with asyncio.timeout(60):
                writer.write(purchase(bearer(), "big"))
                start, headers = parse_head(await reader.readuntil(b"\r\n\r\n"))
                assert start.startswith("HTTP/1.1 200")
                assert headers["Content-Length"] == str(size)
                slow_until = time.monotonic() + slow_seconds
                while time.monotonic() < slow_until:
                    piece = await reader.readexactly(PIECE)
                    digest.update(piece)
                    got += len(piece)
                    ahead = max(ahead, upstream_side.written - got)
                    await asyncio.sleep(1 / 16)  # the slow reader's pace: 64 KiB per 1/16 s
                while got < size and (piece := await reader.read(MiB)):
                    digest.update(piece)
                    got += len(piece)
        finally:
            writer.close()
        peak = memory(pid)["VmHWM"]
    finally:
        await raw.close()
    assert got == size
    assert digest.hexdigest() == expected.hexdigest()
    assert ahead < ahead_limit, f"the upstream got {ahead / MiB:.1f} MiB ahead of the client"
    assert peak - baseline < RSS_GROWTH_LIMIT, f"RSS grew {(peak - baseline) / MiB:.1f} MiB"


@pytest.mark.parametrize("half_closed", [False, True], ids=["open", "half-closed"])
async def test_a_client_that_stops_reading_a_streamed_answer_lets_go_of_the_upstream(
    gateway, bearer, half_closed
):
    """A client that takes none of a streamed answer for ``SEND_PATIENCE`` (0.3 s here; 60 s in
    production, nginx's send_timeout) has its transfer aborted: the SME gateway's connection,
    the only one in the pool, goes on to serve the next request instead of being held for as
    long as that client stays connected. Also when it has half-closed its end first (aiohttp
    then closes the gateway's, which waits for its buffer to empty: for ever, unread)."""
    upstream_side = BigAnswer(64 * MiB, os.urandom(PIECE))
    raw = await RawUpstream(upstream_side.script).start()
    try:
        gw = await gateway(upstream=raw.url, upstream_max_connections=1, upstream_max_pending=0,
                           tuning=Tuning(send_patience=0.3))  # fmt: skip
        reader, writer = await small_buffer_client(gw.url, socket.SO_RCVBUF)
        try:
            writer.write(purchase(bearer(), "stalls"))
            start, _ = parse_head(await reader.readuntil(b"\r\n\r\n"))
            assert start.startswith("HTTP/1.1 200")
            if half_closed:
                writer.write_eof()
            # It reads nothing more: the gateway gives up on it and lets the upstream go.
            await eventually(lambda: gw.parts.dispatcher.in_flight == 0, timeout=10)
            served = await only_answer(gw.url, purchase(bearer(), "warm-up"))
            assert (served.status, served.body) == (200, upstream_side.piece)
            got = 0
            with contextlib.suppress(ConnectionError):
                async with asyncio.timeout(10):
                    while piece := await reader.read(MiB):
                        got += len(piece)
            assert got < 64 * MiB  # cut short, not delivered whole
        finally:
            writer.close()
    finally:
        await raw.close()


async def test_an_http10_client_that_stops_reading_an_answer_framed_by_the_close_gets_a_reset(
    gateway, bearer
):
    """An HTTP/1.0 client whose answer is framed by the connection's end (the SME gateway's
    is chunked) and which stops reading: its transfer is aborted with a reset, so that it
    never takes the part it got, followed by a FIN, for the whole answer."""

    async def endless(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")  # fmt: skip
        piece = b"%x\r\n%s\r\n" % (PIECE, os.urandom(PIECE))
        with contextlib.suppress(ConnectionError):
            while True:
                writer.write(piece)
                await writer.drain()

    raw = await RawUpstream(endless).start()
    try:
        gw = await gateway(upstream=raw.url, tuning=Tuning(send_patience=0.3))
        reader, writer = await small_buffer_client(gw.url, socket.SO_RCVBUF)
        try:
            token = bearer()["Authorization"]
            writer.write(f"POST {PURCHASE} HTTP/1.0\r\nAuthorization: {token}\r\n"
                         "Content-Length: 2\r\n\r\n{}".encode())  # fmt: skip
            start, headers = parse_head(await reader.readuntil(b"\r\n\r\n"))
            assert start.endswith("200 OK")
            assert "Content-Length" not in headers
            await eventually(lambda: gw.parts.dispatcher.in_flight == 0, timeout=10)
            _, ended = await read_to_the_end(reader, timeout=10)
            assert ended == "reset"
        finally:
            writer.close()
    finally:
        await raw.close()


async def test_an_http10_answer_handed_whole_but_still_buffered_at_the_cut_ends_in_a_reset(
    gateway, bearer
):
    """An HTTP/1.0 answer framed by the close, handed whole to the transport, with its last
    bytes still in the transport's buffer (the client has not taken them) when the drain's
    grace runs out: the cut (``runner.cut``, then the close shutdown makes) makes that close
    a reset. The process then exits with those bytes unsent: a FIN would pass the part the
    client got for the whole answer. (Both sides' kernel buffers are made small, so that
    48 KiB fill them and the rest waits in the transport's.)"""
    body = os.urandom(48 * KiB)
    rest = asyncio.Event()

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n1\r\n-\r\n")  # fmt: skip
        await writer.drain()
        await rest.wait()  # the gateway streams it (no length: framed by the close)
        writer.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))
        await writer.drain()

    raw = await RawUpstream(answer).start()
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(raw.close)
        gw = await gateway(upstream=raw.url)
        assert gw.runner.server is not None
        server = gw.runner.server
        sock = socket.socket()
        stack.callback(sock.close)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        host, port = urlsplit(gw.url).hostname, urlsplit(gw.url).port
        await loop.sock_connect(sock, (host, port))
        await eventually(lambda: len(server.connections) == 1)
        (handler,) = server.connections
        assert handler.transport is not None
        handler.transport.get_extra_info("socket").setsockopt(
            socket.SOL_SOCKET, socket.SO_SNDBUF, 4096
        )
        token = bearer()["Authorization"]
        await loop.sock_sendall(sock, f"POST {PURCHASE} HTTP/1.0\r\nAuthorization: {token}\r\n"
                                      "Content-Length: 2\r\n\r\n{}".encode())  # fmt: skip
        await eventually(lambda: getattr(handler, "close_framed", None) == "streaming")
        rest.set()
        await eventually(lambda: gw.parts.dispatcher.in_flight == 0)  # handed whole
        assert handler.close_framed == "handed"
        assert handler.transport.get_write_buffer_size() > 0  # not all with the kernel
        handler.force_close()  # as the server's shutdown does
        runner_module.cut([handler])  # and then, the process about to exit
        reader, writer = await asyncio.open_connection(sock=sock)
        stack.callback(writer.close)
        _, ended = await read_to_the_end(reader, timeout=10)
        assert ended == "reset"


async def read_at_a_pace(
    port: int, request: bytes, *, receive_buffer: int, bite: int, pace: float, size: int
) -> tuple[bytes, bytes]:
    """Send ``request`` to the gateway on ``port`` from a socket whose kernel receive buffer is
    ``receive_buffer`` bytes, then read the answer straight from it (no reader's buffer
    between, so the client takes bytes off the gateway at its own pace): ``bite`` bytes
    every ``pace`` seconds, until ``size`` bytes of body came. The head and the body; an
    AssertionError if the gateway cuts it off first."""
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.setblocking(False)
    await loop.sock_connect(sock, ("127.0.0.1", port))
    with sock:
        await loop.sock_sendall(sock, request)
        got = bytearray()
        while b"\r\n\r\n" not in got:
            got += await loop.sock_recv(sock, bite)
        head, _, body = bytes(got).partition(b"\r\n\r\n")
        got = bytearray(body)
        while len(got) < size:
            await asyncio.sleep(pace)  # the client's pace, not a wait for anything
            try:
                piece = await loop.sock_recv(sock, bite)
            except ConnectionError as exc:
                raise AssertionError(f"cut off after {len(got)} bytes: {exc!r}") from None
            assert piece, f"cut off after {len(got)} bytes"
            got += piece
    return head, bytes(got)


@pytest.mark.parametrize(
    ("patience", "pace", "bite", "pieces"),
    [(0.2, 0.02, 4 * KiB, 8), (0.4, 0.35, 64 * KiB, 4)],
    ids=["a-piece-outlasts-the-window", "each-read-late-in-the-window"],
)
async def test_a_client_reading_a_streamed_answer_slowly_gets_all_of_it(
    gateway, bearer, patience, pace, bite, pieces
):
    """A client that reads steadily gets the whole answer, however slowly, as long as it
    takes some within every ``SEND_PATIENCE`` (shortened here): its patience starts again
    whenever it has taken some. Both ways it could go wrong: a piece of the answer (64 KiB
    and more) that takes it longer than the window (~200 KB/s against 0.2 s), and reads that
    each come late in the window (64 KiB every 0.35 s against 0.4 s: the last quarter of a
    window counts too). Only a client that takes nothing is let go (the test above)."""
    size = pieces * PIECE
    upstream_side = BigAnswer(size, os.urandom(PIECE))
    raw = await RawUpstream(upstream_side.script).start()
    try:
        gw = await gateway(upstream=raw.url, tuning=Tuning(send_patience=patience))
        # The gateway's kernel buffer toward the client small too (an accepted socket takes
        # the listener's), as over a long path: what the client has not read waits in the
        # gateway's own buffer, where the patience looks.
        for site in gw.runner.sites:
            for listener in site._server.sockets:  # type: ignore[attr-defined]
                listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16 * KiB)
        # And the client's own kernel buffer small.
        head, body = await read_at_a_pace(gw.runner.addresses[0][1], purchase(bearer(), "slow"),
                                          receive_buffer=16 * KiB, bite=bite, pace=pace,
                                          size=size)  # fmt: skip
        assert head.startswith(b"HTTP/1.1 200")
        assert body == upstream_side.piece * pieces
    finally:
        await raw.close()


async def test_a_client_reading_steadily_past_the_kernels_queue_gets_all_of_it(gateway, bearer):
    """The kernel's own buffers as they are (loopback's grow to megabytes): a client that
    reads steadily, 32 KiB every 20 ms, gets the whole 4 MiB answer, though the transport's
    buffer moves only when the kernel wakes the writer, after the client has taken a third
    of the kernel's send queue: by that alone it looked as if it took nothing for longer
    than the patience (0.3 s here), and was cut off. The watch counts the kernel's queue
    too (SIOCOUTQ), so every read is seen."""
    pieces = 64  # 4 MiB: more than the kernel's queue holds
    upstream_side = BigAnswer(pieces * PIECE, os.urandom(PIECE))
    raw = await RawUpstream(upstream_side.script).start()
    try:
        gw = await gateway(upstream=raw.url, tuning=Tuning(send_patience=0.3))
        # (a small receive buffer: the rest waits in the gateway's kernel queue)
        port = gw.runner.addresses[0][1]
        head, body = await read_at_a_pace(port, purchase(bearer(), "steady"),
                                          receive_buffer=32 * KiB, bite=32 * KiB, pace=0.02,
                                          size=pieces * PIECE)  # fmt: skip
        assert head.startswith(b"HTTP/1.1 200")
        assert body == upstream_side.piece * pieces
    finally:
        await raw.close()


async def test_a_send_to_a_half_closed_client_that_reads_nothing_ends():
    """``_send`` on its own, where nothing cancels the handler when the client half-closes:
    aiohttp then closes the transport, which waits for its buffer to empty, for ever if the
    client reads nothing. The patience still looks at a closing transport, so the send ends
    as stalled (in the gateway, the handler is also cancelled at the client's end of input:
    the test above)."""
    outcome: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def handler(request: web.Request) -> web.StreamResponse:
        request.transport.get_extra_info("socket").setsockopt(
            socket.SOL_SOCKET, socket.SO_SNDBUF, 16 * KiB
        )
        response = web.StreamResponse()
        response.content_length = 8 * MiB
        await response.prepare(request)
        try:
            await proxy_module._send(request, response, bytes(8 * MiB), 0.3)
            outcome.set_result("sent whole")
        except proxy_module._ClientStalled:
            outcome.set_result("stalled")
        request.transport.abort()
        return response

    app = web.Application()
    app.router.add_get("/", handler)
    runner, url = await start_app(app)
    try:
        reader, writer = await small_buffer_client(url, socket.SO_RCVBUF)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        await reader.readuntil(b"\r\n\r\n")
        writer.write_eof()  # half-closed, and it reads nothing from here on
        async with asyncio.timeout(5):
            assert await outcome == "stalled"
        writer.close()
    finally:
        await runner.cleanup()


@dataclass
class SlowReader:
    """An upstream reading a ``warm-up`` upload at once and any other at about 2 MiB/s for
    ``slow_seconds`` (then fast); ``read`` counts the body bytes it has taken."""

    slow_seconds: float
    read: int = 0
    slow: bool = True

    async def script(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            _, headers = parse_head(await reader.readuntil(b"\r\n\r\n"))
            length = int(headers["Content-Length"])
            if headers["X-Request-ID"] == "warm-up":
                body = await reader.readexactly(length)
                writer.write(final(200, hashlib.sha256(body).hexdigest().encode()))
                await writer.drain()
                continue
            # Its own kernel buffer small, so `read` is close to what left the gateway.
            writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, PIECE)
            digest = hashlib.sha256()
            slow_until = time.monotonic() + self.slow_seconds
            while self.read < length:
                piece = await reader.read(min(PIECE, length - self.read))
                if not piece:
                    return
                digest.update(piece)
                self.read += len(piece)
                if self.slow and time.monotonic() < slow_until:
                    await asyncio.sleep(1 / 32)  # the slow upstream's pace: 64 KiB per 1/32 s
                else:
                    self.slow = False
            self.slow = False
            writer.write(final(200, digest.hexdigest().encode()))
            await writer.drain()
            return


@pytest.mark.slow
async def test_upload_to_a_slow_upstream_holds_the_client_back_in_flat_memory(
    child_gateway, bearer
):
    """An upload to an upstream reading at about 2 MiB/s (then fast) arrives intact while the
    gateway's RSS grows by less than 20 MB and the client is held back to a few MB ahead of
    what the upstream read."""
    # 48 MiB, not the default 1 MiB limit: the kernel buffers between client and upstream
    # hold several MB, so only an upload well past them can show what the gateway holds.
    size, slow_seconds, ahead_limit = 48 * MiB, 2.0, AHEAD_LIMIT
    piece = os.urandom(PIECE)
    expected = hashlib.sha256()
    for _ in range(size // PIECE):
        expected.update(piece)
    upstream_side = SlowReader(slow_seconds)
    raw = await RawUpstream(upstream_side.script).start()
    try:
        pid, url = await child_gateway(
            raw.url,
            CATALYST_MAX_BODY_BYTES=str(64 * MiB),
            CATALYST_UPSTREAM_TIMEOUT_SECONDS="30",  # the answer comes after the whole upload
        )
        warm = await only_answer(url, purchase(bearer(), "warm-up", piece))
        assert (warm.status, warm.body) == (200, hashlib.sha256(piece).hexdigest().encode())
        baseline = memory(pid)["VmRSS"]
        reset_peak(pid)
        reader, writer = await small_buffer_client(url, socket.SO_SNDBUF)
        sent, ahead = 0, 0
        try:
            async with asyncio.timeout(60):
                headers = [*bearer().items(), ("X-Request-ID", "big"),
                           ("Content-Type", "application/octet-stream"),
                           ("Content-Length", str(size))]  # fmt: skip
                writer.write(request_bytes("POST", PURCHASE, headers))
                for _ in range(size // PIECE):
                    writer.write(piece)
                    await writer.drain()
                    sent += PIECE
                    if upstream_side.slow:
                        ahead = max(ahead, sent - upstream_side.read)
                response = await read_response(reader)
        finally:
            writer.close()
        peak = memory(pid)["VmHWM"]
    finally:
        await raw.close()
    assert response is not None
    assert (response.status, response.body) == (200, expected.hexdigest().encode())
    assert upstream_side.read == size
    assert ahead < ahead_limit, f"the client got {ahead / MiB:.1f} MiB ahead of the upstream"
    assert peak - baseline < RSS_GROWTH_LIMIT, f"RSS grew {(peak - baseline) / MiB:.1f} MiB"
