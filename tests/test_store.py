"""The shared store (``store.Store``) against a real redis-server (reference.md: "Rate limits").

Start-up never waits for the store; an outage makes it skip the store for
``RETRY_AFTER`` seconds, then try again; the password comes from the URL or a
file read for every new connection; it never reaches ``describe()``, the
state report, a log line or an error. The store's clock is a fake
``monotonic`` where a test must step past ``RETRY_AFTER``; everything else is
real: the session's redis-server (``redis_server`` / ``redis_url``), and one
of our own with ``requirepass`` for the password cases.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import uvloop
from redis.exceptions import ConnectionError as RedisConnectionError
from structlog.testing import capture_logs

from catalyst_proxy import log
from catalyst_proxy.config import ConfigError, Settings
from catalyst_proxy.store import (
    COMMAND_TIMEOUT,
    MAX_CONNECTIONS,
    PROBE_AFTER,
    RECHECK_EVERY,
    RETRY_AFTER,
    Store,
    StoreRefused,
    StoreUnavailable,
)

from .redis_server import RedisServer, self_signed
from .support import SlowLink, free_socket

PASSWORD = "pw-one-8e1f0c2b"
ROTATED = "pw-two-5d7a9e44"
DEADLINE = 5.0  # generous: every wait below ends in well under a second


class FakeClock:
    """The store's ``monotonic``: moves only when the test says so."""

    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


async def until(predicate: Callable[[], bool], timeout: float = DEADLINE) -> None:
    """Return once ``predicate()`` holds; fail after ``timeout`` seconds (polled, not slept)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached before the deadline"
        await asyncio.sleep(0.01)


def store_for(url: str, *, password_file: Path | None = None, clock: Any = None) -> Store:
    settings = Settings(
        jwks_url="http://keys.test/jwks",
        redis_url=url,
        redis_password_file=str(password_file) if password_file else None,
    )
    return Store(settings) if clock is None else Store(settings, clock=clock)


@pytest.fixture
async def stores() -> AsyncIterator[Callable[..., Store]]:
    """Factory like ``store_for``; every store made is closed at the end."""
    made: list[Store] = []

    def make(url: str, **kwargs: Any) -> Store:
        store = store_for(url, **kwargs)
        made.append(store)
        return store

    yield make
    for store in made:
        await store.close()


@pytest.fixture
def password_server() -> Iterator[RedisServer]:
    """A redis-server of this test's own, with ``requirepass PASSWORD``."""
    with RedisServer(password=PASSWORD) as server:
        yield server


@pytest.fixture
def silent_store() -> Iterator[str]:
    """A ``redis://`` URL whose listener completes the TCP handshake and never answers."""
    sock = free_socket()
    sock.listen(8)  # the kernel accepts connections into the queue; nobody reads them
    try:
        yield f"redis://127.0.0.1:{sock.getsockname()[1]}/0"
    finally:
        sock.close()


