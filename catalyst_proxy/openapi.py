"""The OpenAPI 3.1 document of this gateway, built from the route table and the error tree.

Nothing here is written twice: each proxied route of the table (aliases from
``CATALYST_ROUTES_FILE`` included) becomes an operation per client method; the
answers it can make itself are the error classes whose ``step`` applies to
that route (every route: protocol, session, bridge, body, exchange; a
``{code}`` route: the code; a rate-limited route: the rate limit; a route
with idempotency: the key's answers), each status with its exact ``error``
codes. Any status may also be the SME gateway's own answer, passed through
unchanged (``X-Catalyst-Forwarded: yes``): our answers say ``no`` or
``unknown`` and have the documented JSON shape. Built once at start-up,
served at ``GET /openapi.json`` and printed by ``catalyst-proxy openapi``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from . import __version__
from . import headers as hdrs
from .errors import ProxyError, every_error
from .routes import HEALTHZ, METRICS, OPENAPI_JSON, PLACEHOLDER, READYZ, Route

ALWAYS = frozenset({"protocol", "session", "bridge", "body", "exchange"})
_JSON = "application/json"
# 1-255 visible ASCII characters, bare, or quoted with \" and \\ escapes (idempotency/keys.py).
_KEY_PATTERN = r'^(?:[!#-~][!-~]{0,254}|"(?:[!#-\[\]-~]|\\["\\]){1,255}")$'

_HEADERS: dict[str, dict[str, Any]] = {
    hdrs.REQUEST_ID: {
        "description": "The client's X-Request-ID when it is a sane token of at most 128 "
        "characters, else a new one; quote it when asking for help.",
        "required": True,
        "schema": {"type": "string", "pattern": r"^[A-Za-z0-9._~:@+=/-]{1,128}$"},
    },
    hdrs.FORWARDED: {
        "description": "Whether the request reached the SME gateway: `no` (safe to retry, even "
        "a POST), `yes` (its own answer, passed through or replayed), `unknown` (it may have "
        "been acted on: retry only with the same Idempotency-Key).",
        "required": True,
        "schema": {"type": "string", "enum": ["yes", "no", "unknown"]},
    },
    "Retry-After": {
        "description": "Seconds to wait before retrying.",
        "schema": {"type": "string"},
    },
    "WWW-Authenticate": {
        "description": 'Bearer realm="catalyst-proxy", with '
        'error="invalid_token" when a token was presented (RFC 6750).',
        "schema": {"type": "string"},
    },
    "RateLimit-Policy": {
        "description": "The route's rate limits (IETF httpapi "
        'ratelimit-headers), e.g. `"30-per-minute";q=30;w=60`.',
        "schema": {"type": "string"},
    },
    "RateLimit": {
        "description": 'The exhausted limit: `"30-per-minute";r=0;t=12`.',
        "schema": {"type": "string"},
    },
    hdrs.REPLAYED: {
        "description": "`true` on an answer replayed from an Idempotency-Key record.",
        "schema": {"type": "string", "enum": ["true"]},
    },
    "Allow": {
        "description": "The methods the path takes, on `405 method-not-allowed`.",
        "schema": {"type": "string"},
    },
}
_ERROR_HEADERS = {
    "RateLimited": ("Retry-After", "RateLimit-Policy", "RateLimit"),
    "Unauthenticated": ("WWW-Authenticate",),
    "OperatorKeysUnavailable": ("Retry-After",),
    "GatewayOverloaded": ("Retry-After",),
    "UpstreamUnreachable": ("Retry-After",),
    "IdempotencyKeyInUse": ("Retry-After",),
}


def document(
    routes: Iterable[Route],
    *,
    idempotency: Callable[[str], str],
    rate_limited: Callable[[str], bool],
    shared_store: bool = False,
    refuse_on_store_error: bool = False,
) -> dict[str, Any]:
    """The whole document. ``idempotency(path)`` is a route's mode, ``rate_limited(path)``
    whether it has a rate limit; ``shared_store``: Redis holds the records and counters
    (whose absence is a 503 for a key, and for a rate limit if ``refuse_on_store_error``)."""
    unreachable = set()
    if shared_store:
        unreachable.add("IdempotencyStoreUnavailable")
        if refuse_on_store_error:
            unreachable.add("RateLimitStoreUnavailable")
    paths: dict[str, Any] = {}
    for route in routes:
        operations = paths.setdefault(route.path, {})
        if route.templated:
            operations["parameters"] = [
                {
                    "name": "code",
                    "in": "path",
                    "required": True,
                    # At least one character that is not ASCII white space (what is trimmed).
                    "schema": {"type": "string", "pattern": r"[^\t\n\v\f\r ]"},
                    "description": "Trimmed, then sent upstream as one percent-encoded path "
                    "segment; blank is `400 missing-code`.",
                }
            ]
        for method in route.methods:
            operations[method.lower()] = _operation(
                route, method, idempotency(route.path), rate_limited(route.path), unreachable
            )
    _unique_operation_ids(paths)
    paths.update(_OPS_PATHS)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "catalyst-proxy",
            "version": __version__,
            "description": "The operator console's gateway to the SME billing gateway: an "
            "RS256 operator session in, an HS256 bridge token out, request and answer "
            "streamed unchanged, each request sent upstream at most once. Any other method "
            "on a documented path is `405 method-not-allowed` with `Allow` "
            "(components.responses.MethodNotAllowed); any other path is `404 not-found`.",
        },
        "paths": paths,
        "components": {
            "securitySchemes": {
                "operatorBearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"},
                "operatorCookie": {"type": "apiKey", "in": "cookie", "name": "catalyst_session"},
            },
            "headers": _HEADERS,
            "schemas": {"Error": _error_schema(every_error())},
            "responses": {
                "MethodNotAllowed": _routing_answer("method-not-allowed", "Allow"),
                "NotFound": _routing_answer("not-found"),
            },
        },
    }


def _can_answer(name: str, mode: str, unreachable: set[str]) -> bool:
    if name == "IdempotencyKeyMissing":
        return mode == "required"
    if name.endswith("StoreUnavailable"):  # only a shared store's absence is answered
        return name in unreachable
    return True


def _operation(
    route: Route, method: str, mode: str, limited: bool, unreachable: set[str]
) -> dict[str, Any]:
    """One route's method; ``unreachable``: the store errors this configuration can answer."""
    steps = set(ALWAYS)
    if route.templated:
        steps.add("code")
    if limited:
        steps.add("rate-limit")
    if mode != "off":
        steps.add("idempotency")
    errors = [
        cls
        for cls in every_error()
        if cls.step in steps and _can_answer(cls.__name__, mode, unreachable)
    ]
    responses: dict[str, Any] = {
        "default": {
            "description": "The SME gateway's own answer (any status), streamed back unchanged: "
            "its body and Content-Type, Content-Encoding, Cache-Control, Location, Retry-After "
            "and ETag; never Set-Cookie or Server.",
            "headers": _refs(hdrs.REQUEST_ID, hdrs.FORWARDED, hdrs.REPLAYED),
            "content": {"*/*": {"schema": {}}},
        }
    }
    for status in sorted({cls.status for cls in errors}):
        at_status = [cls for cls in errors if cls.status == status]
        extra = sorted({h for cls in at_status for h in _ERROR_HEADERS.get(cls.__name__, ())})
        responses[str(status)] = {
            "description": "; ".join(f"`{cls.code}`: {_meaning(cls)}" for cls in at_status)
            + ". Or the SME gateway's own answer with this status (X-Catalyst-Forwarded: yes).",
            "headers": _refs(hdrs.REQUEST_ID, hdrs.FORWARDED, hdrs.REPLAYED, *extra),
            "content": {
                _JSON: {"schema": {"anyOf": [_error_schema(at_status), {}]}},
                "*/*": {"schema": {}},
            },
        }
    parameters: list[dict[str, Any]] = [
        {
            "name": hdrs.REQUEST_ID,
            "in": "header",
            "required": False,
            "schema": {"type": "string"},
            "description": "Kept when sane, else replaced.",
        },
    ]
    if mode != "off":
        parameters.append(
            {
                "name": "Idempotency-Key",
                "in": "header",
                "required": mode == "required",
                "schema": {"type": "string", "pattern": _KEY_PATTERN},
                "description": "1-255 visible ASCII characters, bare or quoted: a repeat with "
                "the same key and request replays the first answer instead of acting twice. "
                f"This route: {mode}.",
            }
        )
    operation: dict[str, Any] = {
        "summary": f"{route.upstream_method} {route.upstream_path} on the SME gateway",
        "operationId": _operation_id(method, route.path),
        "security": [{"operatorBearer": []}, {"operatorCookie": []}],
        "parameters": parameters,
        "responses": responses,
    }
    if method in ("POST", "PUT", "PATCH", "DELETE"):
        operation["requestBody"] = {
            "required": False,
            "description": "Streamed to the SME gateway byte for byte (no Content-Encoding).",
            "content": {_JSON: {"schema": {}}, "*/*": {"schema": {}}},
        }
    return operation


