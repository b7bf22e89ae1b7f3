"""Settings: every environment variable the gateway reads, declared, read and validated once.

``VARIABLES`` is the one place a variable is declared (name, default, meaning):
the README's configuration table, the reference in ``docs/`` and the Helm
chart's coverage are all checked against it. ``Settings.from_env(environ)``
takes a plain mapping (tests pass dicts) and raises ``ConfigError(variable,
problem)`` for the first bad value; only the CLI turns that into a message and
exit status 2. This module imports nothing from the package.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, urlsplit

from .numerals import decimal, whole

DEFAULT_GATEWAY_URL = "http://gateway.org-services.svc.cluster.local:8080"
DEFAULT_REALM = "sovereign"
_REALM = re.compile(r"[A-Za-z0-9._~-]+")
# The JWKS is re-fetched every cache period: below a second that is hammering the IdP.
MIN_JWKS_CACHE_SECONDS = 1.0
MAX_SECONDS = 10 * 365 * 86400.0  # any duration: ten years
MAX_INTEGER = 2**63 - 1  # any count or size: what a C int64 (and orjson) takes
# A base URL's path (sent before every upstream target): RFC 3986 path characters, %XX.
_BASE_PATH = re.compile(r"(?:[A-Za-z0-9._~!$&'()*+,;=:@/-]|%[0-9A-Fa-f]{2})*")
ASYMMETRIC_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)


@dataclass(frozen=True, slots=True)
class Variable:
    """One environment variable: its name, its default as documented, what it means."""

    name: str
    default: str | None
    meaning: str


VARIABLES: tuple[Variable, ...] = (
    Variable("CATALYST_SME_GATEWAY_URL", None,
             "SME gateway base URL (trailing `/` trimmed)"),
    Variable("CATALYST_ORG_GATEWAY_URL", DEFAULT_GATEWAY_URL,
             "the platform's newer name, used when the one above is unset"),
    Variable("CATALYST_UPSTREAM_TIMEOUT_SECONDS", "3",
             "budget from the start of the exchange to the upstream's response headers "
             "(the wait for a connection included), and for each wait for the next piece "
             "of its body"),
    Variable("CATALYST_UPSTREAM_MAX_CONNECTIONS", "100",
             "most upstream connections open at once (per process)"),
    Variable("CATALYST_UPSTREAM_MAX_PENDING", "1000",
             "most requests waiting for a free upstream connection; the next gets "
             "`503 gateway-overloaded` (`0`: no waiting at all)"),
    Variable("CATALYST_UPSTREAM_IDLE_SECONDS", "15",
             "an idle upstream connection closes after this long (keep it below the SME "
             "gateway's own idle timeout)"),
    Variable("CATALYST_BREAKER_FAILURES", "5",
             "connection failures in a row that open the breaker (`0`: no breaker)"),
    Variable("CATALYST_BREAKER_COOLDOWN_SECONDS", "5",
             "how long an open breaker answers 503 at once before one trial request"),
    Variable("CATALYST_JWKS_URL", None, "the realm's JWKS URL"),
    Variable("CATALYST_KC_ADDR", None,
             "Keycloak base URL; JWKS is "
             "`$CATALYST_KC_ADDR/realms/$CATALYST_KC_REALM/protocol/openid-connect/certs`"),
    Variable("CATALYST_KC_REALM", DEFAULT_REALM, "realm for the above"),
    Variable("CATALYST_SESSION_PUBLIC_KEY_FILE", None,
             "PEM file with one or more operator public keys (tokens without `kid`)"),
    Variable("CATALYST_JWKS_CACHE_SECONDS", "600",
             "how long a fetched JWKS is used before a refresh"),
    Variable("CATALYST_JWKS_TIMEOUT_SECONDS", "3", "time limit of one JWKS fetch"),
    Variable("CATALYST_TOKEN_ALGORITHMS", "RS256",
             "accepted operator-token algorithms, asymmetric only"),
    Variable("CATALYST_TOKEN_LEEWAY_SECONDS", "30", "clock leeway for `exp`, `nbf`, `iat`"),
    Variable("CATALYST_TOKEN_ISSUER", None, "accepted `iss` values (comma-separated, exact)"),
    Variable("CATALYST_TOKEN_AUDIENCE", None,
             "required `aud` values (comma-separated, exact; one must match)"),
    Variable("CATALYST_SESSION_COOKIE_SECRET", None,
             "when set, the `catalyst_session` cookie must be `<jwt>.<HMAC-SHA256>`"),
    Variable("OPERATOR_EMAIL", None, "this verified email is treated as the Sovereign's owner"),
    Variable("CATALYST_SME_JWT_SECRET", None, "the bridge secret (`sme-secrets/JWT_SECRET`)"),
    Variable("CATALYST_ORG_JWT_SECRET", None, "used when the one above is unset"),
    Variable("CATALYST_SME_JWT_SECRET_FILE", None,
             "a file holding the bridge secret, re-read when it changes"),
    Variable("CATALYST_MAX_BODY_BYTES", "1048576", "largest request body"),
    Variable("CATALYST_ROUTES_FILE", None,
             "extra route aliases (`.json` or `.toml`), with per-route `idempotency` and "
             "`rate_limit`"),
    Variable("CATALYST_RATE_LIMIT", None,
             "per operator and route, e.g. `30/minute` or `5/second;100/hour` (unset: no limit)"),
    Variable("CATALYST_RATE_LIMIT_ON_STORE_ERROR", "allow",
             "when the shared store cannot be reached: `allow` (counted and logged) or "
             "`refuse` (`503 rate-limit-store-unavailable`)"),
    Variable("CATALYST_REDIS_URL", None,
             "Redis/Valkey (`redis://` or `rediss://`) shared by every worker and replica for "
             "rate-limit counters and idempotency records (unset: in-process)"),
    Variable("CATALYST_REDIS_PASSWORD_FILE", None,
             "a file holding the Redis password (instead of one in the URL)"),
    Variable("CATALYST_IDEMPOTENCY", "auto",
             "`auto` (optional on the purchase and voucher-issue upstreams), `off`, "
             "`optional` or `required` on every proxied route"),
    Variable("CATALYST_IDEMPOTENCY_TTL_SECONDS", "86400",
             "how long an `Idempotency-Key`'s record (and its answer) is kept"),
    Variable("CATALYST_IDEMPOTENCY_MAX_BODY_BYTES", "65536",
             "largest answer body recorded for replay"),
    Variable("CATALYST_SHUTDOWN_GRACE_SECONDS", "10",
             "how long in-flight requests may finish after SIGTERM"),
    Variable("CATALYST_LOG_FORMAT", "json", "`json` (one object per line) or `console`"),
    Variable("CATALYST_LOG_LEVEL", "info", "`debug`, `info`, `warning`, `error`"),
)  # fmt: skip
DECLARED = frozenset(variable.name for variable in VARIABLES)

IDEMPOTENCY_MODES = ("auto", "off", "optional", "required")
ROUTE_IDEMPOTENCY_MODES = ("off", "optional", "required")
RATE_PERIODS = {"second": 1, "minute": 60, "hour": 3600, "day": 86400}
_RATE = re.compile(r"\s*([0-9]+)\s*(?:/|\s+per\s+)\s*([a-z]+?)s?\s*", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class Rate:
    """``amount`` requests per ``period`` (one of RATE_PERIODS)."""

    amount: int
    period: str

    @property
    def seconds(self) -> int:
        return RATE_PERIODS[self.period]

    def __str__(self) -> str:
        return f"{self.amount}/{self.period}"


def parse_rate_limit(text: str) -> tuple[Rate, ...]:
    """``"5/second;100/hour"`` (or ``"5 per second"``) → its rates; ValueError if malformed."""
    rates = []
    for part in text.split(";"):
        match = _RATE.fullmatch(part)
        if match is None or match.group(2).lower() not in RATE_PERIODS:
            raise ValueError(f"{part.strip()!r} is not N/second|minute|hour|day (or N per PERIOD)")
        amount = int(match.group(1))
        if amount < 1:
            raise ValueError(f"{part.strip()!r}: the number of requests must be at least 1")
        rates.append(Rate(amount, match.group(2).lower()))
    return tuple(rates)


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
    upstream_max_connections: int = 100
    upstream_max_pending: int = 1000
    upstream_idle_seconds: float = 15.0
    breaker_failures: int = 5
    breaker_cooldown_seconds: float = 5.0
    routes_file: str | None = None
    rate_limit: tuple[Rate, ...] = ()
    rate_limit_on_store_error: str = "allow"
    redis_url: str | None = field(default=None, repr=False)  # may hold a password
    redis_password_file: str | None = None
    idempotency: str = "auto"
    idempotency_ttl_seconds: float = 86400.0
    idempotency_max_body_bytes: int = 65536
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
            max_body_bytes=env.integer("CATALYST_MAX_BODY_BYTES", 1024 * 1024, unit="bytes"),
            upstream_timeout_seconds=env.seconds(
                "CATALYST_UPSTREAM_TIMEOUT_SECONDS", 3.0, positive=True
            ),
            upstream_max_connections=env.integer(
                "CATALYST_UPSTREAM_MAX_CONNECTIONS", 100, unit="connections", minimum=1
            ),
            upstream_max_pending=env.integer(
                "CATALYST_UPSTREAM_MAX_PENDING", 1000, unit="requests"
            ),
            upstream_idle_seconds=env.seconds(
                "CATALYST_UPSTREAM_IDLE_SECONDS", 15.0, positive=True
            ),
            breaker_failures=env.integer("CATALYST_BREAKER_FAILURES", 5, unit="failures"),
            breaker_cooldown_seconds=env.seconds(
                "CATALYST_BREAKER_COOLDOWN_SECONDS", 5.0, positive=True
            ),
            routes_file=env.text("CATALYST_ROUTES_FILE"),
            rate_limit=_rate_limit(env),
            rate_limit_on_store_error=env.choice(
                "CATALYST_RATE_LIMIT_ON_STORE_ERROR", ("allow", "refuse"), "allow"
            ),
            redis_url=_redis_url(env),
            redis_password_file=env.text("CATALYST_REDIS_PASSWORD_FILE"),
            idempotency=env.choice("CATALYST_IDEMPOTENCY", IDEMPOTENCY_MODES, "auto"),
            idempotency_ttl_seconds=env.seconds(
                "CATALYST_IDEMPOTENCY_TTL_SECONDS", 86400.0, minimum=1.0
            ),
            idempotency_max_body_bytes=env.integer(
                "CATALYST_IDEMPOTENCY_MAX_BODY_BYTES", 65536, unit="bytes"
            ),
            shutdown_grace_seconds=env.seconds("CATALYST_SHUTDOWN_GRACE_SECONDS", 10.0),
            log_format=env.choice("CATALYST_LOG_FORMAT", ("json", "console"), "json"),
            log_level=env.choice(
                "CATALYST_LOG_LEVEL", ("debug", "info", "warning", "error"), "info"
            ),
        )
        if settings.redis_password_file and settings.redis_url is None:
            raise ConfigError(
                "CATALYST_REDIS_PASSWORD_FILE", "is set but CATALYST_REDIS_URL is not"
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

    def check_workers(self, workers: int) -> None:
        """``--workers N``: an explicit idempotency mode needs a store every worker shares."""
        if workers > 1 and self.redis_url is None and self.idempotency in ("optional", "required"):
            raise ConfigError(
                "CATALYST_IDEMPOTENCY",
                f"{self.idempotency!r} with --workers {workers} needs CATALYST_REDIS_URL "
                "(each worker's memory store would miss retries that reach another worker)",
            )


class _Env:
    """Typed reads of one environment mapping; blank counts as unset."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self._environ = environ

    def _raw(self, name: str) -> str:
        assert name in DECLARED, f"{name} is not declared in VARIABLES"
        return self._environ.get(name, "").strip()

    def text(self, name: str) -> str | None:
        return self._raw(name) or None

    def secret(self, name: str) -> bytes | None:
        """The variable's bytes as the environment held them (Python decodes the environment
        with ``surrogateescape``: a byte that is not UTF-8 comes back as it was, as the SME
        gateway reads its own copy of the secret)."""
        assert name in DECLARED, f"{name} is not declared in VARIABLES"
        value = self._environ.get(name, "").encode("utf-8", "surrogateescape").strip()
        return value or None  # (bytes.strip(): ASCII white space, as the secret file's)

    def csv(self, name: str) -> tuple[str, ...]:
        raw = self.text(name)
        if raw is None:
            return ()
        parts = tuple(part.strip() for part in raw.split(",") if part.strip())
        if not parts:  # set, but to commas: not the same as unset (a check left off)
            raise ConfigError(name, f"must list at least one value, got {raw!r}")
        return parts

    def seconds(
        self, name: str, default: float, *, positive: bool = False, minimum: float = 0.0
    ) -> float:
        raw = self.text(name)
        if raw is None:
            return default
        try:
            value = decimal(raw)
        except ValueError:
            raise ConfigError(name, f"must be a number of seconds, got {raw!r}") from None
        if value > MAX_SECONDS:  # Redis and the event loop take milliseconds: they must fit
            # (1e400 too: decimal notation, read as infinity)
            raise ConfigError(name, f"must be at most {MAX_SECONDS:g} s (ten years), got {raw!r}")
        if not math.isfinite(value) or value < minimum or (positive and value == 0):
            bound = (
                f"of at least {minimum:g}"
                if minimum
                else ("greater than 0" if positive else "0 or more")
            )
            raise ConfigError(name, f"must be a number of seconds {bound}, got {raw!r}")
        return value

    def integer(self, name: str, default: int, *, unit: str, minimum: int = 0) -> int:
        raw = self.text(name)
        if raw is None:
            return default
        try:
            value = whole(raw)
        except ValueError:
            raise ConfigError(name, f"must be a whole number of {unit}, got {raw!r}") from None
        if value < minimum:
            raise ConfigError(name, f"must be {minimum} or more, got {raw!r}")
        if value > MAX_INTEGER:
            raise ConfigError(name, f"must be at most {MAX_INTEGER} (2**63 - 1), got {raw!r}")
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
    # The value is never repeated: a URL may carry a credential anywhere (user info, a query,
    # a path), and one too broken to parse may still hold a password.
    try:
        parts = urlsplit(raw)
        parts.port  # noqa: B018 (raises ValueError for a bad port)
    except ValueError:
        return "is not a valid URL"
    if parts.username is not None or parts.password is not None:
        return "must not hold credentials"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "must be an http:// or https:// URL with a host"
    try:  # what the clients send as the Host field and resolve
        parts.hostname.encode("idna")
    except UnicodeError:
        return "must name a host that is a valid DNS name or address"
    if parts.port == 0:
        return "must not name port 0"
    if base and not _BASE_PATH.fullmatch(parts.path):  # it goes into every request line
        return "must have a path of URL characters (percent-encode the others)"
    if parts.fragment or raw.endswith("#") or (base and (parts.query or raw.endswith("?"))):
        return f"must not have a {'query or ' if base else ''}fragment"
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


