"""``serve()``: run the app until SIGTERM/SIGINT, then drain and stop."""

from __future__ import annotations

import asyncio
import signal
import socket
from collections.abc import Callable

from aiohttp import web

from . import log, native
from .app import PARTS
from .runner import Runner, cut
from .workers import BACKLOG, listen_socket


class ListenError(Exception):
    """The address could not be listened on (taken, not this host's): a usage error."""

    def __init__(self, exc: OSError) -> None:
        self.cause = exc
        self.reason = exc.strerror or str(exc)
        super().__init__(self.reason)


_DRAIN_POLL = 0.05  # how often the drain looks for connections still open
_CANCEL_WAIT = 0.1  # after the grace: how long a cancelled request may take to unwind


async def serve(
    app: web.Application,
    host: str,
    port: int,
    *,
    sock: socket.socket | None = None,
    on_ready: Callable[[int], None] | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Serve ``app`` until ``stop`` is set or SIGTERM/SIGINT arrives, then shut down gracefully."""
    parts = app[PARTS]
    settings = parts.settings
    logger = log.get_logger()
    stop = stop or asyncio.Event()
    # The grace is spent in _drain(); the runner's own timeout only bounds the cancelling.
    runner = Runner(app, shutdown_timeout=_CANCEL_WAIT)
    await runner.setup()
    try:
        if sock is None and ":" in host:  # an IPv6 address: dual stack, as with --workers
            sock = listen_socket(host, port, reuse_port=False)
        site: web.BaseSite = (
            web.SockSite(runner, sock, backlog=BACKLOG)
            if sock is not None
            else web.TCPSite(runner, host, port, backlog=BACKLOG)
        )
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise ListenError(exc) from None
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    bound = _bound_port(runner, port)
    logger.info(
        log.STARTUP,
        listen=f"{host}:{bound}",
        upstream=settings.gateway_url,
        operator_keys=parts.keys.describe(),
        token_algorithms=list(settings.token_algorithms),
        token_issuers=list(settings.token_issuers),
        token_audiences=list(settings.token_audiences),
        # What /readyz says: a secret file that cannot be read (yet) gives no secret.
        bridge_secret="set" if parts.secret.get() is not None else "unset",
        bridge_secret_file=settings.bridge_secret_file,
        session_cookie_secret="set" if settings.session_cookie_secret else "unset",
        operator_email="set" if settings.operator_email else "unset",
        routes=[route.path for route in parts.table.routes],
        max_body_bytes=settings.max_body_bytes,
        upstream_timeout_seconds=settings.upstream_timeout_seconds,
        upstream_max_connections=settings.upstream_max_connections,
        upstream_max_pending=settings.upstream_max_pending,
        upstream_idle_seconds=settings.upstream_idle_seconds,
        breaker=(
            f"{settings.breaker_failures} failures, {settings.breaker_cooldown_seconds:g} s"
            if settings.breaker_failures
            else "off"
        ),
        rate_limit=";".join(map(str, settings.rate_limit)) or None,
        rate_limit_on_store_error=settings.rate_limit_on_store_error,
        store=parts.store.describe() if parts.store is not None else "memory (this process)",
        shutdown_grace_seconds=settings.shutdown_grace_seconds,
        native=native.extensions(),
    )
    if on_ready is not None:
        on_ready(bound)
    try:
        await stop.wait()
    finally:
        # Shutdown, in order:
        # 1. readiness fails at once, so the load balancer stops sending us work;
        parts.ops.draining = True
        parts.dispatcher.drain()  # ... and every answer from now on says Connection: close
        # (The signal handlers stay: a second SIGTERM, e.g. one sent to the whole process
        # group and forwarded by the supervisor too, must not cut the drain short.)
        # 2. the listener closes: no new connections (before the log line, so that a
        #    reader of shutdown.begin may rely on it);
        for site in list(runner.sites):
            await site.stop()
        logger.info(log.SHUTDOWN_BEGIN, grace_seconds=settings.shutdown_grace_seconds)
        # (The record updates still on their way at the end get what is left of the grace.)
        parts.idempotency.close_by = loop.time() + settings.shutdown_grace_seconds
        # 3. idle keep-alive connections close now (_drain), busy ones right after their answer;
        #    in-flight requests get up to the grace period to finish;
        left = await _drain(runner, settings.shutdown_grace_seconds)
        still_open = runner.server.connections if runner.server is not None else []
        if left:
            logger.warning(log.SHUTDOWN_GRACE_EXCEEDED, connections=left)
            parts.dispatcher.cutting = True  # what is cancelled now is ours, not the client's
        # 4. what is still running is cancelled (its client sees a closed connection,
        #    never a made-up answer), and the app's cleanup closes the upstream session
        #    and the key set.
        await runner.cleanup()
        # 5. what is still in a transport's buffer now is never sent: an answer framed by
        #    the close with bytes left there ends in a reset (a FIN would complete it).
        cut(still_open)
        logger.info(log.SHUTDOWN_DONE)
        log.flush()  # every line written before the process goes


async def _drain(runner: web.AppRunner, grace: float) -> int:
    """Wait (up to ``grace``) until every connection has closed; return how many are left."""
    server = runner.server
    if server is None:
        return 0
    # pre_shutdown() only cancels an idle connection's wait for its next request, which
    # ends that connection's task and leaves the connection open (aiohttp 3.14): nothing
    # would read from it again, and the drain would wait out the grace for it. So those
    # waiting for a request (aiohttp's own keep-alive test: a pending wait) close now; one
    # whose request is already read, or that is still reading a refused body, is left to
    # answer and close as before.
    idle = [h for h in server.connections if h._waiter is not None and not h._waiter.done()]
    server.pre_shutdown()
    for handler in idle:
        handler.force_close()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace
    # aiohttp has no "last connection closed" event to await, so look every _DRAIN_POLL.
    while server.connections and loop.time() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(min(_DRAIN_POLL, max(deadline - loop.time(), 0)))
    return len(server.connections)


def _bound_port(runner: web.AppRunner, default: int) -> int:
    for address in runner.addresses:
        if isinstance(address, tuple) and len(address) >= 2:
            return int(address[1])
    return default
