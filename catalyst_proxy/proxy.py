"""The proxied routes: one request in, at most one request upstream, the answer back.

For each request routed here, in the contract's order:

1. operator session (401 / 503 operator-keys-unavailable), then this
   operator's rate limit on this route (429 / 503 rate-limit-store-unavailable:
   a bad token never spends an operator's budget);
2. bridge secret (503 sme-jwt-bridge-unwired), then the voucher code (400);
3. request body: Content-Encoding (415), declared length (413); only now is a
   client that sent ``Expect: 100-continue`` invited to send it;
4. the upstream exchange through our own client (``upstream/``): the body is
   streamed up (413 again if an undeclared length runs over the limit: the
   upstream request is aborted), the answer is streamed back. The client's
   failures become the contract's answers in one table, ``_FAILURES``.

Nothing reaches the upstream before 1-3 passed, and nothing is ever retried:
the client writes a request on exactly one connection.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from aiohttp import HttpVersion11, web
from aiohttp.streams import StreamReader

from . import headers as hdrs
from .auth import Authenticator
from .bridge import BridgeSecret, map_role, mint
from .config import Settings
from .dispatch import RequestInfo
from .errors import (
    BadRequest,
    BodyTooLarge,
    BridgeUnwired,
    GatewayOverloaded,
    MintFailed,
    MissingCode,
    ProxyError,
    UnsupportedContentEncoding,
    UpstreamBadResponse,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from .metrics import Metrics
from .ratelimit import RateLimiter
from .routes import Match
from .upstream import (
    BadResponse,
    Body,
    BodyBroken,
    BodyFailed,
    BreakerOpen,
    Client,
    ConnectFailed,
    PoolOverloaded,
    Response,
    ResponseTimeout,
    UpstreamFailure,
)

# The client's failures, as the contract's answers (CONTRACT: "The upstream exchange").
_FAILURES: tuple[tuple[type[UpstreamFailure], type[ProxyError]], ...] = (
    (PoolOverloaded, GatewayOverloaded),
    (BreakerOpen, UpstreamUnreachable),
    (ConnectFailed, UpstreamUnreachable),
    (ResponseTimeout, UpstreamTimeout),
    (BadResponse, UpstreamBadResponse),
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
        authenticator: Authenticator,
        secret: BridgeSecret,
        metrics: Metrics,
        client: Client,
        limiter: RateLimiter | None = None,
    ) -> None:
        self._settings = settings
        self._limiter = limiter if limiter is not None and limiter.active else None
        self._auth = authenticator
        self._secret = secret
        self._metrics = metrics
        self._client = client
        self._limit = settings.max_body_bytes

    async def handle(
        self, request: web.BaseRequest, info: RequestInfo, match: Match, query: str
    ) -> web.StreamResponse:
        operator = await self._auth.authenticate(request.headers)
        role = map_role(operator.claims, self._settings.operator_email)
        info.sub, info.email, info.role = operator.sub, operator.email, role
        if self._limiter is not None:
            await self._limiter.check(info.route, operator.sub)
        secret = self._secret.get()
        if secret is None:
            self._metrics.bridge_unwired.inc()
            raise BridgeUnwired(self._secret.last_error or "no bridge secret configured")
        if match.code is not None and not match.code:
            raise MissingCode()
        self.check_body(request)
        await _invite_body(request)
        upload = _Upload(self._limit)
        body, length = self._body(request, upload)
        try:
            token = mint(secret, sub=operator.sub, email=operator.email, role=role)
        except Exception as exc:
            raise MintFailed(type(exc).__name__) from None

        route = match.route
        target = route.upstream_target(match.code) + query
        head = hdrs.upstream_request_head(
            request.raw_headers,
            bridge_token=token,
            request_id=info.request_id,
            peer=request.remote,
            scheme=request.scheme,
            host=request.host,
        )
        started = time.perf_counter()
        try:
            upstream = await self._client.request(
                route.upstream_method.encode(), target.encode(errors="surrogateescape"), head,
                body, length,
            )  # fmt: skip
        except UpstreamFailure as exc:
            raise self._translate(exc, upload) from None
        finally:
            elapsed = time.perf_counter() - started
            info.upstream_ms = round(elapsed * 1000, 3)
            self._metrics.upstream_done(info.route, elapsed)
        info.upstream_status = upstream.status
        try:
            return await self._relay(request, info, upstream)
        finally:
            upstream.release()

    def check_body(self, request: web.BaseRequest) -> None:
        """415 for an encoded body, 413 for a declared length over the limit."""
        for value in request.headers.getall("Content-Encoding", ()):
            for coding in value.split(","):
                if coding.strip().lower() not in ("identity", ""):
                    raise UnsupportedContentEncoding()
        length = request.content_length
        if length is not None and length > self._limit:
            raise BodyTooLarge(self._limit)

    def _body(self, request: web.BaseRequest, upload: _Upload) -> tuple[Body, int | None]:
        """The body as bytes when it has all arrived already (one write upstream), else a stream."""
        if not request.body_exists:
            return None, None
        content = request.content
        if content.is_eof():
            data = content.read_nowait(-1)
            if len(data) > self._limit:
                raise BodyTooLarge(self._limit)
            return data, None
        return _stream_body(content, upload), request.content_length

    def _translate(self, exc: UpstreamFailure, upload: _Upload) -> ProxyError:
        """The client's failure → the contract's answer (most specific first)."""
        if isinstance(exc, BodyFailed):
            if upload.too_large:
                return BodyTooLarge(upload.limit)
            return BadRequest(f"the request body ended early: {type(exc.cause).__name__}")
        self._metrics.failures[exc.kind].inc()
        for kind, answer in _FAILURES:
            if isinstance(exc, kind):
                error = answer(exc.reason)
                break
        else:  # pragma: no cover - every failure kind is in the table
            error = UpstreamBadResponse(exc.reason)
        if isinstance(exc, BreakerOpen):
            error.headers["Retry-After"] = str(exc.retry_after)
        error.forwarded = "unknown" if exc.sent else "no"
        return error

    async def _relay(
        self, request: web.BaseRequest, info: RequestInfo, upstream: Response
    ) -> web.StreamResponse:
        """Stream the answer back; if the upstream breaks off, so does the client's transfer."""
        headers, length = hdrs.client_response_headers(upstream.headers, info.request_id)
        if upstream.complete:  # the whole answer is here already: one write
            return web.Response(status=upstream.status, body=upstream.body(), headers=headers)
        response = web.StreamResponse(status=upstream.status, headers=headers)
        if length is not None:
            response.content_length = length
        await response.prepare(request)
        try:
            while chunk := await upstream.read():
                await response.write(chunk)
        except BodyBroken as exc:
            # The upstream stalled or broke off mid-body: close the client's connection
            # before the declared length / final chunk, so the client sees an aborted
            # transfer, never a clean short answer.
            self._metrics.failures[exc.kind].inc()
            info.error = "sme-gateway-aborted"
            if request.transport is not None:
                request.transport.abort()
        return response


async def _invite_body(request: web.BaseRequest) -> None:
    """``Expect: 100-continue``: invite the body now that every check that could refuse it
    has passed (a client declaring 50 MB, a gzip body or a bad token is refused before it
    sends a byte of it). Other expectations are ignored (RFC 9110 §10.1.1 allows that)."""
    if request.version < HttpVersion11 or not request.body_exists:
        return
    if request.headers.get("Expect", "").lower() == "100-continue" and not request.content.is_eof():
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # the answer proper has not started


async def _stream_body(content: StreamReader, upload: _Upload) -> AsyncIterator[bytes]:
    """The client's body, chunk by chunk as it arrives, up to the limit."""
    while chunk := await content.readany():
        upload.sent += len(chunk)
        if upload.sent > upload.limit:
            upload.too_large = True
            raise _TooLarge()
        yield chunk
