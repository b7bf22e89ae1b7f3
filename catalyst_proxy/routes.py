"""The route table: which client paths go where upstream, as data.

A path is literal text, optionally with one ``{code}`` placeholder standing for
one whole path segment. Matching is done here rather than by aiohttp's router
because a blank segment must reach us (``/revoke/`` → 400 ``missing-code``, where
aiohttp's ``{code}`` would not match and answer 404) and because the code must
be taken from the *raw* path, so ``%2F`` stays inside the segment.

``CATALYST_ROUTES_FILE`` adds entries of the same shape (JSON or TOML, by
extension), each optionally with its own ``idempotency`` mode and
``rate_limit``; a bad file raises ``RoutesFileError`` naming the file and entry.
Methods are the standard ones, in any case (``post`` is ``POST``); anything
else (``FETCH``) is a bad entry.
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import quote, unquote_to_bytes

from .config import ROUTE_IDEMPOTENCY_MODES, Rate, parse_rate_limit

PLACEHOLDER = "{code}"
STANDARD_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
_KEYS = frozenset(
    {"methods", "path", "upstream_method", "upstream_path", "idempotency", "rate_limit"}
)
_LITERAL_PATH = re.compile(r"^/[A-Za-z0-9._~!$&'()*+,;=:@/-]*$")


@dataclass(frozen=True, slots=True)
class Route:
    """One client path and the upstream request it becomes."""

    methods: tuple[str, ...]
    path: str
    upstream_method: str
    upstream_path: str
    idempotency: str | None = None  # this route's mode; None: CATALYST_IDEMPOTENCY decides
    rate_limit: tuple[Rate, ...] | None = None  # None: CATALYST_RATE_LIMIT decides

    @property
    def templated(self) -> bool:
        return PLACEHOLDER in self.path

    def upstream_target(self, code: bytes | None) -> str:
        """The upstream path, with ``code`` percent-encoded as exactly one segment."""
        if code is None:
            return self.upstream_path
        return self.upstream_path.replace(PLACEHOLDER, encode_segment(code))


def encode_segment(code: bytes) -> str:
    """``code`` as one opaque path segment: every octet but the unreserved ones is escaped.

    ``.`` is unreserved, yet a segment of only dots is a dot-segment that a server
    normalises away (``/revoke/..`` is ``/``), so those dots are escaped too.
    """
    segment = quote(code, safe="")
    if segment.strip(".") == "":
        segment = segment.replace(".", "%2E")
    return segment


DEFAULT_ROUTES: tuple[Route, ...] = (
    Route(("POST",), "/api/v1/billing/purchase", "POST", "/api/billing/purchase"),
    Route(("POST",), "/api/v1/sme/billing/purchase", "POST", "/api/billing/purchase"),
    Route(("GET",), "/api/v1/sme/billing/vouchers/list", "GET", "/api/billing/vouchers/list"),
    Route(("POST",), "/api/v1/sme/billing/vouchers/issue", "POST", "/api/billing/vouchers/issue"),
    Route(
        ("POST", "DELETE"),
        "/api/v1/sme/billing/vouchers/revoke/{code}",
        "DELETE",
        "/api/billing/vouchers/revoke/{code}",
    ),
)


class Match(NamedTuple):  # made per request: a tuple is the cheapest immutable record
    route: Route
    code: bytes | None  # the percent-decoded, trimmed segment (bytes: any octet is kept)


class RouteTable:
    """Looks up a raw request path (no query) in the table."""

    def __init__(self, routes: Iterable[Route]) -> None:
        self.routes = tuple(routes)
        self._literal: dict[str, Route] = {}
        self._templated: list[tuple[str, str, Route]] = []
        for route in self.routes:
            if route.templated:
                prefix, suffix = route.path.split(PLACEHOLDER)
                self._templated.append((prefix, suffix, route))
                # The segment-less form (".../revoke") is the same route with a blank code.
                if not suffix:
                    self._literal.setdefault(prefix.rstrip("/"), route)
            else:
                self._literal[route.path] = route

    def match(self, raw_path: str) -> Match | None:
        route = self._literal.get(raw_path)
        if route is not None:
            return Match(route, b"" if route.templated else None)
        for prefix, suffix, route in self._templated:
            if (
                raw_path.startswith(prefix)
                and raw_path.endswith(suffix)
                and len(raw_path) >= len(prefix) + len(suffix)
            ):
                segment = raw_path[len(prefix) : len(raw_path) - len(suffix)]
                if "/" not in segment:
                    return Match(route, unquote_to_bytes(segment).strip())
        return None


class RoutesFileError(Exception):
    """The routes file is unreadable or an entry is wrong; the message names both."""


# The gateway's own endpoints (ops.py): answered before any route, so never a route's path.
HEALTHZ, READYZ, METRICS, OPENAPI_JSON = "/healthz", "/readyz", "/metrics", "/openapi.json"
OPERATIONS_PATHS = frozenset({HEALTHZ, READYZ, METRICS, OPENAPI_JSON})


def load_routes(path: str, existing: Iterable[Route] = ()) -> tuple[Route, ...]:
    """Parse ``CATALYST_ROUTES_FILE`` (``.json`` or ``.toml``) into routes.

    A path that ``existing`` (or an earlier entry) already routes, or one of the
    gateway's own endpoints (it could never be reached), is an error.
    """
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RoutesFileError(f"{path}: cannot read: {exc}") from None
    try:
        if file.suffix.lower() == ".json":
            document: Any = json.loads(text)
        elif file.suffix.lower() == ".toml":
            document = tomllib.loads(text)
        else:
            raise RoutesFileError(f"{path}: the extension must be .json or .toml")
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        raise RoutesFileError(f"{path}: not valid {file.suffix[1:].upper()}: {exc}") from None
    if not isinstance(document, Mapping) or not isinstance(document.get("routes"), list):
        raise RoutesFileError(f'{path}: expected a top-level "routes" list')
    taken = {route.path for route in existing}
    routes = []
    for index, entry in enumerate(document["routes"]):
        route = _route(path, index, entry)
        if route.path in taken:
            raise RoutesFileError(f"{path}: routes[{index}]: {route.path} is already routed")
        if route.path in OPERATIONS_PATHS:
            raise RoutesFileError(
                f"{path}: routes[{index}]: {route.path} is one of the gateway's own endpoints"
            )
        taken.add(route.path)
        routes.append(route)
    return tuple(routes)


def _route(path: str, index: int, entry: object) -> Route:
    def bad(problem: str) -> RoutesFileError:
        return RoutesFileError(f"{path}: routes[{index}]: {problem}")

    if not isinstance(entry, Mapping):
        raise bad("must be a table/object")
    unknown = set(entry) - _KEYS
    if unknown:
        raise bad(f"unknown key(s) {', '.join(sorted(unknown))}")
    standard = ", ".join(STANDARD_METHODS)
    methods = entry.get("methods")
    if not isinstance(methods, list) or not methods or not all(map(_method, methods)):
        raise bad(f'"methods" must be a non-empty list of standard HTTP methods ({standard})')
    upstream_method = entry.get("upstream_method")
    if not _method(upstream_method):
        raise bad(f'"upstream_method" must be a standard HTTP method ({standard})')
    client_path = _path(entry.get("path"), "path", bad)
    upstream_path = _path(entry.get("upstream_path"), "upstream_path", bad)
    if PLACEHOLDER in upstream_path and PLACEHOLDER not in client_path:
        raise bad('"upstream_path" uses {code} but "path" does not')
    idempotency = entry.get("idempotency")
    if isinstance(idempotency, str):
        idempotency = idempotency.lower()  # choices are case-insensitive, as in the environment
    if idempotency is not None and idempotency not in ROUTE_IDEMPOTENCY_MODES:
        raise bad(f'"idempotency" must be one of {", ".join(ROUTE_IDEMPOTENCY_MODES)}')
    rate_limit = entry.get("rate_limit")
    rates = None
    if rate_limit is not None:
        if not isinstance(rate_limit, str):
            raise bad('"rate_limit" must be a string such as "30/minute"')
        try:
            rates = parse_rate_limit(rate_limit)
        except ValueError as exc:
            raise bad(f'"rate_limit": {exc}') from None
    return Route(
        tuple(dict.fromkeys(m.upper() for m in methods)),
        client_path,
        str(upstream_method).upper(),
        upstream_path,
        idempotency,
        rates,
    )


def _method(value: object) -> bool:
    return isinstance(value, str) and value.upper() in STANDARD_METHODS


def _path(value: object, key: str, bad: Any) -> str:
    if not isinstance(value, str) or not value.startswith("/"):
        raise bad(f'"{key}" must be a string starting with "/"')
    literal = value.replace(PLACEHOLDER, "code")  # the placeholder stands for one segment
    if value.count(PLACEHOLDER) > 1 or not _LITERAL_PATH.match(literal):
        raise bad(f'"{key}" may hold plain path characters and at most one {PLACEHOLDER}')
    if PLACEHOLDER in value:
        before, after = value.split(PLACEHOLDER)
        if not before.endswith("/") or (after and not after.startswith("/")):
            raise bad(f'"{key}": {PLACEHOLDER} must be a whole path segment')
    if "//" in literal or "/./" in value or "/../" in value or value.endswith(("/.", "/..")):
        raise bad(f'"{key}" must be a normalised path')
    return value
