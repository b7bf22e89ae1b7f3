"""Whole answers written by the gateway itself (``answer.py``): framing, connection handling
and back-pressure, as a client sees them on the wire."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from pathlib import Path

import pytest

from catalyst_proxy.headers import answer_fields

from .rawhttp import Seen, answer, raw_client, read_response, request_bytes

PURCHASE = "/api/v1/billing/purchase"


def http10(method: str, path: str, headers: list[tuple[str, str]], body: bytes = b"") -> bytes:
    """An HTTP/1.0 request as exact bytes, with no Host (HTTP/1.0 does not require one)."""
    lines = [f"{method} {path} HTTP/1.0", *[f"{name}: {value}" for name, value in headers]]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


async def test_answer_head_has_each_framing_field_once(gateway, bearer, upstream):
    """A proxied answer carries exactly one Content-Length (the body's), Date and Server
    (the gateway's name, never a version), and the upstream's allowed fields as sent."""
    up = await upstream(answer(201, b'{"order_id": "o-1"}', {"ETag": '"v1"', "Server": "sme/9"}))
    gw = await gateway(upstream=up.url)
    reader, writer = await raw_client(gw.url)
    try:
        writer.write(request_bytes("POST", PURCHASE, [*bearer().items(), ("Content-Length", "2")]))
        writer.write(b"{}")
        response = await asyncio.wait_for(read_response(reader), 5)
    finally:
        writer.close()
    assert response is not None
    assert response.status == 201
    assert response.body == b'{"order_id": "o-1"}'
    for name in ("Content-Length", "Date", "Server", "ETag", "X-Request-ID"):
        assert len(response.headers.getall(name)) == 1, name
    assert response.headers["Content-Length"] == str(len(response.body))
    assert response.headers["Server"] == "catalyst-proxy"
    assert response.headers["ETag"] == '"v1"'
    assert response.headers["X-Catalyst-Forwarded"] == "yes"
    assert "Connection" not in response.headers  # HTTP/1.1: keep-alive goes without saying


async def test_http10_client_gets_an_http10_answer_and_a_closed_connection(
    gateway, bearer, upstream
):
    """An HTTP/1.0 request without keep-alive gets an HTTP/1.0 answer framed by its length,
    and the connection closes after it; with no Host, no X-Forwarded-Host goes upstream."""
    up = await upstream(answer(200, b'{"ok": true}'))
    gw = await gateway(upstream=up.url)
    reader, writer = await raw_client(gw.url)
    try:
        headers = [*bearer().items(), ("Content-Length", "2")]
        writer.write(http10("POST", PURCHASE, headers, b"{}"))
        response = await asyncio.wait_for(read_response(reader), 5)
        assert response is not None
        assert await asyncio.wait_for(reader.read(), 5) == b""  # the gateway closed it
    finally:
        writer.close()
    assert response.status == 200
    assert response.complete
    assert response.body == b'{"ok": true}'
    assert response.headers["Content-Length"] == "12"
    [seen] = up.complete
    assert "X-Forwarded-Host" not in seen.headers


async def test_http10_keep_alive_and_http11_close_are_honoured(gateway, bearer, upstream):
    """HTTP/1.0 with ``Connection: keep-alive`` is answered with it and served again on the
    same connection; HTTP/1.1 with ``Connection: close`` is answered with it, then closed."""
    up = await upstream(answer(200, b'{"ok": true}'))
    gw = await gateway(upstream=up.url)
    headers = [*bearer().items(), ("Content-Length", "2")]
    reader, writer = await raw_client(gw.url)
    try:
        for _ in range(2):
            writer.write(http10("POST", PURCHASE, [*headers, ("Connection", "keep-alive")], b"{}"))
            kept = await asyncio.wait_for(read_response(reader), 5)
            assert kept is not None
            assert kept.status == 200
            assert kept.headers["Connection"].lower() == "keep-alive"
        writer.write(request_bytes("POST", PURCHASE, [*headers, ("Connection", "close")], b"{}"))
        closing = await asyncio.wait_for(read_response(reader), 5)
        assert closing is not None
        assert closing.status == 200
        assert closing.headers["Connection"].lower() == "close"
        assert await asyncio.wait_for(reader.read(), 5) == b""
    finally:
        writer.close()
    assert len(up.complete) == 3


async def test_http10_keep_alive_with_a_streamed_answer_of_no_length_ends_at_the_close(
    gateway, bearer, upstream
):
    """HTTP/1.0 with keep-alive, and an answer that streams with no length to pass on (chunked
    upstream, in pieces): to HTTP/1.0 its end can only be the connection's end, so the
    gateway closes the connection after it (never a hang, never a next answer run on)."""

    async def pieces(
        seen: Seen, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n7\r\n{\"a\": 1\r\n")  # fmt: skip
        await writer.drain()
        await asyncio.sleep(0.05)  # the rest later: the answer streams
        writer.write(b"1\r\n}\r\n0\r\n\r\n")
        await writer.drain()
        return True

    up = await upstream(pieces)
    gw = await gateway(upstream=up.url)
    headers = [*bearer().items(), ("Content-Length", "2"), ("Connection", "keep-alive")]
    reader, writer = await raw_client(gw.url)
    try:
        writer.write(http10("POST", PURCHASE, headers, b"{}"))
        received = await asyncio.wait_for(reader.read(), 5)  # to the connection's end
    finally:
        writer.close()
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200 ")
    assert b"content-length" not in head.lower()
    assert b"keep-alive" not in head.lower()
    assert body == b'{"a": 1}'


async def test_head_answer_states_the_upstream_length_and_has_no_body(
    gateway, bearer, upstream, tmp_path: Path
):
    """A route that forwards HEAD answers with the SME gateway's Content-Length and no body,
    and the connection serves a next request (no stray body bytes in between)."""
    routes = tmp_path / "routes.json"
    routes.write_text(
        json.dumps(
            {
                "routes": [
                    {
                        "methods": ["HEAD"],
                        "path": "/api/v1/org/billing/vouchers/list",
                        "upstream_method": "HEAD",
                        "upstream_path": "/api/billing/vouchers/list",
                    }
                ]
            }
        )
    )

    async def head_answer(seen, reader, writer) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 4096\r\n\r\n")  # fmt: skip
        await writer.drain()
        return True

    up = await upstream(head_answer)
    gw = await gateway(upstream=up.url, routes_file=str(routes))
    reader, writer = await raw_client(gw.url)
    try:
        for _ in range(2):
            request = request_bytes(
                "HEAD", "/api/v1/org/billing/vouchers/list", [*bearer().items()]
            )
            writer.write(request)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 200 ")
            assert b"\r\nContent-Length: 4096\r\n" in head
    finally:
        writer.close()
    assert [seen.method for seen in up.complete] == ["HEAD", "HEAD"]


HEAD_TO_GET = {
    "routes": [
        {
            "methods": ["HEAD", "GET"],
            "path": "/api/v1/org/billing/vouchers/list",
            "upstream_method": "GET",
            "upstream_path": "/api/billing/vouchers/list",
        }
    ]
}


@pytest.mark.parametrize("framing", ["length", "chunked"])
async def test_head_on_a_route_to_an_upstream_get_never_sends_the_streamed_body(
    gateway, bearer, upstream, tmp_path: Path, framing: str
):
    """A HEAD request on a route whose upstream request is a GET, answered by a body that
    arrives in pieces (streamed, not whole): the client gets the head and not one byte of
    the body, so the next answer on its connection starts where it should."""
    routes = tmp_path / "routes.json"
    routes.write_text(json.dumps(HEAD_TO_GET))
    piece = b"x" * 64 * 1024
    head_seen = asyncio.Event()

    async def get_answer(seen, reader, writer) -> bool:
        if seen.method == "GET" and seen.headers.get("X-Request-ID") == "second":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsecond")
        elif framing == "length":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (4 * len(piece)))
            await writer.drain()
            await head_seen.wait()  # the client has the head: the body is being streamed
            writer.write(piece * 4)
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            await writer.drain()
            await head_seen.wait()
            writer.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(piece), piece))
        await writer.drain()
        return True

    up = await upstream(get_answer)
    gw = await gateway(upstream=up.url, routes_file=str(routes))
    path = "/api/v1/org/billing/vouchers/list"
    reader, writer = await raw_client(gw.url)
    try:
        writer.write(request_bytes("HEAD", path, [*bearer().items()]))
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200 ")
        head_seen.set()
        writer.write(request_bytes("GET", path, [*bearer().items(), ("X-Request-ID", "second")]))
        next_head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        rest = await asyncio.wait_for(reader.readexactly(6), 5)
    finally:
        writer.close()
    # The bytes right after the HEAD answer's head are the next answer's, not a body's.
    assert next_head.startswith(b"HTTP/1.1 200 "), next_head[:40]
    assert rest == b"second"


async def test_a_client_that_does_not_read_holds_back_its_pipelined_requests(
    gateway, bearer, upstream
):
    """Whole answers wait for a client that reads nothing (as aiohttp's writer does): of
    pipelined purchases whose 60 KiB answers add up to three times what the kernel can hold
    for the connection, those reaching the upstream while the client reads nothing stay
    within the kernel's buffers plus a few answers; once it reads, all are answered, in
    order and complete."""
    body = b"x" * (60 * 1024)
    kernel_bytes = _send_buffer_max() + (1 << 20)  # its send buffer, the client's, a few answers
    count = max(200, 3 * kernel_bytes // len(body))
    up = await upstream(answer(200, body))
    gw = await gateway(upstream=up.url)
    loop = asyncio.get_running_loop()
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)  # a small window
    client.setblocking(False)
    host, port = gw.url.removeprefix("http://").split(":")
    await loop.sock_connect(client, (host, int(port)))
    request = request_bytes("POST", PURCHASE, [*bearer().items(), ("Content-Length", "2")])
    try:
        # Written with the loop's socket calls, which never read: nothing is read until the
        # gateway has had 3 s to forward every request, were it not waiting for this client.
        await loop.sock_sendall(client, (request + b"{}") * count)
        with contextlib.suppress(TimeoutError):
            await up.until(lambda: len(up.complete) >= count, timeout=3)
        held_back = len(up.complete)
        assert held_back * len(body) < kernel_bytes, (held_back, count)
        reader, writer = await asyncio.open_connection(sock=client, limit=1 << 20)
        try:
            for _ in range(count):
                response = await asyncio.wait_for(read_response(reader), 10)
                assert response is not None
                assert response.status == 200
                assert response.complete
                assert len(response.body) == len(body)
        finally:
            writer.close()
    finally:
        client.close()
    assert len(up.complete) == count


def _send_buffer_max() -> int:
    """The most a TCP socket's send buffer grows to on this host (tcp_wmem's maximum)."""
    return int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])


def test_answer_fields_cross_as_sent_and_never_start_a_line_of_their_own():
    """The allow-listed fields cross as the bytes received, under their canonical names; a
    value with CR, LF or NUL (a tampered record in a shared store) or one that is not UTF-8
    is dropped, never sent; a missing Content-Type gets the default, and the answer's own
    fields follow."""
    upstream = [
        (b"content-type", b"application/problem+json"),
        (b"ETag", b'"v1"\r\nSet-Cookie: session=stolen'),
        (b"Location", b"/orders/1\x00"),
        (b"Cache-Control", b"no-store\n"),
        (b"Retry-After", b"\xff\xfe"),
        (b"Set-Cookie", b"a=b"),
        (b"Content-Length", b"42"),
    ]
    fields, length = answer_fields(upstream, "req-1", 200)
    assert fields == [
        (b"Content-Type", b"application/problem+json"),
        (b"X-Request-ID", b"req-1"),
        (b"X-Catalyst-Forwarded", b"yes"),
    ]
    assert length == 42
    defaulted, _ = answer_fields([(b"ETag", b'"v2"')], "req-2", 200)
    assert (b"Content-Type", b"application/json") in defaulted


@pytest.mark.parametrize("status", [204, 304])
def test_no_content_type_is_made_up_for_an_answer_without_a_body(status):
    """A 204 or 304 without a Content-Type gets none (on a 304 a cache would take a made-up
    one for the stored answer's type); the other fields cross as ever."""
    fields, _ = answer_fields([(b"ETag", b'"v2"')], "req-3", status)
    assert fields == [
        (b"ETag", b'"v2"'),
        (b"X-Request-ID", b"req-3"),
        (b"X-Catalyst-Forwarded", b"yes"),
    ]


def test_a_content_type_that_cannot_cross_is_not_replaced_by_the_default():
    """A Content-Type the gateway cannot pass on unaltered (not UTF-8: a quoted parameter may
    hold such bytes) is dropped, and no application/json is put in its place: a CSV body must
    not go out labelled JSON."""
    fields, _ = answer_fields([(b"Content-Type", b'text/csv; header="pr\xe9sent"')], "r", 200)
    assert [name for name, _ in fields] == [b"X-Request-ID", b"X-Catalyst-Forwarded"]