def store_events(logs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [entry for entry in logs if entry["event"] == log.STORE]


async def ping(store: Store) -> Any:
    return await store.run(store.redis.ping)


# --- start-up ----------------------------------------------------------------------------------


async def test_start_returns_at_once_and_the_first_ping_reports_ok(stores, redis_url):
    """start() does not wait for the store: the state is `connecting` until the background PING
    answers, then `ok`, logged once as a store.state event with the URL."""
    with capture_logs() as logs:
        store = stores(redis_url)
        await store.start()
        assert store.report() == {"url": redis_url, "state": "connecting", "last_error": None}
        await until(lambda: store.state != "connecting")
    assert store.report() == {"url": redis_url, "state": "ok", "last_error": None}
    assert store_events(logs) == [
        {"event": log.STORE, "log_level": "info", "state": "ok", "url": redis_url}
    ]


async def test_a_store_that_never_answers_does_not_hold_up_start(stores, silent_store):
    """Against a store that accepts and never answers, start() returns while the PING is still
    out; the PING gives up after COMMAND_TIMEOUT and the state turns `unavailable`."""
    with capture_logs() as logs:
        store = stores(silent_store)
        started = time.monotonic()
        await store.start()
        assert store.state == "connecting"
        await until(lambda: store.state != "connecting")
        waited = time.monotonic() - started
    assert store.state == "unavailable"
    assert store.last_error == "TimeoutError"
    assert COMMAND_TIMEOUT * 0.9 <= waited < COMMAND_TIMEOUT + 1.0  # bounded by the timeout
    assert store_events(logs) == [
        {
            "event": log.STORE,
            "log_level": "warning",
            "state": "unavailable",
            "url": silent_store,
            "reason": "TimeoutError",
        }
    ]


async def test_a_store_that_is_down_at_start_is_reported_unavailable(
    stores, redis_server, redis_url
):
    """With Redis down at start-up the background PING fails fast and the state says why."""
    redis_server.stop()
    store = stores(redis_url)
    await store.start()
    await until(lambda: store.state != "connecting")
    assert store.state == "unavailable"
    assert store.last_error is not None
    assert store.last_error.startswith("ConnectionError")


async def test_close_before_the_first_ping_answered(silent_store):
    """Closing the store before its first PING answered cancels it quietly."""
    with capture_logs() as logs:
        store = store_for(silent_store)
        await store.start()
        await store.close()
    assert store.state == "connecting"
    assert store_events(logs) == []


# --- outage and recovery ------------------------------------------------------------------


async def test_an_outage_skips_the_store_for_retry_after_then_it_is_tried_again(
    stores, redis_server, redis_url
):
    """After a failure the store is not tried for RETRY_AFTER (even when Redis is back), then the
    next command tries it again and the state returns to ok; each change is logged once."""
    clock = FakeClock()
    with capture_logs() as logs:
        store = stores(redis_url, clock=clock)
        assert await ping(store) is True
        redis_server.stop()
        for _ in range(3):
            with pytest.raises(StoreUnavailable):
                await ping(store)
        assert (store.state, store.down) == ("unavailable", True)

        clock.advance(RETRY_AFTER + 0.01)  # still down: the next command tries and fails again
        assert not store.down
        with pytest.raises(StoreUnavailable):
            await ping(store)
        assert store.down

        redis_server.start()
        clock.advance(RETRY_AFTER - 0.02)
        with pytest.raises(StoreUnavailable):  # Redis answers again, but it is not asked yet
            await ping(store)
        assert store.state == "unavailable"
        clock.advance(0.04)
        assert await ping(store) is True
        assert (store.state, store.down) == ("ok", False)
    assert [(event["state"], event["log_level"]) for event in store_events(logs)] == [
        ("ok", "info"),
        ("unavailable", "warning"),
        ("ok", "info"),
    ]


async def test_after_a_restart_no_idle_connection_fails_a_command(stores, redis_server, redis_url):
    """A restarted server has closed every connection the pool kept; one failure drops them
    all, so that once the store is tried again no command fails on a connection left from
    before (each would be a failure, and a pause of RETRY_AFTER, of its own)."""
    store = stores(redis_url)
    commands = [store.redis.ping, lambda: store.redis.config_get("maxmemory-policy")] * 2
    await asyncio.gather(*(store.run(command) for command in commands))  # several connections
    redis_server.stop()
    with pytest.raises(StoreUnavailable):
        await ping(store)
    redis_server.start()
    await until(lambda: not store.down)  # RETRY_AFTER, in real time, as the gateway waits it
    results = await asyncio.gather(*(store.run(command) for command in commands),
                                   return_exceptions=True)  # fmt: skip
    assert not [r for r in results if isinstance(r, BaseException)], results
    assert store.state == "ok"


async def test_a_connection_the_server_closed_while_idle_is_replaced(
    stores, redis_server, redis_url
):
    """A pooled connection the server closed while it sat idle (its ``timeout``, a load
    balancer's idle timeout, CLIENT KILL) is replaced when a command takes it: the command
    succeeds and the store does not pause, though with redis-py's default RESP3
    notifications the pool would hand it out unchecked."""
    store = stores(redis_url)
    await ping(store)
    (idle,) = store.pool._available_connections
    assert redis_server.command("CLIENT", "KILL", "TYPE", "normal") >= 1  # (not this one)
    deadline = time.monotonic() + DEADLINE
    while not await idle.can_read():  # the close has reached the connection (polled)
        assert time.monotonic() < deadline, "the server's close never arrived"
        await asyncio.sleep(0.01)
    assert await ping(store) is True
    assert store.state == "ok"
    assert not store.down


LOOPS = pytest.mark.parametrize(
    "new_loop", [asyncio.new_event_loop, uvloop.new_event_loop], ids=["asyncio", "uvloop"]
)


@LOOPS
def test_a_connection_reset_while_idle_is_replaced_before_a_command(redis_server, new_loop):
    """A pooled connection reset (RST) while it sat idle (by a sidecar, a load balancer,
    conntrack in front of Redis) is replaced when a command takes it, before a byte is
    written: the command succeeds and the store does not pause. (Under uvloop the write on
    the closed transport raised RuntimeError: a 500, and a purchase's record left reserved;
    on the default loop a failure and a pause.) Both loops: serve runs on uvloop."""

    async def scenario() -> None:
        redis_server.start()
        link = await SlowLink(int(redis_server.url.rsplit(":", 1)[1].split("/")[0])).start()
        store = store_for(link.url, clock=FakeClock())
        try:
            await ping(store)
            (idle,) = store.pool._available_connections
            assert link.reset() == 1
            await until(lambda: idle._writer is None or idle._writer.transport.is_closing())
            assert await store.run(lambda: store.redis.set("after-reset", "1")) is True
            assert (store.state, store.down) == ("ok", False)
        finally:
            await store.close()
            await link.close()

    with asyncio.Runner(loop_factory=new_loop) as runner:
        runner.run(scenario())


@pytest.fixture
def tls_server() -> Iterator[RedisServer]:
    """A redis-server of this test's own with a TLS port (its own self-signed certificate)."""
    with RedisServer(tls=True) as server:
        yield server


async def test_a_burst_of_new_tls_connections_fits_the_command_bound(tls_server):
    """Thirty commands at once on a fresh ``rediss://`` store (thirty new TLS connections)
    all succeed: with a TLS context made per connection they took over a second of the
    loop's time together, past the commands' bound, and most were StoreUnavailable."""
    store = store_for(tls_server.tls_url)
    try:
        results = await asyncio.gather(*(ping(store) for _ in range(30)), return_exceptions=True)
        assert results == [True] * 30
    finally:
        await store.close()


async def test_closing_a_tls_store_whose_server_stalls_ends_quietly(tls_server):
    """A ``rediss://`` store whose server stopped answering closes without an exception (its
    TLS connections cannot close in time: redis-py raised TimeoutError, and the process
    exited 1 with a traceback instead of 0)."""
    store = store_for(tls_server.tls_url, clock=FakeClock())
    assert await ping(store) is True
    with tls_server.stalled():
        async with asyncio.timeout(10):
            await store.close()


async def test_no_free_connection_in_time_is_a_store_error_but_no_pause(stores, redis_url):
    """When every connection of the pool is in use past the command timeout (a burst of this
    process's own requests), the command is StoreUnavailable, but the store is not paused:
    the store itself did not fail, and pausing it refused everyone's keyed requests for a
    second (and, with rate limits allowed on a store error, let a flood through them)."""
    store = stores(redis_url, clock=FakeClock())
    await ping(store)
    held = [await store.pool.get_connection() for _ in range(MAX_CONNECTIONS)]
    try:
        with pytest.raises(StoreUnavailable):
            await ping(store)
        assert (store.state, store.down) == ("ok", False)
    finally:
        for connection in held:
            await store.pool.release(connection)
    assert await ping(store) is True


def test_tls_connections_share_one_context():
    """Connections to a ``rediss://`` store share one TLS context: redis-py made one per
    connection, loading the CA store each time (~35 ms of the loop's time apiece), so that a
    burst of new connections took longer than the commands' bound."""
    store = store_for("rediss://127.0.0.1:6380/0")
    first, second = store.pool.make_connection(), store.pool.make_connection()
    assert first.ssl_context is second.ssl_context
    assert first.ssl_context.get() is second.ssl_context.get()


@LOOPS
def test_a_write_on_a_closed_connection_is_a_lost_connection(redis_server, new_loop):
    """Should a command's write still meet a closed transport, it fails as a lost connection
    (redis-py's ConnectionError, which the store translates into StoreUnavailable), never as
    uvloop's RuntimeError, which nothing expects."""

    async def scenario() -> None:
        redis_server.start()
        store = store_for(redis_server.url, clock=FakeClock())
        try:
            connection = await store.pool.get_connection()
            connection._writer.transport.abort()
            await until(lambda: connection._writer.transport.is_closing())
            with pytest.raises(RedisConnectionError):
                await connection.send_packed_command(b"PING\r\n", check_health=False)
            await store.pool.release(connection)
        finally:
            await store.close()

    with asyncio.Runner(loop_factory=new_loop) as runner:
        runner.run(scenario())


async def test_a_connection_closed_under_a_command_does_not_pause_a_store_that_answers(
    stores, redis_server, redis_url
):
    """A command whose connection the server closes under it (CLIENT KILL; a proxy in front of
    Redis restarting) fails, but a PING on a new connection, sent at once, finds the server
    there and ends the pause: the next callers are not refused for RETRY_AFTER (the store's
    clock stands still here: only that PING can end it)."""
    store = stores(redis_url, clock=FakeClock())
    await ping(store)
    held = asyncio.create_task(store.run(lambda: store.redis.blpop(["never-pushed"], 0.4)))
    await until(lambda: any(b"blpop" in line for line in client_commands(redis_server)))
    redis_server.command("CLIENT", "KILL", "TYPE", "normal")
    with pytest.raises(StoreUnavailable):
        await held
    await until(lambda: not store.down)
    assert store.state == "ok"
    assert await ping(store) is True


async def test_an_error_reply_pauses_the_store_with_no_recovery_ping(
    stores, redis_server, redis_url
):
    """A command the server answers with an error (out of memory here; a read-only replica, no
    permission) is StoreRefused and pauses the store, and no recovery PING is sent: such a
    server answers PING while it fails every command, and ending the pause on it would flap
    the store's state (a log line, a pool's worth of reconnections) at every request."""
    store = stores(redis_url, clock=FakeClock())
    await ping(store)
    redis_server.command("CONFIG", "SET", "maxmemory", "1")
    try:
        with pytest.raises(StoreRefused):
            await store.run(lambda: store.redis.set("refused", "1"))
    finally:
        redis_server.command("CONFIG", "SET", "maxmemory", "0")
    assert (store.state, store.down) == ("unavailable", True)
    assert store._probe is None  # nothing sent to end the pause


def client_commands(redis_server: RedisServer) -> list[bytes]:
    """The last command of each client connected (CLIENT LIST), lower-case."""
    listing = redis_server.command("CLIENT", "LIST")
    return [line.split(b" cmd=")[1].split(b" ")[0].lower() for line in listing.splitlines()]


async def test_dropping_the_idle_connections_never_closes_one_a_command_took(stores, redis_url):
    """The idle connections a failure drops are out of the pool at once: a command that had
    passed the store's checks before the failure and takes a connection right after it gets
    a new one, never one closed under it; close() waits for the drop."""
    store = stores(redis_url)
    await asyncio.gather(*(store.run(store.redis.ping) for _ in range(4)))  # 4 kept idle
    store.failed(TimeoutError())  # another command's failure
    results = await asyncio.gather(store.redis.set("drop-a", "1"), store.redis.set("drop-b", "1"),
                                   return_exceptions=True)  # fmt: skip
    assert results == [True, True]
    await store.close()
    assert not store._dropping


async def test_readyz_follows_an_outage_and_a_recovery_with_no_traffic(
    stores, redis_server, redis_url
):
    """With no command running, report() (what /readyz calls) still notices the store going away
    and coming back: once nothing has succeeded for PROBE_AFTER it PINGs in the background, and
    the next report shows the outcome. While the store answers it sends no more than that."""
    clock = FakeClock()
    store = stores(redis_url, clock=clock)
    assert await ping(store) is True
    assert store.report()["state"] == "ok"
    assert store._probe is None  # heard from just now: no PING

    redis_server.stop()
    assert store.report()["state"] == "ok"  # nothing has failed yet
    clock.advance(PROBE_AFTER)
    store.report()  # not heard from for PROBE_AFTER: a PING goes out, and fails
    await until(lambda: store.state == "unavailable")
    assert store.report()["state"] == "unavailable"

    redis_server.start()
    clock.advance(RETRY_AFTER)
    store.report()  # the pause after the failure is over: a PING again, which answers
    await until(lambda: store.state == "ok")
    assert store.report() == {"url": redis_url, "state": "ok", "last_error": None}


async def test_a_failing_on_up_callback_neither_fails_the_command_nor_stops_the_others(
    stores, redis_url
):
    """The checks run when the store comes up (the eviction-policy check) are not the
    command's business: one that raises is logged, the command that brought the store up
    still succeeds, and the checks after it still run."""
    ran: list[str] = []

    async def broken() -> None:
        ran.append("broken")
        raise RuntimeError("a check's own bug")

    async def next_one() -> None:
        ran.append("next")

    store = stores(redis_url)
    store.on_up += [broken, next_one]
    with capture_logs() as logs:
        assert await ping(store) is True
        assert store.state == "ok"
        await until(lambda: len(ran) == 2)
        await until(lambda: any(e.get("callback") == "failed" for e in store_events(logs)))
    assert sorted(ran) == ["broken", "next"]


async def test_a_server_that_closed_the_pools_connections_is_checked_again(
    stores, redis_server, redis_url
):
    """A server that closed the connections the pool kept (a restart between two requests,
    CLIENT KILL) has them replaced before use, so no command fails and the store never
    leaves "ok"; it may have come back with another configuration, so the checks run again,
    at most once per RECHECK_EVERY (a restart with another eviction policy was never
    warned about)."""
    clock = FakeClock()
    ran: list[str] = []

    async def check() -> None:
        ran.append("check")

    store = stores(redis_url, clock=clock)
    store.on_up.append(check)
    assert await ping(store) is True
    await until(lambda: ran == ["check"])

    async def closed_by_the_server() -> None:
        (idle,) = store.pool._available_connections
        assert redis_server.command("CLIENT", "KILL", "TYPE", "normal") >= 1
        await until(lambda: idle._reader is not None and idle._reader.at_eof())
        assert await ping(store) is True  # on a new connection: nothing failed
        assert (store.state, store.down) == ("ok", False)

    clock.advance(RECHECK_EVERY)
    await closed_by_the_server()
    await until(lambda: ran == ["check", "check"])
    clock.advance(1.0)
    await closed_by_the_server()  # again within RECHECK_EVERY: not checked again
    assert not store._checks  # none started (nor pending: a task is filed as it starts)
    assert ran == ["check", "check"]


async def test_close_waits_for_the_checks_running_and_starts_no_more(stores, redis_url):
    """A check still running when the store closes is waited for (it would otherwise run on,
    and connect afresh, on a pool already closed); a store coming up while it closes starts
    none."""
    started, finished = asyncio.Event(), asyncio.Event()
    calls: list[str] = []

    async def slow_check() -> None:
        calls.append("check")
        started.set()
        await asyncio.sleep(0.05)  # a command on its way (the check's own work, not a wait)
        finished.set()

    store = stores(redis_url)
    store.on_up.append(slow_check)
    assert await ping(store) is True
    await asyncio.wait_for(started.wait(), DEADLINE)
    await store.close()
    assert finished.is_set()
    store.state = "unavailable"  # as if it came up again while closing
    store.succeeded()
    assert calls == ["check"]


async def test_the_reason_of_a_failure_is_its_kind(stores, redis_server, redis_url):
    """StoreUnavailable and last_error name the kind of failure, not the library's text."""
    store = stores(redis_url, clock=FakeClock())
    await ping(store)
    redis_server.stop()
    with pytest.raises(StoreUnavailable) as caught:
        await ping(store)
    assert str(caught.value) == store.last_error
    assert store.last_error is not None
    assert store.last_error.split(":")[0] in ("ConnectionError", "ConnectionRefusedError")
    assert "127.0.0.1" not in str(caught.value)


# --- describe(): never the password -----------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "described"),
    [
        ("redis://:s3cret-pw@cache.internal:6380/2", "redis://cache.internal:6380/2"),
        ("rediss://app:s3cret-pw@cache.internal/0", "rediss://cache.internal/0"),
        ("redis://app@cache.internal:6379", "redis://cache.internal:6379"),
        ("redis://cache.internal", "redis://cache.internal"),
    ],
)
def test_describe_is_the_url_without_credentials(url, described):
    """describe() and report() show scheme, host, port and database, never user or password."""
    store = store_for(url)
    assert store.describe() == described
    assert store.report() == {"url": described, "state": "connecting", "last_error": None}
    assert "s3cret" not in repr(store.report())


