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


class ProxyError(Exception):
    status: int = 500
    code: str = "internal-error"
    detail: str | None = None
    forwarded: str = "no"

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
    """The request could not be parsed (answered by the protocol handler, before routing)."""

    status, code = 400, "bad-request"


class MissingCode(ProxyError):
    status, code = 400, "missing-code"


class IdempotencyKeyInvalid(ProxyError):
    status, code = 400, "idempotency-key-invalid"


class IdempotencyKeyMissing(ProxyError):
    status, code = 400, "idempotency-key-missing"


class Unauthenticated(ProxyError):
    """``reason`` is one of the auth-failure metric's labels (missing, invalid, expired, ...)."""

    status, code = 401, "unauthenticated"

    def __init__(self, reason: str, *, token_presented: bool, log_detail: str = "") -> None:
        challenge = 'Bearer realm="catalyst-proxy"'
        if token_presented:
            challenge += ', error="invalid_token"'
        super().__init__(reason, headers={"WWW-Authenticate": challenge})
        self.log_detail = log_detail


class NotFound(ProxyError):
    status, code = 404, "not-found"


class MethodNotAllowed(ProxyError):
    status, code = 405, "method-not-allowed"

    def __init__(self, allowed: tuple[str, ...]) -> None:
        super().__init__(headers={"Allow": ", ".join(allowed)})


class IdempotencyKeyInUse(ProxyError):
    status, code = 409, "idempotency-key-in-use"

    def __init__(self) -> None:
        super().__init__(headers={"Retry-After": "1"})


class IdempotencyOutcomeUnknown(ProxyError):
    status, code = 409, "idempotency-outcome-unknown"


class IdempotencyReplayUnavailable(ProxyError):
    status, code = 409, "idempotency-replay-unavailable"


class BodyTooLarge(ProxyError):
    status, code = 413, "request-body-too-large"

    def __init__(self, limit: int) -> None:
        super().__init__(f"request body over {limit} bytes")


class UnsupportedContentEncoding(ProxyError):
    status, code = 415, "unsupported-content-encoding"


class IdempotencyKeyReused(ProxyError):
    status, code = 422, "idempotency-key-reused"


class RateLimited(ProxyError):
    status, code = 429, "rate-limited"


class HeaderFieldsTooLarge(ProxyError):
    status, code = 431, "request-header-fields-too-large"


class InternalError(ProxyError):
    status, code = 500, "internal-error"


class MintFailed(ProxyError):
    status, code = 500, "sme-jwt-mint-failed"


class UpstreamBadResponse(ProxyError):
    status, code = 502, "sme-gateway-bad-response"


class OperatorKeysUnavailable(ProxyError):
    status, code = 503, "operator-keys-unavailable"

    def __init__(self, reason: str = "keys_unavailable", *, retry_after: int = 5) -> None:
        super().__init__(reason, headers={"Retry-After": str(retry_after)})


class BridgeUnwired(ProxyError):
    status, code = 503, "sme-jwt-bridge-unwired"
    detail = (
        "the SME bridge secret is not configured (CATALYST_SME_JWT_SECRET, "
        "CATALYST_ORG_JWT_SECRET or CATALYST_SME_JWT_SECRET_FILE); the marketplace is not enabled"
    )


class UpstreamUnreachable(ProxyError):
    status, code = 503, "sme-gateway-unreachable"
    detail = "the SME gateway could not be reached; the marketplace may not be enabled"


class GatewayOverloaded(ProxyError):
    status, code = 503, "gateway-overloaded"

    def __init__(self, reason: str = "") -> None:
        super().__init__(reason, headers={"Retry-After": "1"})


class RateLimitStoreUnavailable(ProxyError):
    status, code = 503, "rate-limit-store-unavailable"


class IdempotencyStoreUnavailable(ProxyError):
    status, code = 503, "idempotency-store-unavailable"


class UpstreamTimeout(ProxyError):
    status, code = 504, "sme-gateway-timeout"


def every_error() -> tuple[type[ProxyError], ...]:
    """Every answer class of the tree, in the docstring's order (status, then name)."""
    return tuple(sorted(_leaves(ProxyError), key=lambda cls: (cls.status, cls.code)))


def _leaves(cls: type[ProxyError]) -> list[type[ProxyError]]:
    found: list[type[ProxyError]] = []
    for sub in cls.__subclasses__():
        found.append(sub)
        found.extend(_leaves(sub))
    return found
