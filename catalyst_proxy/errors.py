"""Every answer the gateway makes on its own, as one exception tree.

::

    ProxyError                         status  error
    ├── BadRequest                     400     bad-request                    (unparsable request)
    ├── IdempotencyKeyInvalid          400     idempotency-key-invalid
    ├── IdempotencyKeyMissing          400     idempotency-key-missing
    ├── MissingCode                    400     missing-code
    ├── Unauthenticated                401     unauthenticated                (+ WWW-Authenticate)
    ├── NotFound                       404     not-found
    ├── MethodNotAllowed               405     method-not-allowed             (+ Allow)
    ├── IdempotencyKeyInUse            409     idempotency-key-in-use         (+ Retry-After)
    ├── IdempotencyOutcomeUnknown      409     idempotency-outcome-unknown
    ├── IdempotencyReplayUnavailable   409     idempotency-replay-unavailable
    ├── BodyTooLarge                   413     request-body-too-large
    ├── UnsupportedContentEncoding     415     unsupported-content-encoding
    ├── IdempotencyKeyReused           422     idempotency-key-reused
    ├── RateLimited                    429     rate-limited                   (+ Retry-After, ...)
    ├── HeaderFieldsTooLarge           431     request-header-fields-too-large
    ├── InternalError                  500     internal-error
    ├── MintFailed                     500     sme-jwt-mint-failed
    ├── UpstreamBadResponse            502     sme-gateway-bad-response
    ├── GatewayOverloaded              503     gateway-overloaded             (+ Retry-After)
    ├── IdempotencyStoreUnavailable    503     idempotency-store-unavailable
    ├── OperatorKeysUnavailable        503     operator-keys-unavailable      (+ Retry-After)
    ├── RateLimitStoreUnavailable      503     rate-limit-store-unavailable
    ├── UpstreamUnreachable            503     sme-gateway-unreachable        (+ Retry-After)
    ├── BridgeUnwired                  503     sme-jwt-bridge-unwired
    └── UpstreamTimeout                504     sme-gateway-timeout

Bodies are ``{"error": code}``, plus ``"detail"`` (a short sentence for
humans, never a token or a secret) on the two answers whose detail the
contract promises: ``sme-jwt-bridge-unwired`` and ``sme-gateway-unreachable``.
``RateLimited`` also carries ``RateLimit-Policy`` and ``RateLimit``;
``UpstreamUnreachable`` carries ``Retry-After`` only when the breaker answered
it. ``reason`` is for the log only (and the auth-failure metric): it never
reaches the client.

``forwarded`` is the answer's ``X-Catalyst-Forwarded``: ``no`` for every
answer made before or instead of the exchange; a 502 or 504 raised after the
whole request was handed to the upstream says ``unknown`` (it may have been
acted on).
"""

from __future__ import annotations

from collections.abc import Mapping

FORWARDED = "X-Catalyst-Forwarded"

# The checks a request passes, in order (reference.md: "How a proxied request is handled");
# each error names its step, so the reference and the OpenAPI document know which routes
# can answer it.
STEPS = ("protocol", "routing", "session", "rate-limit", "bridge", "code", "body",
         "idempotency", "exchange")  # fmt: skip


