"""Idempotency end to end (reference.md "Idempotency"), over real sockets.

Every rule runs against both stores: the process's memory and a real
redis-server (``store`` is parametrised; ``start(upstream_url, **settings)``
builds a gateway on the store under test). What reached the SME gateway comes
from an ``HTTPUpstream`` that records every request byte. Nothing here waits
by sleeping: in-flight requests are held at the upstream with events, time
moves with a fake clock (or a real, short Redis TTL), and "the gateway has
settled" is observed (no request in flight, every record update written).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import json
import os
import signal
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from structlog.testing import capture_logs

from catalyst_proxy import log
from catalyst_proxy.app import Tuning
from catalyst_proxy.config import Rate, Settings
from catalyst_proxy.idempotency import redis_records
from catalyst_proxy.idempotency.guard import LEASE_MARGIN
from catalyst_proxy.idempotency.keys import scope, slot
from catalyst_proxy.idempotency.memory import ENTRY_WEIGHT
from catalyst_proxy.idempotency.memory import MAX_ANSWER_BYTES as MEMORY_MAX_ANSWER_BYTES

from .auth_support import Clock, metric
from .conftest import BRIDGE_SECRET, RunningGateway
from .rawhttp import (
    HTTPUpstream,
    RawResponse,
    Respond,
    Seen,
    answer,
    exchange,
    never_answer,
    partial_answer,
    raw_client,
    read_response,
    request_bytes,
    write_then_close,
)
from .redis_server import RedisServer
from .serve_proc import ServeProcess, run_cli
from .support import RawUpstream, SlowLink, eventually, free_socket

PURCHASE = "/api/v1/billing/purchase"
SME_PURCHASE = "/api/v1/sme/billing/purchase"
ISSUE = "/api/v1/sme/billing/vouchers/issue"
LIST = "/api/v1/sme/billing/vouchers/list"
REVOKE = "/api/v1/sme/billing/vouchers/revoke/"
ORDER = b'{"sku": "starter"}'
OTHER_ORDER = b'{"sku": "enterprise"}'
ORDER_ANSWER = b'{"order_id": "ord-1", "paid_by_credit": true, "session_url": null}'
IDEM_TOTAL = "catalyst_proxy_idempotency_total"
STORES = ("memory", "redis")
LEASE = Settings().upstream_timeout_seconds + LEASE_MARGIN  # a reservation's, by default
PREFIX = "catalyst-idem:"

# Headers that differ between two answers by design: the date, the request's own ID,
# and the replay marker.
PER_ANSWER = frozenset({"date", "x-request-id", "idempotent-replayed"})

Start = Callable[..., Awaitable[RunningGateway]]


# --- fixtures and helpers --------------------------------------------------------------------


@pytest.fixture(params=STORES)
def store(request: pytest.FixtureRequest) -> str:
    """The store under test: this process's memory or a real Redis."""
    return str(request.param)


@pytest.fixture
def start(gateway: Any, store: str, request: pytest.FixtureRequest) -> Start:
    """``await start(upstream_url, **settings)``: a gateway on the store under test."""
    redis_url = request.getfixturevalue("redis_url") if store == "redis" else None

    async def make(upstream_url: str, **overrides: Any) -> RunningGateway:
        if redis_url is not None:
            overrides.setdefault("redis_url", redis_url)
        return await gateway(upstream=upstream_url, **overrides)  # type: ignore[no-any-return]

    return make


@pytest.fixture
def redis(store: str, request: pytest.FixtureRequest) -> RedisServer | None:
    """The session's redis-server when the store under test is Redis, else None."""
    if store != "redis":
        return None
    request.getfixturevalue("redis_url")  # running and flushed
    server: RedisServer = request.getfixturevalue("redis_server")
    return server


def ok(body: bytes = ORDER_ANSWER, status: int = 200, **kwargs: Any) -> Respond:
    return answer(status, body, **kwargs)