def test_describe_keeps_an_ipv6_host_a_url():
    """An IPv6 host keeps its brackets in describe(), so /readyz and the logs show a URL."""
    store = store_for("redis://:s3cret-pw@[fd00::7]:6379/0")
    assert store.describe() == "redis://[fd00::7]:6379/0"


# --- the password -------------------------------------------------------------------------


async def test_a_password_in_the_url_authenticates(stores, password_server):
    """A password in CATALYST_REDIS_URL authenticates, and describe() leaves it out."""
    store = stores(password_server.url_with_password())
    assert await store.run(lambda: store.redis.set("k", "v")) is True
    assert password_server.command("GET", "k") == b"v"
    assert store.describe() == password_server.url


async def test_a_wrong_password_is_unavailable_and_never_repeated(stores, password_server):
    """A refused password makes the store unavailable; neither password appears in the error,
    the report or the log."""
    wrong = "wrong-pw-31c9d8"
    with capture_logs() as logs:
        store = stores(password_server.url_with_password(wrong))
        await store.start()
        await until(lambda: store.state != "connecting")
        with pytest.raises(StoreUnavailable) as caught:
            await ping(store)
    assert store.state == "unavailable"
    assert store.last_error == "AuthenticationError"
    for text in (str(caught.value), repr(store.report()), repr(logs)):
        assert wrong not in text
        assert PASSWORD not in text