class ProxyError(Exception):
    """An answer the gateway makes on its own, rendered as ``{"error": code}``.

    Each subclass's docstring opens with what the answer means to the caller,
    in one paragraph, and ``advice`` says what the caller should do: both are
    the reference's error table (``catalyst_proxy/devtools/reference.py``).
    """

    status: int = 500
    code: str = "internal-error"
    detail: str | None = None
    forwarded: str = "no"
    advice: str = ""
    step: str = "protocol"  # which check of STEPS answers it

    def __init__(
        self,
        reason: str = "",
        *,
        detail: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(reason or self.code)
        self.reason = reason or self.code
        if detail is not None:
            self.detail = detail
        self.headers: dict[str, str] = dict(headers or {})

    def body(self) -> dict[str, str]:
        payload = {"error": self.code}
        if self.detail:
            payload["detail"] = self.detail
        return payload


class BadRequest(ProxyError):
    """The request could not be parsed as HTTP (a bad request line, header or
    chunk size; a request line without `HTTP/1.0` or `HTTP/1.1`; an HTTP/1.0
    request with a `Transfer-Encoding`, RFC 9112 §6.1); the connection is closed
    after the answer.

    Answered by the protocol handler, before routing.
    """

    status, code = 400, "bad-request"
    step = "protocol"
    advice = "fix the client's HTTP; nothing was forwarded"


class MissingCode(ProxyError):
    """The voucher code in the path is blank (after trimming)."""

    status, code = 400, "missing-code"
    step = "code"
    advice = "send a code"


class IdempotencyKeyInvalid(ProxyError):
    """The ``Idempotency-Key`` header is malformed (not 1-255 visible ASCII
    characters, bare or quoted) or was sent more than once.
    """

    status, code = 400, "idempotency-key-invalid"
    step = "idempotency"
    advice = "send one well-formed key; nothing was forwarded"


class IdempotencyKeyMissing(ProxyError):
    """The route requires an ``Idempotency-Key`` and none was sent."""

    status, code = 400, "idempotency-key-missing"
    step = "idempotency"
    advice = "send a new random key per operation, and the same key on every retry of it"


class Unauthenticated(ProxyError):
    """No operator session, or one that is invalid, expired or ambiguous
    (``WWW-Authenticate`` says whether a token was presented).

    ``reason`` is one of the auth-failure metric's labels (missing, invalid, expired, ...).
    """

    status, code = 401, "unauthenticated"
    step = "session"
    advice = "sign in again; the reason is in the gateway's log under the `X-Request-ID`"

    def __init__(self, reason: str, *, token_presented: bool, log_detail: str = "") -> None:
        challenge = 'Bearer realm="catalyst-proxy"'
        if token_presented:
            challenge += ', error="invalid_token"'
        super().__init__(reason, headers={"WWW-Authenticate": challenge})
        self.log_detail = log_detail


class NotFound(ProxyError):
    """Not a route of this gateway."""

    status, code = 404, "not-found"
    step = "routing"
    advice = "check the path"


class MethodNotAllowed(ProxyError):
    """A known path, another method (``Allow`` lists the right ones)."""

    status, code = 405, "method-not-allowed"
    step = "routing"
    advice = "use a listed method"

    def __init__(self, allowed: tuple[str, ...]) -> None:
        super().__init__(headers={"Allow": ", ".join(allowed)})


class IdempotencyKeyInUse(ProxyError):
    """An earlier request with this key is still in progress."""

    status, code = 409, "idempotency-key-in-use"
    step = "idempotency"
    advice = "retry with the same key after `Retry-After`"

    def __init__(self) -> None:
        super().__init__(headers={"Retry-After": "1"})


class IdempotencyOutcomeUnknown(ProxyError):
    """An earlier attempt with this key may have been acted on, but its outcome
    is unknown; it is never forwarded again under this key.
    """

    status, code = 409, "idempotency-outcome-unknown"
    step = "idempotency"
    advice = "do not repeat it blindly under a new key: find out whether it happened first"


class IdempotencyReplayUnavailable(ProxyError):
    """The request with this key was done, but its answer was too large to
    record (or, in the memory store, no longer kept), so it cannot be replayed.
    """

    status, code = 409, "idempotency-replay-unavailable"
    step = "idempotency"
    advice = "do not repeat it under a new key: it happened once; look up its result"


class BodyTooLarge(ProxyError):
    """The request body is over ``CATALYST_MAX_BODY_BYTES``."""

    status, code = 413, "request-body-too-large"
    step = "body"
    advice = "send less"

    def __init__(self, limit: int) -> None:
        super().__init__(f"request body over {limit} bytes")


class UnsupportedContentEncoding(ProxyError):
    """The request body has a ``Content-Encoding`` other than ``identity`` (or a
    ``Transfer-Encoding`` other than ``chunked``)."""

    status, code = 415, "unsupported-content-encoding"
    step = "body"
    advice = "send it uncompressed"


class IdempotencyKeyReused(ProxyError):
    """This key was already used for a different request (another method, path,
    query or body).
    """

    status, code = 422, "idempotency-key-reused"
    step = "idempotency"
    advice = "a new request needs a new key; retry this one only with its own key"


class RateLimited(ProxyError):
    """This operator is over the route's rate limit (``Retry-After``,
    ``RateLimit-Policy`` and ``RateLimit`` say how long and which limit).
    """

    status, code = 429, "rate-limited"
    step = "rate-limit"
    advice = "wait `Retry-After` seconds, then retry (safe: nothing was forwarded)"


class HeaderFieldsTooLarge(ProxyError):
    """A header line is over 16 KiB, or the whole head over 64 KiB; the connection is closed
    after the answer."""

    status, code = 431, "request-header-fields-too-large"
    step = "protocol"
    advice = "send a shorter header (usually a smaller token or fewer cookies)"


class InternalError(ProxyError):
    """An unexpected fault in the gateway itself."""

    status, code = 500, "internal-error"
    step = "protocol"
    advice = "retry with the same `Idempotency-Key`; report the `X-Request-ID`"


class MintFailed(ProxyError):
    """The bridge token could not be signed."""

    status, code = 500, "sme-jwt-mint-failed"
    step = "bridge"
    advice = "operator: check the bridge secret"


class UpstreamBadResponse(ProxyError):
    """The SME gateway closed the connection or sent something that is not HTTP
    before a complete status line and headers, or an answer the gateway cannot
    pass on unchanged (a status under 100, a transfer coding other than chunked).
    """

    status, code = 502, "sme-gateway-bad-response"
    step = "exchange"
    forwarded = "unknown"  # "no" when it broke off before all was sent and no answer began
    advice = "retry only with the same `Idempotency-Key`; operator: check the SME gateway"


class OperatorKeysUnavailable(ProxyError):
    """No operator verification key is usable (the realm's JWKS was never
    fetched and there is no local key): the identity provider is down, the
    session may be fine.
    """

    status, code = 503, "operator-keys-unavailable"
    step = "session"
    advice = "retry after `Retry-After`; operator: check Keycloak"

    def __init__(self, reason: str = "keys_unavailable", *, retry_after: int = 5) -> None:
        super().__init__(reason, headers={"Retry-After": str(retry_after)})


class BridgeUnwired(ProxyError):
    """No bridge secret is configured: the marketplace is not enabled on this
    Sovereign.
    """

    status, code = 503, "sme-jwt-bridge-unwired"
    step = "bridge"
    advice = "operator: wire `sme-secrets/JWT_SECRET`"
    detail = (
        "the SME bridge secret is not configured (CATALYST_SME_JWT_SECRET, "
        "CATALYST_ORG_JWT_SECRET or CATALYST_SME_JWT_SECRET_FILE); the marketplace is not enabled"
    )


class UpstreamUnreachable(ProxyError):
    """The SME gateway cannot be reached (name, refused, unreachable, connect
    timeout, or the breaker is open): the marketplace is not enabled or is down.
    """

    status, code = 503, "sme-gateway-unreachable"
    step = "exchange"
    advice = (
        "safe to retry, even a POST (after `Retry-After` when sent); operator: check the SME tier"
    )
    detail = "the SME gateway could not be reached; the marketplace may not be enabled"


class GatewayOverloaded(ProxyError):
    """Too many requests are already waiting for an upstream connection, or this
    one's budget ran out while waiting; nothing was sent.
    """

    status, code = 503, "gateway-overloaded"
    step = "exchange"
    advice = "retry after `Retry-After` (safe, even a POST)"

    def __init__(self, reason: str = "") -> None:
        super().__init__(reason, headers={"Retry-After": "1"})


class RateLimitStoreUnavailable(ProxyError):
    """The shared rate-limit store cannot be reached and the gateway is set to
    refuse (``CATALYST_RATE_LIMIT_ON_STORE_ERROR=refuse``).
    """

    status, code = 503, "rate-limit-store-unavailable"
    step = "rate-limit"
    advice = "retry shortly; operator: check Redis/Valkey"


class IdempotencyStoreUnavailable(ProxyError):
    """A request with an ``Idempotency-Key`` arrived while the shared
    idempotency store cannot be reached; it was not forwarded.
    """

    status, code = 503, "idempotency-store-unavailable"
    step = "idempotency"
    advice = "retry with the same key; operator: check Redis/Valkey"


class UpstreamTimeout(ProxyError):
    """The SME gateway's response headers did not come within
    ``CATALYST_UPSTREAM_TIMEOUT_SECONDS`` from the start of the exchange (the wait
    for a connection and the sending of the request body count).
    """

    status, code = 504, "sme-gateway-timeout"
    step = "exchange"
    forwarded = "unknown"  # "no" when it broke off before all was sent and no answer began
    advice = "retry only with the same `Idempotency-Key`; operator: check the SME gateway's latency"


def every_error() -> tuple[type[ProxyError], ...]:
    """Every answer class of the tree, in the docstring's order (status, then name)."""
    return tuple(sorted(_leaves(ProxyError), key=lambda cls: (cls.status, cls.code)))


def _leaves(cls: type[ProxyError]) -> list[type[ProxyError]]:
    found: list[type[ProxyError]] = []
    for sub in cls.__subclasses__():
        found.append(sub)
        found.extend(_leaves(sub))
    return found
