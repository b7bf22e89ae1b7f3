"""Faults, at most once, body integrity, smuggling (issue 4, sections 4-7).

Every case drives the real gateway over real sockets and checks three things:
the exact status and JSON ``error`` (or, mid-body, an aborted transfer), and
what the upstream saw, counted byte-exactly by ``HTTPUpstream``: nothing, one
partial request, or one complete request, never two.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import json
import logging
import os
import re
import socket
import time
import zlib
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.http_parser import RawRequestMessage
from structlog.testing import capture_logs

from catalyst_proxy.app import Tuning
from catalyst_proxy.runner import MAX_HEAD_BYTES

from .conftest import Assurance
from .rawhttp import (
    Respond,
    Seen,
    answer,
    echo,
    exchange,
    never_answer,
    partial_answer,
    raw_client,
    read_response,
    request_bytes,
    write_then_close,
)
from .support import RawUpstream, eventually, memory, reset_peak

ASSURANCE = Assurance()

PURCHASE = "/api/v1/billing/purchase"
BUDGET = 0.3  # upstream_timeout_seconds for the fault cases
LIMIT = 256 * 1024  # max_body_bytes for the body cases

# A request that must never reach the upstream when it rides behind or inside another one.
SECOND = (
    b"POST /api/v1/sme/billing/vouchers/issue HTTP/1.1\r\nHost: gateway.test\r\n"
    b"Authorization: {auth}\r\nContent-Length: 20\r\n\r\n"
    b'{"code": "SMUGGLED"}'
)


def error_of(body: bytes) -> str:
    return str(json.loads(body)["error"])


@contextlib.contextmanager
def black_hole() -> Iterator[str]:
    """A 127.0.0.1 URL whose accept queue is full: SYNs are dropped, never answered or refused."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers: list[socket.socket] = []
    try:
        for _ in range(4):
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
            fillers.append(filler)
        yield f"http://127.0.0.1:{port}"
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


# === 4. Upstream faults ======================================================================


async def test_black_holed_upstream_is_503_unreachable_within_the_budget(gateway, bearer):
    """An upstream whose SYNs are dropped (accept queue full) is 503 unreachable within the
    budget."""
    with black_hole() as url:
        gw = await gateway(upstream=url, upstream_timeout_seconds=BUDGET)
        started = time.monotonic()
        status, headers, body = await gw.request("POST", PURCHASE, headers=bearer(), data=b"{}")
        elapsed = time.monotonic() - started
    assert status == 503, body
    assert error_of(body) == "sme-gateway-unreachable"
    assert json.loads(body)["detail"]
    assert headers["X-Request-ID"]
    assert elapsed < BUDGET + 0.5


@pytest.mark.slow
async def test_black_holed_upstream_is_503_with_a_budget_above_five_seconds(gateway, bearer):
    """With a budget above 5 s (where aiohttp rounds its timeouts up to whole seconds) a
    black-holed upstream is still 503 unreachable at the budget, never a 504."""
    budget = 5.02
    with black_hole() as url:
        gw = await gateway(upstream=url, upstream_timeout_seconds=budget)
        started = time.monotonic()
        status, _, body = await gw.request("POST", PURCHASE, headers=bearer(), data=b"{}")
        elapsed = time.monotonic() - started
    assert (status, error_of(body)) == (503, "sme-gateway-unreachable")
    assert budget <= elapsed < budget + 0.5


async def test_upstream_that_reads_and_never_answers_is_504_within_the_budget(
    gateway, bearer, upstream
):
    """An upstream that takes the whole request and never answers is 504 sme-gateway-timeout
    once the budget is spent, plus a small margin, and saw the request exactly once."""
    up = await upstream(never_answer)
    gw = await gateway(upstream=up.url, upstream_timeout_seconds=BUDGET)
    started = time.monotonic()
    status, headers, body = await gw.request("POST", PURCHASE, headers=bearer(), data=b"{}")
    elapsed = time.monotonic() - started
    assert (status, error_of(body)) == (504, "sme-gateway-timeout")
    assert headers["X-Request-ID"]
    assert BUDGET <= elapsed < BUDGET + 0.5
    await up.all_closed()
    assert [seen.complete for seen in up.requests] == [True]


@pytest.mark.parametrize(
    "reply",
    [
        b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 65536 + b"\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 65536,
        b"HTTP/1.1 200 " + b"O" * 65536 + b"\r\n\r\n",
    ],
    ids=["header-line", "header-line-unterminated", "status-line"],
)
async def test_64_kib_upstream_line_is_502(gateway, bearer, upstream, reply):
    """A 64 KiB status or header line from the upstream is 502 sme-gateway-bad-response."""
    up = await upstream(write_then_close(reply))
    gw = await gateway(upstream=up.url, upstream_timeout_seconds=BUDGET)
    status, _, body = await gw.request("POST", PURCHASE, headers=bearer(), data=b"{}")
    assert (status, error_of(body)) == (502, "sme-gateway-bad-response")
    await up.all_closed()
    assert [seen.complete for seen in up.requests] == [True]


async def test_slow_upstream_body_streams_through_piece_by_piece(gateway, bearer, upstream):
    """A body sent one byte at a time, each within the budget, streams through to the client
    as it comes (each byte arrives before the next is sent), though the whole takes longer."""
    pieces = b"slowly!"
    delivered = [asyncio.Event() for _ in pieces]
    interval = 0.1  # per piece, under the 0.25 s budget; 7 pieces take longer than the budget

    async def respond(
        seen: Seen, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(pieces))
        await writer.drain()
        for index in range(len(pieces)):
            await asyncio.sleep(interval)  # a slow server
            writer.write(pieces[index : index + 1])
            await writer.drain()
            await delivered[index].wait()  # the client has it before the next byte leaves
        return False

    up = await upstream(respond)
    gw = await gateway(upstream=up.url, upstream_timeout_seconds=0.25)
    started = time.monotonic()
    async with (
        asyncio.timeout(10),
        gw.http.post(gw.url + PURCHASE, headers=bearer(), data=b"{}") as resp,
    ):
        assert resp.status == 200
        assert resp.headers["Content-Length"] == str(len(pieces))
        for index in range(len(pieces)):
            # Lock-step: the upstream sends byte n+1 only once the client holds byte n.
            assert await resp.content.readany() == pieces[index : index + 1]
            delivered[index].set()
        assert await resp.content.read() == b""
    assert time.monotonic() - started > 0.25  # the whole outlasted the budget: it is per piece


@dataclass(frozen=True)
class MidBody:
    """An upstream that starts a 200 and breaks off (or stalls) partway through the body."""

    chunked: bool
    then: str

    def respond(self) -> Respond:
        return partial_answer(b"x" * 1000, b"x" * 400, chunked=self.chunked, then=self.then)


MID_BODY = {
    "length-then-close": MidBody(chunked=False, then="close"),
    "chunked-then-close": MidBody(chunked=True, then="close"),
    "length-then-stall": MidBody(chunked=False, then="stall"),
    "chunked-then-stall": MidBody(chunked=True, then="stall"),
}


@pytest.mark.parametrize("case", MID_BODY)
async def test_upstream_breaking_off_mid_body_aborts_the_clients_transfer(
    gateway, bearer, upstream, case
):
    """An upstream that breaks off or stalls past the budget mid-body ends in an aborted
    transfer (short of the declared length or without the final chunk), never a clean short 200."""
    up = await upstream(MID_BODY[case].respond())
    gw = await gateway(upstream=up.url, upstream_timeout_seconds=BUDGET)
    request = request_bytes("POST", PURCHASE, [*bearer().items(), ("Content-Length", "2")], b"{}")
    started = time.monotonic()
    responses = await exchange(gw.url, request + request, at_most=2)
    elapsed = time.monotonic() - started
    assert len(responses) == 1  # the connection is gone: no second answer on it
    [response] = responses
    assert response.status == 200
    assert not response.complete
    assert response.body == b"x" * 400
    if MID_BODY[case].chunked:
        assert "Content-Length" not in response.headers
    else:
        assert response.headers["Content-Length"] == "1000"
    if MID_BODY[case].then == "stall":
        assert BUDGET <= elapsed < BUDGET + 0.5
    await up.all_closed()
    assert [seen.complete for seen in up.requests] == [True]


@pytest.mark.parametrize("case", MID_BODY)
async def test_aiohttp_client_sees_a_payload_error_when_the_upstream_breaks_off(
    gateway, bearer, upstream, case
):
    """An ordinary HTTP client reading a broken-off answer gets a payload error, not a short
    body."""
    up = await upstream(MID_BODY[case].respond())
    gw = await gateway(upstream=up.url, upstream_timeout_seconds=BUDGET)
    status, error, _ = await one_call(gw, "POST", PURCHASE, bearer(), b"{}")
    assert (status, error) == (200, "aborted")


