"""The shared store: one Redis/Valkey client per process, for every worker and replica.

``CATALYST_REDIS_URL`` (``redis://`` or ``rediss://``) names it; the password
is in the URL or in ``CATALYST_REDIS_PASSWORD_FILE`` (read for every new
connection, so a rotated Kubernetes Secret takes effect without a restart).
Rate-limit counters (through ``limits``) and idempotency records share the
one connection pool.

- Start-up never waits for it: the first PING runs in the background and its
  outcome is logged (``store.state``) and shown in ``/readyz``. ``/readyz`` keeps
  the state current: when no command has succeeded for ``PROBE_AFTER`` seconds
  (no traffic, or the store down) it sends a PING in the background, so an outage
  with no traffic shows, and so does the recovery.
- Commands are never retried by the client library: a retried compare-and-set
  whose first try did run would report a conflict that is not there. Each one
  is bounded by ``COMMAND_TIMEOUT``.
- After a failure the store is treated as down for ``RETRY_AFTER`` seconds
  (callers do not each wait for a connection that will not come), then the
  next command tries again: when Redis is back, its users resume without a
  restart. After a connection lost under a command (not a timeout, not an
  error reply), a PING on a new connection, sent at once, ends the pause early
  if the server answers it (the loss was the connection's, not the server's).
- The password never reaches a log line, ``/readyz`` or an error message:
  ``describe()`` is the URL without it.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.connection import AbstractConnection, RedisSSLContext
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.credentials import CredentialProvider
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError

try:  # redis-py 7 and later
    from redis.maint_notifications import MaintNotificationsConfig

    # Redis Enterprise's maintenance notifications (RESP3 pushes), on by default since
    # redis-py 7, make the pool skip its check of an idle connection when it hands one
    # out: one the server closed while it sat idle (its `timeout`, a load balancer's idle
    # timeout, CLIENT KILL) then failed the next command, a failure and a pause of
    # RETRY_AFTER apiece, though the server was there. Off: a closed one is replaced.
    _CHECK_IDLE: dict[str, Any] = {"maint_notifications_config": MaintNotificationsConfig(False)}
except ImportError:  # before 7: no such notifications, and the check is always made
    _CHECK_IDLE = {}

from . import log
from .config import ConfigError, Settings

COMMAND_TIMEOUT = 0.5  # a command takes well under a millisecond on a healthy store
RETRY_AFTER = 1.0
PROBE_AFTER = 1.0  # /readyz pings a store not heard from for this long (see the module's text)
RECHECK_EVERY = 60.0  # s: at most this often, a connection the server closed re-runs on_up
MAX_CONNECTIONS = 64

T = TypeVar("T")


class StoreUnavailable(Exception):
    """The store could not be reached (or answered with an error); the reason is for logs."""


class StorePaused(StoreUnavailable):
    """Refused without being sent: the store pauses after a failure (nothing reached it)."""


class StoreRefused(StoreUnavailable):
    """The server answered with an error (out of memory, a read-only replica, no
    permission): the command's outcome is known, and it stored nothing it would report."""


class _PasswordFile(CredentialProvider):
    """The password from a file, read for each new connection (rotation without restart)."""

    def __init__(self, path: str, username: str | None) -> None:
        self._path = Path(path)
        self._username = username

    def get_credentials(self) -> tuple[str] | tuple[str, str]:
        password = self._path.read_text(encoding="utf-8").strip()
        return (self._username, password) if self._username else (password,)

    async def get_credentials_async(self) -> tuple[str] | tuple[str, str]:
        return self.get_credentials()