async def test_a_password_file_authenticates(stores, password_server, tmp_path):
    """CATALYST_REDIS_PASSWORD_FILE supplies the password (trailing newline trimmed)."""
    secret = tmp_path / "redis-password"
    secret.write_text(PASSWORD + "\n")
    store = stores(password_server.url, password_file=secret)
    assert await store.run(lambda: store.redis.set("k", "v")) is True
    assert password_server.command("GET", "k") == b"v"


async def test_a_rotated_password_file_is_used_by_new_connections(
    stores, password_server, tmp_path
):
    """The password file is read for every new connection: after the server's password changes,
    new connections fail until the file holds the new one, then the store serves again
    without a restart."""
    clock = FakeClock()
    secret = tmp_path / "redis-password"
    secret.write_text(PASSWORD)
    store = stores(password_server.url, password_file=secret, clock=clock)
    assert await ping(store) is True

    # The server's password changes; connections open now must authenticate anew.
    password_server.command("CONFIG", "SET", "requirepass", ROTATED)
    password_server.password = ROTATED
    password_server.command("CLIENT", "KILL", "TYPE", "normal")  # not this one (SKIPME)
    with pytest.raises(StoreUnavailable):
        await ping(store)  # the store's connection is gone
    clock.advance(RETRY_AFTER)
    with pytest.raises(StoreUnavailable):
        await ping(store)  # a new connection, with the file's old password
    assert store.last_error == "AuthenticationError"

    secret.write_text(ROTATED + "\n")  # the Secret is rotated
    clock.advance(RETRY_AFTER)
    assert await ping(store) is True
    assert store.state == "ok"


