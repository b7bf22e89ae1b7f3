"""The one middleware every request passes through.

It gives the request its ``X-Request-ID``, renders every ``ProxyError`` as the
contract's JSON body (the reason goes to the log, never to the client), counts
the request in the metrics, and writes the one access-log line.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from . import headers as hdrs
from . import log
from .errors import (
    MethodNotAllowed,
    NotFound,
    OperatorKeysUnavailable,
    ProxyError,
    Unauthenticated,
)
from .metrics import Metrics

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
CLIENT_CLOSED = 499  # nginx's code for "the client went away first"


@dataclass(slots=True)
class RequestInfo:
    """What the access-log line says about one request; filled in as it goes."""

    request_id: str
    route: str = "none"
    status: int = 0
    upstream_status: int | None = None
    upstream_ms: float | None = None
    sub: str | None = None
    email: str | None = None
    role: str | None = None
    error: str | None = None


INFO = web.RequestKey("catalyst_proxy.info", RequestInfo)


def error_response(exc: ProxyError, request_id: str) -> web.Response:
    response = web.json_response(exc.body(), status=exc.status, headers=exc.headers)
    response.headers[hdrs.REQUEST_ID] = request_id
    return response


def make_middleware(metrics: Metrics) -> Any:
    logger = log.get_logger()

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        info = RequestInfo(hdrs.request_id(request.headers))
        request[INFO] = info
        started = time.perf_counter()
        metrics.in_flight.inc()
        response: web.StreamResponse | None = None
        try:
            response = await handler(request)
            if not response.prepared:
                response.headers[hdrs.REQUEST_ID] = info.request_id
        except ProxyError as exc:
            response = _refuse(request, exc, info, metrics, logger)
        except web.HTTPException as exc:  # from aiohttp's router: give it our shape
            allowed = tuple(m.strip() for m in exc.headers.get("Allow", "").split(","))
            error = MethodNotAllowed(allowed) if exc.status == 405 else NotFound()
            response = _refuse(request, error, info, metrics, logger)
        except asyncio.CancelledError:
            info.status, info.error = CLIENT_CLOSED, info.error or "client-closed-request"
            raise
        except Exception:
            info.status, info.error = 500, "internal-error"
            logger.exception(log.HANDLER_ERROR, request_id=info.request_id)
            raise
        finally:
            metrics.in_flight.dec()
            duration = time.perf_counter() - started
            status = info.status or (response.status if response is not None else 500)
            metrics.request_done(info.route, request.method, status, duration)
            logger.info(
                log.REQUEST,
                request_id=info.request_id,
                method=request.method,
                path=request.raw_path.partition("?")[0],  # as sent: no query, nothing decoded
                route=info.route,
                status=status,
                duration_ms=round(duration * 1000, 3),
                upstream_status=info.upstream_status,
                upstream_ms=info.upstream_ms,
                sub=info.sub,
                email=info.email,
                role=info.role,
                error=info.error,
            )
        return response

    return middleware


def _refuse(
    request: web.Request, exc: ProxyError, info: RequestInfo, metrics: Metrics, logger: Any
) -> web.Response:
    info.error = exc.code
    if isinstance(exc, Unauthenticated):
        metrics.auth_failures.labels(exc.reason).inc()
        logger.info(log.REFUSED, request_id=info.request_id, error=exc.code, reason=exc.reason,
                    detail=exc.log_detail)  # fmt: skip
    else:
        if isinstance(exc, OperatorKeysUnavailable):
            metrics.auth_failures.labels("keys_unavailable").inc()
        if exc.status >= 500:
            logger.warning(log.REFUSED, request_id=info.request_id, error=exc.code,
                           reason=exc.reason)  # fmt: skip
    response = error_response(exc, info.request_id)
    if request.body_exists and not request.content.at_eof():
        # The body was not read: do not let its bytes be parsed as a next request.
        response.force_close()
    return response