class Store:
    def __init__(self, settings: Settings, *, clock: Callable[[], float] = time.monotonic) -> None:
        assert settings.redis_url is not None
        self.url = settings.redis_url
        parts = urlsplit(self.url)
        self._clock = clock
        options: dict[str, Any] = {
            "socket_timeout": COMMAND_TIMEOUT,
            "socket_connect_timeout": COMMAND_TIMEOUT,
            "retry": Retry(NoBackoff(), 0),
            "retry_on_error": [],
            **_CHECK_IDLE,
        }
        if parts.scheme == "rediss":
            # No password for the client key unless the URL gives one: OpenSSL would ask
            # for it on the terminal (a prompt on stderr, or a start-up blocked on a tty).
            options["ssl_password"] = ""
        if settings.redis_password_file:
            if parts.password:
                raise ConfigError(
                    "CATALYST_REDIS_PASSWORD_FILE",
                    "CATALYST_REDIS_URL holds a password too: keep it in one place",
                )
            provider = _PasswordFile(settings.redis_password_file, parts.username)
            try:
                provider.get_credentials()
            except (OSError, UnicodeDecodeError) as exc:
                problem = getattr(exc, "strerror", None) or type(exc).__name__
                raise ConfigError(
                    "CATALYST_REDIS_PASSWORD_FILE", f"cannot read it: {problem}"
                ) from None
            options["credential_provider"] = provider
            self.url = parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()
        # Blocking: a burst waits (up to COMMAND_TIMEOUT) for a free connection instead
        # of failing at once (redis-py's plain pool raises past its 100 connections).
        try:
            self.pool = BlockingConnectionPool.from_url(
                self.url, max_connections=MAX_CONNECTIONS, timeout=COMMAND_TIMEOUT, **options
            )
            self.pool.connection_class = _closed_is_lost(
                self.pool.connection_class, self._found_closed
            )
            # An option redis-py does not know only fails when a connection is made: make
            # one here (it does not connect), so that it is a start-up error, not a 500.
            probe = self.pool.connection_class(**self.pool.connection_kwargs)
        except (TypeError, ValueError, RedisError) as exc:
            raise ConfigError("CATALYST_REDIS_URL", _bad_option(exc)) from None
        # The TLS context too (rediss://): redis-py builds it at the first connection, so a
        # CA file that is not there, a key whose password is wrong or missing, or ciphers
        # OpenSSL does not know left the store unusable, said only as "ConnectionError".
        # Built here, once (the connections share it), it is a start-up error naming its kind.
        context = getattr(probe, "ssl_context", None)
        if isinstance(context, RedisSSLContext):
            try:
                context.get()
            except (OSError, TypeError, ValueError) as exc:  # (ssl.SSLError is an OSError)
                problem = f"its TLS options cannot be used ({_reason(exc)})"
                raise ConfigError("CATALYST_REDIS_URL", problem) from None
        self.redis = Redis(connection_pool=self.pool)
        self.state = "connecting"
        self.last_error: str | None = None
        self._down_until = 0.0
        self._last_ok = 0.0  # when a command last succeeded (the clock's time)
        self._dropping: set[asyncio.Task[None]] = set()  # idle connections being dropped
        self._probe: asyncio.Task[None] | None = None
        self._logger = log.get_logger()
        # Run each time the store comes up (start-up, and after an outage): a restarted
        # server may have come back with another configuration. Tasks of the store's own:
        # close() waits for those running and starts no more (one that ran on after it
        # would connect afresh, on a pool already closed).
        self.on_up: list[Callable[[], Awaitable[object]]] = []
        self._checks: set[asyncio.Task[None]] = set()
        self._checked_at = float("-inf")  # when on_up last ran (the clock's time)
        self._closing = False

    def describe(self) -> str:
        """The URL without credentials (for logs and /readyz)."""
        parts = urlsplit(self.url)
        where = parts.netloc.rpartition("@")[2]  # host[:port], IPv6 brackets kept
        return f"{parts.scheme}://{where}{parts.path or ''}"

    def report(self) -> dict[str, Any]:
        """For /readyz: the state, and a PING in the background when the store has not been
        heard from lately (one at a time; never while it pauses after a failure), so that
        the state follows an outage, and a recovery, with no traffic (the next call shows
        the PING's outcome)."""
        quiet = self._clock() - self._last_ok >= PROBE_AFTER and not self.down
        if quiet and (self._probe is None or self._probe.done()):
            with contextlib.suppress(RuntimeError):  # no loop running: nothing to probe with
                self._probe = asyncio.get_running_loop().create_task(self._first_ping())
        return {"url": self.describe(), "state": self.state, "last_error": self.last_error}

    async def start(self) -> None:
        """Begin connecting in the background (start-up does not wait for it)."""
        self._probe = asyncio.get_running_loop().create_task(self._first_ping())

    async def close(self) -> None:
        self._closing = True
        if self._probe is not None and not self._probe.done():
            self._probe.cancel()
        if self._checks:
            await asyncio.gather(*self._checks, return_exceptions=True)
        if self._dropping:
            await asyncio.gather(*self._dropping, return_exceptions=True)
        # A server that does not answer may not let a TLS connection close in time either
        # (redis-py raises its TimeoutError): the process is stopping all the same.
        with contextlib.suppress(RedisError, OSError, TimeoutError):
            await self.redis.aclose()
        with contextlib.suppress(RedisError, OSError, TimeoutError):
            await self.pool.disconnect()

    async def run(self, command: Callable[[], Awaitable[T]]) -> T:
        """Run one store command; StoreUnavailable if the store is down or fails."""
        if self._down_until and self._clock() < self._down_until:
            raise StorePaused(self.last_error or "the store is down")
        try:
            result = await command()
        except (RedisError, OSError, TimeoutError) as exc:
            raise self.refusal(exc) from None
        self.succeeded()
        return result

    def refusal(self, exc: BaseException) -> StoreUnavailable:
        """What a command's failure means, for every user of the store (here and a library
        using the pool): an error about one key, or this process's own congestion, refuses
        that command alone; anything else is the store's, noted by ``failed()`` (a pause).
        An error reply is StoreRefused: the command's outcome is known."""
        if key_error(exc):
            return StoreRefused(KEY_ERROR)
        if pool_busy(exc):
            return StoreUnavailable(POOL_BUSY)
        self.failed(exc)
        if isinstance(exc, ResponseError):
            return StoreRefused(self.last_error or "the store refused")
        return StoreUnavailable(self.last_error or "the store failed")

    def failed(self, exc: BaseException) -> None:
        """Note a failure (from here or from a library using the pool).

        The pool's idle connections go too: after a failure they are suspect (a restarted
        server has closed them all, and a close not yet seen is only found on the next
        command sent on each, a failure and a pause apiece). The next commands connect
        afresh."""
        self._down_until = self._clock() + RETRY_AFTER
        self.last_error = _reason(exc)
        self._drop_idle()
        # A connection lost under a command may be the connection's fault alone: see
        # _recover(). (A timeout, or an error reply, is the server's: the pause stands.)
        lost = isinstance(exc, (RedisConnectionError, ConnectionError))
        if lost and (self._probe is None or self._probe.done()):
            with contextlib.suppress(RuntimeError):  # no loop running: nothing to probe with
                self._probe = asyncio.get_running_loop().create_task(self._recover())
        if self.state != "unavailable":
            self.state = "unavailable"
            self._logger.warning(
                log.STORE, state=self.state, url=self.describe(), reason=self.last_error
            )

    def succeeded(self) -> None:
        self._last_ok = self._clock()
        if self.state != "ok":
            self.state = "ok"
            self._down_until = 0.0
            self.last_error = None
            self._logger.info(log.STORE, state=self.state, url=self.describe())
            self._run_checks()

    def _found_closed(self) -> None:
        """A pooled connection the server closed (a restart, its idle timeout, CLIENT KILL),
        replaced before use, so no command failed and the store never left "ok": a restarted
        server may have come back with another configuration (an eviction policy, no
        persistence), so the checks run again, at most once per RECHECK_EVERY."""
        if self._clock() - self._checked_at >= RECHECK_EVERY:
            self._run_checks()

    def _run_checks(self) -> None:
        if self._closing:
            return
        self._checked_at = self._clock()
        for check in self.on_up:
            with contextlib.suppress(RuntimeError):  # no loop running: nothing to check with
                task = asyncio.get_running_loop().create_task(self._check(check))
                self._checks.add(task)
                task.add_done_callback(self._checks.discard)

    async def _check(self, check: Callable[[], Awaitable[object]]) -> None:
        try:
            await check()
        except Exception:  # a check's failure is its own: the command succeeded
            self._logger.exception(log.STORE, state=self.state, callback="failed")

    def _drop_idle(self) -> None:
        """Take the pool's idle connections out of reach now (redis-py's own list: no command
        can pick one up from here on) and close them in the background."""
        idle = self.pool._available_connections
        if not idle:
            return
        taken = list(idle)
        idle.clear()  # the pool makes new connections as it needs them (it counts those in use)
        with contextlib.suppress(RuntimeError):  # no loop running: nothing is connected
            task = asyncio.get_running_loop().create_task(_disconnect(taken))
            self._dropping.add(task)
            task.add_done_callback(self._dropping.discard)

    @property
    def down(self) -> bool:
        """A recent failure: skip the store for now (RETRY_AFTER after it)."""
        return bool(self._down_until) and self._clock() < self._down_until

    async def _recover(self) -> None:
        """Right after a connection was lost under a command, one PING on a new connection: if
        the server answers, the loss was the connection's, not the server's (one it closed or
        reset under a command: CLIENT KILL, a proxy's restart), and the pause ends at once
        rather than refusing every caller for RETRY_AFTER. Otherwise the pause stands. Never
        after a timeout or an error reply: a server that answers PING may still fail every
        command (out of memory, a read-only replica, CLIENT PAUSE WRITE)."""
        try:
            await self.redis.ping()
        except (RedisError, OSError, TimeoutError):
            return
        self.succeeded()

    async def _first_ping(self) -> None:
        with contextlib.suppress(StoreUnavailable):  # logged by failed(); the next one retries
            await self.run(self.redis.ping)