def _rate_limit(env: _Env) -> tuple[Rate, ...]:
    raw = env.text("CATALYST_RATE_LIMIT")
    if raw is None:
        return ()
    try:
        return parse_rate_limit(raw)
    except ValueError as exc:
        raise ConfigError("CATALYST_RATE_LIMIT", str(exc)) from None


# The options CATALYST_REDIS_URL's query may set, and the values each takes (a regular
# expression): the connection's keep-alive, health checks and name, and TLS for rediss://.
# Not the timeouts (the gateway's bounds: a keyed request meets 503 within them when Redis
# does not answer), the pool's size or wait, retries, the protocol or the replies' decoding,
# which the gateway sets; not a user or password (the URL's user info, or
# CATALYST_REDIS_PASSWORD_FILE). redis-py reads `socket_keepalive` and `ssl_check_hostname`
# as false for 0, f, false, n, no (any case) and as true for anything else.
_YES_NO = r"(?i:true|false|yes|no|1|0)"
REDIS_OPTIONS: dict[str, str] = {
    "socket_keepalive": _YES_NO,
    "health_check_interval": r"[0-9]{1,5}",  # whole seconds
    "client_name": r"[A-Za-z0-9._:-]{1,64}",  # (Redis refuses a name with spaces)
    "ssl_cert_reqs": r"none|optional|required",  # (redis-py reads these spellings only)
    "ssl_check_hostname": _YES_NO,
    "ssl_ca_certs": r"[^\x00]+",  # paths
    "ssl_ca_path": r"[^\x00]+",
    "ssl_certfile": r"[^\x00]+",
    "ssl_keyfile": r"[^\x00]+",
    "ssl_password": r"[^\x00]+",
    "ssl_ciphers": r"[ -~]+",  # (OpenSSL reads spaces as separators; + is a space here)
}