def test_a_password_in_both_places_is_a_config_error(tmp_path):
    """A password in the URL and a password file: ConfigError naming the file's variable,
    without the password."""
    secret = tmp_path / "redis-password"
    secret.write_text(PASSWORD)
    with pytest.raises(ConfigError) as caught:
        store_for(f"redis://:{PASSWORD}@127.0.0.1:6379/0", password_file=secret)
    assert caught.value.variable == "CATALYST_REDIS_PASSWORD_FILE"
    assert PASSWORD not in str(caught.value)


@pytest.mark.parametrize("kind", ["missing", "directory", "not UTF-8"])
def test_an_unreadable_password_file_is_a_config_error(tmp_path, kind):
    """A password file that cannot be read is a ConfigError at construction, not a later
    connection failure."""
    path = tmp_path / "redis-password"
    if kind == "directory":
        path.mkdir()
    elif kind == "not UTF-8":
        path.write_bytes(b"\xff\xfe-not-text")
    with pytest.raises(ConfigError) as caught:
        store_for("redis://127.0.0.1:6379/0", password_file=path)
    assert caught.value.variable == "CATALYST_REDIS_PASSWORD_FILE"
    assert "cannot read it" in caught.value.problem
    assert "\n" not in str(caught.value)


async def test_a_user_name_with_a_password_file(stores, password_server, tmp_path):
    """A user name in the URL goes with the file's password (Redis ACL users)."""
    password_server.command("ACL", "SETUSER", "limiter", "on", ">" + ROTATED, "~*", "+@all")
    secret = tmp_path / "redis-password"
    secret.write_text(ROTATED)
    url = password_server.url.replace("redis://", "redis://limiter@")
    store = stores(url, password_file=secret)
    assert await store.run(lambda: store.redis.acl_whoami()) == "limiter"
    assert store.describe() == password_server.url