def _closed_is_lost(
    base: type[AbstractConnection], found_closed: Callable[[], None]
) -> type[AbstractConnection]:
    """``base`` (redis-py's connection, plain or TLS) with a closed transport read as a lost
    connection.

    A connection the server reset while it sat idle is closed by the event loop, but
    redis-py still holds it as connected. Under uvloop the next command's write then raises
    ``RuntimeError`` ("unable to perform operation on <TCPTransport closed=True>"), which
    nothing expects: a 500 where the contract has a 503, and a completed purchase's record
    left reserved. (The default loop raises an ``OSError``, which redis-py translates.) So:
    the pool's check of an idle connection it hands out (``can_read()``, the one that
    already replaces a connection the server closed with a FIN) replaces one found closed,
    before any byte of the command is written; and a write that meets a closed transport
    all the same is a lost connection (``redis.ConnectionError``), like any other. Each one
    found closed is told to ``found_closed`` (the store re-runs its checks: see there)."""

    class ClosedIsLost(base):  # type: ignore[misc,valid-type]  # a class made at run time
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            # redis-py builds a TLS context per connection (the CA store loaded each time:
            # ~35 ms of the event loop's time): 30 connections at once took over a second,
            # past the commands' bound, and a burst on rediss:// failed (review rev9f).
            # Connections with the same settings share one.
            made = getattr(self, "ssl_context", None)
            if isinstance(made, RedisSSLContext):
                settings = repr([getattr(made, name) for name in made.__slots__
                                 if name != "context"])  # fmt: skip
                self.ssl_context = _SSL_CONTEXTS.setdefault(settings, made)

        async def can_read(self) -> bool:
            writer = self._writer
            if writer is not None and writer.transport.is_closing():
                found_closed()
                return True  # (as a connection with data pending: the pool reconnects it)
            result: bool = await super().can_read()
            if result:  # closed by the server (a FIN), or with bytes no command asked for
                found_closed()
            return result

        async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
            try:
                await super().send_packed_command(command, check_health)
            except RuntimeError:  # (redis-py has disconnected it)
                raise RedisConnectionError("the connection was closed") from None

    ClosedIsLost.__name__ = ClosedIsLost.__qualname__ = f"ClosedIsLost{base.__name__}"
    return ClosedIsLost  # (one per store: its found_closed)