def _routing_answer(code: str, *headers: str) -> dict[str, Any]:
    """An answer of the routing step (no operation of its own: any path, any method)."""
    [cls] = [cls for cls in every_error() if cls.code == code]
    return {
        "description": f"`{code}`: {_meaning(cls)}.",
        "headers": _refs(hdrs.REQUEST_ID, hdrs.FORWARDED, *headers),
        "content": {_JSON: {"schema": _error_schema([cls])}},
    }


def _error_schema(errors: Iterable[type[ProxyError]]) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {"type": "string", "enum": sorted({cls.code for cls in errors})},
            "detail": {"type": "string"},
        },
        "additionalProperties": False,
    }


def _meaning(cls: type[ProxyError]) -> str:
    return " ".join((cls.__doc__ or cls.code).split("\n\n")[0].split()).rstrip(".")


def _refs(*names: str) -> dict[str, Any]:
    return {name: {"$ref": f"#/components/headers/{name}"} for name in names}


def _unique_operation_ids(paths: dict[str, Any]) -> None:
    """OpenAPI requires operationIds to be unique; two paths may spell one (``/a-b``,
    ``/a/b``): a later one gets a number, in the table's order."""
    seen: set[str] = set()
    for operations in paths.values():
        for operation in operations.values():
            if not isinstance(operation, dict) or "operationId" not in operation:
                continue  # the path's parameters
            base = name = operation["operationId"]
            number = 1
            while name in seen:
                number += 1
                name = f"{base}{number}"
            operation["operationId"] = name
            seen.add(name)


