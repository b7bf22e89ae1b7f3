"""The one entry every request passes through (aiohttp's low-level server calls it).

``Dispatcher`` gives the request its ``X-Request-ID``, sends it to an
operations endpoint or to the proxy (the route table matches the raw path
itself: no aiohttp router, no middleware chain, measured cheaper), renders
every ``ProxyError`` as the contract's JSON body (the reason goes to the log,
never to the client), marks every answer with ``X-Catalyst-Forwarded``,
counts the request in the metrics, and writes the one access-log line.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import orjson
from aiohttp import HttpVersion10, HttpVersion11, web

from . import headers as hdrs
from . import log
from .answer import Answer
from .errors import (
    BadRequest,
    MethodNotAllowed,
    NotFound,
    OperatorKeysUnavailable,
    ProxyError,
    Unauthenticated,
)
from .metrics import Metrics
from .routes import Match, RouteTable

CLIENT_CLOSED = 499  # nginx's code for "the client went away first"

OpsHandler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


@dataclass(slots=True)
class RequestInfo:
    """What the access-log line says about one request; filled in as it goes."""

    request_id: str
    route: str = "none"
    status: int = 0
    upstream_status: int | None = None
    upstream_seconds: float | None = None  # from the start of the exchange to its head
    sub: str | None = None
    email: str | None = None
    role: str | None = None
    error: str | None = None
    idempotency: str | None = None  # new, replayed, in-use, reused, unknown, store-error


class ProxyHandler(Protocol):
    draining: bool  # shutdown has begun: every answer says Connection: close

    async def handle(
        self, request: web.BaseRequest, info: RequestInfo, match: Match, query: str
    ) -> web.StreamResponse: ...


_OWN_HEADERS = {hdrs.FORWARDED: "no", hdrs.SERVER: hdrs.SERVER_NAME}


def error_response(exc: ProxyError, request_id: str) -> web.Response:
    """The contract's JSON answer for ``exc`` (an answer of ours: no hot path to shave)."""
    headers = {**exc.headers, hdrs.REQUEST_ID: request_id, hdrs.SERVER: hdrs.SERVER_NAME,
               hdrs.FORWARDED: exc.forwarded}  # fmt: skip
    return web.json_response(exc.body(), status=exc.status, headers=headers)


