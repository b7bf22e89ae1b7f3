"""Settings: every environment variable of CONTRACT.md, read and validated once.

``Settings.from_env(environ)`` takes a plain mapping (tests pass dicts) and
raises ``ConfigError(variable, problem)`` for the first bad value; only the CLI
turns that into a message and exit status 2. This module imports nothing from
the package.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

DEFAULT_GATEWAY_URL = "http://gateway.org-services.svc.cluster.local:8080"
DEFAULT_REALM = "sovereign"
_REALM = re.compile(r"[A-Za-z0-9._~-]+")
# The JWKS is re-fetched every cache period: below a second that is hammering the IdP.
MIN_JWKS_CACHE_SECONDS = 1.0
ASYMMETRIC_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)


class ConfigError(Exception):
    """A configuration value is missing or wrong; ``str()`` is the one-line message."""

    def __init__(self, variable: str, problem: str) -> None:
        super().__init__(f"{variable}: {problem}")
        self.variable = variable
        self.problem = problem


@dataclass(frozen=True, slots=True)
class Settings:
    """The gateway's whole configuration; built by :meth:`from_env`."""

    gateway_url: str = DEFAULT_GATEWAY_URL
    jwks_url: str | None = None
    public_key_file: str | None = None
    jwks_cache_seconds: float = 600.0
    jwks_timeout_seconds: float = 3.0
    token_algorithms: tuple[str, ...] = ("RS256",)
    token_leeway_seconds: float = 30.0
    token_issuers: tuple[str, ...] = ()
    token_audiences: tuple[str, ...] = ()
    session_cookie_secret: bytes | None = field(default=None, repr=False)
    operator_email: str | None = None
    bridge_secret: bytes | None = field(default=None, repr=False)
    bridge_secret_file: str | None = None
    max_body_bytes: int = 1024 * 1024
    upstream_timeout_seconds: float = 3.0
    routes_file: str | None = None
    shutdown_grace_seconds: float = 10.0
    log_format: str = "json"
    log_level: str = "info"

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Settings:
        """Read and validate every variable; raise ConfigError on the first bad one."""
        env = _Env(environ)
        settings = cls(
            gateway_url=_gateway_url(env),
            jwks_url=_jwks_url(env),
            public_key_file=env.text("CATALYST_SESSION_PUBLIC_KEY_FILE"),
            jwks_cache_seconds=env.seconds(
                "CATALYST_JWKS_CACHE_SECONDS", 600.0, minimum=MIN_JWKS_CACHE_SECONDS
            ),
            jwks_timeout_seconds=env.seconds("CATALYST_JWKS_TIMEOUT_SECONDS", 3.0, positive=True),
            token_algorithms=_algorithms(env),
            token_leeway_seconds=env.seconds("CATALYST_TOKEN_LEEWAY_SECONDS", 30.0),
            token_issuers=env.csv("CATALYST_TOKEN_ISSUER"),
            token_audiences=env.csv("CATALYST_TOKEN_AUDIENCE"),
            session_cookie_secret=env.secret("CATALYST_SESSION_COOKIE_SECRET"),
            operator_email=env.text("OPERATOR_EMAIL"),
            bridge_secret=(
                env.secret("CATALYST_SME_JWT_SECRET") or env.secret("CATALYST_ORG_JWT_SECRET")
            ),
            bridge_secret_file=env.text("CATALYST_SME_JWT_SECRET_FILE"),
            max_body_bytes=env.integer("CATALYST_MAX_BODY_BYTES", 1024 * 1024),
            upstream_timeout_seconds=env.seconds(
                "CATALYST_UPSTREAM_TIMEOUT_SECONDS", 3.0, positive=True
            ),
            routes_file=env.text("CATALYST_ROUTES_FILE"),
            shutdown_grace_seconds=env.seconds("CATALYST_SHUTDOWN_GRACE_SECONDS", 10.0),
            log_format=env.choice("CATALYST_LOG_FORMAT", ("json", "console"), "json"),
            log_level=env.choice(
                "CATALYST_LOG_LEVEL", ("debug", "info", "warning", "error"), "info"
            ),
        )
        if settings.jwks_url is None and settings.public_key_file is None:
            raise ConfigError(
                "CATALYST_JWKS_URL",
                "no operator key source: set CATALYST_JWKS_URL, CATALYST_KC_ADDR or "
                "CATALYST_SESSION_PUBLIC_KEY_FILE (the gateway never runs without authentication)",
            )
        return settings

    @property
    def bridge_secret_configured(self) -> bool:
        return self.bridge_secret is not None or self.bridge_secret_file is not None