def _operation_id(method: str, path: str) -> str:
    words = [part for part in path.replace(PLACEHOLDER, "by-code").split("/") if part]
    return method.lower() + "".join(word.title().replace("-", "") for word in words)


def _ops(
    name: str, summary: str, content: str, schema: dict[str, Any], *statuses: str
) -> dict[str, Any]:
    return {
        "get": {
            "summary": summary,
            "operationId": name,
            "responses": {
                status: {
                    "description": summary,
                    "headers": _refs(hdrs.REQUEST_ID, hdrs.FORWARDED),
                    "content": {content: {"schema": schema}},
                }
                for status in statuses
            },
        }
    }


_OPS_PATHS = {
    HEALTHZ: _ops(
        "getHealthz",
        "Liveness",
        _JSON,
        {"type": "object", "required": ["status"], "properties": {"status": {"const": "ok"}}},
        "200",
    ),
    READYZ: _ops(
        "getReadyz",
        "Readiness: 200 when operator keys are usable; 503 with reasons otherwise",
        _JSON,
        {"type": "object", "required": ["status", "reasons"]},
        "200",
        "503",
    ),
    METRICS: _ops("getMetrics", "Prometheus metrics", "text/plain", {"type": "string"}, "200"),
    OPENAPI_JSON: _ops("getOpenapi", "This document", _JSON, {"type": "object"}, "200"),
}
