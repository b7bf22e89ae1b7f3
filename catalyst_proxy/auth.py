"""Who is calling: the operator's RS256 session, verified.

Steps, cheapest first, so junk costs nothing and never reaches the JWKS:

1. Find the token: ``Authorization: Bearer`` or else the ``catalyst_session``
   cookie (raw, or ``<jwt>.<hmac>`` when a cookie secret is set). The first
   source present decides; two headers or two cookies are ambiguous.
2. Check what needs no key: shape, ``alg`` (asymmetric and allowed; never
   ``none`` or ``HS*``), no ``crit``, ``kid`` type, and the claims ``exp``,
   ``nbf``, ``iat``, ``sub``, ``iss``, ``aud``.
3. Pick keys: the JWKS key named by ``kid`` (refreshing once if unknown),
   falling back to the local keys; no ``kid`` → local keys only.
4. Verify with PyJWT (algorithm pinned, ``exp``/``sub`` required,
   issuer/audience) — the same rules again, now with the signature. The time
   claims are judged once, in step 2, against the injected clock (PyJWT reads
   the wall clock itself, which would make the ``clock`` seam a lie).

Time claims follow RFC 7519 with the leeway: valid while ``now < exp + leeway``,
``nbf <= now + leeway`` and ``iat <= now + leeway``.

Verified tokens are remembered (exact token → result) until they expire or the
JWKS keys change, so a console that sends the same session on every click pays
for the RSA work once.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import math
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import jwt

from .config import ASYMMETRIC_ALGORITHMS, Settings
from .errors import OperatorKeysUnavailable, Unauthenticated
from .jwks import Key, KeySet

SESSION_COOKIE = "catalyst_session"
# Distinct sessions remembered. A token and its claims can weigh ~10 KiB (Keycloak tokens
# approach 8 KiB), so 1,024 bounds the cache near 10 MiB per worker; a console has far
# fewer concurrent operators than that.
CACHE_SIZE = 1024
_MAX_KID = 256
# RFC 7515 compact serialization: unpadded base64url only. Anything else (padding,
# other characters) is refused, so one signed token has exactly one accepted spelling.
_BASE64URL = re.compile(r"[A-Za-z0-9_-]*")


@dataclass(frozen=True, slots=True)
class Operator:
    sub: str
    email: str | None
    claims: Mapping[str, Any]
    exp: float
    # Values derived from the verified claims (the SME role), cached with the session:
    # a console sends the same session on every click.
    derived: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class _Unverified:
    token: str
    alg: str
    kid: str | None
    claims: dict[str, Any]


class Authenticator:
    def __init__(
        self,
        settings: Settings,
        keys: KeySet,
        *,
        clock: Callable[[], float] = time.time,
        cache_size: int = CACHE_SIZE,
    ) -> None:
        self._settings = settings
        self._keys = keys
        self._clock = clock
        self._algorithms = frozenset(settings.token_algorithms) & ASYMMETRIC_ALGORITHMS
        self._leeway = settings.token_leeway_seconds
        self._cache: OrderedDict[str, tuple[Operator, int]] = OrderedDict()
        self._cache_size = cache_size

    async def authenticate(self, headers: Mapping[str, str] | Any) -> Operator:
        token = self.token(headers)
        return self.remembered(token) or await self.verify(token)

    def token(self, headers: Mapping[str, str] | Any) -> str:
        """The request's one session token (Unauthenticated if none, or ambiguous)."""
        return find_token(headers, self._settings.session_cookie_secret)

    def remembered(self, token: str) -> Operator | None:
        """The operator of a token verified before and still valid (no await: the hot path)."""
        cached = self._cache.get(token)
        if cached is None:
            return None
        operator, generation = cached
        if generation == self._keys.generation and self._clock() < operator.exp + self._leeway:
            self._cache.move_to_end(token)
            return operator
        del self._cache[token]
        return None

    async def verify(self, token: str) -> Operator:
        """Verify ``token`` (steps 2-4) and remember it."""
        now = self._clock()
        unverified = self._precheck(token, now)
        candidates = await self._candidates(unverified)
        operator = self._verify(unverified, candidates)
        self._remember(token, operator)
        return operator

    # --- step 2: everything that needs no key --------------------------------
    def _precheck(self, token: str, now: float) -> _Unverified:
        parts = token.split(".")
        if len(parts) != 3 or not all(parts[:2]) or not all(map(_BASE64URL.fullmatch, parts)):
            raise _invalid("malformed", "not a compact JWS")
        header = _json_segment(parts[0], "header")
        claims = _json_segment(parts[1], "payload")
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self._algorithms:
            raise _invalid("invalid", f"algorithm {str(alg)[:16]!r} is not accepted")
        if "crit" in header:
            raise _invalid("invalid", "critical header parameters are not supported")
        kid = header.get("kid")
        if kid is not None and (not isinstance(kid, str) or not 0 < len(kid) <= _MAX_KID):
            raise _invalid("invalid", "kid is not a short string")
        self._check_claims(claims, now)
        return _Unverified(token, alg, kid, claims)

    def _check_claims(self, claims: dict[str, Any], now: float) -> None:
        leeway = self._leeway
        exp = claims.get("exp")
        if not isinstance(exp, int | float) or not _is_time(exp):
            raise _invalid("bad_claims", "exp is missing or not a number")
        if now >= exp + leeway:
            raise _invalid("expired", "token expired")
        for name in ("nbf", "iat"):
            value = claims.get(name)
            if value is None:
                continue
            if not isinstance(value, int | float) or not _is_time(value):
                raise _invalid("bad_claims", f"{name} is not a number")
            if value > now + leeway:
                raise _invalid("not_yet_valid", f"{name} is in the future")
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub.strip():
            raise _invalid("bad_claims", "sub is missing or empty")
        for name in ("sub", "email", "iss"):  # they go on: into the bridge token, logs, keys
            value = claims.get(name)
            if isinstance(value, str) and not is_text(value):
                raise _invalid("bad_claims", f"{name} is not valid Unicode text")
        issuers = self._settings.token_issuers
        if issuers and claims.get("iss") not in issuers:
            raise _invalid("bad_claims", "issuer not accepted")
        audiences = self._settings.token_audiences
        if audiences:
            aud = claims.get("aud")
            listed = [aud] if isinstance(aud, str) else aud
            if not isinstance(listed, list) or not any(
                isinstance(a, str) and a in audiences for a in listed
            ):
                raise _invalid("bad_claims", "audience not accepted")

    # --- step 3: keys ----------------------------------------------------------
    async def _candidates(self, unverified: _Unverified) -> list[Key]:
        alg, kid = unverified.alg, unverified.kid
        candidates: list[Key] = []
        if kid is not None:
            named = self._keys.cached(kid) or await self._keys.lookup(kid)
            candidates.extend(key for key in named if key.fits(alg))
        candidates.extend(k for k in self._keys.local_keys if k.fits(alg))
        if not candidates:
            if not self._keys.usable:
                raise OperatorKeysUnavailable()
            raise _invalid("unknown_key", "no key matches the token's kid and alg")
        return candidates

    # --- step 4: the signature, by PyJWT ---------------------------------------
    def _verify(self, unverified: _Unverified, candidates: list[Key]) -> Operator:
        settings = self._settings
        for key in candidates:
            try:
                claims = jwt.decode(
                    unverified.token,
                    key.key,
                    algorithms=[unverified.alg],
                    issuer=list(settings.token_issuers) or None,
                    audience=list(settings.token_audiences) or None,
                    options={
                        "require": ["exp", "sub"],
                        "verify_aud": bool(settings.token_audiences),
                        "verify_iss": bool(settings.token_issuers),
                        "verify_jti": False,
                        # exp/nbf/iat were checked in _check_claims with our clock.
                        "verify_exp": False,
                        "verify_nbf": False,
                        "verify_iat": False,
                    },
                )
            except jwt.InvalidSignatureError:
                continue
            except jwt.PyJWTError as exc:
                raise _invalid("invalid", type(exc).__name__) from None
            email = claims.get("email")
            return Operator(
                sub=claims["sub"],
                email=email if isinstance(email, str) else None,
                claims=claims,
                exp=float(claims["exp"]),
            )
        raise _invalid("bad_signature", "signature does not verify")

    def _remember(self, token: str, operator: Operator) -> None:
        self._cache[token] = (operator, self._keys.generation)
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)