class Gate:
    """An upstream ``respond`` that holds the requests ``when`` picks until ``open`` is set."""

    def __init__(
        self, respond: Respond | None = None, when: Callable[[Seen], bool] = lambda seen: True
    ) -> None:
        self.open = asyncio.Event()
        self._respond = respond or ok()
        self._when = when

    async def __call__(
        self, seen: Seen, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        if self._when(seen):
            await self.open.wait()
        return await self._respond(seen, reader, writer)


def in_turn(*responds: Respond) -> Respond:
    """The n-th request gets the n-th ``respond`` (the last one from then on)."""
    counter = itertools.count()

    async def respond(
        seen: Seen, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        step = responds[min(next(counter), len(responds) - 1)]
        return await step(seen, reader, writer)

    return respond


def by_body(default: Respond, **rules: Respond) -> Respond:
    """``rules`` name a marker: a request whose body holds it gets that ``respond``."""

    async def respond(
        seen: Seen, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        for marker, step in rules.items():
            if marker.encode() in seen.body:
                return await step(seen, reader, writer)
        return await default(seen, reader, writer)

    return respond


def keyed(auth: dict[str, str], key: str | None, **extra: str) -> dict[str, str]:
    headers = {**auth, "Content-Type": "application/json", **extra}
    if key is not None:
        headers["Idempotency-Key"] = key
    return headers


CHUNKED = ("Transfer-Encoding", "chunked")
SIZED = ("Content-Length", str(len(ORDER)))  # ORDER's length


def keyed_lines(auth: dict[str, str], key: str, framing: tuple[str, str]) -> list[tuple[str, str]]:
    """``keyed()`` as the header lines of a raw request, with its framing field."""
    return [*keyed(auth, key).items(), framing]


async def post(
    gw: RunningGateway,
    auth: dict[str, str],
    key: str | None,
    body: bytes = ORDER,
    path: str = PURCHASE,
    method: str = "POST",
    **extra: str,
) -> tuple[int, Any, bytes]:
    return await gw.request(method, path, headers=keyed(auth, key, **extra), data=body)


def error_of(body: bytes) -> str:
    return str(json.loads(body)["error"])


def keyed_requests(upstream: HTTPUpstream, key: str) -> list[Seen]:
    """The requests that reached the upstream under ``key`` (its header as sent)."""
    return [seen for seen in upstream.requests if seen.headers.get("Idempotency-Key") == key]


async def settled(gw: RunningGateway, in_flight: int = 0) -> None:
    """Wait until only ``in_flight`` requests are in flight (those the test holds) and every
    record update on its way is written."""
    await eventually(lambda: gw.parts.dispatcher.in_flight == in_flight)
    async with asyncio.timeout(5):
        await gw.parts.idempotency.close(patience=0)  # the first try of each; retries stop


def idem_keys(server: RedisServer) -> list[bytes]:
    return list(server.command("KEYS", PREFIX + "*"))


async def records_written(server: RedisServer) -> None:
    """Wait until no record in Redis is still a reservation: a record is written just after
    its answer goes out (see ``test_a_retry_right_after_the_answer_is_replayed``)."""

    def written() -> bool:
        values = [server.command("GET", name) or b"" for name in idem_keys(server)]
        return not any(b'"state":"reserved"' in value for value in values)

    await eventually(written)


async def expire_all(store: str, clock: Clock, server: RedisServer | None, ttl: float) -> None:
    """Let every record expire: the fake clock moves past the TTL (and a reservation's lease,
    which it outlives by the TTL), or Redis expires them."""
    if store == "memory":
        clock.now += LEASE + ttl + 1
        return
    assert server is not None
    for name in idem_keys(server):
        server.command("PEXPIRE", name, 1)
    await eventually(lambda: not idem_keys(server))


def wire(response: RawResponse) -> tuple[int, list[tuple[str, str]], bytes]:
    """An answer as the client saw it, minus what differs per answer by design."""
    headers = sorted(
        (name.lower(), value) for name, value in response.headers.items()
        if name.lower() not in PER_ANSWER
    )  # fmt: skip
    return response.status, headers, response.body


async def raw_post(
    gw: RunningGateway,
    auth: dict[str, str],
    key_lines: list[tuple[str, str]],
    body: bytes = ORDER,
    *,
    settle: bool = True,
) -> RawResponse:
    """One POST to the purchase route written as exact bytes (headers as given), on a new
    connection; then (``settle``) wait until the gateway has written its record."""
    headers = [*auth.items(), ("Content-Type", "application/json"), *key_lines,
               ("Content-Length", str(len(body)))]  # fmt: skip
    responses = await exchange(gw.url, request_bytes("POST", PURCHASE, headers, body))
    assert len(responses) == 1
    if settle:
        await settled(gw)
    return responses[0]


# --- replay ------------------------------------------------------------------------------------


async def test_a_completed_answer_is_replayed_byte_for_byte_without_a_second_request(
    start, upstream, bearer
):
    """The same key and request again gets the recorded status, passed-through headers and body,
    marked replayed and forwarded, with a fresh X-Request-ID and never a Set-Cookie; the SME
    gateway sees one request, carrying the key."""
    headers = [("Set-Cookie", "sme_session=abc; HttpOnly"), ("Server", "sme-gateway/1.4"),
               ("ETag", '"ord-1-v1"'), ("Cache-Control", "no-store"),
               ("Location", "/api/billing/orders/ord-1"), ("Retry-After", "7"),
               ("X-Internal-Trace", "node-3")]  # fmt: skip
    up = await upstream(answer(201, ORDER_ANSWER, headers, content_type="application/vnd+json"))
    gw = await start(up.url)
    auth = bearer()
    first = await raw_post(gw, auth, [("Idempotency-Key", "order-8e03978e")])
    second = await raw_post(gw, auth, [("Idempotency-Key", "order-8e03978e")])
    assert first.status == 201
    assert first.complete
    assert second.complete
    assert first.body == ORDER_ANSWER
    assert wire(second) == wire(first)
    assert first.headers["ETag"] == '"ord-1-v1"'
    assert first.headers["Location"] == "/api/billing/orders/ord-1"
    assert second.headers["Content-Type"] == "application/vnd+json"
    assert second.headers["Idempotent-Replayed"] == "true"
    assert "Idempotent-Replayed" not in first.headers
    assert first.headers["X-Catalyst-Forwarded"] == second.headers["X-Catalyst-Forwarded"] == "yes"
    assert second.headers["X-Request-ID"] != first.headers["X-Request-ID"]
    assert second.headers["Server"] == "catalyst-proxy"
    assert "Set-Cookie" not in second.headers
    assert "Set-Cookie" not in first.headers
    assert "X-Internal-Trace" not in second.headers
    assert len(up.requests) == 1
    assert up.requests[0].headers.getall("Idempotency-Key") == ["order-8e03978e"]


async def test_a_field_the_answers_connection_header_names_is_not_recorded(start, upstream, bearer):
    """An allowed field the recorded answer's ``Connection`` header named (hop-by-hop) is not
    in its replay either."""
    headers = [("Connection", "ETag"), ("ETag", '"ord-1-v1"'), ("Retry-After", "7")]
    up = await upstream(answer(201, ORDER_ANSWER, headers))
    gw = await start(up.url)
    auth = bearer()
    first = await raw_post(gw, auth, [("Idempotency-Key", "order-hop-1")])
    second = await raw_post(gw, auth, [("Idempotency-Key", "order-hop-1")])
    assert second.headers["Idempotent-Replayed"] == "true"
    assert second.body == first.body == ORDER_ANSWER
    for replied in (first, second):
        assert "ETag" not in replied.headers
        assert replied.headers["Retry-After"] == "7"
    assert len(up.requests) == 1


async def test_a_replay_keeps_the_clients_own_request_id(start, upstream, bearer):
    """A replayed answer carries the X-Request-ID of the request it answers."""
    up = await upstream(ok())
    gw = await start(up.url)
    auth = bearer()
    await post(gw, auth, "rid-key", **{"X-Request-ID": "first-0001"})
    status, headers, _ = await post(gw, auth, "rid-key", **{"X-Request-ID": "retry-0002"})
    assert status == 200
    assert headers["Idempotent-Replayed"] == "true"
    assert headers["X-Request-ID"] == "retry-0002"
    assert len(up.requests) == 1


async def test_every_upstream_status_is_recorded_and_replayed(start, upstream, bearer):
    """The SME gateway's answer is recorded whatever its status: a 4xx or 5xx of its own is
    replayed too, never forwarded again."""
    up = await upstream(in_turn(ok(b'{"error": "insufficient-credit"}', 402),
                                ok(b'{"error": "billing-down"}', 500)))  # fmt: skip
    gw = await start(up.url)
    auth = bearer()
    for key, status in (("k-402", 402), ("k-500", 500)):
        first = await post(gw, auth, key)
        again = await post(gw, auth, key)
        assert first[0] == again[0] == status
        assert again[2] == first[2]
        assert again[1]["Idempotent-Replayed"] == "true"
    assert len(up.requests) == 2


async def test_a_chunked_answer_is_recorded_and_replayed(start, upstream, bearer):
    """An answer streamed in chunks, over several reads, is recorded whole and replayed."""
    parts = [b'{"order_id": "ord-', b"2", b'", "paid_by_credit": false}']
    gate = asyncio.Event()

    async def chunks(
        seen: Seen, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")  # fmt: skip
        for index, part in enumerate(parts):
            writer.write(b"%x\r\n%s\r\n" % (len(part), part))
            await writer.drain()
            if index == 0:
                await gate.wait()  # the gateway is streaming by now
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        return True

    up = await upstream(chunks)
    gw = await start(up.url)
    auth = bearer()
    async with gw.http.post(gw.url + PURCHASE, headers=keyed(auth, "chunked"), data=ORDER) as resp:
        gate.set()
        first = await resp.read()
    status, headers, body = await post(gw, auth, "chunked")
    assert first == b"".join(parts)
    assert (status, body) == (200, first)
    assert headers["Idempotent-Replayed"] == "true"
    assert len(up.requests) == 1


async def test_bare_and_quoted_key_are_one_key(start, upstream, bearer):
    """``abc`` and ``"abc"`` are the same key (the quotes are not part of it); the key goes
    upstream exactly as the client sent it."""
    up = await upstream(ok())
    gw = await start(up.url)
    auth = bearer()
    first = await raw_post(gw, auth, [("Idempotency-Key", "8e03978e")])
    second = await raw_post(gw, auth, [("Idempotency-Key", '"8e03978e"')])
    escaped = await raw_post(gw, auth, [("Idempotency-Key", '"a\\"b"')])
    bare = await raw_post(gw, auth, [("Idempotency-Key", 'a"b')])
    assert first.status == second.status == 200
    assert second.headers["Idempotent-Replayed"] == "true"
    assert escaped.status == 200
    assert "Idempotent-Replayed" not in escaped.headers
    assert bare.headers["Idempotent-Replayed"] == "true"  # "a\"b" unquoted is a"b
    assert [seen.headers["Idempotency-Key"] for seen in up.requests] == ["8e03978e", '"a\\"b"']


async def test_the_fingerprint_is_the_body_not_its_framing(start, upstream, bearer):
    """The same body sent chunked instead of with a Content-Length is the same request: replayed."""
    up = await upstream(ok())
    gw = await start(up.url)
    auth = bearer()
    await raw_post(gw, auth, [("Idempotency-Key", "framing")])
    lines = keyed_lines(auth, "framing", CHUNKED)
    chunked = b"5\r\n" + ORDER[:5] + b"\r\n%x\r\n" % (len(ORDER) - 5) + ORDER[5:] + b"\r\n0\r\n\r\n"
    [again] = await exchange(gw.url, request_bytes("POST", PURCHASE, lines, chunked))
    assert again.status == 200
    assert again.headers["Idempotent-Replayed"] == "true"
    assert len(up.requests) == 1


# --- another request under the key ---------------------------------------------------------


async def test_another_body_query_or_code_under_the_key_is_422(start, upstream, bearer):
    """A completed key sent with another body, another query or another voucher code is refused
    with 422 idempotency-key-reused, and nothing more reaches the upstream."""
    up = await upstream(ok())
    gw = await start(up.url, idempotency="optional")
    auth = bearer()
    assert (await post(gw, auth, "k1"))[0] == 200
    status, headers, body = await post(gw, auth, "k1", OTHER_ORDER)
    assert (status, error_of(body)) == (422, "idempotency-key-reused")
    assert headers["X-Catalyst-Forwarded"] == "no"
    assert (await post(gw, auth, "k2", path=PURCHASE + "?promo=a"))[0] == 200
    status, _, body = await post(gw, auth, "k2", path=PURCHASE + "?promo=b")
    assert (status, error_of(body)) == (422, "idempotency-key-reused")
    assert (await post(gw, auth, "k3", b"", path=REVOKE + "VCH-1", method="DELETE"))[0] == 200
    status, _, body = await post(gw, auth, "k3", b"", path=REVOKE + "VCH-2", method="DELETE")
    assert (status, error_of(body)) == (422, "idempotency-key-reused")
    assert len(up.requests) == 3
    assert [seen.target for seen in up.requests] == [
        "/api/billing/purchase",
        "/api/billing/purchase?promo=a",
        "/api/billing/vouchers/revoke/VCH-1",
    ]


# --- in flight -------------------------------------------------------------------------------


async def test_a_key_in_flight_is_409_in_use_then_replayed(start, upstream, bearer):
    """While the first request is in flight the key answers 409 idempotency-key-in-use with
    Retry-After: 1 whatever the body; once the first completes, the answer is replayed."""
    gate = Gate()
    up = await upstream(gate)
    gw = await start(up.url)
    auth = bearer()
    first = asyncio.create_task(post(gw, auth, "in-flight"))
    await up.until(lambda: len(up.complete) == 1)
    for body in (ORDER, OTHER_ORDER):
        status, headers, answer_body = await post(gw, auth, "in-flight", body)
        assert (status, error_of(answer_body)) == (409, "idempotency-key-in-use")
        assert headers["Retry-After"] == "1"
        assert headers["X-Catalyst-Forwarded"] == "no"
    gate.open.set()
    status, _, body = await first
    assert (status, body) == (200, ORDER_ANSWER)
    status, headers, again = await post(gw, auth, "in-flight")
    assert (status, again) == (200, ORDER_ANSWER)
    assert headers["Idempotent-Replayed"] == "true"
    assert len(up.requests) == 1


async def test_a_reservation_past_its_lease_is_outcome_unknown(start, upstream, bearer):
    """A reservation older than the time budget plus 30 s reads as outcome unknown (its process
    may have died): 409 idempotency-outcome-unknown, never forwarded again."""
    clock = Clock()
    gate = Gate()
    up = await upstream(gate)
    gw = await start(up.url, clock=clock, upstream_timeout_seconds=5.0)
    auth = bearer()
    first = asyncio.create_task(post(gw, auth, "lease"))
    await up.until(lambda: len(up.complete) == 1)
    clock.now += 5.0 + 29.0
    status, _, body = await post(gw, auth, "lease")
    assert (status, error_of(body)) == (409, "idempotency-key-in-use")
    clock.now += 2.0
    status, headers, body = await post(gw, auth, "lease")
    assert (status, error_of(body)) == (409, "idempotency-outcome-unknown")
    assert headers["X-Catalyst-Forwarded"] == "no"
    assert len(up.requests) == 1
    gate.open.set()
    assert (await first)[0] == 200


# --- scope ---------------------------------------------------------------------------------


async def test_two_operators_with_one_key_are_independent(start, upstream, bearer):
    """Another operator's identical key (another ``sub``, or another ``iss``) is another key:
    each is forwarded once."""
    up = await upstream(ok())
    gw = await start(up.url)
    operators = [bearer(sub="op-1"), bearer(sub="op-2"), bearer(sub="op-1", iss="https://kc/b")]
    for auth in operators:
        status, headers, _ = await post(gw, auth, "shared-key")
        assert status == 200
        assert "Idempotent-Replayed" not in headers
    for auth in operators:
        status, headers, _ = await post(gw, auth, "shared-key")
        assert status == 200
        assert headers["Idempotent-Replayed"] == "true"
    assert len(up.requests) == 3


async def test_the_scope_is_the_upstream_method_and_path(start, upstream, bearer):
    """One key on routes with another upstream method/path is two keys; on two routes with the
    same upstream (purchase aliases) it is one key."""
    up = await upstream(ok(status=201))
    gw = await start(up.url)
    auth = bearer()
    assert (await post(gw, auth, "scope", path=PURCHASE))[0] == 201
    status, headers, _ = await post(gw, auth, "scope", path=ISSUE)
    assert status == 201
    assert "Idempotent-Replayed" not in headers
    status, headers, _ = await post(gw, auth, "scope", path=SME_PURCHASE)
    assert status == 201
    assert headers["Idempotent-Replayed"] == "true"
    assert [seen.target for seen in up.requests] == [
        "/api/billing/purchase",
        "/api/billing/vouchers/issue",
    ]


# --- refused before forwarding: the key is released -----------------------------------------


async def test_a_401_leaves_the_key_usable(start, upstream, bearer):
    """A request refused 401 leaves its key free: the same key with a valid session is
    forwarded once."""
    up = await upstream(ok())
    gw = await start(up.url)
    status, headers, _ = await post(gw, {"Authorization": "Bearer not-a-jwt"}, "after-401")
    assert status == 401
    assert headers["X-Catalyst-Forwarded"] == "no"
    await assert_forwarded_once(gw, up, bearer(), "after-401")


async def assert_forwarded_once(
    gw: RunningGateway, up: HTTPUpstream, auth: dict[str, str], key: str, body: bytes = ORDER
) -> None:
    """``key`` is forwarded now (a new attempt), and replayed after that."""
    status, headers, _ = await post(gw, auth, key, body)
    assert status == 200, headers
    assert "Idempotent-Replayed" not in headers
    status, headers, _ = await post(gw, auth, key, body)
    assert status == 200
    assert headers["Idempotent-Replayed"] == "true"
    assert len([seen for seen in keyed_requests(up, key) if seen.complete]) == 1


async def test_a_declared_413_and_a_415_leave_the_key_usable(start, upstream, bearer):
    """413 for a declared length over the limit and 415 for an encoded body forward nothing and
    leave the key free for the retry."""
    up = await upstream(ok())
    gw = await start(up.url, max_body_bytes=64)
    auth = bearer()
    status, headers, body = await post(gw, auth, "k-413", b"x" * 65)
    assert (status, error_of(body)) == (413, "request-body-too-large")
    status, headers, body = await post(gw, auth, "k-415", **{"Content-Encoding": "gzip"})
    assert (status, error_of(body)) == (415, "unsupported-content-encoding")
    assert headers["X-Catalyst-Forwarded"] == "no"
    assert up.requests == []
    await assert_forwarded_once(gw, up, auth, "k-413")
    await assert_forwarded_once(gw, up, auth, "k-415")


async def test_a_413_while_streaming_releases_the_key(start, upstream, bearer):
    """A chunked body that runs over the limit while it streams (the upstream request already
    begun) is 413, forwarded no, and releases the key: the retry is forwarded once."""
    up = await upstream(ok())
    gw = await start(up.url, max_body_bytes=64)
    auth = bearer()
    lines = keyed_lines(auth, "k-stream", CHUNKED)
    reader, writer = await raw_client(gw.url)
    try:
        writer.write(request_bytes("POST", PURCHASE, lines) + b"28\r\n" + b"a" * 40 + b"\r\n")
        await up.until(lambda: len(up.requests) == 1)  # the exchange has begun
        writer.write(b"28\r\n" + b"b" * 40 + b"\r\n0\r\n\r\n")
        async with asyncio.timeout(5):
            response = await read_response(reader)
    finally:
        writer.close()
    assert response is not None
    assert (response.status, error_of(response.body)) == (413, "request-body-too-large")
    assert response.headers["X-Catalyst-Forwarded"] == "no"
    assert not up.requests[0].complete
    await settled(gw)
    await assert_forwarded_once(gw, up, auth, "k-stream")


async def test_a_429_leaves_the_key_usable(start, upstream, bearer):
    """A request refused 429 leaves its key free: the same key (same upstream scope, on the
    purchase alias with its own budget) is forwarded once."""
    up = await upstream(ok())
    gw = await start(up.url, rate_limit=(Rate(1, "hour"),))
    auth = bearer()
    assert (await post(gw, auth, None))[0] == 200  # spends PURCHASE's budget
    status, headers, body = await post(gw, auth, "k-429")
    assert (status, error_of(body)) == (429, "rate-limited")
    assert headers["X-Catalyst-Forwarded"] == "no"
    status, headers, _ = await post(gw, auth, "k-429", path=SME_PURCHASE)
    assert status == 200
    assert "Idempotent-Replayed" not in headers
    assert len(keyed_requests(up, "k-429")) == 1


async def test_a_503_unreachable_releases_the_key(start, upstream, bearer):
    """503 sme-gateway-unreachable (nothing sent) releases the key: once the SME gateway is
    back, the same key is forwarded once."""
    sock = free_socket()  # bound, not listening yet: connections are refused
    port = sock.getsockname()[1]
    gw = await start(f"http://127.0.0.1:{port}")
    auth = bearer()
    status, headers, body = await post(gw, auth, "k-503")
    assert (status, error_of(body)) == (503, "sme-gateway-unreachable")
    assert headers["X-Catalyst-Forwarded"] == "no"
    await settled(gw)
    up = await upstream(ok(), sock=sock)
    await assert_forwarded_once(gw, up, auth, "k-503")


async def test_a_503_gateway_overloaded_releases_the_key(start, upstream, bearer):
    """503 gateway-overloaded (no connection free, no waiting allowed) releases the key: the
    same key is forwarded once when a connection is free."""
    gate = Gate()
    up = await upstream(gate)
    gw = await start(up.url, upstream_max_connections=1, upstream_max_pending=0)
    auth = bearer()
    holder = asyncio.create_task(post(gw, auth, "k-holder"))
    await up.until(lambda: len(up.complete) == 1)
    status, headers, body = await post(gw, auth, "k-overload")
    assert (status, error_of(body)) == (503, "gateway-overloaded")
    assert headers["X-Catalyst-Forwarded"] == "no"
    gate.open.set()
    assert (await holder)[0] == 200
    await settled(gw)  # the holder's connection is back in the pool once its record is written
    await assert_forwarded_once(gw, up, auth, "k-overload")


async def test_a_502_before_the_request_was_all_sent_releases_the_key(start, upstream, bearer):
    """An upstream that hangs up before the request body was all sent gives a 502 that says
    forwarded no, and the key stays usable."""
    up = await upstream(ok(), cut=lambda seen: 0 if len(up.requests) == 1 else None)
    gw = await start(up.url)
    auth = bearer()
    lines = keyed_lines(auth, "k-cut", SIZED)
    reader, writer = await raw_client(gw.url)
    try:
        writer.write(request_bytes("POST", PURCHASE, lines) + ORDER[:4])
        async with asyncio.timeout(5):
            response = await read_response(reader)
    finally:
        writer.close()
    assert response is not None
    assert response.status == 502
    assert response.headers["X-Catalyst-Forwarded"] == "no"
    await settled(gw)
    await assert_forwarded_once(gw, up, auth, "k-cut")


# --- the outcome is unknown ----------------------------------------------------------------


async def test_a_504_makes_the_outcome_unknown(start, upstream, bearer):
    """After a 504 (sent, no answer in time) the key answers 409 idempotency-outcome-unknown
    and is never forwarded again."""
    up = await upstream(never_answer)
    gw = await start(up.url, upstream_timeout_seconds=0.3)
    auth = bearer()
    status, headers, body = await post(gw, auth, "k-504")
    assert (status, error_of(body)) == (504, "sme-gateway-timeout")
    assert headers["X-Catalyst-Forwarded"] == "unknown"
    for body in (ORDER, OTHER_ORDER):
        status, headers, answer_body = await post(gw, auth, "k-504", body)
        assert (status, error_of(answer_body)) == (409, "idempotency-outcome-unknown")
        assert headers["X-Catalyst-Forwarded"] == "no"
    assert len(up.requests) == 1


async def test_a_502_after_sending_makes_the_outcome_unknown(start, upstream, bearer):
    """A 502 after the whole request was sent (garbage for an answer) makes the key's outcome
    unknown: 409, no second upstream request."""
    up = await upstream(write_then_close(b"NOT HTTP AT ALL\r\n\r\n"))
    gw = await start(up.url)
    auth = bearer()
    status, headers, body = await post(gw, auth, "k-502")
    assert (status, error_of(body)) == (502, "sme-gateway-bad-response")
    assert headers["X-Catalyst-Forwarded"] == "unknown"
    status, _, body = await post(gw, auth, "k-502")
    assert (status, error_of(body)) == (409, "idempotency-outcome-unknown")
    assert len(up.requests) == 1


async def test_a_client_gone_after_sending_makes_the_outcome_unknown(start, upstream, bearer):
    """A client that disconnects once its request reached the SME gateway leaves the outcome
    unknown: the retry is 409, never a second upstream request."""
    gate = Gate()
    up = await upstream(gate)
    gw = await start(up.url)
    auth = bearer()
    lines = keyed_lines(auth, "k-gone", SIZED)
    _reader, writer = await raw_client(gw.url)
    writer.write(request_bytes("POST", PURCHASE, lines, ORDER))
    await up.until(lambda: len(up.complete) == 1)
    writer.close()
    await settled(gw)  # the gateway saw the client go and cancelled the exchange
    gate.open.set()
    status, _, body = await post(gw, auth, "k-gone")
    assert (status, error_of(body)) == (409, "idempotency-outcome-unknown")
    assert len(up.requests) == 1


async def test_a_client_gone_before_the_request_was_sent_releases_the_key(start, upstream, bearer):
    """A client that disconnects while its body is still streaming up (the upstream request
    aborted unfinished) leaves the key free: the retry is forwarded once."""
    up = await upstream(ok())
    gw = await start(up.url)
    auth = bearer()
    lines = keyed_lines(auth, "k-left", SIZED)
    _reader, writer = await raw_client(gw.url)
    writer.write(request_bytes("POST", PURCHASE, lines) + ORDER[:5])
    await up.until(lambda: len(up.requests) == 1 and len(up.requests[0].body) == 5)
    writer.close()
    await up.all_closed()
    await settled(gw)
    assert not up.requests[0].complete
    await assert_forwarded_once(gw, up, auth, "k-left")


@pytest.mark.parametrize("chunked", [False, True], ids=["length", "chunked"])
async def test_an_answer_broken_off_mid_body_makes_the_outcome_unknown(
    start, upstream, bearer, chunked
):
    """An upstream answer that breaks off mid-body reaches the client as an aborted transfer,
    and the key's outcome is unknown: 409, never forwarded again."""
    up = await upstream(partial_answer(ORDER_ANSWER, ORDER_ANSWER[:10], chunked=chunked))
    gw = await start(up.url)
    auth = bearer()
    first = await raw_post(gw, auth, [("Idempotency-Key", "k-broken")])
    assert first.status == 200
    assert not first.complete
    await settled(gw)
    status, _, body = await post(gw, auth, "k-broken")
    assert (status, error_of(body)) == (409, "idempotency-outcome-unknown")
    assert len(up.requests) == 1


# --- early answers -------------------------------------------------------------------------

EARLY = b'{"error": "sku-unknown"}'


async def answer_after_head(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A raw upstream that answers EARLY (400) once it has the head, before any body."""
    await reader.readuntil(b"\r\n\r\n")
    head = b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\nContent-Length: %d"
    writer.write(head % len(EARLY) + b"\r\nConnection: close\r\n\r\n" + EARLY)
    await writer.drain()


async def test_an_early_answer_is_replayed_to_the_identical_retry(start, bearer):
    """An SME gateway answer sent before it read the whole request body is still the answer to
    that request: the identical retry gets it replayed, not 422 another request."""
    up = await RawUpstream(answer_after_head).start()
    try:
        gw = await start(up.url)
        auth = bearer()
        lines = keyed_lines(auth, "k-early", SIZED)
        reader, writer = await raw_client(gw.url)
        try:
            writer.write(request_bytes("POST", PURCHASE, lines) + ORDER[:5])
            async with asyncio.timeout(5):
                first = await read_response(reader)
            writer.write(ORDER[5:])  # the client finishes its body after the answer
            await writer.drain()
        finally:
            writer.close()
        assert first is not None
        assert (first.status, first.body) == (400, EARLY)
        await settled(gw)
        status, headers, body = await post(gw, auth, "k-early")
        assert (status, body) == (400, EARLY), body
        assert headers["Idempotent-Replayed"] == "true"
        assert up.connections == 1
    finally:
        await up.close()


async def test_an_answer_begun_before_the_body_was_all_sent_then_cut_is_outcome_unknown(
    start, bearer
):
    """The SME gateway begins its final answer before it has the whole body (it may have acted
    on what it read) and hangs up mid-head: a 502 that says unknown, and the key is never
    forwarded again, though the request body never went out whole."""

    async def begin_then_hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        await reader.readuntil(b"\r\n\r\n")
        await reader.readexactly(5)
        writer.write(b"HTTP/1.1 201 Crea")
        await writer.drain()

    up = await RawUpstream(begin_then_hang_up).start()
    try:
        gw = await start(up.url)
        auth = bearer()
        reader, writer = await raw_client(gw.url)
        try:
            writer.write(request_bytes("POST", PURCHASE, keyed_lines(auth, "k-cut-head", SIZED)))
            writer.write(ORDER[:5])
            async with asyncio.timeout(5):
                first = await read_response(reader)
        finally:
            writer.close()
        assert first is not None
        assert (first.status, error_of(first.body)) == (502, "sme-gateway-bad-response")
        assert first.headers["X-Catalyst-Forwarded"] == "unknown"
        await settled(gw)
        status, _, body = await post(gw, auth, "k-cut-head")
        assert (status, error_of(body)) == (409, "idempotency-outcome-unknown")
        assert up.connections == 1
    finally:
        await up.close()


async def test_a_repeat_whose_body_stalls_is_400_not_a_handler_waiting_forever(
    start, upstream, bearer
):
    """A repeated key's body is read (never forwarded) only to be fingerprinted: a client that
    stalls mid-body gets 400 bad-request after the time budget, and the connection is not
    kept, rather than a handler left waiting for it."""
    up = await upstream(ok())
    gw = await start(up.url, upstream_timeout_seconds=0.3)
    auth = bearer()
    assert (await post(gw, auth, "stalled"))[0] == 200
    lines = keyed_lines(auth, "stalled", CHUNKED)
    reader, writer = await raw_client(gw.url)
    try:
        writer.write(request_bytes("POST", PURCHASE, lines) + b'5\r\n{"sku\r\n')  # then nothing
        async with asyncio.timeout(5):
            response = await read_response(reader)
    finally:
        writer.close()
    assert response is not None
    assert (response.status, error_of(response.body)) == (400, "bad-request")
    assert response.headers["Connection"] == "close"
    assert response.headers["X-Catalyst-Forwarded"] == "no"
    assert len(up.requests) == 1


async def test_a_repeat_whose_body_trickles_is_400_within_the_budget(start, upstream, bearer):
    """The whole of a repeated key's body must come within the time budget, as a forwarded
    body must: a client trickling a byte now and then (each within the budget) is answered
    400 while it still trickles, not held for as long as it cares to send. (Each read alone
    was bounded: a 1 MiB body at a byte every 2 s held a connection for weeks.)"""
    up = await upstream(ok())
    gw = await start(up.url, upstream_timeout_seconds=0.3)
    auth = bearer()
    assert (await post(gw, auth, "trickled"))[0] == 200
    reader, writer = await raw_client(gw.url)

    async def trickle() -> None:
        writer.write(request_bytes("POST", PURCHASE, keyed_lines(auth, "trickled", CHUNKED)))
        for _ in range(40):  # 4 s of it, a chunk of one byte every 0.1 s
            writer.write(b"1\r\nx\r\n")
            await asyncio.sleep(0.1)  # the client's pace, not a wait for anything

    trickling = asyncio.create_task(trickle())
    try:
        async with asyncio.timeout(10):
            response = await read_response(reader)
        assert not trickling.done()  # answered while the body still trickled in
    finally:
        trickling.cancel()
        writer.close()
    assert response is not None
    assert (response.status, error_of(response.body)) == (400, "bad-request")
    assert response.headers["X-Catalyst-Forwarded"] == "no"
    assert len(up.requests) == 1


# --- which routes, which keys ------------------------------------------------------------


async def test_required_without_a_key_is_400_missing(start, upstream, bearer):
    """On a ``required`` route a request without a key is 400 idempotency-key-missing and
    reaches nothing."""
    up = await upstream(ok())
    gw = await start(up.url, idempotency="required")
    auth = bearer()
    for method, path in (("POST", PURCHASE), ("GET", LIST), ("DELETE", REVOKE + "VCH-1")):
        status, headers, body = await gw.request(method, path, headers=auth)
        assert (status, error_of(body)) == (400, "idempotency-key-missing"), path
        assert headers["X-Catalyst-Forwarded"] == "no"
    assert up.requests == []
    status, _, _ = await gw.request("GET", LIST, headers={**auth, "Idempotency-Key": "list-1"})
    assert status == 200
    assert len(up.requests) == 1


INVALID_KEYS: list[tuple[str, list[tuple[str, str]]]] = [
    ("empty", [("Idempotency-Key", "")]),
    ("empty quoted", [("Idempotency-Key", '""')]),
    ("256 characters", [("Idempotency-Key", "k" * 256)]),
    ("256 characters quoted", [("Idempotency-Key", '"' + "k" * 256 + '"')]),
    ("tab", [("Idempotency-Key", "ab\tcd")]),
    ("non-ASCII", [("Idempotency-Key", "clé-1".encode().decode("latin-1"))]),
    ("space", [("Idempotency-Key", "ab cd")]),
    ("space quoted", [("Idempotency-Key", '"ab cd"')]),
    ("two headers", [("Idempotency-Key", "k1"), ("Idempotency-Key", "k1")]),
    ("unterminated quote", [("Idempotency-Key", '"abc')]),
    ("lone quote", [("Idempotency-Key", '"')]),
    ("quote inside", [("Idempotency-Key", '"a"b"')]),
    ("bad escape", [("Idempotency-Key", '"a\\qb"')]),
    ("escaped closing quote", [("Idempotency-Key", '"abc\\"')]),
]


@pytest.mark.parametrize(("case", "key_lines"), INVALID_KEYS, ids=[c for c, _ in INVALID_KEYS])
async def test_an_invalid_key_is_400_invalid(start, upstream, bearer, case, key_lines):
    """A key that is not 1-255 visible ASCII characters (bare or quoted), or two key headers,
    is 400 idempotency-key-invalid and reaches nothing."""
    up = await upstream(ok())
    gw = await start(up.url)
    response = await raw_post(gw, bearer(), key_lines)
    assert response.status == 400, response.body
    assert error_of(response.body) == "idempotency-key-invalid"
    assert response.headers["X-Catalyst-Forwarded"] == "no"
    assert up.requests == []


@pytest.mark.parametrize("byte", ["\x01", "\x1f", "\x7f"], ids=["SOH", "US", "DEL"])
async def test_a_key_with_a_control_byte_reaches_nothing(start, upstream, bearer, byte):
    """A key holding a control byte is refused with 400 (the HTTP parser refuses the header
    line before the key is read) and reaches nothing."""
    up = await upstream(ok())
    gw = await start(up.url)
    response = await raw_post(gw, bearer(), [("Idempotency-Key", f"ab{byte}cd")])
    assert response.status == 400
    assert error_of(response.body) in ("bad-request", "idempotency-key-invalid")
    assert response.headers["X-Catalyst-Forwarded"] == "no"
    assert up.requests == []


async def test_the_longest_keys_are_accepted(start, upstream, bearer):
    """255 characters is a valid key, bare or quoted, and every visible ASCII character may
    appear in one."""
    up = await upstream(ok())
    gw = await start(up.url)
    auth = bearer()
    visible = "".join(chr(c) for c in range(0x21, 0x7F)).replace('"', "").replace("\\", "")
    for key in ("k" * 255, visible):
        assert (await raw_post(gw, auth, [("Idempotency-Key", key)])).status == 200
        again = await raw_post(gw, auth, [("Idempotency-Key", f'"{key}"')])
        assert again.headers["Idempotent-Replayed"] == "true"
    assert len(up.requests) == 2


async def test_off_means_no_dedupe(start, upstream, bearer):
    """With CATALYST_IDEMPOTENCY=off a repeated key is forwarded every time (even a malformed
    one), and nothing is marked replayed."""
    up = await upstream(ok())
    gw = await start(up.url, idempotency="off")
    auth = bearer()
    for key in ("same", "same", "not valid at all"):
        status, headers, _ = await post(gw, auth, key)
        assert status == 200
        assert "Idempotent-Replayed" not in headers
    assert len(up.requests) == 3


async def test_no_key_on_an_optional_route_means_no_dedupe(start, upstream, bearer):
    """Without a key an ``optional`` route proxies as usual: two identical requests, two
    upstream requests."""
    up = await upstream(ok())
    gw = await start(up.url)
    auth = bearer()
    for _ in range(2):
        status, headers, _ = await post(gw, auth, None)
        assert status == 200
        assert "Idempotent-Replayed" not in headers
    assert len(up.requests) == 2
    assert all("Idempotency-Key" not in seen.headers for seen in up.requests)


ROUTES_FILE = {
    "routes": [
        {"methods": ["POST"], "path": "/api/v1/org/billing/purchase",
         "upstream_method": "POST", "upstream_path": "/api/billing/purchase"},
        {"methods": ["post"], "path": "/api/v1/org/billing/vouchers/issue",
         "upstream_method": "post", "upstream_path": "/api/billing/vouchers/issue"},
        {"methods": ["GET"], "path": "/api/v1/org/billing/vouchers/list",
         "upstream_method": "GET", "upstream_path": "/api/billing/vouchers/list"},
        {"methods": ["POST"], "path": "/api/v1/org/billing/checkout",
         "upstream_method": "POST", "upstream_path": "/api/billing/checkout"},
        {"methods": ["POST"], "path": "/api/v1/legacy/billing/purchase",
         "upstream_method": "POST", "upstream_path": "/api/billing/purchase",
         "idempotency": "off"},
        {"methods": ["POST"], "path": "/api/v1/org/billing/vouchers/revoke/{code}",
         "upstream_method": "DELETE", "upstream_path": "/api/billing/vouchers/revoke/{code}",
         "idempotency": "required"},
    ]
}  # fmt: skip

# (method, client path, upstream requests for one key sent twice under `auto`)
AUTO_COVERAGE = [
    ("POST", PURCHASE, 1),
    ("POST", SME_PURCHASE, 1),
    ("POST", ISSUE, 1),
    ("GET", LIST, 2),
    ("POST", REVOKE + "VCH-1", 2),
    ("DELETE", REVOKE + "VCH-1", 2),
    ("POST", "/api/v1/org/billing/purchase", 1),
    ("POST", "/api/v1/org/billing/vouchers/issue", 1),
    ("POST", "/api/v1/org/billing/checkout", 1),  # purchase's canonical name on the SME side
    ("GET", "/api/v1/org/billing/vouchers/list", 2),
    ("POST", "/api/v1/legacy/billing/purchase", 2),  # the file's "off" overrides auto
    ("POST", "/api/v1/org/billing/vouchers/revoke/VCH-1", 1),  # the file's "required"
]


async def test_auto_covers_exactly_purchase_and_voucher_issue(
    start, upstream, bearer, tmp_path, store
):
    """``auto`` dedupes exactly the routes whose upstream is POST purchase (or checkout, its
    canonical name) or voucher issue (routes-file aliases included), not vouchers list or
    revoke; a routes-file entry's own mode overrides it."""
    routes_file = tmp_path / "routes.json"
    routes_file.write_text(json.dumps(ROUTES_FILE))
    up = await upstream(ok())
    gw = await start(up.url, routes_file=str(routes_file))
    auth = bearer()
    for index, (method, path, expected) in enumerate(AUTO_COVERAGE):
        key = f"auto-{index}"
        body = b"{}" if method == "POST" else b""
        for _ in range(2):
            status, _, _ = await post(gw, auth, key, body, path=path, method=method)
            assert status == 200, path
        assert len(keyed_requests(up, key)) == expected, path
    status, _, body = await post(gw, auth, None, b"", path="/api/v1/org/billing/vouchers/revoke/V")
    assert (status, error_of(body)) == (400, "idempotency-key-missing")
    _, _, ready = await gw.request("GET", "/readyz")
    report = json.loads(ready)["idempotency"]
    assert report["routes"] == sorted(
        {path.replace("VCH-1", "{code}") for _, path, n in AUTO_COVERAGE if n == 1}
    )
    assert report["off_reason"] is None
    assert report["store"] == store


# --- the outcomes, counted and logged ------------------------------------------------------


async def test_outcomes_are_counted_and_logged_without_the_key(start, upstream, bearer, redis):
    """Each keyed request's outcome (new, replayed, in-use, reused, unknown, store-error) is in
    the access log's ``idempotency`` field and ``catalyst_proxy_idempotency_total``; no log line
    holds the key."""
    gate = Gate(when=lambda seen: b"hold" in seen.body)
    up = await upstream(by_body(gate, garbage=write_then_close(b"NOT HTTP\r\n\r\n")))
    gw = await start(up.url)
    auth = bearer()
    keys = {name: f"secret-key-{name}-5b0c" for name in ("a", "b", "c", "d")}
    with capture_logs() as logs:
        await post(gw, auth, keys["a"])  # new
        await post(gw, auth, keys["a"])  # replayed
        await post(gw, auth, keys["a"], OTHER_ORDER)  # reused
        held = asyncio.create_task(post(gw, auth, keys["b"], b'{"hold": 1}'))  # new
        await up.until(lambda: len(up.complete) == 2)
        await post(gw, auth, keys["b"], b'{"hold": 1}')  # in-use
        gate.open.set()
        await held
        await post(gw, auth, keys["c"], b'{"garbage": 1}')  # new, then unknown (502)
        await post(gw, auth, keys["c"], b'{"garbage": 1}')  # unknown
        await post(gw, auth, None)  # no key: no outcome
        if redis is not None:
            redis.stop()
            status, _, _ = await post(gw, auth, keys["d"])  # store-error
            assert status == 503
            redis.start()
        await settled(gw)
    lines = [entry for entry in logs if entry["event"] == log.REQUEST]
    outcomes = [entry["idempotency"] for entry in lines]
    expected = ["new", "replayed", "reused", "in-use", "new", "unknown", "unknown", None]
    if redis is not None:
        expected.append("store-error")
    assert outcomes == expected
    text = await gw.metrics_text()
    names = ("new", "replayed", "in-use", "reused", "unknown", "store-error")
    counts = {name: metric(text, IDEM_TOTAL, outcome=name) for name in names}
    assert counts == {"new": 3, "replayed": 1, "in-use": 1, "reused": 1, "unknown": 2,
                      "store-error": 1 if redis is not None else 0}  # fmt: skip
    for entry in logs:
        for key in keys.values():
            assert key not in str(entry)


# --- bounds ----------------------------------------------------------------------------------


@pytest.mark.parametrize("chunked", [False, True], ids=["length", "chunked"])
async def test_an_answer_too_large_to_record_is_delivered_then_409(
    start, upstream, bearer, chunked
):
    """An answer over CATALYST_IDEMPOTENCY_MAX_BODY_BYTES is delivered whole the first time;
    a retry gets 409 idempotency-replay-unavailable, never a second upstream request. An answer
    of exactly the limit is replayed."""
    large = os.urandom(300).hex().encode()  # 600 bytes

    def chunks(body: bytes) -> Respond:
        async def respond(
            seen: Seen, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
        ) -> bool:
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            for index in range(0, len(body), 64):
                piece = body[index : index + 64]
                writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                await writer.drain()
            writer.write(b"0\r\n\r\n")
            return True

        return respond

    make = chunks if chunked else ok
    up = await upstream(by_body(make(large[:100]), large=make(large)))
    gw = await start(up.url, idempotency_max_body_bytes=100)
    auth = bearer()
    status, _, body = await post(gw, auth, "too-large", b'{"large": 1}')
    assert status == 200
    assert hashlib.sha256(body).digest() == hashlib.sha256(large).digest()
    status, headers, body = await post(gw, auth, "too-large", b'{"large": 1}')
    assert (status, error_of(body)) == (409, "idempotency-replay-unavailable")
    assert "Idempotent-Replayed" not in headers
    assert (await post(gw, auth, "at-limit"))[2] == large[:100]
    status, headers, body = await post(gw, auth, "at-limit")
    assert (status, body) == (200, large[:100])
    assert headers["Idempotent-Replayed"] == "true"
    assert len(up.requests) == 2


async def test_the_memory_store_drops_old_answers_bodies_and_never_forwards_twice(
    gateway, upstream, bearer
):
    """Past the memory store's bound for answers the oldest answers' bodies go, counted in
    ``catalyst_proxy_idempotency_answers_dropped_total``, and their records stay: a retry of
    the first purchase is 409 replay-unavailable and never reaches the SME gateway again (it
    did, under one bound for records and answers alike, after ~128 answers of 64 KiB); the
    latest are still replayed, and no record was evicted."""
    largest = b"x" * 65536  # the largest answer recorded
    up = await upstream(ok(largest))
    gw = await gateway(upstream=up.url)
    auth = bearer()
    count = MEMORY_MAX_ANSWER_BYTES // len(largest) + 8
    for index in range(count):
        assert (await post(gw, auth, f"evict-{index}"))[0] == 200
    text = await gw.metrics_text()
    assert metric(text, "catalyst_proxy_idempotency_answers_dropped_total") >= 8
    assert metric(text, "catalyst_proxy_idempotency_evictions_total") == 0
    status, headers, body = await post(gw, auth, f"evict-{count - 1}")
    assert (status, body) == (200, largest)
    assert headers["Idempotent-Replayed"] == "true"
    status, headers, body = await post(gw, auth, "evict-0")
    assert (status, error_of(body)) == (409, "idempotency-replay-unavailable")
    assert len(keyed_requests(up, "evict-0")) == 1


async def test_the_memory_store_replays_every_answer_the_configuration_records(
    gateway, upstream, bearer
):
    """With ``CATALYST_IDEMPOTENCY_MAX_BODY_BYTES`` raised past a quarter of the memory store's
    default budget for answers (4 MiB), a 3 MiB answer is still recorded and replayed: the
    budget grows with the setting (an answer over a quarter of it would not be kept)."""
    large = os.urandom(3 * 1024 * 1024)
    up = await upstream(ok(large))
    gw = await gateway(upstream=up.url, idempotency_max_body_bytes=4 * 1024 * 1024)
    auth = bearer()
    assert (await post(gw, auth, "three-mib"))[2] == large
    status, headers, body = await post(gw, auth, "three-mib")
    assert (status, headers["Idempotent-Replayed"]) == (200, "true")
    assert body == large
    assert len(keyed_requests(up, "three-mib")) == 1


async def test_the_memory_store_evicts_the_oldest_records_past_its_bound_and_counts_them(
    gateway, upstream, bearer
):
    """Past the memory store's bound for records (here made small: 64 KiB, ~85 records) the
    oldest records go, counted in ``catalyst_proxy_idempotency_evictions_total``: an evicted
    key is new again (the bound's documented cost), the latest are still replayed."""
    up = await upstream(ok())
    gw = await gateway(upstream=up.url, tuning=Tuning(memory_max_bytes=65536))
    auth = bearer()
    count = 65536 // ENTRY_WEIGHT + 8
    for index in range(count):
        assert (await post(gw, auth, f"evict-{index}"))[0] == 200
    text = await gw.metrics_text()
    assert metric(text, "catalyst_proxy_idempotency_evictions_total") >= 8
    status, headers, body = await post(gw, auth, f"evict-{count - 1}")
    assert (status, body) == (200, ORDER_ANSWER)
    assert headers["Idempotent-Replayed"] == "true"
    status, headers, _ = await post(gw, auth, "evict-0")
    assert status == 200
    assert "Idempotent-Replayed" not in headers
    assert len(keyed_requests(up, "evict-0")) == 2


async def test_200_concurrent_duplicates_reach_the_upstream_once(start, upstream, bearer):
    """200 concurrent requests with one key: exactly one upstream request; every other answer is
    409 in-use or an identical replay."""
    gate = Gate()
    up = await upstream(gate)
    gw = await start(up.url)
    auth = bearer()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:

        async def one() -> tuple[int, Any, bytes]:
            url = gw.url + PURCHASE
            async with http.post(url, headers=keyed(auth, "stampede"), data=ORDER) as resp:
                return resp.status, resp.headers, await resp.read()

        tasks = [asyncio.create_task(one()) for _ in range(200)]
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED, timeout=20)
        assert done  # a duplicate was refused while the first was held
        gate.open.set()
        async with asyncio.timeout(30):
            results = await asyncio.gather(*tasks)
    assert len(up.requests) == 1
    originals = [r for r in results if r[0] == 200 and "Idempotent-Replayed" not in r[1]]
    replays = [r for r in results if r[0] == 200 and r[1].get("Idempotent-Replayed") == "true"]
    in_use = [r for r in results if r[0] == 409 and error_of(r[2]) == "idempotency-key-in-use"]
    assert len(originals) == 1
    assert len(originals) + len(replays) + len(in_use) == 200
    assert in_use
    assert all(r[2] == ORDER_ANSWER for r in originals + replays)


# --- time ---------------------------------------------------------------------------------


async def test_records_expire_after_the_ttl(start, upstream, bearer, store, redis):
    """A record lives CATALYST_IDEMPOTENCY_TTL_SECONDS: replayed within it, and the key is new
    (forwarded again) after it."""
    clock = Clock()
    ttl = 60.0 if store == "memory" else 1.0  # a fake clock for memory; a real TTL for Redis
    up = await upstream(ok())
    gw = await start(up.url, clock=clock, idempotency_ttl_seconds=ttl)
    auth = bearer()
    await post(gw, auth, "ttl")
    if redis is not None:
        [name] = idem_keys(redis)
        assert 0 < redis.command("PTTL", name) <= 1000
    assert (await post(gw, auth, "ttl"))[1]["Idempotent-Replayed"] == "true"
    if redis is not None:
        await eventually(lambda: not idem_keys(redis))
    else:
        clock.now += ttl - 1
        assert (await post(gw, auth, "ttl"))[1]["Idempotent-Replayed"] == "true"
        clock.now += 2
    status, headers, _ = await post(gw, auth, "ttl")
    assert status == 200
    assert "Idempotent-Replayed" not in headers
    assert len(up.requests) == 2


async def test_a_late_completion_never_overwrites_a_newer_reservation(
    start, upstream, bearer, store, redis
):
    """A first attempt that outlived its record (expired and reserved anew by a retry) cannot
    overwrite the newer one when it finally completes: the retry's record stands."""
    clock = Clock()
    first_gate, second_gate = Gate(ok(b'{"order_id": "late"}')), Gate(ok(b'{"order_id": "new"}'))
    up = await upstream(in_turn(first_gate, second_gate))
    gw = await start(up.url, clock=clock, idempotency_ttl_seconds=10.0)
    auth = bearer()
    first = asyncio.create_task(post(gw, auth, "cas"))
    await up.until(lambda: len(up.complete) == 1)
    await expire_all(store, clock, redis, 10.0)
    second = asyncio.create_task(post(gw, auth, "cas"))
    await up.until(lambda: len(up.complete) == 2)
    first_gate.open.set()
    assert (await first)[2] == b'{"order_id": "late"}'
    await settled(gw, in_flight=1)  # the first is done and its record update tried
    status, _, body = await post(gw, auth, "cas")
    assert (status, error_of(body)) == (409, "idempotency-key-in-use")  # the retry's reservation
    second_gate.open.set()
    assert (await second)[2] == b'{"order_id": "new"}'
    status, headers, body = await post(gw, auth, "cas")
    assert (status, body) == (200, b'{"order_id": "new"}')
    assert headers["Idempotent-Replayed"] == "true"
    assert len(up.requests) == 2


async def test_a_ttl_shorter_than_the_exchange_never_lets_a_retry_through(
    gateway, upstream, bearer
):
    """With a TTL shorter than the exchange takes, the reservation still holds for the whole
    exchange (it outlives its lease by the TTL): a retry while the first is in flight is
    409 in use, and the SME gateway sees the purchase once. (Redis: the reservation's PTTL,
    in tests/test_idempotency_unit.py.)"""
    clock = Clock()
    gate = Gate()
    up = await upstream(gate)
    gw = await gateway(upstream=up.url, clock=clock, idempotency_ttl_seconds=1.0)
    auth = bearer()
    first = asyncio.create_task(post(gw, auth, "short-ttl"))
    await up.until(lambda: len(up.complete) == 1)
    clock.now += 2.0  # the SME gateway is slow to answer: past the TTL, within the budget
    status, _, body = await post(gw, auth, "short-ttl")
    assert (status, error_of(body)) == (409, "idempotency-key-in-use")
    gate.open.set()
    assert (await first)[0] == 200
    assert len(keyed_requests(up, "short-ttl")) == 1


async def test_an_answer_streaming_past_the_lease_keeps_its_key_however_full_the_store(
    gateway, upstream, bearer
):
    """An answer still streaming when its reservation's lease is over: a retry is 409 outcome
    unknown, and stays so when other purchases fill the store past its bound for records
    (made small here: 64 KiB; a reservation of this process is never evicted for room): the
    SME gateway sees the purchase once."""
    clock = Clock()
    rest = asyncio.Event()
    large = b"x" * 65536  # recorded whole (the record's limit)

    async def respond(
        seen: Seen, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        if seen.headers.get("Idempotency-Key") != "slow":
            return await ok(large)(seen, reader, writer)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n5\r\n{\"ord\r\n")  # fmt: skip
        await writer.drain()
        await rest.wait()
        writer.write(b'9\r\ner_id":1}\r\n0\r\n\r\n')
        await writer.drain()
        return True

    up = await upstream(respond)
    budget = 30.0  # real seconds per piece: the test's clock jumps, the stream does not stall
    gw = await gateway(
        upstream=up.url, clock=clock, upstream_timeout_seconds=budget,
        tuning=Tuning(memory_max_bytes=65536),
    )  # fmt: skip
    auth = bearer()
    first = asyncio.create_task(post(gw, auth, "slow"))
    await up.until(lambda: len(keyed_requests(up, "slow")) == 1)
    clock.now += budget + LEASE_MARGIN + 1  # the answer has streamed past the lease
    status, _, body = await post(gw, auth, "slow")
    assert (status, error_of(body)) == (409, "idempotency-outcome-unknown")
    for index in range(65536 // ENTRY_WEIGHT + 10):
        assert (await post(gw, auth, f"other-{index}"))[0] == 200
    text = await gw.metrics_text()
    assert metric(text, "catalyst_proxy_idempotency_evictions_total") > 0
    status, _, body = await post(gw, auth, "slow")
    assert (status, error_of(body)) == (409, "idempotency-outcome-unknown")
    rest.set()
    assert (await first)[0] == 200
    assert len(keyed_requests(up, "slow")) == 1


async def test_a_long_streaming_answer_keeps_its_reservation_alive(start, upstream, bearer):
    """An answer that streams for longer than its reservation's lease and TTL together (each
    piece within the budget): the reservation is renewed while the request is alive, so a
    retry in the meantime is 409 in use (not unknown, not forwarded again), and a retry
    after the answer is replayed. The SME gateway sees the purchase once."""
    budget, ttl, piece = 1.0, 1.0, 0.1  # the reservation held 2 s unless renewed
    past_the_hold, done = asyncio.Event(), asyncio.Event()

    async def respond(
        seen: Seen, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")  # fmt: skip
        began = asyncio.get_running_loop().time()
        while not done.is_set():  # pieces until the test has made its retry
            writer.write(b"1\r\n \r\n")
            await writer.drain()
            await asyncio.sleep(piece)  # the SME gateway's pace: slow, within the budget
            if asyncio.get_running_loop().time() - began > budget + ttl + 0.3:
                past_the_hold.set()
        writer.write(b"2\r\n{}\r\n0\r\n\r\n")
        await writer.drain()
        return True

    up = await upstream(respond)
    gw = await start(
        up.url,
        upstream_timeout_seconds=budget,
        idempotency_ttl_seconds=ttl,
        tuning=Tuning(lease_margin=0.0),
    )  # the lease is the budget; fmt: skip
    auth = bearer()
    first = asyncio.create_task(post(gw, auth, "long"))
    async with asyncio.timeout(10):
        await past_the_hold.wait()
    status, headers, body = await post(gw, auth, "long")
    done.set()
    assert (status, error_of(body)) == (409, "idempotency-key-in-use")
    assert headers["X-Catalyst-Forwarded"] == "no"
    status, _, body = await first
    assert status == 200
    assert body.strip(b" ") == b"{}"
    await settled(gw)
    status, headers, again = await post(gw, auth, "long")
    assert (status, headers["Idempotent-Replayed"], again) == (200, "true", body)
    assert len(keyed_requests(up, "long")) == 1


async def test_a_streamed_answer_whose_head_cannot_go_out_is_unknown(
    start, upstream, bearer, monkeypatch
):
    """The SME gateway answered, but the client's connection failed as the answer's head went
    out (the client left between the upstream's head and ours): the purchase was acted on,
    so its key reads 409 outcome unknown, not in use forever by a reservation still renewed."""
    failing = {"left": 1}
    prepare = web.StreamResponse.prepare

    async def prepare_once_failing(self: web.StreamResponse, request: web.BaseRequest) -> Any:
        if failing["left"]:  # the one moment no real client can be made to hit on demand
            failing["left"] -= 1
            raise ConnectionResetError("the client left")
        return await prepare(self, request)

    monkeypatch.setattr(web.StreamResponse, "prepare", prepare_once_failing)
    up = await upstream(partial_answer(b"{}", b"{", chunked=True, then="stall"))
    gw = await start(up.url, upstream_timeout_seconds=1.0, idempotency_ttl_seconds=60.0,
                     tuning=Tuning(lease_margin=0.0))  # fmt: skip
    auth = bearer()
    with contextlib.suppress(aiohttp.ClientError):
        await post(gw, auth, "head-lost")
    await settled(gw)
    status, _, body = await post(gw, auth, "head-lost")
    assert (status, error_of(body)) == (409, "idempotency-outcome-unknown")
    assert len(keyed_requests(up, "head-lost")) == 1


@pytest.mark.parametrize("then", ["streams-on", "leaves", "stalls"])
async def test_an_early_answer_is_recorded_before_the_body_is_in(start, bearer, then):
    """The SME gateway answers before it has the body (an early answer). The record is
    complete as soon as the answer is, whatever the client does with the rest of its body:
    streams it on, leaves, or stalls past the budget. A retry whose body begins with the
    bytes the first attempt had sent gets the answer replayed; one whose body begins
    otherwise is 422; the SME gateway sees the purchase once. (It read "outcome unknown"
    when the client left or stalled: the record waited for the whole body.)"""
    budget = 1.0
    up = await RawUpstream(answer_after_head).start()
    try:
        gw = await start(up.url, upstream_timeout_seconds=budget)
        auth = bearer()
        lines = keyed_lines(auth, "early-partial", SIZED)
        reader, writer = await raw_client(gw.url)
        try:
            writer.write(request_bytes("POST", PURCHASE, lines) + ORDER[:5])  # 5 bytes of it
            async with asyncio.timeout(5):
                first = await read_response(reader)
            assert first is not None
            assert (first.status, first.body) == (400, EARLY)
            if then == "streams-on":
                writer.write(ORDER[5:8])  # and more to come
                await writer.drain()
            elif then == "leaves":
                writer.transport.abort()
            # "stalls": nothing more, the connection held open
            status, headers, body = await post(gw, auth, "early-partial")  # the whole ORDER
            assert (status, headers.get("Idempotent-Replayed"), body) == (400, "true", EARLY)
            assert headers["X-Catalyst-Forwarded"] == "yes"
            status, _, body = await post(gw, auth, "early-partial", b'{"xku": "starter"}')
            assert (status, error_of(body)) == (422, "idempotency-key-reused")
            status, _, body = await post(gw, auth, "early-partial", ORDER[:4])  # shorter
            assert (status, error_of(body)) == (422, "idempotency-key-reused")
        finally:
            writer.close()
        assert up.connections == 1
    finally:
        await up.close()


async def test_an_answer_is_recorded_though_redis_lost_its_reservation(
    gateway, upstream, bearer, redis_url, redis_server
):
    """Redis loses the reservation while the purchase is in flight (a flush, a restart without
    persistence): the answer is still recorded when it comes (and the loss logged), so a
    retry after it is replayed, not forwarded a second time."""
    gate = Gate()
    up = await upstream(gate)
    gw = await gateway(upstream=up.url, redis_url=redis_url)
    auth = bearer()
    first = asyncio.create_task(post(gw, auth, "flushed"))
    await up.until(lambda: len(up.complete) == 1)
    redis_server.command("FLUSHALL")
    with capture_logs() as logs:
        gate.open.set()
        assert (await first)[0] == 200
        await settled(gw)
    assert [e["outcome"] for e in logs if e["event"] == log.IDEMPOTENCY_RECORD_LOST] == [
        "completed"
    ]
    status, headers, body = await post(gw, auth, "flushed")
    assert (status, headers["Idempotent-Replayed"], body) == (200, "true", ORDER_ANSWER)
    assert len(keyed_requests(up, "flushed")) == 1


async def test_the_eviction_policy_is_checked_when_redis_comes_up_after_the_gateway(
    gateway, upstream, bearer, redis_url, redis_server
):
    """Redis down when the gateway starts (pods starting together) and up later with a policy
    that evicts: the warning comes when the store comes up, not only at start-up."""
    up = await upstream(ok())
    redis_server.stop()
    with capture_logs() as logs:
        gw = await gateway(upstream=up.url, redis_url=redis_url)
        store = gw.parts.store
        assert store is not None
        await eventually(lambda: store.state == "unavailable")
        redis_server.start()
        redis_server.command("CONFIG", "SET", "maxmemory-policy", "allkeys-lru")
        try:
            await eventually(lambda: store.report()["state"] == "ok")  # /readyz's probe
            await settled(gw)
        finally:
            redis_server.command("CONFIG", "SET", "maxmemory-policy", "noeviction")
    [warning] = [e for e in logs if e["event"] == log.IDEMPOTENCY_EVICTION]
    assert warning["maxmemory_policy"] == "allkeys-lru"


# --- Redis -------------------------------------------------------------------------------


async def test_a_record_is_replayed_by_another_gateway_on_the_same_redis(
    gateway, upstream, bearer, redis_url
):
    """Two gateway apps sharing one Redis share the records: the second replays what the first
    recorded, and refuses with 409 in use while the first is in flight."""
    gate = Gate(when=lambda seen: b"hold" in seen.body)
    up = await upstream(gate)
    one = await gateway(upstream=up.url, redis_url=redis_url)
    two = await gateway(upstream=up.url, redis_url=redis_url)
    auth = bearer()
    assert (await post(one, auth, "shared"))[0] == 200
    await settled(one)  # the record follows the answer (test_a_retry_right_after_...)
    status, headers, body = await post(two, auth, "shared")
    assert (status, body) == (200, ORDER_ANSWER)
    assert headers["Idempotent-Replayed"] == "true"
    held = asyncio.create_task(post(one, auth, "held", b'{"hold": 1}'))
    await up.until(lambda: len(up.complete) == 2)
    status, _, body = await post(two, auth, "held", b'{"hold": 1}')
    assert (status, error_of(body)) == (409, "idempotency-key-in-use")
    gate.open.set()
    assert (await held)[0] == 200
    await settled(one)
    assert (await post(two, auth, "held", b'{"hold": 1}'))[1]["Idempotent-Replayed"] == "true"
    assert len(up.requests) == 2


# Redis names a script by its SHA-1 (EVALSHA): the completion script's name, to hold it by.
_COMPLETION_SHA = hashlib.sha1(redis_records._REPLACE.encode()).hexdigest().encode()  # noqa: S324


class ScriptGate:
    """A TCP proxy in front of the redis-server that holds every call of the completion script
    (its EVALSHA) until ``open`` is set: the store's record writes wait, the rest passes."""

    def __init__(self, server: RedisServer) -> None:
        self._port = server.port
        self.open = asyncio.Event()
        self.held = asyncio.Event()  # a script call is waiting
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self.url = ""

    async def start(self) -> ScriptGate:
        self._server = await asyncio.start_server(self._serve, sock=free_socket())
        self.url = f"redis://127.0.0.1:{self._server.sockets[0].getsockname()[1]}/0"
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._port)
        self._writers += [writer, up_writer]
        await asyncio.gather(self._pipe(reader, up_writer, hold=True),
                             self._pipe(up_reader, writer, hold=False))  # fmt: skip

    async def _pipe(
        self, source: asyncio.StreamReader, sink: asyncio.StreamWriter, *, hold: bool
    ) -> None:
        try:
            while data := await source.read(65536):
                if hold and _COMPLETION_SHA in data:
                    self.held.set()
                    await self.open.wait()
                sink.write(data)
                await sink.drain()
        except ConnectionError:
            pass
        finally:
            sink.close()

    async def close(self) -> None:
        self.open.set()
        for writer in self._writers:
            writer.close()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


async def test_an_answer_is_never_complete_before_its_record(
    gateway, upstream, bearer, redis_url, redis_server
):
    """The record is complete as soon as the answer is: while the record's write to Redis is
    held, the client has not got its whole answer; once written, the answer completes and a
    retry right after it is replayed, never 409 in use."""
    scripts = await ScriptGate(redis_server).start()
    try:
        up = await upstream(ok())
        gw = await gateway(upstream=up.url, redis_url=scripts.url)
        auth = bearer()
        first = asyncio.create_task(
            raw_post(gw, auth, [("Idempotency-Key", "right-after")], settle=False)
        )
        await eventually(scripts.held.is_set)  # the record's write is on its way
        # ... and the client does not get its whole answer meanwhile (a bounded wait for
        # something that must not happen: an answer sent first arrives in milliseconds).
        done, _ = await asyncio.wait({first}, timeout=0.3)
        assert not done
        scripts.open.set()
        answer = await asyncio.wait_for(first, 5)
        assert (answer.status, answer.body) == (200, ORDER_ANSWER)
        retry = await raw_post(gw, auth, [("Idempotency-Key", "right-after")], settle=False)
        assert (retry.status, retry.body) == (200, ORDER_ANSWER), retry.body
        assert retry.headers["Idempotent-Replayed"] == "true"
        assert len(up.requests) == 1
    finally:
        await scripts.close()


async def test_a_streamed_answer_is_never_complete_before_its_record(
    gateway, upstream, bearer, redis_url, redis_server
):
    """The same for an answer that streams (its head forwarded before its body came) with a
    declared length: the last of its body waits for the record's write, so the client never
    holds a whole answer whose retry would be 409 in use."""
    scripts = await ScriptGate(redis_server).start()
    body_may_come = asyncio.Event()

    async def head_then_body(
        seen: Seen, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(ORDER_ANSWER))  # fmt: skip
        await writer.drain()
        await body_may_come.wait()
        writer.write(ORDER_ANSWER)
        await writer.drain()
        return True

    try:
        up = await upstream(head_then_body)
        gw = await gateway(upstream=up.url, redis_url=scripts.url)
        auth = bearer()
        headers = keyed_lines(auth, "streamed", SIZED)
        reader, writer = await raw_client(gw.url)
        try:
            writer.write(request_bytes("POST", PURCHASE, headers, ORDER))
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 200 ")  # streamed: the head came before the body
            body_may_come.set()
            await eventually(scripts.held.is_set)  # the record's write is on its way
            with pytest.raises(TimeoutError):  # a bounded wait for what must not happen
                await asyncio.wait_for(reader.readexactly(len(ORDER_ANSWER)), 0.3)
            scripts.open.set()
            assert await asyncio.wait_for(reader.readexactly(len(ORDER_ANSWER)), 5) == ORDER_ANSWER
        finally:
            writer.close()
        status, headers_back, body = await post(gw, auth, "streamed")
        assert (status, body) == (200, ORDER_ANSWER)
        assert headers_back["Idempotent-Replayed"] == "true"
        assert len(up.requests) == 1
    finally:
        await scripts.close()


async def test_a_client_leaving_as_the_last_piece_of_an_early_answer_waits_gets_it_replayed(
    gateway, bearer, monkeypatch
):
    """An early answer (the SME gateway answers before the whole body is in) that streams,
    and a client that stops reading just as its last piece is written, then leaves: the
    answer was recorded before that piece (as any answer is), so a retry gets it replayed,
    never forwarded again, never left reserved (409 in use)."""
    head_seen, last_blocked = asyncio.Event(), asyncio.Event()

    async def early_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")  # the head only: the body is not all there
        writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")  # fmt: skip
        await writer.drain()
        await head_seen.wait()
        writer.write(b"4\r\nlast\r\n0\r\n\r\n")
        await writer.drain()
        await reader.read()

    real_write = web.StreamResponse.write

    async def write(self: web.StreamResponse, data: bytes | bytearray | memoryview) -> None:
        if bytes(data) == b"last":  # the client has stopped reading: this write waits
            last_blocked.set()
            await asyncio.Event().wait()
        await real_write(self, data)

    monkeypatch.setattr(web.StreamResponse, "write", write)
    up = await RawUpstream(early_answer).start()
    try:
        gw = await gateway(upstream=up.url)
        auth = bearer()
        headers = keyed_lines(auth, "early", SIZED)
        reader, writer = await raw_client(gw.url)
        writer.write(request_bytes("POST", PURCHASE, headers, ORDER[:5]))
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 400 ")
        head_seen.set()
        await asyncio.wait_for(last_blocked.wait(), 5)
        writer.transport.abort()  # the client leaves
        await settled(gw)
        assert metric(await gw.metrics_text(), IDEM_TOTAL, outcome="unknown") == 0
        status, headers, body = await post(gw, auth, "early")
        assert (status, headers.get("Idempotent-Replayed"), body) == (400, "true", b"firstlast")
        assert up.connections == 1
    finally:
        await up.close()


async def test_redis_never_holds_the_clients_key(
    gateway, upstream, bearer, redis_url, redis_server
):
    """Redis keys are ``catalyst-idem:`` and a SHA-256 of scope and key, and no stored value
    holds the client's key."""
    up = await upstream(ok())
    gw = await gateway(upstream=up.url, redis_url=redis_url)
    await post(gw, bearer(sub="op-7"), "client-key-77f1")
    [name] = redis_server.command("KEYS", "*")
    expected = slot(scope(None, "op-7", "POST", "/api/billing/purchase", "client-key-77f1"))
    assert name == (PREFIX + expected).encode()
    assert b"client-key-77f1" not in redis_server.command("GET", name)


@pytest.mark.parametrize(
    "foreign",
    [("SET", b"1"), ("SET", b"0" * 32 + b"not a record"),
     ("SET", b"0" * 32 + b'{"state":"completed"}'), ("RPUSH", b"a list: WRONGTYPE")],
)  # fmt: skip
async def test_a_value_that_is_no_record_refuses_its_key_alone(
    gateway, upstream, bearer, redis_url, redis_server, foreign
):
    """A value under a key's record that is not a record (another program writing into the
    gateway's keyspace, a truncated write) refuses that key: 503 idempotency-store-unavailable,
    nothing forwarded, never a 500; the store is not paused, so other keys go on."""
    up = await upstream(ok())
    gw = await gateway(upstream=up.url, redis_url=redis_url, monotonic=Clock(1000.0))
    auth = bearer(sub="op-9")
    name = PREFIX + slot(scope(None, "op-9", "POST", "/api/billing/purchase", "k-foreign"))
    command, value = foreign
    redis_server.command(command, name, value)
    status, headers, body = await post(gw, auth, "k-foreign")
    assert (status, error_of(body)) == (503, "idempotency-store-unavailable")
    assert headers["X-Catalyst-Forwarded"] == "no"
    assert keyed_requests(up, "k-foreign") == []
    await assert_forwarded_once(gw, up, auth, "k-other")  # the clock stands: no pause


async def test_redis_down_is_503_for_a_key_and_plain_proxying_without(
    gateway, upstream, bearer, redis_url, redis_server
):
    """With Redis unreachable a keyed request is 503 idempotency-store-unavailable (forwarded no,
    nothing upstream) and an unkeyed one is proxied; once Redis is back the key works."""
    monotonic = Clock(1000.0)
    up = await upstream(ok())
    gw = await gateway(upstream=up.url, redis_url=redis_url, monotonic=monotonic)
    auth = bearer()
    await assert_forwarded_once(gw, up, auth, "before")  # the scripts are loaded
    redis_server.stop()
    try:
        status, headers, body = await post(gw, auth, "k-down")
        assert (status, error_of(body)) == (503, "idempotency-store-unavailable")
        assert headers["X-Catalyst-Forwarded"] == "no"
        assert keyed_requests(up, "k-down") == []
        status, headers, _ = await post(gw, auth, None)
        assert status == 200
        assert headers["X-Catalyst-Forwarded"] == "yes"
    finally:
        redis_server.start()  # empty, its script cache too
    monotonic.now += 2  # past the store's pause after a failure
    await assert_forwarded_once(gw, up, auth, "k-down")


async def test_redis_lost_after_the_reservation_still_delivers_the_answer(
    gateway, upstream, bearer, redis_url, redis_server
):
    """If Redis goes away while a keyed request is in flight, the client still gets the SME
    gateway's answer; the failed record update is counted and logged as a store error."""
    gate = Gate()
    up = await upstream(gate)
    gw = await gateway(upstream=up.url, redis_url=redis_url)
    auth = bearer()
    with capture_logs() as logs:
        held = asyncio.create_task(post(gw, auth, "k-lost"))
        await up.until(lambda: len(up.complete) == 1)
        redis_server.stop()
        try:
            gate.open.set()
            status, headers, body = await held
            await settled(gw)
        finally:
            redis_server.start()
    assert (status, body) == (200, ORDER_ANSWER)
    assert headers["X-Catalyst-Forwarded"] == "yes"
    errors = [e for e in logs if e["event"] == log.IDEMPOTENCY_STORE_ERROR]
    assert [e.get("gave_up", False) for e in errors] == [False, True]  # then settled() stops it
    assert metric(await gw.metrics_text(), IDEM_TOTAL, outcome="store-error") == 1


def reserved_now(server: RedisServer) -> list[bytes]:
    """The reservations in Redis (records whose state is reserved)."""
    return [name for name in idem_keys(server)
            if b'"state":"reserved"' in (server.command("GET", name) or b"")]  # fmt: skip


@pytest.fixture
async def slow_redis(redis_url: str, redis_server: RedisServer) -> AsyncIterator[SlowLink]:
    """The session's Redis behind a link whose replies a test can hold back."""
    link = await SlowLink(redis_server.port).start()
    yield link
    await link.close()


async def test_a_reservation_whose_reply_is_lost_is_taken_back(
    gateway, upstream, bearer, redis_server, slow_redis
):
    """The reservation reaches Redis but its reply comes too late (past the command timeout):
    the client gets 503 idempotency-store-unavailable, forwarded no, and the reservation it
    cannot know about is released in the background once the store answers again: the key
    is then forwarded once, as the contract says of a 503 with nothing forwarded."""
    monotonic = Clock(1000.0)
    up = await upstream(ok())
    gw = await gateway(upstream=up.url, redis_url=slow_redis.url, monotonic=monotonic)
    auth = bearer()
    await assert_forwarded_once(gw, up, auth, "before")  # the scripts are loaded
    slow_redis.reply_delay = 0.7  # past the 0.5 s command timeout
    status, headers, body = await post(gw, auth, "lost-reply")
    assert (status, error_of(body)) == (503, "idempotency-store-unavailable")
    assert headers["X-Catalyst-Forwarded"] == "no"
    slow_redis.reply_delay = 0.0
    await eventually(lambda: bool(reserved_now(redis_server)))  # the late SET did land
    monotonic.now += 2  # past the store's pause after a failure: the release goes through
    await eventually(lambda: not reserved_now(redis_server))
    await assert_forwarded_once(gw, up, auth, "lost-reply")


async def test_a_client_gone_while_its_reservation_is_on_its_way_leaves_no_reservation(
    gateway, upstream, bearer, redis_server, slow_redis
):
    """The client leaves while its reservation is on its way to Redis (the handler is
    cancelled before any reply): the reservation is released in the background, and the key
    is forwarded once on the next try."""
    up = await upstream(ok())
    gw = await gateway(upstream=up.url, redis_url=slow_redis.url)
    auth = bearer()
    await assert_forwarded_once(gw, up, auth, "before")
    slow_redis.reply_delay = 0.3  # slow, within the command timeout
    headers = keyed_lines(auth, "gone", SIZED)
    _, writer = await raw_client(gw.url)
    writer.write(request_bytes("POST", PURCHASE, headers, ORDER))
    await eventually(lambda: bool(reserved_now(redis_server)))  # the SET is there, its reply not
    writer.close()  # the client goes away
    await eventually(lambda: not reserved_now(redis_server))
    slow_redis.reply_delay = 0.0
    await assert_forwarded_once(gw, up, auth, "gone")


async def test_a_key_refused_while_the_store_pauses_leaves_nothing_to_take_back(
    gateway, upstream, bearer, redis_url, redis_server
):
    """While the store pauses after a failure, a keyed request is 503 store-unavailable without
    its reservation ever being sent: nothing can have been stored, so no release is started
    in the background (only a reservation that was sent and unanswered is taken back)."""
    monotonic = Clock(1000.0)
    up = await upstream(ok())
    gw = await gateway(upstream=up.url, redis_url=redis_url, monotonic=monotonic)
    auth = bearer()
    await assert_forwarded_once(gw, up, auth, "before")
    assert gw.parts.store is not None
    gw.parts.store.failed(OSError("another request's failure"))  # the store pauses (1 s)
    status, _, body = await post(gw, auth, "paused-key")
    assert (status, error_of(body)) == (503, "idempotency-store-unavailable")
    assert not gw.parts.idempotency._pending  # no take-back on its way
    assert not reserved_now(redis_server)
    monotonic.now += 2
    await assert_forwarded_once(gw, up, auth, "paused-key")


async def test_a_release_refused_while_the_store_pauses_is_retried(
    gateway, upstream, bearer, redis_url, redis_server
):
    """A keyed request refused before anything was forwarded (413: its chunked body ran over
    the limit while it streamed) while the store pauses after another failure: its release is
    refused too, then retried in the background once the pause is over, and the key is
    forwarded once on the next try."""
    monotonic = Clock(1000.0)
    up = await upstream(ok())
    gw = await gateway(upstream=up.url, redis_url=redis_url, monotonic=monotonic,
                       max_body_bytes=64)  # fmt: skip
    auth = bearer()
    lines = keyed_lines(auth, "paused", CHUNKED)
    reader, writer = await raw_client(gw.url)
    try:
        writer.write(request_bytes("POST", PURCHASE, lines) + b"28\r\n" + b"a" * 40 + b"\r\n")
        await up.until(lambda: len(up.requests) == 1)  # reserved, the exchange begun
        assert reserved_now(redis_server)
        assert gw.parts.store is not None
        gw.parts.store.failed(OSError("another request's failure"))  # the store pauses (1 s)
        writer.write(b"28\r\n" + b"b" * 40 + b"\r\n0\r\n\r\n")  # over the limit: 413
        async with asyncio.timeout(5):
            response = await read_response(reader)
    finally:
        writer.close()
    assert response is not None
    assert (response.status, error_of(response.body)) == (413, "request-body-too-large")
    assert response.headers["X-Catalyst-Forwarded"] == "no"
    assert reserved_now(redis_server)  # the release was refused
    monotonic.now += 2  # the pause is over
    await eventually(lambda: not reserved_now(redis_server))
    await assert_forwarded_once(gw, up, auth, "paused")


# --- the real server, as a child process ---------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _serve_env(public_key_file: Path, upstream_url: str, **extra: str) -> dict[str, str]:
    return {
        "CATALYST_SESSION_PUBLIC_KEY_FILE": str(public_key_file),
        "CATALYST_SME_JWT_SECRET": BRIDGE_SECRET.decode(),
        "CATALYST_SME_GATEWAY_URL": upstream_url,
        "CATALYST_UPSTREAM_TIMEOUT_SECONDS": "0.3",
        "CATALYST_SHUTDOWN_GRACE_SECONDS": "1",
        **extra,
    }


@pytest.fixture
async def children() -> AsyncIterator[Callable[..., Awaitable[ServeProcess]]]:
    """Factory: ``await children(args, env)`` starts ``catalyst-proxy ARGS`` (killed at the end)."""
    started: list[ServeProcess] = []

    async def make(args: list[str], env: dict[str, str]) -> ServeProcess:
        proc = await ServeProcess(args, env).start()
        started.append(proc)
        return proc

    yield make
    for proc in started:
        await _stop(proc)


async def _stop(proc: ServeProcess) -> None:
    """SIGTERM first (a supervisor passes it to its workers), SIGKILL for what is left: a
    killed supervisor's workers would keep the output pipes open."""
    assert proc.proc is not None
    if proc.proc.returncode is None:
        pid = proc.proc.pid
        workers = Path(f"/proc/{pid}/task/{pid}/children")
        pids = [int(p) for p in workers.read_text().split()] if workers.exists() else []
        proc.signal(signal.SIGTERM)
        try:
            await proc.wait(10)
        except TimeoutError:
            for child in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child, signal.SIGKILL)
    await proc.stop()


async def _fetch(url: str, method: str = "GET", **kwargs: Any) -> tuple[int, Any, bytes]:
    """One request on a new connection (so ``--workers`` spread them)."""
    async with aiohttp.ClientSession() as http, http.request(method, url, **kwargs) as resp:
        return resp.status, resp.headers, await resp.read()


@pytest.mark.slow
async def test_the_servers_log_never_holds_the_key(
    children, upstream, bearer, public_key_file, store, request
):
    """The real server's every line (stdout and stderr) names each keyed request's outcome and
    never the key itself, whatever became of it."""
    extra = {"CATALYST_REDIS_URL": request.getfixturevalue("redis_url")} if store == "redis" else {}
    server: RedisServer | None = request.getfixturevalue("redis_server") if extra else None
    up = await upstream(by_body(ok(), hang=never_answer))
    proc = await children(["serve", "--host", "127.0.0.1", "--port", "0"],
                          _serve_env(public_key_file, up.url, **extra))  # fmt: skip
    base = await proc.wait_listening()
    key = "Never-Logged-Key-3f9a2c"
    auth = bearer()
    sent = [(key, ORDER), (key, ORDER), (key, OTHER_ORDER), (f'"{key}-q"', b'{"hang": 1}'),
            (f'"{key}-q"', b'{"hang": 1}'), (f"{key} x", ORDER)]  # fmt: skip
    statuses = []
    for value, body in sent:
        status, _, _ = await _fetch(base + PURCHASE, "POST", data=body,
                                    headers=keyed(auth, value))  # fmt: skip
        statuses.append(status)
        if server is not None:
            await records_written(server)
    assert statuses == [200, 200, 422, 504, 409, 400]
    proc.signal(signal.SIGTERM)
    assert await proc.wait() == 0
    outcomes = [line["idempotency"] for line in proc.json_lines() if line["event"] == "request"]
    assert outcomes == ["new", "replayed", "reused", "unknown", "unknown", None]
    assert key not in proc.output
    assert [seen.headers["Idempotency-Key"] for seen in up.requests] == [key, f'"{key}-q"']


def _proc_field(pid: int, name: str) -> str:
    return Path(f"/proc/{pid}/{name}").read_text()


async def _stop_in_epoll_wait(pid: int) -> None:
    """SIGSTOP ``pid`` while it is blocked in ``epoll_wait()`` (its event loop idle)."""
    for _ in range(50):
        await eventually(lambda: _proc_field(pid, "wchan") == "do_epoll_wait")
        waiting_in = _proc_field(pid, "syscall").split()[0]  # epoll_wait's number
        os.kill(pid, signal.SIGSTOP)
        await eventually(lambda: _proc_field(pid, "stat").rsplit(")", 1)[1].split()[0] == "T")
        if _proc_field(pid, "syscall").split()[0] == waiting_in:
            return
        os.kill(pid, signal.SIGCONT)  # it woke (a timer) just before the stop: again
    raise AssertionError("never stopped inside epoll_wait()")


@pytest.mark.slow
async def test_an_answer_that_came_while_the_gateway_was_paused_is_delivered_and_recorded(
    children, upstream, bearer, public_key_file
):
    """The gateway paused (SIGSTOP: as a starved CPU or a held VM would) past the budget while
    the SME gateway's answer, written in time, waits in its socket: on SIGCONT that answer
    is delivered and recorded (the retry replays it), not a 504 and "outcome unknown".
    uvloop runs overdue timers before it reads its sockets, so the deadline must wait for
    one read. The process is stopped where an idle gateway waits, in ``epoll_wait()``,
    which a stop interrupts. (The pause is the fault itself: it has to outlast the budget
    in real time.)"""
    go, written = asyncio.Event(), asyncio.Event()

    async def respond(
        seen: Seen, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        await go.wait()
        more = await ok()(seen, reader, writer)
        written.set()
        return more

    up = await upstream(respond)
    proc = await children(["serve", "--host", "127.0.0.1", "--port", "0"],
                          _serve_env(public_key_file, up.url))  # fmt: skip
    base = await proc.wait_listening()
    auth = bearer()
    first = asyncio.create_task(_fetch(base + PURCHASE, "POST", data=ORDER,
                                       headers=keyed(auth, "paused")))  # fmt: skip
    await up.until(lambda: len(up.complete) == 1)
    assert proc.proc is not None
    await _stop_in_epoll_wait(proc.proc.pid)
    try:
        go.set()
        await written.wait()
        await asyncio.sleep(0.3 + 0.3)  # paused past the budget (0.3 s) and its watchdog
    finally:
        proc.signal(signal.SIGCONT)
    status, headers, body = await first
    assert (status, body) == (200, ORDER_ANSWER)
    status, headers, body = await _fetch(base + PURCHASE, "POST", data=ORDER,
                                         headers=keyed(auth, "paused"))  # fmt: skip
    assert (status, body) == (200, ORDER_ANSWER)
    assert headers["Idempotent-Replayed"] == "true"
    assert len(keyed_requests(up, "paused")) == 1


@pytest.mark.slow
async def test_two_workers_without_redis_serve_with_idempotency_off(
    children, upstream, bearer, public_key_file
):
    """``--workers 2`` without Redis under ``auto``: a start-up warning ``idempotency.off``,
    /readyz says why, and a repeated key is forwarded every time."""
    up = await upstream(ok())
    port = _free_port()
    proc = await children(["serve", "--host", "127.0.0.1", "--port", str(port), "--workers", "2"],
                          _serve_env(public_key_file, up.url))  # fmt: skip
    warning = await proc.wait_for_event(log.IDEMPOTENCY_OFF)
    assert warning["level"] == "warning"
    assert "--workers 2" in warning["reason"]
    assert "CATALYST_REDIS_URL" in warning["reason"]
    base = await proc.wait_listening()
    status, _, body = await _fetch(base + "/readyz")
    report = json.loads(body)["idempotency"]
    assert report["off_reason"] == warning["reason"]
    assert report["routes"] == []
    auth = bearer()
    for _ in range(2):
        status, headers, _ = await _fetch(base + PURCHASE, "POST", data=ORDER,
                                          headers=keyed(auth, "workers-off"))  # fmt: skip
        assert status == 200
        assert "Idempotent-Replayed" not in headers
    assert len(keyed_requests(up, "workers-off")) == 2
    proc.signal(signal.SIGTERM)
    assert await proc.wait() == 0


@pytest.mark.slow
async def test_two_workers_share_records_through_redis(
    children, upstream, bearer, public_key_file, redis_url, redis_server
):
    """``--workers 2`` with Redis: a record one worker made is replayed by the other process."""
    up = await upstream(ok())
    port = _free_port()
    env = _serve_env(public_key_file, up.url, CATALYST_REDIS_URL=redis_url,
                     CATALYST_IDEMPOTENCY="required")  # fmt: skip
    proc = await children(["serve", "--host", "127.0.0.1", "--port", str(port), "--workers", "2"],
                          env)  # fmt: skip
    base = await proc.wait_listening()
    auth = bearer()
    served: dict[int, list[str]] = {}  # worker pid -> Idempotent-Replayed of its answers
    async with asyncio.timeout(30):
        while len(served) < 2 or not all("true" in marks for marks in served.values()):
            async with aiohttp.ClientSession() as http:  # one connection: one worker
                async with http.get(base + "/readyz") as resp:
                    pid = (await resp.json())["pid"]
                url = base + PURCHASE
                async with http.post(url, headers=keyed(auth, "workers"), data=ORDER) as resp:
                    assert resp.status == 200
                    served.setdefault(pid, []).append(resp.headers.get("Idempotent-Replayed", ""))
            await records_written(redis_server)
    assert len(keyed_requests(up, "workers")) == 1
    assert sum(marks.count("") for marks in served.values()) == 1
    proc.signal(signal.SIGTERM)
    assert await proc.wait() == 0


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["optional", "required"])
async def test_an_explicit_mode_with_workers_and_no_redis_exits_2(public_key_file, mode):
    """CATALYST_IDEMPOTENCY=optional|required with ``--workers 2`` and no Redis stops start-up:
    exit 2, one line naming the variable."""
    env = {"CATALYST_SESSION_PUBLIC_KEY_FILE": str(public_key_file), "CATALYST_IDEMPOTENCY": mode}
    status, _out, err = await run_cli("serve", "--host", "127.0.0.1", "--port", str(_free_port()),
                                     "--workers", "2", env=env)  # fmt: skip
    assert status == 2
    assert len(err.strip().splitlines()) == 1
    assert "CATALYST_IDEMPOTENCY" in err
    assert "CATALYST_REDIS_URL" in err


@pytest.mark.slow
async def test_a_routes_file_mode_with_workers_and_no_redis_exits_2(public_key_file, tmp_path):
    """A routes-file entry with ``idempotency: required`` and ``--workers 2`` without Redis stops
    start-up: exit 2, one line naming CATALYST_ROUTES_FILE and the entry."""
    routes_file = tmp_path / "routes.json"
    entry = {"methods": ["POST"], "path": "/api/v1/org/billing/purchase", "idempotency": "required",
             "upstream_method": "POST", "upstream_path": "/api/billing/purchase"}  # fmt: skip
    routes_file.write_text(json.dumps({"routes": [entry]}))
    env = {"CATALYST_SESSION_PUBLIC_KEY_FILE": str(public_key_file),
           "CATALYST_ROUTES_FILE": str(routes_file)}  # fmt: skip
    status, _out, err = await run_cli("serve", "--host", "127.0.0.1", "--port", str(_free_port()),
                                     "--workers", "2", env=env)  # fmt: skip
    assert status == 2
    assert len(err.strip().splitlines()) == 1
    assert "CATALYST_ROUTES_FILE" in err
    assert "/api/v1/org/billing/purchase" in err