class Dispatcher:
    def __init__(
        self,
        table: RouteTable,
        ops: Mapping[str, OpsHandler],
        proxy: ProxyHandler,
        metrics: Metrics,
    ) -> None:
        self._table = table
        self._ops = dict(ops)
        self._proxy = proxy
        self._metrics = metrics
        self._logger = log.get_logger()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.in_flight = 0
        self.cutting = False  # set by the shutdown when the grace ran out (server.py)
        metrics.in_flight.set_function(lambda: self.in_flight)

    def drain(self) -> None:
        """Shutdown has begun: every answer from now on, including those of requests already
        in flight, says ``Connection: close`` (RFC 9112 §9.6), so that no client sends another
        request on a connection about to close, where it would go unanswered. (The flag is
        the proxy's, which needs it before its answers go out; this reads it too.)"""
        self._proxy.draining = True

    async def __call__(self, request: web.BaseRequest) -> web.StreamResponse:
        info = RequestInfo(hdrs.request_id(request.headers))
        path, question, query = request.raw_path.partition("?")
        started = time.perf_counter()
        self.in_flight += 1
        response: web.StreamResponse | None = None
        try:
            if request.version != HttpVersion11:
                _check_version(request)
            ops = self._ops.get(path)
            if ops is not None:
                if request.method != "GET":
                    raise MethodNotAllowed(("GET",))
                response = await ops(request)
                response.headers.update(_OWN_HEADERS)
                response.headers[hdrs.REQUEST_ID] = info.request_id
            else:
                match = self._route(path, request.method, info)
                response = await self._proxy.handle(request, info, match, question + query)
        except ProxyError as exc:
            response = self._refuse(request, exc, info)
        except asyncio.CancelledError:
            if self.cutting:  # the drain's grace ran out: we cut it, not the client
                info.status, info.error = 503, "shutdown-grace-exceeded"
            else:
                info.status, info.error = CLIENT_CLOSED, info.error or "client-closed-request"
            raise
        except Exception as exc:
            if not (isinstance(exc, ConnectionError) and _client_gone(request)):
                info.status, info.error = 500, "internal-error"
                self._logger.exception(log.HANDLER_ERROR, request_id=info.request_id)
                raise
            # A write to the client failed because it left (aiohttp raises that before it
            # cancels the handler): as a cancellation, 499, not a server error.
            info.status, info.error = CLIENT_CLOSED, info.error or "client-closed-request"
            response = _gone()
        finally:
            self.in_flight -= 1
            duration = time.perf_counter() - started
            status = info.status or (response.status if response is not None else 500)
            # Counted and logged right after the answer goes out, not before: the
            # client does not wait for its own access-log line.
            loop = self._loop or self._bind_loop()
            loop.call_soon(self._account, info, request.method, path, status, duration)
        if self._proxy.draining or (request.body_exists and request.content.exception()):
            # Shutdown; or a body the parser gave up on (runner.py): the bytes after it on
            # this connection cannot be trusted, and aiohttp has queued its own answer to them.
            response.force_close()
        return response

    def _bind_loop(self) -> asyncio.AbstractEventLoop:
        self._loop = asyncio.get_running_loop()  # once: the call is a getpid() each time
        return self._loop

    def unparsable(self, request_id: str, error: ProxyError) -> None:
        """A request aiohttp's parser refused (answered before any handler ran): its access
        line and its count like any other's, with what is known of it (no method, no path)."""
        info = RequestInfo(request_id, status=error.status, error=error.code)
        self._account(info, "", None, error.status, 0.0)

    def _account(
        self, info: RequestInfo, method: str, path: str | None, status: int, duration: float
    ) -> None:
        """The request's metrics and its one access-log line."""
        self._metrics.request_done(info.route, method, status, duration)
        upstream = info.upstream_seconds
        if upstream is not None:
            self._metrics.upstream_done(info.route, upstream)
        log.access(
            {
                "request_id": info.request_id,
                "method": method or None,  # None: the request could not be parsed
                "path": path,  # as sent: no query, nothing decoded
                "route": info.route,
                "status": status,
                "duration_ms": round(duration * 1000, 3),
                "upstream_status": info.upstream_status,
                "upstream_ms": None if upstream is None else round(upstream * 1000, 3),
                "sub": info.sub,
                "email": info.email,
                "role": info.role,
                "error": info.error,
                "idempotency": info.idempotency,  # never the key itself
            }
        )

    def _route(self, path: str, method: str, info: RequestInfo) -> Match:
        match = self._table.match(path)
        if match is None:
            raise NotFound()
        info.route = match.route.path  # a 405 is counted under the route it missed
        if method not in match.route.methods:
            raise MethodNotAllowed(match.route.methods)
        return match

    def _refuse(
        self, request: web.BaseRequest, exc: ProxyError, info: RequestInfo
    ) -> web.StreamResponse:
        info.error = exc.code
        logger: Any = self._logger
        if isinstance(exc, Unauthenticated):
            self._metrics.auth_failures.labels(exc.reason).inc()
            logger.info(log.REFUSED, request_id=info.request_id, error=exc.code,
                        reason=exc.reason, detail=exc.log_detail)  # fmt: skip
        else:
            if isinstance(exc, OperatorKeysUnavailable):
                self._metrics.auth_failures.labels("keys_unavailable").inc()
            if exc.status >= 500:
                logger.warning(log.REFUSED, request_id=info.request_id, error=exc.code,
                               reason=exc.reason)  # fmt: skip
        if isinstance(exc, BadRequest):
            # Framing the gateway cannot trust: nothing after it on this connection is read,
            # and the answer speaks HTTP/1.1 (or 1.0) whatever version the client claimed.
            answer = _error_answer(exc, info.request_id)
            answer.force_close()
            return answer
        response = error_response(exc, info.request_id)
        if request.body_exists and not request.content.at_eof():
            # The body was not read: do not let its bytes be parsed as a next request.
            # (One the parser gave up on: __call__ closes the connection after any answer.)
            response.force_close()
        return response


def _client_gone(request: web.BaseRequest) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


def _gone() -> Answer:
    """What the handler returns for a client that left: nothing is written, and the
    connection (closing already) is not kept."""
    answer = Answer(CLIENT_CLOSED, [], b"")
    answer._eof_sent = True  # never sent: there is no one to send it to
    answer.force_close()
    return answer


def _check_version(request: web.BaseRequest) -> None:
    """400 for a request line without HTTP/1.0 or 1.1 (none, 0.9, 2.0: the parser lets them
    through, and a front proxy could frame them otherwise), and for an HTTP/1.0 request with
    a Transfer-Encoding (RFC 9112 §6.1: its framing is faulty; closed after the answer)."""
    if request.version != HttpVersion10:
        raise BadRequest(f"HTTP/{request.version.major}.{request.version.minor} request")
    if "Transfer-Encoding" in request.headers:
        raise BadRequest("an HTTP/1.0 request with a Transfer-Encoding")


def _error_answer(exc: ProxyError, request_id: str) -> Answer:
    """``error_response()`` as an ``Answer``, which states HTTP/1.1 (or 1.0) itself."""
    fields = {**exc.headers, hdrs.REQUEST_ID: request_id, hdrs.FORWARDED: exc.forwarded,
              "Content-Type": "application/json; charset=utf-8"}  # fmt: skip
    return Answer(
        exc.status,
        [(name.encode(), value.encode()) for name, value in fields.items()],
        orjson.dumps(exc.body()),
    )