# --- step 1: where the token comes from -----------------------------------------
def find_token(headers: Any, cookie_secret: bytes | None) -> str:
    """The presented token, or Unauthenticated (missing / ambiguous / bad cookie)."""
    authorizations = headers.getall("Authorization", ())
    if len(authorizations) > 1:
        raise _invalid("ambiguous", "more than one Authorization header")
    if authorizations:
        scheme, _, credentials = authorizations[0].strip().partition(" ")
        if scheme.lower() == "bearer":
            token: str = credentials.strip()
            if not token:
                raise _invalid("malformed", "empty Bearer credentials")
            return token
    cookies = [
        value
        for header in headers.getall("Cookie", ())
        for name, value in _cookie_pairs(header)
        if name == SESSION_COOKIE
    ]
    if len(cookies) > 1:
        raise _invalid("ambiguous", "more than one session cookie")
    if not cookies:
        raise Unauthenticated("missing", token_presented=False, log_detail="no token presented")
    if cookie_secret is None:
        return str(cookies[0])
    token, _, signature = cookies[0].rpartition(".")
    if not token or not cookies[0].isascii():  # a JWS and base64url are ASCII: a forgery
        raise _invalid("bad_cookie_signature", "session cookie signature does not verify")
    expected = base64.urlsafe_b64encode(
        hmac.new(cookie_secret, token.encode(), hashlib.sha256).digest()
    ).rstrip(b"=")
    if not hmac.compare_digest(signature.encode(), expected):
        raise _invalid("bad_cookie_signature", "session cookie signature does not verify")
    return token


def _cookie_pairs(header: str) -> list[tuple[str, str]]:
    pairs = []
    for item in header.split(";"):
        name, sep, value = item.partition("=")
        if sep:
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] == '"':
                value = value[1:-1]
            pairs.append((name.strip(), value))
    return pairs


# --- helpers -----------------------------------------------------------------
def _invalid(reason: str, log_detail: str) -> Unauthenticated:
    return Unauthenticated(reason, token_presented=True, log_detail=log_detail)


def _json_segment(segment: str, what: str) -> dict[str, Any]:
    try:
        raw = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
        value = json.loads(raw)
    except (binascii.Error, ValueError, RecursionError):  # RecursionError: absurd nesting
        raise _invalid("malformed", f"{what} is not base64url JSON") from None
    if not isinstance(value, dict):
        raise _invalid("malformed", f"{what} is not a JSON object")
    return value


def _is_time(value: object) -> bool:
    """A JSON number usable as a NumericDate (not a bool, finite, fits a float)."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer with hundreds of digits
        return False


def is_text(value: str) -> bool:
    """Encodable as UTF-8: JSON lets a token's string hold a lone surrogate (``"\\ud800"``),
    and Python hands over an argument's byte that is not UTF-8 as one."""
    if value.isascii():
        return True
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True