def test_the_silent_store_fixture_really_accepts(silent_store):
    """(The helper) the silent store completes a TCP handshake, so the PING waits for an answer
    rather than failing to connect."""
    port = int(silent_store.rsplit(":", 1)[1].split("/")[0])
    with socket.create_connection(("127.0.0.1", port), timeout=1):
        pass


def _client_files(directory: Path) -> dict[str, str]:
    """Two certificates and their keys in ``directory``: ``cert`` and ``key`` (plain),
    ``sealed_cert`` and ``sealed`` (the key encrypted with "pw")."""
    self_signed(directory, "client")
    self_signed(directory, "sealed", password=b"pw")
    return {"cert": str(directory / "client.crt"), "key": str(directory / "client.key"),
            "sealed_cert": str(directory / "sealed.crt"),
            "sealed": str(directory / "sealed.key")}  # fmt: skip


@pytest.mark.parametrize(
    "query",
    [
        "ssl_ca_certs={missing}",
        "ssl_ca_certs={key}",  # a key, not certificates
        "ssl_ciphers=no-such-cipher",
        "ssl_certfile={sealed_cert}&ssl_keyfile={sealed}&ssl_password=wrong",
        "ssl_certfile={sealed_cert}&ssl_keyfile={sealed}",  # no password: OpenSSL would prompt
        "ssl_keyfile={key}",  # a key without its certificate
    ],
    ids=["missing-ca", "key-as-ca", "ciphers", "wrong-password", "no-password", "key-only"],
)
def test_tls_options_that_cannot_be_used_stop_start_up(tmp_path, query):
    """A rediss:// URL whose TLS options cannot be used stops start-up, saying so (the kind of
    failure, never a path or a password). redis-py builds the TLS context at the first
    connection: the store was never usable, said only as "ConnectionError", while /readyz
    said ready; a key without its password made OpenSSL prompt on the terminal."""
    files = _client_files(tmp_path)
    url = "rediss://127.0.0.1:6380/0?" + query.format(missing=tmp_path / "nothing.pem", **files)
    with pytest.raises(ConfigError) as caught:
        store_for(url)
    message = str(caught.value)
    assert caught.value.variable == "CATALYST_REDIS_URL"
    assert "TLS options cannot be used" in message
    assert str(tmp_path) not in message
    assert "wrong" not in message


def test_a_client_certificate_and_its_key_are_taken(tmp_path):
    """Usable TLS options (a client certificate, its encrypted key and the key's password) are
    taken at start-up; the store is made."""
    files = _client_files(tmp_path)
    url = (f"rediss://127.0.0.1:6380/0?ssl_certfile={files['sealed_cert']}"
           f"&ssl_keyfile={files['sealed']}&ssl_password=pw")  # fmt: skip
    store = store_for(url)
    assert store.describe() == "rediss://127.0.0.1:6380/0"