class _Env:
    """Typed reads of one environment mapping; blank counts as unset."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self._environ = environ

    def text(self, name: str) -> str | None:
        value = self._environ.get(name, "").strip()
        return value or None

    def secret(self, name: str) -> bytes | None:
        value = self._environ.get(name, "").strip()
        return value.encode() if value else None

    def csv(self, name: str) -> tuple[str, ...]:
        raw = self.text(name)
        if raw is None:
            return ()
        return tuple(part.strip() for part in raw.split(",") if part.strip())

    def seconds(
        self, name: str, default: float, *, positive: bool = False, minimum: float = 0.0
    ) -> float:
        raw = self.text(name)
        if raw is None:
            return default
        try:
            value = float(raw)
        except ValueError:
            raise ConfigError(name, f"must be a number of seconds, got {raw!r}") from None
        if not math.isfinite(value) or value < minimum or (positive and value == 0):
            bound = (
                f"of at least {minimum:g}"
                if minimum
                else ("greater than 0" if positive else "0 or more")
            )
            raise ConfigError(name, f"must be a number of seconds {bound}, got {raw!r}")
        return value

    def integer(self, name: str, default: int) -> int:
        raw = self.text(name)
        if raw is None:
            return default
        try:
            value = int(raw)
        except ValueError:
            raise ConfigError(name, f"must be a whole number of bytes, got {raw!r}") from None
        if value < 0:
            raise ConfigError(name, f"must be 0 or more, got {raw!r}")
        return value

    def choice(self, name: str, allowed: tuple[str, ...], default: str) -> str:
        raw = self.text(name)
        if raw is None:
            return default
        if raw.lower() not in allowed:
            raise ConfigError(name, f"must be one of {', '.join(allowed)}, got {raw!r}")
        return raw.lower()


def _url(name: str, raw: str, *, base: bool = False) -> str:
    """An http(s) URL with a host; a ``base`` URL (to append paths to) has no query or fragment."""
    problem = _url_problem(raw, base)
    if problem is not None:
        raise ConfigError(name, problem)
    return raw


def _url_problem(raw: str, base: bool) -> str | None:
    try:
        parts = urlsplit(raw)
        parts.port  # noqa: B018 (raises ValueError for a bad port)
    except ValueError:
        return f"is not a valid URL, got {raw!r}"
    if parts.username is not None or parts.password is not None:
        return "must not hold credentials"  # and the value is not repeated
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return f"must be an http:// or https:// URL with a host, got {raw!r}"
    if parts.fragment or raw.endswith("#") or (base and (parts.query or raw.endswith("?"))):
        return f"must not have a {'query or ' if base else ''}fragment, got {raw!r}"
    return None


def _gateway_url(env: _Env) -> str:
    for name in ("CATALYST_SME_GATEWAY_URL", "CATALYST_ORG_GATEWAY_URL"):
        raw = env.text(name)
        if raw is not None:
            return _url(name, raw, base=True).rstrip("/")
    return DEFAULT_GATEWAY_URL


def _jwks_url(env: _Env) -> str | None:
    raw = env.text("CATALYST_JWKS_URL")
    if raw is not None:
        return _url("CATALYST_JWKS_URL", raw)
    addr = env.text("CATALYST_KC_ADDR")
    if addr is None:
        return None
    realm = env.text("CATALYST_KC_REALM") or DEFAULT_REALM
    if not _REALM.fullmatch(realm) or not realm.strip("."):
        raise ConfigError("CATALYST_KC_REALM", f"must be a realm name, got {realm!r}")
    base = _url("CATALYST_KC_ADDR", addr, base=True).rstrip("/")
    return f"{base}/realms/{realm}/protocol/openid-connect/certs"


def _algorithms(env: _Env) -> tuple[str, ...]:
    names = env.csv("CATALYST_TOKEN_ALGORITHMS") or ("RS256",)
    for name in names:
        if name not in ASYMMETRIC_ALGORITHMS:
            raise ConfigError(
                "CATALYST_TOKEN_ALGORITHMS",
                f"{name!r} is not an asymmetric JWS algorithm "
                f"(allowed: {', '.join(sorted(ASYMMETRIC_ALGORITHMS))})",
            )
    return names