def _redis_url(env: _Env) -> str | None:
    name = "CATALYST_REDIS_URL"
    raw = env.text(name)
    if raw is None:
        return None
    try:
        parts = urlsplit(raw)
        parts.port  # noqa: B018 (raises ValueError for a bad port)
    except ValueError:
        raise ConfigError(name, "is not a valid URL") from None  # never repeat a password
    if parts.scheme not in ("redis", "rediss") or not parts.hostname:
        raise ConfigError(name, "must be a redis:// or rediss:// URL with a host")
    database = parts.path.strip("/")
    if database and not (database.isascii() and database.isdigit()):
        raise ConfigError(name, "the path, if any, must be a database number (/0)")
    for option, value in parse_qsl(parts.query, keep_blank_values=True):
        if option == "db":
            # (redis-py takes it over the path: the logs and /readyz would name another one)
            raise ConfigError(name, "give the database number as the path (/5), not as db=")
        takes = REDIS_OPTIONS.get(option)
        if takes is None:
            # redis-py passes an option it does not parse itself to the connection as text:
            # `retry=x` failed at start-up with a traceback, `redis_connect_func=x` with a
            # 500 on every keyed request, `decode_responses=1` would garble the records.
            named = "an option in the query"  # (a name that is no name may be a secret)
            if re.fullmatch(r"[a-z_]{1,40}", option):
                named = f"the query's {option!r}"
            raise ConfigError(
                name,
                f"{named} is not one the gateway takes ({', '.join(REDIS_OPTIONS)})",
            )
        if option.startswith("ssl_") and parts.scheme != "rediss":
            raise ConfigError(name, f"the query's {option!r} is for rediss:// URLs only")
        if not re.fullmatch(takes, value):  # (the value is not repeated: it may be a secret)
            raise ConfigError(name, f"the query's {option!r} has a value it does not take")
    return raw


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
