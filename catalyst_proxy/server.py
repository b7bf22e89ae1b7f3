"""``serve()``: run the app until SIGTERM/SIGINT, then drain and stop."""

from __future__ import annotations

import asyncio
import signal
import socket
from collections.abc import Callable

from aiohttp import web

from . import log
from .app import PARTS, SERVER_OPTIONS


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
    runner = web.AppRunner(app, shutdown_timeout=settings.shutdown_grace_seconds, **SERVER_OPTIONS)
    await runner.setup()
    site: web.BaseSite = (
        web.SockSite(runner, sock) if sock is not None else web.TCPSite(runner, host, port)
    )
    await site.start()
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
        bridge_secret="set" if parts.secret.configured else "unset",
        bridge_secret_file=settings.bridge_secret_file,
        session_cookie_secret="set" if settings.session_cookie_secret else "unset",
        operator_email="set" if settings.operator_email else "unset",
        routes=[route.path for route in parts.table.routes],
        max_body_bytes=settings.max_body_bytes,
        upstream_timeout_seconds=settings.upstream_timeout_seconds,
        shutdown_grace_seconds=settings.shutdown_grace_seconds,
    )
    if on_ready is not None:
        on_ready(bound)
    try:
        await stop.wait()
    finally:
        # Shutdown, in order:
        # 1. readiness fails at once, so the load balancer stops sending us work;
        parts.ops.draining = True
        logger.info(log.SHUTDOWN_BEGIN, grace_seconds=settings.shutdown_grace_seconds)
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        # 2. the listener closes (no new connections), idle keep-alive connections close;
        # 3. in-flight requests get up to the grace period to finish, then are cancelled
        #    (their clients see a closed connection, never a made-up answer);
        # 4. the app's cleanup closes the upstream session and the key set.
        await runner.cleanup()
        logger.info(log.SHUTDOWN_DONE)


def _bound_port(runner: web.AppRunner, default: int) -> int:
    for address in runner.addresses:
        if isinstance(address, tuple) and len(address) >= 2:
            return int(address[1])
    return default
