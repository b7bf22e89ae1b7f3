"""Every answer the gateway makes on its own, as one exception tree.

::

    ProxyError                         status  error
    ├── MissingCode                    400     missing-code
    ├── Unauthenticated                401     unauthenticated
    ├── NotFound                       404     not-found
    ├── MethodNotAllowed               405     method-not-allowed   (+ Allow)
    ├── BodyTooLarge                   413     request-body-too-large
    ├── UnsupportedContentEncoding     415     unsupported-content-encoding
    ├── MintFailed                     500     sme-jwt-mint-failed
    ├── UpstreamBadResponse            502     sme-gateway-bad-response
    ├── OperatorKeysUnavailable        503     operator-keys-unavailable  (+ Retry-After)
    ├── BridgeUnwired                  503     sme-jwt-bridge-unwired
    ├── UpstreamUnreachable            503     sme-gateway-unreachable
    └── UpstreamTimeout                504     sme-gateway-timeout

Bodies are ``{"error": code}``, plus ``"detail"`` (a short sentence for
humans, never a token or a secret) on the two answers whose detail the
contract promises: ``sme-jwt-bridge-unwired`` and ``sme-gateway-unreachable``.
``reason`` is for the log only (and the auth-failure metric): it never
reaches the client.
"""

from __future__ import annotations

from collections.abc import Mapping


class ProxyError(Exception):
    status: int = 500
    code: str = "internal-error"
    detail: str | None = None

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


class MissingCode(ProxyError):
    status, code = 400, "missing-code"


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


class BodyTooLarge(ProxyError):
    status, code = 413, "request-body-too-large"

    def __init__(self, limit: int) -> None:
        super().__init__(f"request body over {limit} bytes")


class UnsupportedContentEncoding(ProxyError):
    status, code = 415, "unsupported-content-encoding"


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


class UpstreamTimeout(ProxyError):
    status, code = 504, "sme-gateway-timeout"