async def test_gzip_answer_passes_through_byte_identical(gateway, bearer, upstream):
    """A gzip-encoded upstream answer reaches the client as the same bytes with its
    Content-Encoding: never inflated, never re-encoded."""
    plain = json.dumps({"vouchers": [{"code": f"V{i}", "amount_cents": i} for i in range(500)]})
    compressed = gzip.compress(plain.encode(), mtime=0)
    up = await upstream(answer(200, compressed, [("Content-Encoding", "gzip"), ("Vary", "x")]))
    gw = await gateway(upstream=up.url)
    status, headers, body = await gw.request(
        "GET",
        "/api/v1/sme/billing/vouchers/list",
        headers={**bearer(), "Accept-Encoding": "gzip"},
    )
    assert status == 200
    assert headers["Content-Encoding"] == "gzip"
    assert headers["Content-Length"] == str(len(compressed))
    assert hashlib.sha256(body).hexdigest() == hashlib.sha256(compressed).hexdigest()
    assert gzip.decompress(body).decode() == plain
    assert "Accept-Encoding" not in up.requests[0].headers


@pytest.mark.slow
async def test_200_mb_answer_streams_with_flat_memory(gateway, bearer, upstream):
    """A 200 MB answer streams through intact without the gateway holding it: peak memory grows
    by far less than the body."""
    size, piece = 200 * 1024 * 1024, os.urandom(1 << 20)
    expected = hashlib.sha256()
    for _ in range(size // len(piece)):
        expected.update(piece)

    async def respond(
        seen: Seen, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        for _ in range(size // len(piece)):
            writer.write(piece)
            await writer.drain()
        return False

    up = await upstream(respond)
    gw = await gateway(upstream=up.url, upstream_timeout_seconds=5)
    reset_peak(os.getpid())  # (ru_maxrss would be the run's peak so far: unresettable)
    peak_before = memory(os.getpid())["VmHWM"]
    digest, received = hashlib.sha256(), 0
    async with gw.http.post(gw.url + PURCHASE, headers=bearer(), data=b"{}") as resp:
        assert resp.status == 200
        async for chunk in resp.content.iter_chunked(1 << 20):
            digest.update(chunk)
            received += len(chunk)
    peak_after = memory(os.getpid())["VmHWM"]
    assert received == size
    assert digest.hexdigest() == expected.hexdigest()
    assert peak_after - peak_before < 48 * 1024 * 1024


async def test_a_client_gone_mid_answer_is_499_never_a_server_error(gateway, bearer, upstream):
    """A client that hangs up while a large answer streams to it is logged and counted as 499
    client-closed-request (or 200, if the whole answer was out already): never a 500
    internal-error with a handler.error line, whichever way aiohttp learns of it (a failed
    write, or the handler's cancellation)."""
    piece = b"x" * 16384

    async def large(seen: Seen, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")  # fmt: skip
        with contextlib.suppress(ConnectionError):
            for _ in range(40):  # 640 KiB, in pieces: the gateway streams it
                writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                await writer.drain()
            writer.write(b"0\r\n\r\n")
            await writer.drain()
        return True

    up = await upstream(large)
    gw = await gateway(upstream=up.url)
    auth = bearer()["Authorization"]
    request = request_bytes(
        "POST", PURCHASE, [("Authorization", auth), ("Content-Length", "2")], b"{}"
    )
    with capture_logs() as logs:
        for _ in range(10):
            reader, writer = await raw_client(gw.url)
            writer.write(request)
            await reader.readexactly(2000)  # the answer has started
            writer.close()  # ... and the client goes away
        await eventually(lambda: gw.parts.dispatcher.in_flight == 0)
        await eventually(lambda: len([e for e in logs if e["event"] == "request"]) == 10)
    lines = [(e["status"], e["error"]) for e in logs if e["event"] == "request"]
    assert set(lines) <= {(499, "client-closed-request"), (200, None)}, lines
    assert (499, "client-closed-request") in lines
    assert not [e for e in logs if e["event"] == "handler.error"]


# === 5. At most once =========================================================================


@dataclass(frozen=True)
class Fault:
    respond: Respond
    status: int
    error: str | None  # None: the upstream's own status; "aborted": a broken-off 200
    # The upstream budget: BUDGET (0.3 s) for the faults that wait it out, 5 s for the
    # others, so that a starved CI machine cannot turn their 502 or abort into a 504.
    budget: float = 5.0


FAULTS: dict[str, Fault] = {
    "never-answers": Fault(never_answer, 504, "sme-gateway-timeout", BUDGET),
    "closes-before-status": Fault(write_then_close(b""), 502, "sme-gateway-bad-response"),
    "closes-mid-status": Fault(write_then_close(b"HTTP/1.1 20"), 502, "sme-gateway-bad-response"),
    "garbage-status": Fault(
        write_then_close(b"HTTP/1.1 OK fine\r\n\r\n"), 502, "sme-gateway-bad-response"
    ),
    "64k-header": Fault(
        write_then_close(b"HTTP/1.1 200 OK\r\nX: " + b"a" * 65536 + b"\r\n\r\n"),
        502,
        "sme-gateway-bad-response",
    ),
    "length-then-close": Fault(MID_BODY["length-then-close"].respond(), 200, "aborted"),
    "chunked-then-close": Fault(MID_BODY["chunked-then-close"].respond(), 200, "aborted"),
    "stalls-mid-body": Fault(MID_BODY["length-then-stall"].respond(), 200, "aborted", BUDGET),
    "503-retry-after": Fault(
        answer(503, b'{"error": "busy"}', [("Retry-After", "7")], keep_alive=False), 503, None
    ),
}

METHODS = {
    "POST": ("POST", PURCHASE, "POST"),
    "GET": ("GET", "/api/v1/sme/billing/vouchers/list", "GET"),
    "DELETE": ("DELETE", "/api/v1/sme/billing/vouchers/revoke/VCH-9", "DELETE"),
}


async def one_call(gw, method: str, path: str, headers: dict[str, str], data: bytes | None):
    """(status, error code or "aborted" or None, headers) for one request through the gateway."""
    async with (
        asyncio.timeout(10),
        gw.http.request(method, gw.url + path, headers=headers, data=data) as resp,
    ):
        try:
            body = await resp.read()
        except aiohttp.ClientPayloadError:
            return resp.status, "aborted", resp.headers
        if resp.status >= 500 and body.startswith(b'{"error": "sme-'):
            return resp.status, error_of(body), resp.headers
        return resp.status, None, resp.headers


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("fault", FAULTS)
async def test_every_fault_repeated_reaches_the_upstream_exactly_once_per_request(
    gateway, bearer, upstream, fault, method
):
    """Under every upstream fault, 20 concurrent requests each reach the upstream exactly once:
    no retry for POST, GET or DELETE, whatever the HTTP client library would do."""
    spec = FAULTS[fault]
    client_method, path, upstream_method = METHODS[method]
    up = await upstream(spec.respond)
    gw = await gateway(upstream=up.url, upstream_timeout_seconds=spec.budget)
    ids = [f"{fault}-{method}-{n}" for n in range(20)]
    data = b'{"sku": "starter"}' if client_method == "POST" else None
    results = await asyncio.gather(
        *(one_call(gw, client_method, path, {**bearer(), "X-Request-ID": rid}, data) for rid in ids)
    )
    for status, error, headers in results:
        assert (status, error) == (spec.status, spec.error)
        assert headers["X-Request-ID"] in ids
    await up.all_closed()
    seen_ids = Counter(seen.headers.get("X-Request-ID") for seen in up.requests)
    ASSURANCE.add("fault runs: client requests under upstream faults", len(ids))
    ASSURANCE.add("fault runs: duplicated upstream requests (must be 0)",
                  sum(n - 1 for n in seen_ids.values() if n > 1))  # fmt: skip
    assert seen_ids == Counter(ids)  # each request exactly once: never zero, never twice
    assert all(seen.complete and seen.method == upstream_method for seen in up.requests)
    assert up.connections == 20


@pytest.mark.parametrize("method", METHODS)
async def test_upstream_closing_idle_keepalive_connections_never_causes_a_resend(
    gateway, bearer, upstream, method
):
    """An upstream that closes each keep-alive connection right after answering: every request
    reaches it at most once (a stale pooled connection is a 502, never a silent second send)."""

    async def answer_then_close(
        seen: Seen, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        # Keep-alive is promised (no "Connection: close") and then broken at once.
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
        await writer.drain()
        return False

    client_method, path, _ = METHODS[method]
    up = await upstream(answer_then_close)
    gw = await gateway(upstream=up.url, upstream_timeout_seconds=2)
    outcomes: Counter[int] = Counter()
    for n in range(30):
        rid = f"idle-{method}-{n}"
        headers = {**bearer(), "X-Request-ID": rid}
        status, error, _ = await one_call(gw, client_method, path, headers, None)
        assert (status, error) in ((200, None), (502, "sme-gateway-bad-response"))
        outcomes[status] += 1
        matching = [seen for seen in up.requests if seen.headers.get("X-Request-ID") == rid]
        if status == 200:
            assert len(matching) == 1
            assert matching[0].complete
        else:  # sent on a connection the upstream had already closed: it never saw it
            assert matching == []
    await up.all_closed()
    seen_ids = Counter(seen.headers.get("X-Request-ID") for seen in up.requests)
    ASSURANCE.add("fault runs: client requests under upstream faults", 30)
    ASSURANCE.add("fault runs: duplicated upstream requests (must be 0)",
                  sum(n - 1 for n in seen_ids.values() if n > 1))  # fmt: skip
    assert max(seen_ids.values()) == 1
    assert len(up.requests) == outcomes[200]
    assert outcomes[200] >= 1


# === 6. Body integrity =======================================================================

BODIES = {
    "random-binary": os.urandom(100_000),
    "nul-bytes": b"\x00" * 5000 + b"{}" + b"\x00" * 5000,
    "invalid-utf8": b'{"sku": "\xff\xfe\xc3\x28\xa0\xa1\xe2\x28\xa1\xf0\x28\x8c\xbc"}',
    "emoji": '{"note": "💳🧾✅ ünïcødé 中文 𝕏"}'.encode(),
    "bom": b'\xef\xbb\xbf{"sku": "starter"}',
    "utf16-bom": '{"sku": "x"}'.encode("utf-16"),
    "crlf-and-request-lookalike": b"0\r\n\r\nPOST /api/billing/vouchers/issue HTTP/1.1\r\n\r\n",
    "empty": b"",
    "one-byte": b"\x00",
    "exactly-at-limit": os.urandom(LIMIT),
}


async def chunks_of(data: bytes, size: int) -> AsyncIterator[bytes]:
    for offset in range(0, len(data), size):
        yield data[offset : offset + size]


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
@pytest.mark.parametrize("name", BODIES)
async def test_body_round_trips_byte_for_byte(gateway, bearer, upstream, name, framing):
    """The request body reaches the upstream byte for byte and the answer comes back the same
    way: SHA-256 equal on the client, the upstream and the returning answer."""
    payload = BODIES[name]
    sent = hashlib.sha256(payload).hexdigest()
    up = await upstream(echo)
    gw = await gateway(upstream=up.url, max_body_bytes=LIMIT)
    data = payload if framing == "content-length" else chunks_of(payload, 7919)
    status, _, body = await gw.request(
        "POST",
        PURCHASE,
        headers={**bearer(), "Content-Type": "application/octet-stream"},
        data=data,
    )
    ASSURANCE.add("body round-trips (SHA-256 on client, upstream, answer)")
    ASSURANCE.add("body round-trip mismatches (must be 0)",
                  int(not up.requests or up.requests[0].sha256 != sent
                      or hashlib.sha256(body).hexdigest() != sent))  # fmt: skip
    assert status == 200
    assert len(up.requests) == 1
    seen = up.requests[0]
    assert seen.complete
    assert seen.sha256 == sent
    assert hashlib.sha256(body).hexdigest() == sent
    if framing == "content-length":
        assert seen.headers["Content-Length"] == str(len(payload))


async def test_one_byte_over_the_limit_with_a_declared_length_is_413_and_nothing_upstream(
    gateway, bearer, upstream
):
    """A declared length one byte over the limit is 413 request-body-too-large before anything
    is sent upstream."""
    up = await upstream(echo)
    gw = await gateway(upstream=up.url, max_body_bytes=LIMIT)
    status, headers, body = await gw.request(
        "POST", PURCHASE, headers=bearer(), data=os.urandom(LIMIT + 1)
    )
    assert (status, error_of(body)) == (413, "request-body-too-large")
    assert headers["X-Request-ID"]
    # The refused body is never read as requests: one made of pipelined requests stays inert.
    auth = bearer()["Authorization"]
    inner = SECOND.replace(b"{auth}", auth.encode())
    refused = (inner * (LIMIT // len(inner) + 2))[: LIMIT + 1]
    head = request_bytes(
        "POST", PURCHASE, [("Authorization", auth), ("Content-Length", str(len(refused)))]
    )
    responses = await exchange(gw.url, head + refused, at_most=3)
    assert [response.status for response in responses] == [413]
    assert up.connections == 0


@pytest.mark.parametrize("piece", [1, 8192, LIMIT + 1])
async def test_one_byte_over_the_limit_without_a_length_is_413_and_the_upload_aborted(
    gateway, bearer, upstream, piece
):
    """A chunked upload that runs one byte past the limit is 413 request-body-too-large and the
    upstream never sees a complete request."""
    up = await upstream(echo)
    gw = await gateway(upstream=up.url, max_body_bytes=LIMIT, upstream_timeout_seconds=10)
    payload = os.urandom(LIMIT + 1)
    if piece == 1:
        # Raw bytes: LIMIT bytes in one chunk, then the one byte too many in its own chunk.
        body = b"%x\r\n%s\r\n1\r\n%s\r\n0\r\n\r\n" % (LIMIT, payload[:LIMIT], payload[LIMIT:])
        head = request_bytes(
            "POST", PURCHASE, [*bearer().items(), ("Transfer-Encoding", "chunked")]
        )
        responses = await exchange(gw.url, head + body)
        status, error = responses[0].status, error_of(responses[0].body)
    else:
        status, _, answer_body = await gw.request(
            "POST", PURCHASE, headers=bearer(), data=chunks_of(payload, piece)
        )
        error = error_of(answer_body)
    assert (status, error) == (413, "request-body-too-large")
    await up.all_closed()
    assert not up.complete
    assert all(len(seen.body) <= LIMIT for seen in up.requests)


async def test_100000_one_byte_chunks_arrive_intact_in_bounded_time(gateway, bearer, upstream):
    """A body sent as 100,000 one-byte chunks arrives intact within the time budget (a 504
    otherwise: the bound is the gateway's own, not a guess at this machine's speed)."""
    payload = os.urandom(100_000)
    body = b"".join(b"1\r\n%c\r\n" % byte for byte in payload) + b"0\r\n\r\n"
    up = await upstream(echo)
    gw = await gateway(upstream=up.url, upstream_timeout_seconds=15)
    head = request_bytes("POST", PURCHASE, [*bearer().items(), ("Transfer-Encoding", "chunked")])
    [response] = await exchange(gw.url, head + body, timeout=30)
    assert response.status == 200
    assert response.complete
    assert response.sha256 == hashlib.sha256(payload).hexdigest()
    assert up.requests[0].sha256 == hashlib.sha256(payload).hexdigest()


async def test_100000_one_byte_writes_from_a_client_library_arrive_intact(
    gateway, bearer, upstream
):
    """An HTTP client streaming 100,000 one-byte pieces gets its body through intact within
    the time budget (a 504 otherwise)."""
    payload = os.urandom(100_000)
    up = await upstream(echo)
    gw = await gateway(upstream=up.url, upstream_timeout_seconds=20)
    status, _, body = await gw.request(
        "POST", PURCHASE, headers=bearer(), data=chunks_of(payload, 1)
    )
    assert status == 200
    assert hashlib.sha256(body).hexdigest() == hashlib.sha256(payload).hexdigest()
    assert up.requests[0].sha256 == hashlib.sha256(payload).hexdigest()


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
@pytest.mark.parametrize("how", ["close", "half-close"])
async def test_client_that_stops_halfway_never_completes_upstream(
    gateway, bearer, upstream, framing, how
):
    """A client that stops halfway through its body (closing, or half-closing its side) never
    causes a complete request upstream; the upstream connection is closed."""
    up = await upstream(echo)
    gw = await gateway(upstream=up.url, upstream_timeout_seconds=30)
    half = os.urandom(5000)
    if framing == "chunked":
        headers = [*bearer().items(), ("Transfer-Encoding", "chunked")]
        start = request_bytes("POST", PURCHASE, headers) + b"%x\r\n%s\r\n" % (len(half), half)
        start += b"2710\r\n" + half  # a 10000-byte chunk, cut off halfway
    else:
        headers = [*bearer().items(), ("Content-Length", "10000")]
        start = request_bytes("POST", PURCHASE, headers) + half
    reader, writer = await raw_client(gw.url)
    writer.write(start)
    await writer.drain()
    async with asyncio.timeout(5):
        await up.head_arrived.wait()
    if how == "half-close":
        writer.write_eof()
        response = await asyncio.wait_for(read_response(reader), 5)
        assert response is None or response.status >= 400
    writer.close()
    await up.all_closed(timeout=5)
    ASSURANCE.add("aborted uploads", 1)
    ASSURANCE.add("aborted uploads completed upstream (must be 0)",
                  sum(seen.complete for seen in up.requests))  # fmt: skip
    assert len(up.requests) == 1
    assert not up.requests[0].complete
    assert bytes(up.requests[0].body) == (half + half)[: len(up.requests[0].body)]


@pytest.mark.parametrize(
    "tail",
    [
        pytest.param(b"ZZ\r\nhello\r\n0\r\n\r\n", id="bad-chunk-size"),
        pytest.param(b"5\r\nhelloXX0\r\n\r\n", id="chunk-without-crlf"),
        pytest.param(b"0\r\nX-T: " + b"a" * 20_000 + b"\r\n\r\n", id="trailer-over-the-limit"),
    ],
)
async def test_a_chunked_body_the_parser_refuses_midway_is_400_at_once(
    gateway, bearer, upstream, tail, caplog
):
    """A chunked body whose later bytes the parser refuses, after the request was dispatched
    and its start sent upstream, is 400 at once (nothing forwarded, the connection closed, the
    upstream's request left incomplete), never a wait for the time budget and a 504 that
    blames the SME gateway for the client's bytes."""
    up = await upstream(echo)
    gw = await gateway(upstream=up.url, upstream_timeout_seconds=30)
    headers = [*bearer().items(), ("Transfer-Encoding", "chunked")]
    reader, writer = await raw_client(gw.url)
    writer.write(request_bytes("POST", PURCHASE, headers) + b"3\r\nabc\r\n")
    await writer.drain()
    async with asyncio.timeout(5):
        await up.head_arrived.wait()  # dispatched, and on its way upstream
    with caplog.at_level(logging.DEBUG):
        writer.write(tail)
        async with asyncio.timeout(5):  # not the 30-s budget
            response = await read_response(reader)
            assert await reader.read() == b""  # and nothing after it: the connection closes
    writer.close()
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == []  # no traceback: aiohttp does not read on from the ended body
    assert response is not None
    assert (response.status, error_of(response.body)) == (400, "bad-request")
    assert response.headers["X-Catalyst-Forwarded"] == "no"
    await up.all_closed(timeout=5)
    assert len(up.requests) == 1
    assert not up.requests[0].complete
    blamed = re.search(
        r'upstream_failures_total\{kind="timeout"\} ([0-9.]+)', await gw.metrics_text()
    )
    assert blamed is None or float(blamed.group(1)) == 0  # the SME gateway is not blamed


@pytest.mark.parametrize(
    "encoding",
    [
        ["gzip"],
        ["br"],
        ["deflate"],
        ["deflate, identity"],
        ["identity, gzip"],
        ["GZip"],
        ["x-gzip"],
        ["compress"],
        ["zstd"],
        ["identity", "gzip"],
        ["aes128gcm"],
    ],
)
async def test_encoded_request_body_is_415_and_nothing_upstream(
    gateway, bearer, upstream, encoding
):
    """A request body with any Content-Encoding other than identity is 415
    unsupported-content-encoding and nothing reaches the upstream."""
    up = await upstream(echo)
    gw = await gateway(upstream=up.url)
    body = zlib.compress(b'{"sku": "starter"}')
    headers = [*bearer().items(), *(("Content-Encoding", value) for value in encoding)]
    status, resp_headers, answer_body = await gw.request(
        "POST", PURCHASE, headers=headers, data=body
    )
    assert (status, error_of(answer_body)) == (415, "unsupported-content-encoding")
    assert resp_headers["X-Request-ID"]
    assert up.connections == 0


async def test_identity_content_encoding_is_accepted_and_body_unchanged(gateway, bearer, upstream):
    """Content-Encoding: identity is no encoding: the body goes through unchanged."""
    up = await upstream(echo)
    gw = await gateway(upstream=up.url)
    payload = gzip.compress(b"looks compressed but is just bytes")
    status, _, body = await gw.request(
        "POST", PURCHASE, headers={**bearer(), "Content-Encoding": "identity"}, data=payload
    )
    assert (status, body) == (200, payload)
    assert up.requests[0].sha256 == hashlib.sha256(payload).hexdigest()
    assert "Content-Encoding" not in up.requests[0].headers


# === 7. Request smuggling and header hygiene =================================================

SMUGGLING = {
    "cl-and-te": ([("Content-Length", "5"), ("Transfer-Encoding", "chunked")], "zero"),
    "te-and-cl": ([("Transfer-Encoding", "chunked"), ("Content-Length", "5")], "zero"),
    "cl-covering-smuggled": ([("Transfer-Encoding", "chunked")], "cl-covers"),
    "two-content-lengths": ([("Content-Length", "5"), ("Content-Length", "40")], "zero"),
    "same-content-length-twice": ([("Content-Length", "5"), ("Content-Length", "5")], "zero"),
    "content-length-list": ([("Content-Length", "5, 5")], "zero"),
    "content-length-plus": ([("Content-Length", "+5")], "zero"),
    "te-chunked-identity": ([("Transfer-Encoding", "chunked, identity")], "zero"),
    "te-xchunked": ([("Transfer-Encoding", "xchunked")], "zero"),
    "te-leading-space-and-cl": (
        [("Transfer-Encoding", " chunked"), ("Content-Length", "5")],
        "zero",
    ),
    "te-identity": ([("Transfer-Encoding", "identity")], "zero"),
    "te-twice": ([("Transfer-Encoding", "chunked"), ("Transfer-Encoding", "chunked")], "zero"),
    "te-obs-fold": ([("Transfer-Encoding", "identity\r\n chunked")], "zero"),
    "te-space-before-colon": ([("Transfer-Encoding ", "chunked")], "zero"),
    "te-vertical-tab": ([("Transfer-Encoding", "\x0bchunked")], "zero"),
}


@pytest.mark.parametrize("case", SMUGGLING)
async def test_ambiguous_framing_is_refused_and_the_pipelined_request_never_reaches_upstream(
    gateway, bearer, upstream, case
):
    """A request with ambiguous framing is refused with 400 and the connection closed: neither
    it nor the request pipelined behind it reaches the upstream."""
    up = await upstream(answer())
    gw = await gateway(upstream=up.url)
    auth = bearer()["Authorization"]
    second = SECOND.replace(b"{auth}", auth.encode())
    headers, body_kind = SMUGGLING[case]
    body = b"0\r\n\r\n"
    if body_kind == "cl-covers":
        body += second
        headers = [*headers, ("Content-Length", str(len(body)))]
    first = request_bytes("POST", PURCHASE, [("Authorization", auth), *headers], body)
    responses = await exchange(gw.url, first + second, at_most=3)
    assert [response.status for response in responses] == [400]
    assert up.connections == 0
    assert up.requests == []


REQUEST_LINE_VERSIONS = {
    "none": (b"", b"HTTP/1.1 400 "),
    "http-0.9": (b" HTTP/0.9", b"HTTP/1.1 400 "),
    "http-2.0": (b" HTTP/2.0", b"HTTP/1.1 400 "),
    "http-1.0-with-te": (b" HTTP/1.0", b"HTTP/1.0 400 "),
}


@pytest.mark.parametrize("case", REQUEST_LINE_VERSIONS)
async def test_a_request_line_the_gateway_does_not_speak_is_400_and_the_connection_closed(
    gateway, bearer, upstream, case
):
    """A request line with no version, HTTP/0.9 or HTTP/2.0 (which the parser lets through),
    and an HTTP/1.0 request framed by Transfer-Encoding (RFC 9112 §6.1: faulty framing), even
    one asking for keep-alive, are refused with 400 bad-request in HTTP/1.1 (or 1.0), never
    the claimed version echoed; the connection closes, and nothing reaches the upstream:
    neither that request nor (HTTP/1.0) the one pipelined behind it. (A versionless line
    with a request pipelined behind it is refused by the parser itself.)"""
    up = await upstream(answer())
    gw = await gateway(upstream=up.url)
    auth = bearer()["Authorization"]
    version, status_line = REQUEST_LINE_VERSIONS[case]
    body = b'{"sku": "starter"}'
    framing = (
        b"Transfer-Encoding: chunked\r\nConnection: keep-alive\r\n\r\n%x\r\n%s\r\n0\r\n\r\n"
        % (len(body), body)
        if case == "http-1.0-with-te"
        else b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    first = b"POST %s%s\r\nHost: gateway.test\r\nAuthorization: %s\r\n%s" % (
        PURCHASE.encode(), version, auth.encode(), framing,
    )  # fmt: skip
    second = SECOND.replace(b"{auth}", auth.encode()) if case == "http-1.0-with-te" else b""
    reader, writer = await raw_client(gw.url)
    try:
        writer.write(first + second)
        async with asyncio.timeout(10):
            received = await reader.read(-1)  # to the connection's end: it must close
    finally:
        writer.close()
    assert received.startswith(status_line), received[:40]
    assert received.count(b"HTTP/1.") == 1  # one answer, for the first request only
    assert error_of(received.partition(b"\r\n\r\n")[2]) == "bad-request"
    assert b"X-Catalyst-Forwarded: no\r\n" in received
    assert up.requests == []


@pytest.mark.parametrize(
    ("request_head", "status"),
    [
        (b"FOO /api/v1/billing/purchase HTTP/1.1\r\nHost: g\r\n\r\n", 400),
        (b"POST /api/v1/billing/purchase HTTP/1.1\r\nX-Big: " + b"a" * 17000 + b"\r\n\r\n", 431),
    ],
    ids=["unknown-method", "header-line-too-long"],
)
async def test_a_request_the_parser_refuses_is_logged_and_counted(gateway, request_head, status):
    """A request refused by the HTTP parser, before any handler (an unknown method, a header
    line over the limit), still has its one access line, under the X-Request-ID its answer
    carries, and its count in catalyst_proxy_requests_total (route none, method other)."""
    gw = await gateway()
    with capture_logs() as logs:
        [response] = await exchange(gw.url, request_head)
        await eventually(lambda: any(e["event"] == "request" for e in logs))
    assert response.status == status
    [line] = [e for e in logs if e["event"] == "request"]
    assert line["request_id"] == response.headers["X-Request-ID"]
    assert (line["status"], line["error"], line["method"], line["path"], line["route"]) == (
        status, error_of(response.body), None, None, "none",
    )  # fmt: skip
    [refused] = [e for e in logs if e["event"] == "request.refused"]
    assert refused["request_id"] == line["request_id"]
    text = await gw.metrics_text()
    wanted = f'catalyst_proxy_requests_total{{method="other",route="none",status="{status}"}} 1.0'
    assert wanted in text


async def test_a_handler_raising_a_protocol_error_is_accounted_once(gateway, bearer, monkeypatch):
    """aiohttp answers a handler's exception through the same error path as the parser's
    refusals: one that is a protocol error (as aiohttp's own body reader can raise) is the
    dispatcher's to log and count (500), never counted a second time as unparsable."""
    gw = await gateway()

    async def broken(*args: object) -> None:
        raise HttpProcessingError(message="a body the reader could not parse")

    monkeypatch.setattr(gw.parts.dispatcher._proxy, "handle", broken)
    with capture_logs() as logs:
        async with gw.http.post(gw.url + PURCHASE, headers=bearer(), data=b"{}") as resp:
            assert resp.status == 500
            answered_id = resp.headers["X-Request-ID"]
        await eventually(lambda: gw.parts.dispatcher.in_flight == 0)
    lines = [e for e in logs if e["event"] == "request"]
    assert [(e["status"], e["error"]) for e in lines] == [(500, "internal-error")]
    assert not [e for e in logs if e["event"] == "request.refused"]  # (not the parser's)
    text = await gw.metrics_text()
    counted = [
        line
        for line in text.splitlines()
        if line.startswith("catalyst_proxy_requests_total{") and 'status="500"' in line
    ]
    assert counted == [
        'catalyst_proxy_requests_total{method="POST",route="/api/v1/billing/purchase",'
        'status="500"} 1.0'
    ]
    assert answered_id


@pytest.mark.parametrize("keyed", [False, True])
async def test_a_bad_chunk_size_right_after_a_chunk_never_ends_the_body_cleanly(
    gateway, bearer, upstream, keyed
):
    """The CRLF that ends a good chunk and a bad chunk size after it, in one read: the CRLF
    wakes the body's reader with nothing new, then the parser gives up. The reader must see
    the error, not an end: the upstream request stays incomplete (never a shorter purchase
    sent whole and answered), the client gets one 400 and the connection closes."""
    up = await upstream(echo)
    gw = await gateway(upstream=up.url, upstream_timeout_seconds=30)
    headers = [*bearer().items(), ("Transfer-Encoding", "chunked")]
    if keyed:
        headers.append(("Idempotency-Key", "cut-body"))
    reader, writer = await raw_client(gw.url)
    writer.write(request_bytes("POST", PURCHASE, headers) + b"5\r\nhello")
    async with asyncio.timeout(5):
        await up.until(lambda: bool(up.requests) and bytes(up.requests[0].body) == b"hello")
        writer.write(b"\r\nZZ\r\n-the-rest-of-the-order\r\n0\r\n\r\n")
        response = await read_response(reader)
        assert await reader.read() == b""  # one answer, then the connection closes
    writer.close()
    assert response is not None
    assert (response.status, error_of(response.body)) == (400, "bad-request")
    await up.all_closed(timeout=5)
    assert [seen.complete for seen in up.requests] == [False]


async def test_a_bad_chunk_read_before_its_handler_starts_is_still_400(gateway, bearer, upstream):
    """Python 3.11 starts the handler's task at the loop's next pass after aiohttp takes the
    request from its queue: a bad chunk read in between (the request neither queued nor
    handled yet) still ends its body with the error, 400 at once, not a 504 after the budget.
    (The bytes are handed to the connection's protocol at that very moment.)"""
    up = await upstream(echo)
    gw = await gateway(upstream=up.url, upstream_timeout_seconds=30)
    reader, writer = await raw_client(gw.url)
    await eventually(lambda: len(gw.runner.server.connections) == 1)
    (protocol,) = gw.runner.server.connections
    headers = [*bearer().items(), ("Transfer-Encoding", "chunked")]
    protocol.data_received(request_bytes("POST", PURCHASE, headers))  # queued; start() woken
    await asyncio.sleep(0)  # start() takes it and creates the handler's task, not yet run
    assert not protocol._messages
    assert protocol._current_request is None
    protocol.data_received(b"ZZ\r\nhello\r\n0\r\n\r\n")  # in between
    async with asyncio.timeout(5):
        response = await read_response(reader)
    writer.close()
    assert response is not None
    assert (response.status, error_of(response.body)) == (400, "bad-request")


async def test_a_bad_chunk_in_a_queued_request_is_400_for_it_alone(gateway, bearer, upstream):
    """Two pipelined purchases; the second's body goes bad while the first is at the SME
    gateway: the first is answered in full, the second 400 (never a 500), never complete
    upstream."""
    release = asyncio.Event()

    async def first_held(
        seen: Seen, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        if seen.headers.get("X-Request-ID") == "first":
            await release.wait()
        return await echo(seen, reader, writer)

    up = await upstream(first_held)
    gw = await gateway(upstream=up.url, upstream_timeout_seconds=30)
    auth = list(bearer().items())
    first = request_bytes(
        "POST", PURCHASE, [*auth, ("X-Request-ID", "first"), ("Content-Length", "8")], b'{"n": 1}'
    )
    second = request_bytes(
        "POST", PURCHASE, [*auth, ("X-Request-ID", "second"), ("Transfer-Encoding", "chunked")]
    )
    reader, writer = await raw_client(gw.url)
    writer.write(first + second + b"3\r\nabc\r\n")
    async with asyncio.timeout(5):
        await up.until(lambda: len(up.requests) == 1)
        writer.write(b"ZZ\r\nhello\r\n0\r\n\r\n")  # the second's body, still queued, breaks
        await eventually(lambda: refused_queued(gw))  # the bad bytes are read
        release.set()
        answers = [await read_response(reader), await read_response(reader)]
    writer.close()
    assert answers[0] is not None
    assert (answers[0].status, answers[0].body) == (200, b'{"n": 1}')
    assert answers[1] is not None
    assert (answers[1].status, error_of(answers[1].body)) == (400, "bad-request")
    assert [(seen.headers.get("X-Request-ID"), seen.complete) for seen in up.requests] == [
        ("first", True)
    ]


def refused_queued(gw: Any) -> bool:
    """Whether a refusal (the parser's, queued by aiohttp) waits on a client connection."""
    return any(
        not isinstance(message, RawRequestMessage)
        for handler in gw.runner.server.connections
        for message, _ in handler._messages
    )


async def test_a_bad_chunk_after_an_early_answer_began_is_not_blamed_on_the_sme_gateway(
    gateway, bearer
):
    """The SME gateway answers early and streams its answer while the client's chunked body
    is still coming; then the body goes bad. The upstream request is aborted (never complete)
    and the client's transfer with it (no final chunk), but the fault is the client's: no
    upstream failure is counted."""

    async def early(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n8\r\npiece-0;\r\n")
        with contextlib.suppress(ConnectionError):
            while await reader.read(65536):  # the body, until the gateway lets go
                pass

    up = await RawUpstream(early).start()
    gw = await gateway(upstream=up.url, upstream_timeout_seconds=30)
    headers = [*bearer().items(), ("Transfer-Encoding", "chunked")]
    reader, writer = await raw_client(gw.url)
    try:
        writer.write(request_bytes("POST", PURCHASE, headers) + b"3\r\nabc\r\n")
        async with asyncio.timeout(5):
            await reader.readuntil(b"piece-0;")  # the answer streams
            writer.write(b"ZZ\r\nhello\r\n0\r\n\r\n")
            with contextlib.suppress(ConnectionError):
                rest = await reader.read()
    finally:
        writer.close()
        await up.close()
    assert b"0\r\n\r\n" not in rest  # aborted, never a clean end
    text = await gw.metrics_text()
    assert not re.search(r'upstream_failures_total\{kind="[a-z_]+"\} [1-9]', text), text


SHORT = {"head_timeout": 0.3, "keepalive_timeout": 0.3}  # the production ones: 60 s and 75 s


async def test_unfinished_heads_past_the_process_budget_are_closed(gateway, bearer):
    """The unfinished heads a process holds have one budget together (shortened here to
    100,000 bytes): a connection whose unfinished head would take them past it is closed,
    unanswered, while the others wait on, a request whose head comes whole is served, and a
    head let go makes room again. (2,000 connections each holding 64 KB of a head that never
    ends, no token needed, took ~310 MB.)"""
    gw = await gateway(server={"heads_budget": 100_000})
    part = b"POST /api/v1/billing/purchase HTTP/1.1\r\nHost: x\r\n" + b"".join(
        b"X-Pad-%d: %s\r\n" % (n, b"p" * 4_000) for n in range(10)
    )  # ~40 KB, and never the blank line

    async def holding() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await raw_client(gw.url)
        writer.write(part)
        await writer.drain()
        return reader, writer

    first, second = await holding(), await holding()
    await eventually(lambda: gw.runner.server.heads_held >= 2 * len(part) - 32_000)
    third = await holding()
    async with asyncio.timeout(5):
        assert await third[0].read() == b""  # closed, unanswered
    third[1].close()
    assert (await gw.request("POST", PURCHASE, headers=bearer(), data=b"{}"))[0] == 200
    first[1].close()
    await eventually(lambda: gw.runner.server.heads_held == len(part))  # the second's
    fourth = await holding()
    await eventually(lambda: gw.runner.server.heads_held == 2 * len(part))  # it waits on too
    for _, writer in (second, fourth):
        writer.close()
    await eventually(lambda: gw.runner.server.heads_held == 0)


@pytest.mark.parametrize(
    ("path", "count"), [("/openapi.json", 2_000), ("/nowhere", 50_000)], ids=["own", "404s"]
)
async def test_a_client_that_never_reads_its_answers_is_let_go(gateway, path, count):
    """A client that pipelines requests and never reads an answer (no token needed: the
    gateway's own answers, or 404s) is let go once it has taken nothing for the send patience
    (nginx's send_timeout): its connection, and the answers buffered for it, are not held for
    ever. (aiohttp waits for a client's buffer to drain with no time limit; the head and
    keep-alive timeouts do not run while a request is answered.)"""
    gw = await gateway(tuning=Tuning(send_patience=0.3))
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, ("127.0.0.1", int(gw.url.rsplit(":", 1)[1])))
        request = f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
        with contextlib.suppress(TimeoutError):  # (the gateway stops reading: fine)
            async with asyncio.timeout(3):  # (enough answers to fill every buffer on the way)
                await loop.sock_sendall(sock, request * count)
        await eventually(lambda: gw.runner.server.connections, timeout=2)
        await eventually(lambda: not gw.runner.server.connections, timeout=10)
    finally:
        sock.close()


async def test_a_client_that_never_reads_the_last_answer_before_a_close_is_let_go(gateway):
    """A connection that ends after its answer (the last request says `Connection: close`)
    is closed by aiohttp itself, not through force_close(), and the close waits for what
    the transport's buffer holds. A client that reads nothing was held for ever whenever
    the buffer held less than its high-water mark at the close (no pause, so no watch): 26
    pipelined /openapi.json, 1.6 MB in the kernel's queue, after 660 s. Every close is now
    watched: whatever is left over (20 to 34 answers, so that some close falls under the
    mark whatever the kernel's buffer sizes), each is let go after the patience."""
    gw = await gateway(tuning=Tuning(send_patience=0.3))
    loop = asyncio.get_running_loop()
    one = b"GET /openapi.json HTTP/1.1\r\nHost: x\r\n\r\n"
    last = b"GET /openapi.json HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    socks = []
    try:
        for count in range(20, 35):
            sock = socket.socket()
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)
            sock.setblocking(False)
            await loop.sock_connect(sock, ("127.0.0.1", int(gw.url.rsplit(":", 1)[1])))
            await loop.sock_sendall(sock, one * (count - 1) + last)
        await eventually(lambda: len(gw.runner.server.connections) == len(socks), timeout=5)
        await eventually(lambda: not gw.runner.server.connections, timeout=20)
    finally:
        for sock in socks:
            sock.close()


async def test_a_client_reading_its_pipelined_answers_steadily_gets_them_all(gateway):
    """The kernel's buffers as they are (loopback's grow to megabytes): a client that pipelines
    80 requests for /openapi.json (~5 MB of answers, more than the kernel's queue holds) and
    reads them steadily, 32 KiB every 20 ms, gets every answer. The transport's buffer moves
    only when the kernel wakes the writer, after the client has taken a third of its send
    queue: by that alone the client looked as if it took nothing for the patience (0.3 s
    here), and was let go. The watch counts the kernel's queue too (SIOCOUTQ)."""
    gw = await gateway(tuning=Tuning(send_patience=0.3))
    status, _, document = await gw.request("GET", "/openapi.json")
    assert status == 200
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)  # the rest waits there
    sock.setblocking(False)
    count = 80
    with sock:
        await loop.sock_connect(sock, ("127.0.0.1", int(gw.url.rsplit(":", 1)[1])))
        await loop.sock_sendall(sock, b"GET /openapi.json HTTP/1.1\r\nHost: x\r\n\r\n" * count)
        got = bytearray()
        while got.count(b"HTTP/1.1 200 ") < count or not got.endswith(document):
            await asyncio.sleep(0.02)  # the client's pace, not a wait for anything
            try:
                piece = await loop.sock_recv(sock, 32 * 1024)
            except ConnectionError as exc:
                raise AssertionError(f"cut off after {len(got)} bytes: {exc!r}") from None
            assert piece, f"cut off after {len(got)} bytes"
            got += piece
    assert got.count(document) == count


async def test_a_bad_chunk_in_a_body_nobody_reads_is_never_logged(gateway, caplog):
    """A body aiohttp reads on by itself after the answer (a GET /healthz sent with a chunked
    body) that then goes bad is left alone: the parser's error quotes the refused bytes (a
    cookie, a card number), and set on that body it was logged as an unhandled exception."""
    gw = await gateway()
    reader, writer = await raw_client(gw.url)
    secret = b"4111111111111111"
    with caplog.at_level(logging.DEBUG):
        writer.write(request_bytes("GET", "/healthz", [("Transfer-Encoding", "chunked")]))
        writer.write(b"5\r\nhello\r\n")
        async with asyncio.timeout(5):
            response = await read_response(reader)
        writer.write(b"ZZ-" + secret + b"\r\n")  # after the answer: aiohttp reads it alone
        writer.close()  # ... and then the connection ends (after those bytes, in order)
        await eventually(lambda: not gw.runner.server.connections)
    assert response is not None
    assert response.status == 200
    logged = [
        (r.levelname, r.getMessage(), str(r.exc_info and r.exc_info[1])) for r in caplog.records
    ]
    assert not [entry for entry in logged if secret.decode() in " ".join(entry)], logged
    assert not [entry for entry in logged if entry[0] in ("ERROR", "CRITICAL")], logged


@pytest.mark.parametrize(
    "sent",
    [
        pytest.param(b"", id="nothing"),
        pytest.param(b"POST /api/v1/billing/pur", id="part-of-the-request-line"),
        pytest.param(b"POST /api/v1/billing/purchase HTTP/1.1\r\nHost: g", id="part-of-the-head"),
    ],
)
async def test_a_connection_without_a_whole_head_in_time_is_closed(gateway, sent):
    """A new connection that sends no whole request head within the head timeout (nothing,
    or a head dribbled out) is closed, unanswered: a client, no token needed, cannot hold a
    descriptor per connection for ever (nginx: client_header_timeout)."""
    gw = await gateway(server=SHORT)
    reader, writer = await raw_client(gw.url)
    writer.write(sent)
    async with asyncio.timeout(5):
        assert await reader.read() == b""
    writer.close()


@pytest.mark.parametrize("then", [b"", b"POST /api/v1/billing/purchase HTTP/1.1\r\n"])
async def test_a_keep_alive_connection_idle_after_an_answer_is_closed(gateway, then):
    """After an answer, a keep-alive connection that stays idle (or holds only part of its next
    head) closes after the keep-alive timeout, not aiohttp's default hour."""
    gw = await gateway(server=SHORT)
    reader, writer = await raw_client(gw.url)
    writer.write(request_bytes("GET", "/healthz", []))
    async with asyncio.timeout(5):
        response = await read_response(reader)
        assert response is not None
        assert response.status == 200
        writer.write(then)
        assert await reader.read() == b""
    writer.close()


def big_head(lines: int, *, line_bytes: int = 15_000, end: bool = True) -> bytes:
    """A GET /healthz head with ``lines`` header lines of ``line_bytes`` each, each under the
    line limit (16 KiB); ended with its blank line or not."""
    fields = b"".join(b"X-Pad-%d: %s\r\n" % (n, b"p" * line_bytes) for n in range(lines))
    return b"GET /healthz HTTP/1.1\r\nHost: g\r\n" + fields + (b"\r\n" if end else b"")


@pytest.mark.parametrize("pieces", [1, 64], ids=["one-write", "trickled"])
async def test_a_head_past_64_kib_in_all_is_431_at_once(gateway, upstream, bearer, pieces):
    """A request head over 64 KiB in all, every line of it under the line limit, is answered
    431 as soon as it is over, with the head timeout far off, and its connection closed:
    aiohttp bounds lines, not their sum, and held ~4 MB per such connection (128 lines)
    until the head timeout, no token needed."""
    up = await upstream(answer())
    gw = await gateway(upstream=up.url)
    head = big_head(5, end=False).replace(b"GET /healthz", b"POST " + PURCHASE.encode())
    head = head.replace(b"Host: g\r\n", b"Host: g\r\nAuthorization: %s\r\n"
                        % bearer()["Authorization"].encode())  # fmt: skip
    reader, writer = await raw_client(gw.url)
    step = len(head) // pieces + 1
    with capture_logs() as logs:
        for start in range(0, len(head), step):
            writer.write(head[start : start + step])
            await writer.drain()
        async with asyncio.timeout(5):  # (the head timeout is 60 s)
            received = await reader.read(-1)  # to the connection's end: it must close
        await eventually(lambda: any(e["event"] == "request" for e in logs))
    writer.close()
    assert re.match(rb"HTTP/1\.[01] 431 ", received), received[:60]  # (1.0: aiohttp's, known)
    assert error_of(received.partition(b"\r\n\r\n")[2]) == "request-header-fields-too-large"
    assert b"X-Catalyst-Forwarded: no\r\n" in received
    assert up.requests == []
    [line] = [e for e in logs if e["event"] == "request"]
    assert (line["status"], line["route"]) == (431, "none")


HEAD_STYLES = {  # name: (bytes per padding line, separator, leading spaces in its value)
    "long-lines": (15_000, b": ", 0),
    "many-tight-lines": (540, b":", 0),  # "Name:value", as RFC 9110 allows
    "space-padded": (15_000, b": ", 13_000),  # white space the parser trims from values
}


def head_of(size: int, authorization: str, style: str = "long-lines", body: int = 2) -> bytes:
    """A whole purchase head (``body`` bytes declared) of exactly ``size`` bytes, padded with
    header lines of the ``HEAD_STYLES`` entry (each under the line limit)."""
    line_bytes, separator, spaces = HEAD_STYLES[style]
    base = b"POST %s HTTP/1.1\r\nHost: g\r\nAuthorization: %s\r\nContent-Length: %d\r\n" % (
        PURCHASE.encode(), authorization.encode(), body)  # fmt: skip
    room, lines, n = size - len(base) - 2, [], 0
    while room:
        take = min(room, line_bytes)
        if room - take and room - take < 40:  # no line too short for its name
            take -= 40
        name = b"X-Pad-%d%s" % (n, separator)
        lead = min(spaces, take - len(name) - 3)
        value = b" " * lead + b"p" * (take - len(name) - 2 - lead)
        lines.append(name + value + b"\r\n")
        room, n = room - take, n + 1
    head = base + b"".join(lines) + b"\r\n"
    assert len(head) == size
    return head


@pytest.mark.parametrize("style", list(HEAD_STYLES))
@pytest.mark.parametrize("piece", [None, 10_000, 8192, 4096], ids=["one-write", "10k", "8k", "4k"])
@pytest.mark.parametrize(
    ("size", "served"),
    [(MAX_HEAD_BYTES - 36, True), (MAX_HEAD_BYTES, True), (MAX_HEAD_BYTES + 1, False)],
)
async def test_a_whole_head_is_bound_at_64_kib_however_its_bytes_arrive(
    gateway, upstream, bearer, piece, size, served, style
):
    """The bound is the head's own bytes, whatever pieces TCP cut it into and however its
    lines are written: a head of 64 KiB is served and one byte more is 431 and reaches
    nothing. (The read that completed a head was not counted, so up to 16 KiB more reached
    the SME gateway; then weighing that read by the parsed fields refused a 64 KiB head of
    "Name:value" lines and served one padded with spaces the parser trims.)"""
    up = await upstream(answer())
    gw = await gateway(upstream=up.url)
    body = b'{"sku": "%s"}' % (b"s" * 300)  # its first bytes share the head's last read
    request = head_of(size, bearer()["Authorization"], style, len(body)) + body
    reader, writer = await raw_client(gw.url)
    step = piece or len(request)
    for start in range(0, len(request), step):
        writer.write(request[start : start + step])
        await writer.drain()
    async with asyncio.timeout(5):
        if served:
            response = await read_response(reader)
            assert response is not None
            assert response.status == 200
            assert len(up.requests) == 1
        else:
            received = await reader.read(-1)  # to the connection's end: it must close
            assert re.match(rb"HTTP/1\.[01] 431 ", received), received[:60]
            assert up.requests == []
    writer.close()


@pytest.mark.parametrize("before", ["a-get", "a-sized-purchase"])
async def test_the_next_head_on_a_kept_alive_connection_is_counted_from_its_first_read(
    gateway, upstream, bearer, before
):
    """After a request answered whole, the next head on the connection (its own reads, not
    pipelined) is counted from its first byte: a 78,000-byte head is 431 and reaches
    nothing. (Its first read, up to 16 KiB, went uncounted after a request whose body had
    ended with its content, or that had none: heads up to 80 KiB were served. A request
    with a chunked body ends its connection: no head follows it.)"""
    up = await upstream(answer())
    gw = await gateway(upstream=up.url)
    auth = bearer()["Authorization"]
    first = {
        "a-get": request_bytes("GET", "/healthz", []),
        "a-sized-purchase": request_bytes(
            "POST", PURCHASE, [("Authorization", auth), ("Content-Length", "2")], b"{}"
        ),
    }[before]  # fmt: skip
    reader, writer = await raw_client(gw.url)
    writer.write(first)
    async with asyncio.timeout(5):
        response = await read_response(reader)
    assert response is not None
    assert response.status == 200
    forwarded = len(up.requests)
    head = head_of(78_000, auth)
    for start in range(0, len(head), 16_000):  # reads of its own, after the answer
        writer.write(head[start : start + 16_000])
        await writer.drain()
    async with asyncio.timeout(5):
        received = await reader.read(-1)  # to the connection's end: it must close
    writer.close()
    assert re.match(rb"HTTP/1\.[01] 431 ", received), received[:60]
    assert len(up.requests) == forwarded


@pytest.mark.parametrize("before", ["a-whole-get", "a-whole-purchase"])
async def test_a_head_begun_in_the_read_that_ends_a_request_is_counted_too(
    gateway, upstream, bearer, before
):
    """The bound holds for a head that begins in the same read as the end of the request before
    it (a whole GET, or the last bytes of a purchase's body): that part of the read was not
    counted, and ~190 KB of head sat on the connection until the keep-alive timeout."""
    up = await upstream(answer())
    gw = await gateway(upstream=up.url)
    body = b'{"plan": "%s"}' % (b"p" * 40_000)
    first = (
        request_bytes("GET", "/healthz", [])
        if before == "a-whole-get"
        else request_bytes("POST", PURCHASE, [*bearer().items(),
                                              ("Content-Length", str(len(body)))], body)
    )  # fmt: skip
    reader, writer = await raw_client(gw.url)
    writer.write(first + big_head(12, line_bytes=16_000, end=False))  # one write, ~230 KB
    async with asyncio.timeout(5):  # (the keep-alive timeout is 75 s)
        received = await reader.read(-1)  # to the connection's end: it must close
    writer.close()
    assert received.startswith(b"HTTP/1.1 200 "), received[:60]  # the first, answered
    assert re.search(rb"HTTP/1\.[01] 431 ", received), received[:200]  # then the bound


@pytest.mark.parametrize(("with_a_token", "status"), [(False, b"401"), (True, b"400")])
async def test_a_trailer_section_past_64_kib_is_refused_at_once(
    gateway, upstream, bearer, with_a_token, status
):
    """A chunked body's trailer section is kept by the parser as a head is, and is bounded the
    same: past 64 KiB the connection is closed and nothing forwarded whole, after the 401
    already answered (no token), or with a 400 while the purchase's body is read. It was
    held, ~4 MB a connection, until aiohttp's lingering (10 s) or the time budget ended."""
    up = await upstream(answer())
    gw = await gateway(upstream=up.url)
    auth = [("Authorization", bearer()["Authorization"])] if with_a_token else []
    head = request_bytes("POST", PURCHASE, [*auth, ("Transfer-Encoding", "chunked")])
    trailers = b"".join(b"X-T-%d: %s\r\n" % (n, b"t" * 15_000) for n in range(8))  # unended
    reader, writer = await raw_client(gw.url)
    writer.write(head + b"2\r\n{}\r\n0\r\n")
    await writer.drain()
    for start in range(0, len(trailers), 4096):  # as a trickle: never with the body's bytes
        writer.write(trailers[start : start + 4096])
        await writer.drain()
    async with asyncio.timeout(5):
        received = await reader.read(-1)  # to the connection's end: it must close
    writer.close()
    assert received.startswith(b"HTTP/1.1 %s " % status), received[:60]
    assert received.count(b"HTTP/1.") == 1
    assert up.complete == []  # its body never ended: nothing forwarded whole


async def test_a_trailer_section_that_ends_as_it_crosses_the_bound_gets_no_stray_answer(
    gateway, upstream, bearer
):
    """A chunked purchase whose trailer section ends in the very slice that crosses the bound
    is whole and answered; nothing is refused behind it. (A 431 was queued for it after its
    answer: the next request on the connection got that 431, an answer to nothing.) A chunked
    request ends its connection: after its answer comes its end, no stray byte."""
    up = await upstream(answer())
    gw = await gateway(upstream=up.url)
    head = request_bytes("POST", PURCHASE, [*bearer().items(), ("Transfer-Encoding", "chunked")])
    trailers = b"".join(b"X-T-%d: %s\r\n" % (n, b"t" * 16_000) for n in range(6))  # ~96 KB
    reader, writer = await raw_client(gw.url)
    writer.write(head + b"2\r\n{}\r\n0\r\n" + trailers + b"\r\n")  # one write
    async with asyncio.timeout(5):
        first = await read_response(reader)
    assert first is not None
    if first.status == 200:  # whole (the read split as usual): then the connection's end
        assert first.headers["Connection"].lower() == "close"
        async with asyncio.timeout(5):
            assert await reader.read() == b""
    else:  # refused before its end (another split of the reads): nothing forwarded whole
        assert first.status in (400, 431), first
        assert up.complete == []
    writer.close()


async def test_a_head_parsed_while_the_pipelining_queue_is_full_is_counted(gateway):
    """Bytes aiohttp's parser takes in while its queue of pipelined requests is full are still
    parsed into the head that follows them, and are counted. A client that pipelines without
    reading until the gateway stops reading, then sends more requests and ~200 KB of an
    unended head, gets its answers, then 431 (the head was held ~256 KB deep, past the bound,
    until the keep-alive timeout)."""
    gw = await gateway()
    host, port = gw.url.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # answers back up at once
    sock.connect((host, int(port)))
    sock.setblocking(False)
    reader, writer = await asyncio.open_connection(sock=sock, limit=1 << 22)
    padded = request_bytes("GET", "/healthz", [("X-Pad", "p" * 3000)])
    writer.write(padded * 300)
    await eventually(lambda: len(gw.runner.server.connections) == 1)
    (protocol,) = gw.runner.server.connections
    await eventually(lambda: protocol._buffer_paused)  # its queue is full: it stopped reading
    writer.write(request_bytes("GET", "/healthz", []) * 40 + big_head(13, line_bytes=16_000,
                                                                       end=False))  # fmt: skip
    async with asyncio.timeout(10):  # (the keep-alive timeout is 75 s)
        received = await reader.read(-1)  # to the connection's end: it must close
    writer.close()
    assert received.count(b"HTTP/1.1 200 ") == 340
    assert re.search(rb"HTTP/1\.[01] 431 ", received), received[-300:]


async def test_a_head_behind_a_full_pipelining_queue_in_one_read_is_counted(gateway):
    """One read (up to 256 KiB from the kernel) of 40 pipelined GETs and ~200 KB of a head:
    the first slice fills aiohttp's queue (32 requests), and its parser would keep the rest
    unparsed, releasing a request per slice (each resetting the count), then parse the head
    uncounted once the queue drained: it was served. The rest of the read is held until the
    queue drains, then counted: 40 answers, then 431. (The read is handed to the server's
    protocol as the event loop would: the kernel's split of a write cannot be forced.)"""
    gw = await gateway()
    reader, writer = await raw_client(gw.url)
    await eventually(lambda: len(gw.runner.server.connections) == 1)
    (protocol,) = gw.runner.server.connections
    read = request_bytes("GET", "/healthz", []) * 40 + big_head(13, line_bytes=16_000)
    protocol.data_received(read)
    async with asyncio.timeout(5):
        received = await reader.read(-1)  # to the connection's end: it must close
    writer.close()
    assert received.count(b"HTTP/1.1 200 ") == 40
    assert re.search(rb"HTTP/1\.[01] 431 ", received), received[-300:]


async def test_a_head_of_several_long_lines_under_64_kib_is_served(gateway):
    """Several header lines near the line limit (a large token, cookies, a trace state) are
    served while the whole head stays under 64 KiB, also on a kept-alive connection."""
    gw = await gateway()
    reader, writer = await raw_client(gw.url)
    for _ in range(2):
        writer.write(big_head(3, line_bytes=16_000))  # 48 KB of lines, ~48.1 KB in all
        async with asyncio.timeout(5):
            response = await read_response(reader)
        assert response is not None
        assert response.status == 200
    writer.close()


async def test_a_head_sent_in_time_is_served_and_its_connection_kept(gateway):
    """The head timeout ends with the first head: the connection, idle between its requests for
    longer than that, still serves the next (the keep-alive timeout governs it now)."""
    gw = await gateway(server={"head_timeout": 0.3})
    reader, writer = await raw_client(gw.url)
    for _ in range(2):
        writer.write(request_bytes("GET", "/healthz", []))
        async with asyncio.timeout(5):
            response = await read_response(reader)
        assert response is not None
        assert response.status == 200
        await asyncio.sleep(0.4)  # idle past the head timeout (the time is what is tested)
    writer.close()


async def test_duplicate_host_is_400_and_nothing_upstream(gateway, bearer, upstream):
    """Two Host headers are refused with 400 (RFC 9112 §3.2) and nothing reaches the upstream."""
    up = await upstream(answer())
    gw = await gateway(upstream=up.url)
    request = request_bytes(
        "POST",
        PURCHASE,
        [("Host", "evil.test"), *bearer().items(), ("Content-Length", "2")],
        b"{}",
    )
    responses = await exchange(gw.url, request + request, at_most=2)
    assert [response.status for response in responses] == [400]
    assert up.connections == 0


PATH_TRICKS = [
    "//api/v1/billing/purchase",
    "/api//v1/billing/purchase",
    "/api/v1/./billing/purchase",
    "/api/v1/billing/./purchase",
    "/api/v1/x/../billing/purchase",
    "/api/v1/%2e%2e/v1/billing/purchase",
    "/api/v1/%2E%2E/v1/billing/purchase",
    "/api/v1/billing%2Fpurchase",
    "/api/v1/billing/purchase/",
    "/api/v1/billing/purchase/.",
    "/api/v1/billing/purchase;jsessionid=1",
    "/api/v1/billing/purchase%00",
    "/API/v1/billing/purchase",
    "/api/V1/Billing/Purchase",
    "/api/v1/sme/billing/vouchers/LIST",
    "/api/v1/sme/billing/vouchers/revoke/V1/",
    "/api/v1/sme/billing/vouchers/revoke/V1/../../issue",
]


@pytest.mark.parametrize("authenticated", [False, True], ids=["anonymous", "authenticated"])
@pytest.mark.parametrize("path", PATH_TRICKS)
async def test_path_tricks_are_404_and_never_forwarded(
    gateway, bearer, upstream, path, authenticated
):
    """A path that only resembles a route is 404 not-found, with or without a session, and
    nothing reaches the upstream."""
    up = await upstream(answer())
    gw = await gateway(upstream=up.url)
    headers = [*bearer().items()] if authenticated else []
    request = request_bytes("POST", path, [*headers, ("Content-Length", "2")], b"{}")
    [response] = await exchange(gw.url, request)
    assert response.status == 404
    assert error_of(response.body) == "not-found"
    assert response.headers["X-Request-ID"]
    assert up.connections == 0


@pytest.mark.parametrize(
    "header",
    [
        "Connection",
        "Keep-Alive",
        "Proxy-Authenticate",
        "Proxy-Authorization",
        "Proxy-Connection",
        "TE",
        "Trailer",
        "Upgrade",
        "X-Named-In-Connection",
        "X-User-Role",
        "X-Forwarded-User",
        "X-HTTP-Method-Override",
        "X-HTTP-Method",
        "X-Method-Override",
        "X-Auth-Request-User",
        "X-Remote-User",
        "Remote-User",
        "Cookie",
    ],
)
async def test_hop_by_hop_and_spoofed_identity_headers_never_reach_upstream(
    gateway, bearer, upstream, header
):
    """Each hop-by-hop header, each header named in Connection and each spoofed identity or
    method-override header stays at the gateway; the upstream gets the route's own method."""
    up = await upstream(answer())
    gw = await gateway(upstream=up.url)
    value = {"Connection": "keep-alive", "TE": "trailers"}.get(header, "DELETE")
    headers = [
        *bearer().items(),
        ("Connection", "keep-alive, X-Named-In-Connection"),
        (header, value),
        ("Content-Length", "2"),
    ]
    if header == "Connection":
        headers.pop(1)
    [response] = await exchange(gw.url, request_bytes("POST", PURCHASE, headers, b"{}"))
    assert response.status == 200
    [seen] = up.requests
    assert seen.method == "POST"
    assert header not in seen.headers
    assert "X-Named-In-Connection" not in seen.headers
    assert "Connection" not in seen.headers


@pytest.mark.parametrize(
    ("head", "status", "error"),
    [
        (b"POST /api/v1/billing/purchase HTTP/1.1\r\nHost: gw\r\nBad Name: x\r\n\r\n",
         400, "bad-request"),
        (b"GET /healthz HTTP/1.1\r\nHost: gw\r\nX-Long: " + b"a" * 70_000 + b"\r\n\r\n",
         431, "request-header-fields-too-large"),
    ],
    ids=["bad-field-name", "field-too-long"],
)  # fmt: skip
async def test_a_parser_refusal_logs_the_answers_error(gateway, head, status, error):
    """A request the parser refuses is answered 400 bad-request or 431 (its line too long),
    and its request.refused line names the same `error` as its answer and access line, as
    every refusal's does (the README: find the request by `error`); it said
    `unparsable-request`, a code of no answer."""
    gw = await gateway()
    with capture_logs() as logs:
        reader, writer = await raw_client(gw.url)
        try:
            writer.write(head)
            async with asyncio.timeout(5):
                response = await read_response(reader)
        finally:
            writer.close()
        await eventually(lambda: [e for e in logs if e["event"] == "request"])
    assert response is not None
    assert (response.status, json.loads(response.body)["error"]) == (status, error)
    refused = [e["error"] for e in logs if e["event"] == "request.refused"]
    answered = [e["error"] for e in logs if e["event"] == "request"]
    assert (refused, answered) == ([error], [error])
