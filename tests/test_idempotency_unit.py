"""Idempotency's parts on their own: the key's syntax, its slot, a record's bytes, and the two
stores (memory with a fake clock; Redis against the session's real redis-server).

The store rules (reserve atomically, compare-and-set on the owner, expiry) run against both
stores through one parametrised ``records`` fixture, as the memory store is the shipped fake
of the Redis one.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from structlog.testing import capture_logs

from catalyst_proxy import log
from catalyst_proxy.config import Settings
from catalyst_proxy.errors import IdempotencyKeyInvalid, IdempotencyStoreUnavailable
from catalyst_proxy.idempotency import Idempotency, MemoryRecords, Record, RedisRecords, parse_key
from catalyst_proxy.idempotency.guard import RETRY_FIRST
from catalyst_proxy.idempotency.keys import fingerprinter, scope, slot
from catalyst_proxy.idempotency.records import (
    COMPLETED,
    OWNER_LENGTH,
    RESERVED,
    UNKNOWN,
    Records,
)
from catalyst_proxy.idempotency.redis_records import PREFIX, taken
from catalyst_proxy.ids import hex_id
from catalyst_proxy.metrics import Metrics
from catalyst_proxy.routes import Route
from catalyst_proxy.store import RETRY_AFTER, Store, StoreUnavailable

from .auth_support import Clock
from .redis_server import RedisServer
from .support import eventually

NOW = 1_800_000_000.0


def S(name: str) -> str:
    """A slot for ``name`` (slots are SHA-256 digests in hex, as ``slot()`` makes them)."""
    return hashlib.sha256(name.encode()).hexdigest()


# --- parse_key --------------------------------------------------------------------------------

VALID = [
    ("8e03978e", "8e03978e"),
    ('"8e03978e"', "8e03978e"),
    ('"a\\"b"', 'a"b'),
    ('"a\\\\b"', "a\\b"),
    ('a"b', 'a"b'),  # bare: a quote that does not open the value is a character
    ("k" * 255, "k" * 255),
    ('"' + "k" * 255 + '"', "k" * 255),
    ('"' + "\\\\" * 255 + '"', "\\" * 255),  # 255 characters once unescaped
    ("!#$%&'()*+,-./:;<=>?@[]^_`{|}~", "!#$%&'()*+,-./:;<=>?@[]^_`{|}~"),
]


@pytest.mark.parametrize(("raw", "key"), VALID)
def test_parse_key_accepts_visible_ascii_bare_or_quoted(raw, key):
    """1-255 visible ASCII characters, bare or as a quoted string with \\" and \\\\ escapes,
    give the key without its quotes."""
    assert parse_key([raw]) == key


INVALID = [
    "",
    '""',
    "k" * 256,
    '"' + "k" * 256 + '"',
    "a b",
    '"a b"',
    "a\tb",
    "a\x00b",
    "a\x1fb",
    "a\x7fb",
    "clé",
    "ключ",
    '"abc',
    '"',
    '"a"b"',
    '"a\\qb"',
    '"abc\\"',
    ' "abc"',
]


@pytest.mark.parametrize("raw", INVALID)
def test_parse_key_refuses_anything_else(raw):
    """An empty or over-long key, a space, a control or non-ASCII character, or bad quoting is
    idempotency-key-invalid, and neither its reason nor its answer repeats the key."""
    with pytest.raises(IdempotencyKeyInvalid) as caught:
        parse_key([raw])
    assert caught.value.status == 400
    assert caught.value.code == "idempotency-key-invalid"
    told = caught.value.reason + str(caught.value.body())  # the log's reason, the client's body
    assert raw.strip('" ') == "" or raw.strip('" ') not in told


def test_parse_key_refuses_two_headers_and_allows_none():
    """No header is no key (None); two headers are invalid even when they agree."""
    assert parse_key([]) is None
    with pytest.raises(IdempotencyKeyInvalid):
        parse_key(["k1", "k1"])
    with pytest.raises(IdempotencyKeyInvalid):
        parse_key(["k1", '"k1"'])


# --- slot and fingerprint ------------------------------------------------------------------

SCOPE = ("https://kc/realms/sovereign", "op-1", "POST", "/api/billing/purchase", "k-1")


def test_slot_is_a_digest_of_the_whole_scope():
    """A shared store's slot is a 64-hex-digit SHA-256 of the scope that changes with each part
    of it (issuer, subject, upstream method and path, key) and never contains the key."""
    base = slot(scope(*SCOPE))
    assert len(base) == 64
    assert int(base, 16) >= 0
    assert slot(scope(*SCOPE)) == base
    assert "k-1" not in base
    for index in range(len(SCOPE)):
        changed = list(SCOPE)
        changed[index] = changed[index] + "x"
        assert slot(scope(*changed)) != base, index
    assert slot(scope(None, *SCOPE[1:])) != base
    assert scope(None, *SCOPE[1:]) == scope("", *SCOPE[1:])  # no issuer claim is an empty one


def test_scope_keeps_its_parts_apart():
    """Moving a character from one part of the scope to the next changes it: the parts are
    separated, not just concatenated (the memory store files records under the scope)."""
    base = scope("iss", "op-1", "POST", "/api/billing/purchase", "k-1")
    assert scope("iss", "op-1", "POST", "/api/billing/purchase", "k-1") == base
    assert scope("is", "sop-1", "POST", "/api/billing/purchase", "k-1") != base
    assert scope("iss", "op-1", "POST", "/api/billing/purchas", "ek-1") != base


def test_fingerprint_covers_method_target_and_body_not_its_pieces():
    """The fingerprint is over method, target and body: the same bytes fed in any pieces give
    the same digest, and another method, query or body another."""

    def digest(method: bytes, target: bytes, *pieces: bytes) -> str:
        hasher = fingerprinter(method, target)
        for piece in pieces:
            hasher.update(piece)
        return hasher.digest()

    base = digest(b"POST", b"/api/billing/purchase", b'{"sku": "starter"}')
    assert digest(b"POST", b"/api/billing/purchase", b'{"sku": ', b'"starter"}') == base
    assert base == hashlib.sha256(b'POST /api/billing/purchase\n{"sku": "starter"}').digest()
    assert digest(b"PUT", b"/api/billing/purchase", b'{"sku": "starter"}') != base
    assert digest(b"POST", b"/api/billing/purchase?a=1", b'{"sku": "starter"}') != base
    assert digest(b"POST", b"/api/billing/purchase", b'{"sku": "pro"}') != base


# --- Record --------------------------------------------------------------------------------

RECORDS = [
    Record(RESERVED, hex_id(), NOW + 33.0),
    Record(UNKNOWN, hex_id(), 0.0),
    Record(
        COMPLETED,
        hex_id(),
        0.0,
        b"f" * 32,
        201,
        (
            (b"Content-Type", b"application/json"),
            (b"Cache-Control", b"no-store"),
            (b"cache-control", b"private"),
            (b"Location", "/orders/é".encode()),
            (b"ETag", b"\xff\x80 not UTF-8"),
        ),
        b'{"order_id": "ord-1"}\n\x00\xff binary\r\n tail',
    ),
    Record(COMPLETED, hex_id(), 0.0, b"e" * 32, 204, (), b""),
    Record(COMPLETED, hex_id(), 0.0, b"d" * 32, 200, ((b"Content-Type", b"text/plain"),), None),
]


@pytest.mark.parametrize("record", RECORDS, ids=["reserved", "unknown", "completed", "empty",
                                                 "too-large"])  # fmt: skip
def test_a_record_decodes_to_what_was_encoded(record):
    """A record's bytes (owner, a JSON line, the body) decode to the same record: duplicate,
    non-ASCII and non-UTF-8 header fields as received, any body bytes, an empty body and a
    body too large to keep (None)."""
    data = record.encode()
    assert data.startswith(record.owner.encode())
    assert Record.decode(data) == record


def test_a_stored_record_keeps_only_the_header_fields_a_replay_may_send():
    """What leaves the process (the shared store's bytes) holds the allow-listed fields only:
    never the SME gateway's Set-Cookie, its Date or anything else a replay would not send."""
    fields = ((b"Content-Type", b"application/json"), (b"Set-Cookie", b"sme_session=s3cr3t"),
              (b"Date", b"Wed, 02 Dec 2026 21:00:00 GMT"), (b"Location", b"/orders/1"))  # fmt: skip
    record = Record(COMPLETED, hex_id(), 0.0, b"f" * 32, 201, fields, b"{}")
    data = record.encode()
    for absent in (b"s3cr3t", b"Set-Cookie", b"Date"):
        assert absent not in data
    assert Record.decode(data).headers == (fields[0], fields[3])


# --- both stores ---------------------------------------------------------------------------


class Stores:
    """Builds the store under test; ``expire()`` makes its records expire."""

    def __init__(self, kind: str, redis_server: RedisServer | None, redis_url: str | None):
        self.kind = kind
        self.clock = Clock(NOW)
        self._server = redis_server
        self._url = redis_url
        self._stores: list[Store] = []

    async def make(self, ttl: float = 60.0) -> Records:
        if self.kind == "memory":
            return MemoryRecords(ttl, clock=self.clock)
        store = Store(Settings(redis_url=self._url))
        await store.start()
        self._stores.append(store)
        return RedisRecords(store, ttl, lease=LEASE)

    async def expire(self, ttl: float = 60.0) -> None:
        """Every record expires now: the fake clock moves past the TTL (and a reservation's
        lease, which it outlives by the TTL), or Redis expires it."""
        if self.kind == "memory":
            self.clock.now += LEASE + ttl + 1
            return
        assert self._server is not None
        for name in self._server.command("KEYS", PREFIX + "*"):
            self._server.command("PEXPIRE", name, 1)
        await eventually(lambda: not self._server.command("KEYS", PREFIX + "*"))  # type: ignore[union-attr]

    async def close(self) -> None:
        for store in self._stores:
            await store.close()


@pytest.fixture(params=["memory", "redis"])
async def stores(request: pytest.FixtureRequest) -> AsyncIterator[Stores]:
    """The store under test, memory or the session's real Redis (running and flushed)."""
    if request.param == "redis":
        url = request.getfixturevalue("redis_url")
        made = Stores("redis", request.getfixturevalue("redis_server"), url)
    else:
        made = Stores("memory", None, None)
    yield made
    await made.close()


LEASE = 33.0  # a reservation's lease here: the default budget (3 s) plus the margin (30 s)


def reservation(clock: Clock, owner: str | None = None) -> Record:
    return Record(RESERVED, owner or hex_id(), clock() + LEASE)


def completed(owner: str, body: bytes = b'{"order_id": "ord-1"}') -> Record:
    return Record(COMPLETED, owner, 0.0, b"f" * 32, 200, ((b"Content-Type", b"application/json"),),
                  body)  # fmt: skip


async def test_reserve_stores_once_and_then_returns_the_holder(stores):
    """The first reserve stores its record (None); the next one gets that record back and
    stores nothing."""
    records = await stores.make()
    mine = reservation(stores.clock)
    assert await records.reserve(S("s1"), mine) is None
    found = await records.reserve(S("s1"), reservation(stores.clock))
    assert found == mine
    assert await records.reserve(S("s2"), reservation(stores.clock)) is None


async def test_owner_tokens_never_repeat(stores):
    """Every reservation draws an owner token no earlier one drew (compare-and-set rests on
    it); a shared store's are random 32-hex-digit tokens, as its records' layout expects."""
    records = await stores.make()
    owners = [records.new_owner() for _ in range(2000)]
    assert len(set(owners)) == len(owners)
    if stores.kind == "redis":
        assert all(len(owner) == OWNER_LENGTH and int(owner, 16) >= 0 for owner in owners)


@pytest.mark.parametrize("record", RECORDS, ids=["reserved", "unknown", "completed", "empty",
                                                 "too-large"])  # fmt: skip
async def test_a_stored_record_comes_back_as_it_was_stored(stores, record):
    """What a store returns for a slot is the record it was given: duplicate, non-ASCII and
    non-UTF-8 header fields, empty values, any body bytes, no body (None). (Redis keeps only
    the fields a replay may send: these all are. The memory store keeps no header fields of
    an answer it keeps no body of: such a record is never replayed.)"""
    records = await stores.make()
    assert await records.reserve(S("kept"), record) is None
    if stores.kind == "memory" and record.body is None:
        record = record._replace(headers=())
    assert await records.reserve(S("kept"), reservation(stores.clock)) == record


async def test_memory_complete_now_records_what_replace_would():
    """The memory store's fast path records the answer as ``replace()`` would (headers with
    empty values included), only for the reservation's owner: a later reserve returns it
    whole."""
    clock = Clock(NOW)
    records, _ = memory(clock)
    owner = records.new_owner()
    assert records.reserve_now(S("s"), owner, clock() + 33.0) is None
    head = [(b"Content-Type", b"application/json"), (b"X-Empty", b""), (b"X-Empty", b"")]
    assert not records.complete_now(S("s"), "another", b"f" * 32, 500, head, b"{}")
    assert records.complete_now(S("s"), owner, b"f" * 32, 201, head, b"{}")
    found = await records.reserve(S("s"), reservation(clock))
    assert found == Record(COMPLETED, owner, 0.0, b"f" * 32, 201, tuple(head), b"{}")


async def test_concurrent_reserves_have_exactly_one_winner(stores):
    """Of 50 reserves racing on one slot exactly one stores its record; the others all see it."""
    records = await stores.make()
    contenders = [reservation(stores.clock) for _ in range(50)]
    results = await asyncio.gather(*(records.reserve(S("race"), r) for r in contenders))
    winners = [r for r, result in zip(contenders, results, strict=True) if result is None]
    assert len(winners) == 1
    assert all(result == winners[0] for result in results if result is not None)


async def test_a_reservation_run_past_its_fence_stores_nothing(redis_records, redis_server):
    """Redis runs a reservation only before its fence (half its lease, by the server's clock):
    one that arrives later stores nothing, and the caller is told the store failed."""
    records = await redis_records()
    late = Record(RESERVED, hex_id(), time.time() + LEASE / 2 - 5)  # its fence: 5 s ago
    with pytest.raises(StoreUnavailable, match="fence"):
        await records.reserve(S("late"), late)
    assert redis_server.command("KEYS", PREFIX + "*") == []
    assert await records.reserve(S("in-time"), reservation(Clock(time.time()))) is None
    assert redis_server.command("KEYS", PREFIX + "*") == [(PREFIX + S("in-time")).encode()]


async def test_a_reservation_a_stalled_redis_runs_late_leaves_the_key_free(
    redis_records, redis_server
):
    """Redis freezes with a reservation in its socket; the gateway stops waiting (503, nothing
    forwarded) and its take-back gives up when the lease ends. When Redis runs the command
    at last, past the fence, it stores nothing: the key is not held (and read as "outcome
    unknown") for the TTL for a request that went nowhere."""
    lease = 0.6  # its fence 0.3 s after the send; the command times out at 0.5 s
    records = await redis_records(lease=lease)
    warm = Record(RESERVED, hex_id(), time.time() + 60)  # a connection made: the next is sent
    assert await records.reserve(S("warm"), warm) is None
    with redis_server.stalled(), pytest.raises(StoreUnavailable):
        await records.reserve(S("stalled"), Record(RESERVED, hex_id(), time.time() + lease))
    redis_server.command("PING")  # it has read its sockets again: the old command ran first
    assert redis_server.command("KEYS", PREFIX + "*") == [(PREFIX + S("warm")).encode()]


async def test_a_reservation_run_after_its_take_back_stores_nothing(redis_records, redis_server):
    """A reservation held up on its way (a lossy path that delivers a connection's bytes late)
    can run after the gateway gave up on it and took it back, and still inside its fence. The
    take-back, finding no reservation of ours, leaves a marker of the owner for a lease, and
    the late reservation stores nothing: the key is not held (as in use, then as "outcome
    unknown" for the TTL) for a request that went nowhere. A retry's reservation, another
    owner's, is not affected."""
    records = await redis_records()
    owner = hex_id()
    assert await records.release(S("late"), owner) is False  # the take-back: nothing there yet
    with pytest.raises(StoreUnavailable, match="taken back"):
        await records.reserve(S("late"), Record(RESERVED, owner, time.time() + LEASE))
    assert redis_server.command("EXISTS", PREFIX + S("late")) == 0
    marker = taken(S("late"), owner)
    assert 0 < redis_server.command("PTTL", marker) <= LEASE * 1000
    # One hash slot with the record's key (a cluster runs no script across two): its tag.
    assert marker[marker.index("{") + 1 : marker.index("}")] == PREFIX + S("late")
    assert await records.reserve(S("late"), reservation(Clock(time.time()))) is None


async def test_replace_and_release_are_compare_and_set_on_the_owner(stores):
    """Only the reservation's owner may complete or release it; anyone else changes nothing."""
    records = await stores.make()
    owner, stranger = hex_id(), hex_id()
    mine = reservation(stores.clock, owner)
    await records.reserve(S("s"), mine)
    assert await records.replace(S("s"), stranger, completed(stranger)) is False
    assert await records.release(S("s"), stranger) is False
    assert await records.reserve(S("s"), reservation(stores.clock)) == mine
    assert await records.replace(S("s"), owner, completed(owner)) is True
    assert await records.reserve(S("s"), reservation(stores.clock)) == completed(owner)
    assert await records.release(S("s"), owner) is True
    assert await records.reserve(S("s"), reservation(stores.clock)) is None
    assert await records.release(S("gone"), owner) is False


async def test_a_completion_whose_reservation_was_lost_is_recorded(stores, redis_server):
    """A completion (or "unknown") that finds no record at all (the store lost the reservation:
    a restart without persistence, a flush, an eviction, an expiry) is stored all the same,
    with a full TTL: the answer is known, so every retry from then on is replayed, never
    forwarded again. Redis logs that it lost the reservation."""
    records = await stores.make(ttl=60.0)
    owner, other = hex_id(), hex_id()
    for name, who in (("lost", owner), ("lost-unknown", other)):
        await records.reserve(S(name), reservation(stores.clock, who))
    if stores.kind == "redis":
        redis_server.command("FLUSHALL")
    else:
        stores.clock.now += LEASE + 61  # the reservations expired
    with capture_logs() as logs:
        assert await records.replace(S("lost"), owner, completed(owner)) is True
        assert await records.replace(S("lost-unknown"), other, Record(UNKNOWN, other, 0.0))
    assert await records.reserve(S("lost"), reservation(stores.clock)) == completed(owner)
    assert await records.reserve(S("lost-unknown"), reservation(stores.clock)) == Record(
        UNKNOWN, other, 0.0
    )
    lost = [e["outcome"] for e in logs if e["event"] == log.IDEMPOTENCY_RECORD_LOST]
    if stores.kind == "redis":
        assert lost == [COMPLETED, UNKNOWN]
        assert 59_000 < redis_server.command("PTTL", PREFIX + S("lost")) <= 60_000
    else:
        stores.clock.now += 59
        assert await records.reserve(S("lost"), reservation(stores.clock)) == completed(owner)


async def test_a_release_the_store_refused_still_lands_when_shutdown_begins(
    redis_url, redis_server
):
    """A release the store refused (it blinked) is retried in the background; a shutdown that
    begins meanwhile gives the retry time to land instead of dropping it, which would leave the
    key reserved, then read as "outcome unknown" for the TTL, for a request never forwarded."""
    store = Store(Settings(redis_url=redis_url))
    await store.start()
    # (The first PING, in the background, must be over before the blink: its reply coming
    # after it would end the pause, and the release would land at once. A loaded machine
    # failed the test so, once in a while.)
    await eventually(lambda: store.state == "ok")
    try:
        route = Route(("POST",), "/p", "POST", "/api/billing/purchase")
        guard = Idempotency({"/p": "optional"}, RedisRecords(store, 60.0, lease=LEASE), Metrics(),
                            lease_seconds=LEASE, max_body_bytes=65536, shared=True)  # fmt: skip
        attempt = await guard.begin("iss", "op-1", route, "k-refused")
        assert len(redis_server.command("KEYS", PREFIX + "*")) == 1
        store.failed(OSError("a blink"))  # the store counts as down for a second
        await attempt.release()  # refused: retried in the background
        assert len(redis_server.command("KEYS", PREFIX + "*")) == 1
        await guard.close()  # shutdown begins
        assert redis_server.command("KEYS", PREFIX + "*") == []
    finally:
        await store.close()


async def test_a_retry_backing_off_when_shutdown_begins_tries_at_once(redis_url, redis_server):
    """A release the store refused is retried after a back-off (growing to RETRY_MOST). When
    shutdown begins, a retry still backing off tries at once, within close()'s patience,
    rather than sleep past it and be dropped: the key is free, not reserved until it reads as
    "outcome unknown" for the TTL. (The store's clock stands still but for the test.)"""
    now = [1_000.0]
    store = Store(Settings(redis_url=redis_url), clock=lambda: now[0])
    try:
        route = Route(("POST",), "/p", "POST", "/api/billing/purchase")
        guard = Idempotency({"/p": "optional"}, RedisRecords(store, 60.0, lease=LEASE), Metrics(),
                            lease_seconds=LEASE, max_body_bytes=65536, shared=True)  # fmt: skip
        attempt = await guard.begin("iss", "op-1", route, "k-backing-off")
        store.failed(OSError("a blink"))  # the store pauses
        await attempt.release()  # refused at once: retried after RETRY_FIRST
        now[0] += RETRY_AFTER  # the pause is over (the retry has RETRY_FIRST to wait still)
        with capture_logs() as logs:
            await guard.close(patience=RETRY_FIRST / 5)
        assert redis_server.command("KEYS", PREFIX + "*") == []
        assert not [e for e in logs if e.get("gave_up")]
    finally:
        await store.close()


async def test_a_reservation_the_store_answers_with_an_error_is_not_taken_back(
    redis_url, redis_server
):
    """A reservation Redis answers with an error (out of memory here; a read-only replica, no
    permission) is known to have stored nothing: 503, and no take-back, which would write its
    marker, fail the same way, and be retried for a lease, each failure logged."""
    store = Store(Settings(redis_url=redis_url))
    route = Route(("POST",), "/p", "POST", "/api/billing/purchase")
    guard = Idempotency({"/p": "optional"}, RedisRecords(store, 60.0, lease=LEASE), Metrics(),
                        lease_seconds=LEASE, max_body_bytes=65536, shared=True)  # fmt: skip
    redis_server.command("CONFIG", "SET", "maxmemory", "1")
    try:
        with pytest.raises(IdempotencyStoreUnavailable):
            await guard.begin("iss", "op-1", route, "k-out-of-memory")
        assert not guard._pending  # nothing to take back, nothing to retry
    finally:
        redis_server.command("CONFIG", "SET", "maxmemory", "0")
        await store.close()
    assert redis_server.command("KEYS", PREFIX + "*") == []


async def test_a_release_whose_first_try_fails_during_shutdown_still_lands(redis_url, redis_server):
    """A release still on its first try when shutdown begins (the store stalled: the try
    times out after shutdown began) starts its retry as a new task then; shutdown waits for
    that one too, and it lands once the store answers again: the key is free, not reserved
    until it reads as "outcome unknown" for the TTL."""
    store = Store(Settings(redis_url=redis_url))
    await store.start()
    try:
        route = Route(("POST",), "/p", "POST", "/api/billing/purchase")
        metrics = Metrics()
        guard = Idempotency({"/p": "optional"}, RedisRecords(store, 60.0, lease=LEASE), metrics,
                            lease_seconds=LEASE, max_body_bytes=65536, shared=True)  # fmt: skip
        attempt = await guard.begin("iss", "op-1", route, "k-stalled")
        with redis_server.stalled():
            attempt.settle_later(sent=False)  # the client left before anything was sent
            await asyncio.sleep(0)  # its first try is on its way, into the stalled store
            closing = asyncio.create_task(guard.close())  # shutdown begins
            while metrics.idempotency.counts["store-error"] == 0:  # the first try timed out
                await asyncio.wait({closing}, timeout=0.05)
            assert not closing.done()
        await closing
        assert redis_server.command("KEYS", PREFIX + "*") == []
    finally:
        await store.close()


async def test_an_attempt_settled_once_is_never_completed_after(stores):
    """An attempt released (or marked unknown) stays so: a completion after it changes
    nothing, although a completion that finds no record writes one (a released key is not
    brought back as completed)."""
    records = await stores.make()
    route = Route(("POST",), "/p", "POST", "/api/billing/purchase")
    guard = Idempotency({"/p": "optional"}, records, Metrics(), lease_seconds=LEASE,
                        max_body_bytes=65536, shared=stores.kind == "redis",
                        clock=stores.clock)  # fmt: skip
    attempt = await guard.begin("iss", "op-1", route, "k-released")
    assert attempt.existing is None
    await attempt.release()
    write = attempt.complete(b"f" * 32, 200, [(b"Content-Type", b"application/json")], b"{}")
    assert write is None
    await guard.close()
    again = await guard.begin("iss", "op-1", route, "k-released")
    assert again.existing is None  # the key was free: reserved anew, nothing recorded


async def test_renew_extends_only_its_owners_reservation(stores, redis_server):
    """``renew()`` moves a reservation's lease (and its expiry: the lease, then the TTL) only
    for its owner and only while it is a reservation: never over the completion it renews
    for, never another request's record."""
    records = await stores.make(ttl=60.0)
    owner = hex_id()
    mine = reservation(stores.clock, owner)
    await records.reserve(S("s"), mine)
    later = mine.lease_until + 100.0
    assert await records.renew(S("s"), hex_id(), later) is False
    assert await records.reserve(S("s"), reservation(stores.clock)) == mine
    if stores.kind == "redis":
        redis_server.command("PEXPIRE", PREFIX + S("s"), 5000)  # as if most of it had passed
    assert await records.renew(S("s"), owner, later) is True
    assert await records.reserve(S("s"), reservation(stores.clock)) == mine._replace(
        lease_until=later
    )
    if stores.kind == "redis":
        assert redis_server.command("PTTL", PREFIX + S("s")) > (LEASE + 60 - 1) * 1000
    else:
        stores.clock.now += LEASE + 61  # the first expiry: renewed past it
        assert (await records.reserve(S("s"), reservation(stores.clock))) is not None
    assert await records.replace(S("s"), owner, completed(owner)) is True
    assert await records.renew(S("s"), owner, later + 100.0) is False  # a late renewal
    assert await records.reserve(S("s"), reservation(stores.clock)) == completed(owner)
    assert await records.renew(S("nothing"), owner, later) is False


async def test_a_late_completion_cannot_overwrite_a_newer_reservation(stores):
    """A first attempt whose record expired and was reserved anew by another cannot complete,
    mark unknown or release the newer record."""
    records = await stores.make(ttl=60.0)
    first, second = hex_id(), hex_id()
    await records.reserve(S("s"), reservation(stores.clock, first))
    await stores.expire(60.0)
    newer = reservation(stores.clock, second)
    assert await records.reserve(S("s"), newer) is None
    assert await records.replace(S("s"), first, completed(first)) is False
    assert await records.replace(S("s"), first, Record(UNKNOWN, first, 0.0)) is False
    assert await records.release(S("s"), first) is False
    assert await records.reserve(S("s"), reservation(stores.clock)) == newer
    assert await records.replace(S("s"), second, completed(second, b"new")) is True
    found = await records.reserve(S("s"), reservation(stores.clock))
    assert found is not None
    assert found.body == b"new"


async def test_records_expire_after_the_ttl(stores, redis_server):
    """A record is gone after the TTL (memory: by the clock; Redis: a real PX expiry), and
    a completion keeps a full TTL from the moment it is written."""
    if stores.kind == "memory":
        records = await stores.make(ttl=60.0)
        owner = hex_id()
        await records.reserve(S("s"), reservation(stores.clock, owner))
        stores.clock.now += 50
        assert await records.replace(S("s"), owner, completed(owner)) is True
        stores.clock.now += 50  # 100 s after the reservation, 50 after the completion
        assert await records.reserve(S("s"), reservation(stores.clock)) == completed(owner)
        stores.clock.now += 11
        assert await records.reserve(S("s"), reservation(stores.clock)) is None
        return
    records = await stores.make(ttl=0.3)
    owner = hex_id()
    await records.reserve(S("s"), reservation(stores.clock, owner))
    assert 32_000 < redis_server.command("PTTL", PREFIX + S("s")) <= 33_300  # lease, then TTL
    redis_server.command("PEXPIRE", PREFIX + S("s"), 100_000)  # as if much of the TTL were left
    assert await records.replace(S("s"), owner, completed(owner)) is True
    assert 0 < redis_server.command("PTTL", PREFIX + S("s")) <= 300  # a fresh TTL, not the old one
    await eventually(lambda: redis_server.command("EXISTS", PREFIX + S("s")) == 0)
    assert await records.reserve(S("s"), reservation(stores.clock)) is None


# --- memory: bounds --------------------------------------------------------------------------


def memory(clock: Clock, **bounds: Any) -> tuple[MemoryRecords, list[int]]:
    evicted: list[int] = []
    records = MemoryRecords(60.0, clock=clock, on_evict=evicted.append, **bounds)
    return records, evicted


async def test_memory_drops_the_oldest_record_past_the_count_bound():
    """Past ``max_records`` the oldest record goes first, counted as an eviction."""
    clock = Clock(NOW)
    records, evicted = memory(clock, max_records=2)
    for name in ("a", "b", "c"):
        await records.reserve(S(name), completed(hex_id()))
    assert len(records) == 2
    assert evicted == [1]
    assert await records.reserve(S("a"), reservation(clock)) is None  # a was dropped
    assert await records.reserve(S("c"), reservation(clock)) is not None


async def test_memory_drops_expired_records_before_a_live_one_reserved_earlier():
    """Records expire out of reservation order (an answer that took long to come expires
    late): past the count bound, the expired go before a live record reserved before them,
    uncounted, and the live one is still replayed. (It was evicted, and counted, while 27
    expired records stayed: a retry under its key would have been forwarded again.)"""
    clock = Clock(NOW)
    records, evicted = memory(clock, max_records=32)
    slow = hex_id()
    assert records.reserve_now(S("slow"), slow, NOW + LEASE) is None
    for index in range(28):
        await records.reserve(S(f"b{index}"), completed(hex_id()))
    clock.now += 20
    assert records.complete_now(S("slow"), slow, b"f" * 32, 200, (), b"late answer")
    clock.now += 50  # the b records are past their TTL (60 s); slow is not (its ends at +80)
    for index in range(5):
        await records.reserve(S(f"new{index}"), completed(hex_id()))
    assert evicted == []
    assert len(records) == 6
    found = await records.reserve(S("slow"), reservation(clock))
    assert found is not None
    assert found.body == b"late answer"


async def test_memory_drops_the_oldest_answers_bodies_before_any_record():
    """Past ``max_answer_bytes`` the oldest answers lose their bodies (down to 3/4 of the
    bound), counted; their records stay, completed without a body (a replay is refused,
    never forwarded again), and no record is evicted. Completions on the fast path and
    through ``replace`` count alike."""
    clock = Clock(NOW)
    dropped: list[int] = []
    records, evicted = memory(clock, max_answer_bytes=8000, on_drop_answers=dropped.append)
    for index in range(10):
        name, owner = S(f"a{index}"), hex_id()
        assert records.reserve_now(name, owner, NOW + LEASE) is None
        body = bytes([index]) * 1000
        if index % 2:
            assert records.complete_now(name, owner, b"f" * 32, 200, (), body)
        else:
            assert await records.replace(name, owner, completed(owner, body))
    assert evicted == []
    assert len(records) == 10
    found = [await records.reserve(S(f"a{index}"), reservation(clock)) for index in range(10)]
    assert all(record is not None and record.state == COMPLETED for record in found)
    kept = [record.body for record in found if record is not None and record.body]
    assert sum(map(len, kept)) <= 8000
    assert len(kept) < 10
    assert kept == [bytes([index]) * 1000 for index in range(10 - len(kept), 10)]  # the newest
    assert [record.body for record in found[: 10 - len(kept)]] == [None] * (10 - len(kept))
    assert sum(dropped) == 10 - len(kept)


async def test_memory_answers_of_expired_records_go_with_their_records_uncounted():
    """A pass over the answers' bound that meets the answer of a record already past its TTL
    drops that record whole and does not count it: the dropped-answers metric counts only
    answers a retry could still have been replayed from."""
    clock = Clock(NOW)
    dropped: list[int] = []
    records, evicted = memory(clock, max_answer_bytes=4000, on_drop_answers=dropped.append)
    for index in range(3):
        await records.reserve(S(f"old{index}"), completed(hex_id(), b"o" * 900))
    clock.now += 61  # the three are past the TTL (60 s), still in the store
    for index in range(2):
        await records.reserve(S(f"new{index}"), completed(hex_id(), b"n" * 900))  # a pass
    assert dropped == []
    assert evicted == []
    assert len(records) == 3  # old0 and old1 went whole (down to 3/4 of 4000); old2 waits
    for index in range(2):
        found = await records.reserve(S(f"new{index}"), reservation(clock))
        assert found is not None
        assert found.body == b"n" * 900


async def test_memory_drops_answers_oldest_by_completion_not_by_reservation():
    """The answers dropped first are the oldest answers: a request reserved long ago whose
    answer (a long stream) came last keeps it over answers that came before."""
    clock = Clock(NOW)
    records, _ = memory(clock, max_answer_bytes=4000)
    late = hex_id()
    assert records.reserve_now(S("late"), late, NOW + LEASE) is None
    for index in range(3):
        await records.reserve(S(f"early{index}"), completed(hex_id(), b"e" * 900))
    assert records.complete_now(S("late"), late, b"f" * 32, 200, (), b"l" * 900)
    await records.reserve(S("last"), completed(hex_id(), b"n" * 900))  # over 4000: a pass
    found = {name: await records.reserve(S(name), reservation(clock))
             for name in ("late", "early0", "early1", "last")}  # fmt: skip
    assert {name: record.body if record else "gone" for name, record in found.items()} == {
        "late": b"l" * 900,
        "early0": None,
        "early1": None,
        "last": b"n" * 900,
    }


async def test_memory_answers_bound_forgets_the_bodies_of_records_gone_otherwise():
    """An answer's bytes leave the answers' bound with its record, whichever way it goes
    (evicted by count, released, expired, replaced): bodies are never dropped for room
    that records long gone still seem to take."""
    clock = Clock(NOW)
    dropped: list[int] = []
    records, evicted = memory(clock, max_records=3, max_answer_bytes=4200,
                              on_drop_answers=dropped.append)  # fmt: skip
    for index in range(20):
        owner = hex_id()
        await records.reserve(S(f"r{index}"), completed(owner, b"x" * 1000))
    assert sum(evicted) == 17
    owner = hex_id()
    await records.reserve(S("gone"), reservation(clock, owner))
    assert await records.replace(S("gone"), owner, completed(owner, b"y" * 1000))
    assert await records.release(S("gone"), owner)
    await records.reserve(S("old"), completed(hex_id(), b"z" * 1000))
    clock.now += 61  # past the TTL: expired
    for index in range(3):
        await records.reserve(S(f"n{index}"), completed(hex_id(), b"n" * 1000))
    assert dropped == []
    for index in range(3):
        found = await records.reserve(S(f"n{index}"), reservation(clock))
        assert found is not None
        assert found.body == b"n" * 1000


async def test_memory_evicts_in_batches_below_the_bound():
    """Past a bound one eviction pass drops the oldest records down to 1/32 below it (a full
    store does not pay a pass on every request), counted once for the batch."""
    clock = Clock(NOW)
    records, evicted = memory(clock, max_records=64)
    for index in range(65):
        await records.reserve(S(f"r{index}"), completed(hex_id()))
    assert len(records) == 62
    assert evicted == [3]
    assert await records.reserve(S("r2"), reservation(clock)) is None  # among the oldest
    assert await records.reserve(S("r3"), reservation(clock)) is not None


async def test_memory_records_are_left_out_of_the_garbage_collectors_passes():
    """The stored records are plain tuples of plain values, which the collector stops
    tracking: thousands of them add nothing to its full passes."""
    records, _ = memory(Clock(NOW))
    await records.reserve(S("kept"), completed(hex_id()))
    gc.collect()  # one pass: the entry is one flat tuple, nothing nested to untrack first
    entry = records._records[S("kept")]
    assert not gc.is_tracked(entry)
    assert all(not gc.is_tracked(value) for value in entry)


async def test_memory_never_drops_a_reservation_for_room():
    """A reservation is spared by the bounds, within its lease and past it: in this store it is
    a request of this process still in flight (an answer may stream past the lease), and
    dropping it could let a retry through twice."""
    clock = Clock(NOW)
    records, evicted = memory(clock, max_records=2)
    held = reservation(clock)
    await records.reserve(S("held"), held)
    await records.reserve(S("b"), completed(hex_id()))
    await records.reserve(S("c"), completed(hex_id()))
    assert await records.reserve(S("held"), reservation(clock)) == held
    assert await records.reserve(S("c"), reservation(clock)) is not None
    assert len(records) == 2
    assert evicted == [1]
    clock.now += LEASE + 1  # past held's lease, within the TTL
    await records.reserve(S("d"), completed(hex_id()))
    await records.reserve(S("e"), completed(hex_id()))
    assert await records.reserve(S("held"), reservation(clock)) == held


async def test_memory_spares_past_lease_reservations_only_up_to_what_can_be_in_flight():
    """Past their lease, reservations are spared for room only up to ``max_in_flight`` (as many
    requests as the process can have in flight); more can only be leaked by a fault, and go
    oldest first rather than pin the store: new answers are still kept."""
    clock = Clock(NOW)
    records, _ = memory(clock, max_records=8, max_in_flight=2)
    leaked = [hex_id() for _ in range(6)]
    for index, owner in enumerate(leaked):
        await records.reserve(S(f"leaked-{index}"), reservation(clock, owner))
    clock.now += LEASE + 1
    for index in range(8):
        owner = hex_id()
        assert await records.reserve(S(f"new-{index}"), reservation(clock, owner)) is None
        assert await records.replace(S(f"new-{index}"), owner, completed(owner)) is True
    found = await records.reserve(S("new-7"), reservation(clock))
    assert found is not None
    assert found.state == COMPLETED
    still_there = [await records.release(S(f"leaked-{i}"), owner) for i, owner in enumerate(leaked)]
    assert 0 < sum(still_there) <= 2


async def test_a_reservation_outlives_its_lease_by_the_ttl_however_short(stores, redis_server):
    """A reservation is kept for its lease and then the TTL, even when the TTL is shorter than
    the lease: it never expires while its request may still be in flight, which would let a
    retry reserve the key afresh and be forwarded a second time."""
    records = await stores.make(ttl=1.0)
    held = reservation(stores.clock)
    await records.reserve(S("s"), held)
    if stores.kind == "redis":
        pttl = redis_server.command("PTTL", PREFIX + S("s"))
        assert LEASE * 1000 < pttl <= (LEASE + 1.0) * 1000
        return
    stores.clock.now += LEASE  # long past the TTL, at the end of the lease
    assert await records.reserve(S("s"), reservation(stores.clock)) == held
    stores.clock.now += 1.5  # the lease and then the TTL are over
    assert await records.reserve(S("s"), reservation(stores.clock)) is None


async def test_memory_keeps_reservations_over_the_bound_rather_than_drop_them():
    """When every record is a live reservation the set grows past the bound instead."""
    clock = Clock(NOW)
    records, evicted = memory(clock, max_records=2)
    for name in ("a", "b", "c"):
        assert await records.reserve(S(name), reservation(clock)) is None
    assert len(records) == 3
    assert evicted == []


async def test_memory_weighs_answers_bodies_apart_from_records():
    """Bodies count against ``max_answer_bytes``, not ``max_bytes``: five answers of 10 kB
    stay as records in a 25 kB bound for records; past 50 kB of answers the oldest go, down
    to 3/4 of the bound, their records kept."""
    clock = Clock(NOW)
    records, evicted = memory(clock, max_bytes=25_000, max_answer_bytes=50_000)
    for name in ("a", "b", "c", "d", "e"):
        await records.reserve(S(name), completed(hex_id(), b"x" * 10_000))
    assert len(records) == 5
    assert evicted == []
    bodies = [await records.reserve(S(name), reservation(clock)) for name in "abcde"]
    assert [record.body if record else "gone" for record in bodies] == [None, None] + [
        b"x" * 10_000
    ] * 3


async def test_memory_keeps_no_answer_over_a_quarter_of_its_bound():
    """An answer larger than a quarter of ``max_answer_bytes`` is not kept (as one too large to
    record: 409 replay-unavailable), so that one answer cannot empty the store of the rest."""
    clock = Clock(NOW)
    dropped: list[int] = []
    records, _ = memory(clock, max_answer_bytes=40_000, on_drop_answers=dropped.append)
    for name in ("a", "b", "c"):
        await records.reserve(S(name), completed(hex_id(), b"x" * 9_000))
    await records.reserve(S("big"), completed(hex_id(), b"y" * 10_001))
    found = [await records.reserve(S(name), reservation(clock)) for name in ("a", "b", "c", "big")]
    assert [record.body if record else "gone" for record in found] == [b"x" * 9_000] * 3 + [None]
    assert dropped == []


async def test_memory_keeps_only_replayed_header_fields_of_a_long_head_and_counts_them_as_answer():
    """An answer's header fields count against ``max_answer_bytes``, never against the records'
    bound: answers with 10 kB of header fields push no record out. Past ``HEAD_FILTERED``
    bytes only the fields a replay sends are kept (an SME gateway's cookies take no room)."""
    clock = Clock(NOW)
    dropped: list[int] = []
    records, evicted = memory(clock, max_bytes=25_000, max_answer_bytes=100_000,
                              on_drop_answers=dropped.append)  # fmt: skip
    for index in range(20):
        owner = records.new_owner()
        assert records.reserve_now(S(f"h{index}"), owner, clock() + 33.0) is None
        head = [(b"Set-Cookie", b"c" * 10_000), (b"ETag", b'"e%d"' % index),
                (b"Cache-Control", b"p" * 3_000)]  # fmt: skip
        assert records.complete_now(S(f"h{index}"), owner, b"f" * 32, 200, head, b"x")
    assert len(records) == 20
    assert evicted == []
    assert dropped == []  # 20 x ~3 kB kept: under 100 kB
    found = await records.reserve(S("h0"), reservation(clock))
    assert found is not None
    assert found.headers == ((b"ETag", b'"e0"'), (b"Cache-Control", b"p" * 3_000))
    assert found.body == b"x"


async def test_memory_expired_records_are_not_counted_as_evictions():
    """A record past its TTL that makes room is expiry, not an eviction."""
    clock = Clock(NOW)
    records, evicted = memory(clock, max_records=1)
    await records.reserve(S("a"), completed(hex_id()))
    clock.now += 61
    await records.reserve(S("b"), completed(hex_id()))
    assert len(records) == 1
    assert evicted == []


# --- Redis specifics -------------------------------------------------------------------------


@pytest.fixture
async def redis_records(
    redis_url: str,
) -> AsyncIterator[Callable[..., Awaitable[RedisRecords]]]:
    """Factory: ``await redis_records(ttl, lease=...)`` on the session's real Redis."""
    made: list[Store] = []

    async def make(ttl: float = 60.0, *, lease: float = LEASE) -> RedisRecords:
        store = Store(Settings(redis_url=redis_url))
        await store.start()
        made.append(store)
        return RedisRecords(store, ttl, lease=lease)

    yield make
    for store in made:
        await store.close()


async def test_redis_keys_are_prefixed_slots_and_hold_the_record(redis_records, redis_server):
    """A record lives under ``catalyst-idem:<slot>`` as the record's own bytes."""
    records = await redis_records()
    where = records.slot(scope(*SCOPE))
    assert where == slot(scope(*SCOPE))  # a digest: the client's key never reaches Redis
    record = completed(records.new_owner())
    await records.reserve(where, record)
    assert redis_server.command("KEYS", "*") == [(PREFIX + where).encode()]
    assert Record.decode(redis_server.command("GET", PREFIX + where)) == record


async def test_redis_unreachable_raises_store_unavailable(redis_records, redis_server):
    """With the server down every call raises StoreUnavailable (the proxy's 503), never a
    redis-py exception."""
    records = await redis_records()
    redis_server.stop()
    try:
        for call in (
            records.reserve(S("s"), completed(hex_id())),
            records.replace(S("s"), hex_id(), completed(hex_id())),
            records.release(S("s"), hex_id()),
        ):
            with pytest.raises(StoreUnavailable):
                await call
    finally:
        redis_server.start()


async def test_redis_compare_and_set_survives_a_restart(redis_records, redis_server):
    """After the server restarts (its script cache empty) completion still works: the scripts
    are loaded again."""
    clock = Clock(NOW)
    monotonic = Clock(0.0)
    store = Store(Settings(redis_url=redis_server.url), clock=monotonic)
    await store.start()
    try:
        records = RedisRecords(store, 60.0, lease=LEASE)
        owner = hex_id()
        await records.reserve(S("s"), reservation(clock, owner))
        assert await records.replace(S("s"), owner, completed(owner)) is True
        redis_server.stop()
        with pytest.raises(StoreUnavailable):
            await records.reserve(S("t"), reservation(clock))
        redis_server.start()
        monotonic.now += 2  # past the store's pause after a failure
        owner = hex_id()
        assert await records.reserve(S("t"), reservation(clock, owner)) is None
        assert await records.replace(S("t"), owner, completed(owner)) is True
        assert await records.release(S("t"), owner) is True
    finally:
        await store.close()


async def test_redis_warns_when_the_server_may_evict_records(redis_records, redis_server):
    """``check_policy()`` warns at start-up when ``maxmemory-policy`` is not noeviction, and
    says nothing when it is."""
    records = await redis_records()
    with capture_logs() as quiet:
        await records.check_policy()
    assert [e for e in quiet if e["event"] == log.IDEMPOTENCY_EVICTION] == []
    redis_server.command("CONFIG", "SET", "maxmemory-policy", "allkeys-lru")
    try:
        with capture_logs() as logs:
            await records.check_policy()
    finally:
        redis_server.command("CONFIG", "SET", "maxmemory-policy", "noeviction")
    [warning] = [e for e in logs if e["event"] == log.IDEMPOTENCY_EVICTION]
    assert warning["log_level"] == "warning"
    assert warning["maxmemory_policy"] == "allkeys-lru"


async def test_redis_warns_when_the_server_keeps_nothing_across_a_restart(
    redis_records, redis_server
):
    """``check_policy()`` warns when the server persists nothing (no snapshots, no append-only
    file: the test server's settings), and says nothing once it takes snapshots."""
    records = await redis_records()
    with capture_logs() as logs:
        await records.check_policy()
    [warning] = [e for e in logs if e["event"] == log.IDEMPOTENCY_NO_PERSISTENCE]
    assert warning["log_level"] == "warning"
    redis_server.command("CONFIG", "SET", "save", "3600 1")  # (no file is written this soon)
    try:
        with capture_logs() as quiet:
            await records.check_policy()
    finally:
        redis_server.command("CONFIG", "SET", "save", "")
    assert [e for e in quiet if e["event"] == log.IDEMPOTENCY_NO_PERSISTENCE] == []
