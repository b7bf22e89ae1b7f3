"""The proxied routes: one request in, at most one request upstream, the answer back.

For each request, in the contract's order:

1. route: the raw path in the table (404), the method on the route (405);
2. operator session (401 / 503 operator-keys-unavailable);
3. bridge secret (503 sme-jwt-bridge-unwired), then the voucher code (400);
4. request body: Content-Encoding (415), declared length (413);
5. the upstream exchange: the body is streamed up (413 again if an undeclared
   length runs over the limit: the upstream request is aborted), the answer is
   streamed back. Failures are translated in one place, ``_translate()``.

Nothing reaches the upstream before 1-4 passed, and nothing is ever retried:
the HTTP client's own silent retry of idempotent requests on a stale pooled
connection is switched off by ``never_retry`` (see there).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from . import headers as hdrs
from .auth import Authenticator
from .bridge import BridgeSecret, map_role, mint
from .config import Settings
from .errors import (
    BodyTooLarge,
    BridgeUnwired,
    MethodNotAllowed,
    MintFailed,
    MissingCode,
    NotFound,
    ProxyError,
    UnsupportedContentEncoding,
    UpstreamBadResponse,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from .metrics import Metrics
from .middleware import INFO, RequestInfo
from .routes import Match, RouteTable

# Margin past the connect timeout for the headers deadline, so that a connection
# that cannot be made is always reported as unreachable (503), never as a 504.
_DEADLINE_MARGIN = 0.05


class _ConnectionLost(aiohttp.ClientConnectionError):
    """The upstream connection broke before a complete answer; never retried."""


async def never_retry(
    request: aiohttp.ClientRequest,
    handler: Callable[[aiohttp.ClientRequest], Awaitable[aiohttp.ClientResponse]],
) -> aiohttp.ClientResponse:
    """Client middleware: a request is sent upstream at most once.

    aiohttp re-sends GET/DELETE/PUT once when a pooled keep-alive connection
    turns out to be closed (``ServerDisconnectedError`` / ``ClientOSError``).
    For a purchase or a revoke that is a second charge or a second revoke. We
    re-raise those errors as a type aiohttp does not retry on; connection
    *setup* errors (``ClientConnectorError``, a subclass) pass through intact.
    """
    try:
        return await handler(request)
    except aiohttp.ClientConnectorError:
        raise
    except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
        raise _ConnectionLost(type(exc).__name__) from exc


def new_upstream_session(settings: Settings) -> aiohttp.ClientSession:
    """The process's one pooled client for the SME gateway."""
    budget = settings.upstream_timeout_seconds
    # aiohttp rounds timeouts over 5 s up to a whole second (``ceil_threshold``). Ours must
    # fire at the budget: a connect timeout rounded past the headers deadline would report
    # an unreachable upstream as a 504 instead of a 503. So: never round.
    connector = aiohttp.TCPConnector(
        limit=0, ttl_dns_cache=10, keepalive_timeout=15, timeout_ceil_threshold=math.inf
    )
    return aiohttp.ClientSession(
        connector=connector,
        cookie_jar=aiohttp.DummyCookieJar(),  # never keep or send upstream cookies
        auto_decompress=False,  # answers pass through as the upstream's bytes
        skip_auto_headers=("User-Agent", "Content-Type", "Accept-Encoding"),
        timeout=aiohttp.ClientTimeout(
            total=None, connect=budget, sock_read=budget, ceil_threshold=math.inf
        ),
        middlewares=(never_retry,),
        trust_env=False,
    )


@dataclass(slots=True)
class _Upload:
    """What the request-body stream saw; read after the exchange fails."""

    limit: int
    sent: int = 0
    too_large: bool = False


class _TooLarge(Exception):
    pass