_SSL_CONTEXTS: dict[str, RedisSSLContext] = {}  # (see ClosedIsLost.__init__)


async def _disconnect(connections: list[AbstractConnection]) -> None:
    # A connection that fails to close cleanly is closed all the same: nothing to report.
    await asyncio.gather(*(c.disconnect() for c in connections), return_exceptions=True)


KEY_ERROR = "a value the gateway cannot use is stored under this key"
POOL_BUSY = "every connection to the store is in use"


def pool_busy(exc: BaseException) -> bool:
    """No connection of the pool came free within the command timeout: this process's own
    congestion (a burst of requests), not the store failing. That request is refused, as any
    store error, but the store is not paused for everyone (the commands in flight fail on
    their own if the store is at fault)."""
    return isinstance(exc, RedisConnectionError) and str(exc) == "No connection available."


def key_error(exc: BaseException) -> bool:
    """An error about one key, not about the server: a value of another type there
    (``WRONGTYPE``), or one that is not the number a counter holds (the server's reply,
    inside a script too, or ``limits``' own ``int()`` of it: ValueError): written by another
    program sharing the server. It refuses what uses that key, and does not pause the store
    for everyone else."""
    if isinstance(exc, ValueError):
        return True
    return isinstance(exc, ResponseError) and any(marker in str(exc) for marker in _KEY_ERRORS)


_KEY_ERRORS = ("WRONGTYPE", "not an integer", "not a valid float")


def _reason(exc: BaseException) -> str:
    """The kind of failure, never the exception text (it could quote the URL)."""
    text = type(exc).__name__
    if isinstance(exc, OSError) and exc.strerror:
        text += f": {exc.strerror}"
    return text


def _bad_option(exc: Exception) -> str:
    """What is wrong with the URL's query, naming the option, never repeating the URL."""
    named = re.search(r"(?:keyword argument|value for) '(\w+)'", str(exc))
    if named is None:
        return "an option in its query is not valid"
    what = "is not an option" if isinstance(exc, TypeError) else "has an invalid value"
    return f"the query's {named.group(1)!r} {what}"