class Proxy:
    def __init__(
        self,
        settings: Settings,
        table: RouteTable,
        authenticator: Authenticator,
        secret: BridgeSecret,
        metrics: Metrics,
        session: Callable[[], aiohttp.ClientSession],
    ) -> None:
        self._settings = settings
        self._table = table
        self._auth = authenticator
        self._secret = secret
        self._metrics = metrics
        self._session = session
        self._base = settings.gateway_url

    async def handle(self, request: web.Request) -> web.StreamResponse:
        info = request[INFO]
        path, question, query = request.raw_path.partition("?")
        match = self._route(path, request.method, info)

        operator = await self._auth.authenticate(request.headers)
        role = map_role(operator.claims, self._settings.operator_email)
        info.sub, info.email, info.role = operator.sub, operator.email, role
        secret = self._secret.get()
        if secret is None:
            self._metrics.bridge_unwired.inc()
            raise BridgeUnwired(self._secret.last_error or "no bridge secret configured")
        if match.code is not None and not match.code:
            raise MissingCode()
        self._check_body(request)
        try:
            token = mint(secret, sub=operator.sub, email=operator.email, role=role)
        except Exception as exc:
            raise MintFailed(type(exc).__name__) from None

        route = match.route
        target = self._base + route.upstream_target(match.code) + question + query
        upstream_headers = hdrs.upstream_request_headers(
            request.headers,
            bridge_token=token,
            request_id=info.request_id,
            peer=request.remote,
            scheme=request.scheme,
            host=request.host,
        )
        upload = _Upload(self._settings.max_body_bytes)
        body: AsyncIterator[bytes] | None = None
        if request.body_exists:
            body = _stream_body(request.content, upload)
            if request.content_length is not None:
                upstream_headers["Content-Length"] = str(request.content_length)
        return await self._exchange(
            request,
            route.upstream_method,
            URL(target, encoded=True),
            upstream_headers,
            body,
            upload,
        )

    def _route(self, path: str, method: str, info: RequestInfo) -> Match:
        match = self._table.match(path)
        if match is None:
            raise NotFound()
        info.route = match.route.path  # a 405 is counted under the route it missed
        if method not in match.route.methods:
            raise MethodNotAllowed(match.route.methods)
        return match

    async def expect_handler(self, request: web.Request) -> None:
        """``Expect: 100-continue``: invite the body only if we would take it.

        aiohttp's default sends ``100 Continue`` before any handler runs, so a
        client declaring 50 MB or a gzip body would upload it all before being
        told 413/415. We stay silent instead; the handler then refuses (401,
        413, 415) without the body ever being sent.
        """
        if request.headers.get("Expect", "").lower() != "100-continue":
            raise web.HTTPExpectationFailed()
        try:
            self._check_body(request)
        except ProxyError:
            return
        if request.version >= aiohttp.HttpVersion11:
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            request.writer.output_size = 0

    def _check_body(self, request: web.Request) -> None:
        for value in request.headers.getall("Content-Encoding", ()):
            for coding in value.split(","):
                if coding.strip().lower() not in ("identity", ""):
                    raise UnsupportedContentEncoding()
        length = request.content_length
        if length is not None and length > self._settings.max_body_bytes:
            raise BodyTooLarge(self._settings.max_body_bytes)

    async def _exchange(
        self,
        request: web.Request,
        method: str,
        url: URL,
        upstream_headers: CIMultiDict[str],
        body: AsyncIterator[bytes] | None,
        upload: _Upload,
    ) -> web.StreamResponse:
        info = request[INFO]
        budget = self._settings.upstream_timeout_seconds
        started = time.perf_counter()
        try:
            async with asyncio.timeout(budget + _DEADLINE_MARGIN):
                upstream = await self._session().request(
                    method, url, headers=upstream_headers, data=body, allow_redirects=False
                )
        except (aiohttp.ClientError, TimeoutError) as exc:
            if upload.too_large:
                raise BodyTooLarge(upload.limit) from None
            raise self._translate(exc) from None
        finally:
            elapsed = time.perf_counter() - started
            info.upstream_ms = round(elapsed * 1000, 3)
            self._metrics.upstream_done(info.route, elapsed)
        info.upstream_status = upstream.status
        try:
            return await self._relay(request, upstream)
        finally:
            upstream.close() if not upstream.content.at_eof() else upstream.release()

    def _translate(self, exc: BaseException) -> ProxyError:
        """aiohttp's failure → the contract's answer; the most specific match wins."""
        for kinds, error, label in _FAILURES:
            if isinstance(exc, kinds):
                self._metrics.upstream_failures.labels(label).inc()
                return error(f"{type(exc).__name__}: {exc}")
        self._metrics.upstream_failures.labels("bad_response").inc()
        return UpstreamBadResponse(type(exc).__name__)

    async def _relay(
        self, request: web.Request, upstream: aiohttp.ClientResponse
    ) -> web.StreamResponse:
        """Stream the answer back; if the upstream breaks off, so does the client's transfer."""
        info = request[INFO]
        response = web.StreamResponse(
            status=upstream.status,
            headers=hdrs.client_response_headers(upstream.headers, info.request_id),
        )
        if upstream.content_length is not None:
            response.content_length = upstream.content_length
        await response.prepare(request)
        try:
            while chunk := await upstream.content.readany():
                await response.write(chunk)
        except (aiohttp.ClientError, TimeoutError) as exc:
            # The upstream stalled or broke off mid-body: close the client's
            # connection before the declared length / final chunk, so the
            # client sees an aborted transfer, never a clean short answer.
            kind = "timeout" if isinstance(exc, TimeoutError) else "aborted"
            self._metrics.upstream_failures.labels(kind).inc()
            info.error = "sme-gateway-aborted"
            if request.transport is not None:
                request.transport.close()
        return response


_Kinds = type[BaseException] | tuple[type[BaseException], ...]
_FAILURES: tuple[tuple[_Kinds, type[ProxyError], str], ...] = (
    (aiohttp.ConnectionTimeoutError, UpstreamUnreachable, "unreachable"),
    (aiohttp.ClientConnectorError, UpstreamUnreachable, "unreachable"),
    ((aiohttp.ServerTimeoutError, TimeoutError), UpstreamTimeout, "timeout"),
    (aiohttp.ClientError, UpstreamBadResponse, "bad_response"),
)  # fmt: skip


async def _stream_body(content: aiohttp.StreamReader, upload: _Upload) -> AsyncIterator[bytes]:
    """The client's body, chunk by chunk as it arrives, up to the limit."""
    while chunk := await content.readany():
        upload.sent += len(chunk)
        if upload.sent > upload.limit:
            upload.too_large = True
            raise _TooLarge()
        yield chunk
