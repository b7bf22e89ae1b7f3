"""The bridge to the SME gateway: role mapping, the shared secret, the HS256 token.

The SME gateway trusts only HS256 tokens signed with ``sme-secrets/JWT_SECRET``.
For each proxied request we mint a five-minute token naming the operator and
the SME role their realm roles map to. The token goes upstream and nowhere
else: never to the client, never to a log.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import orjson

from . import log
from .ids import hex_id

BRIDGE_TTL_SECONDS = 300
SHORT_SECRET_BYTES = 32
STAT_INTERVAL = 1.0  # how often (at most) the secret file is checked for a rotation

_OWNER_ROLES = frozenset({"catalyst-owner"})
_ADMIN_ROLES = frozenset({"catalyst-admin", "sovereign-admin", "application-admin"})
_TIER_ROLES = {"owner": "superadmin", "admin": "sovereign-admin"}


def map_role(claims: Mapping[str, Any], operator_email: str | None = None) -> str:
    """The SME role for an operator's claims (CONTRACT: *Role mapping*). Pure."""
    roles = _realm_roles(claims)
    tier = claims.get("tier")
    tier = tier.strip().lower() if isinstance(tier, str) else None
    if operator_email and _is_operator(claims, operator_email):
        roles = ("catalyst-owner", *roles)
        tier = "owner"
    for role in roles:
        if role in _OWNER_ROLES:
            return "superadmin"
        if role in _ADMIN_ROLES:
            return "sovereign-admin"
    return _TIER_ROLES.get(tier or "", "member")


def _realm_roles(claims: Mapping[str, Any]) -> tuple[str, ...]:
    realm_access = claims.get("realm_access")
    if not isinstance(realm_access, Mapping):
        return ()
    roles = realm_access.get("roles")
    if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
        return ()
    return tuple(r.strip().lower() for r in roles)


def _is_operator(claims: Mapping[str, Any], operator_email: str) -> bool:
    email = claims.get("email")
    if not isinstance(email, str) or claims.get("email_verified") is False:
        return False
    return _ascii_fold(email.strip()) == _ascii_fold(operator_email.strip())


def _ascii_fold(text: str) -> str:
    # ASCII-only case folding: "İ".lower() or "K" (Kelvin) must not turn into a match.
    return text.translate(_ASCII_LOWER)


_ASCII_LOWER = {c: c + 32 for c in range(ord("A"), ord("Z") + 1)}


class BridgeSecret:
    """The HS256 secret: a fixed value, or a file re-read when it changes."""

    def __init__(
        self,
        value: bytes | None = None,
        path: str | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        interval: float = STAT_INTERVAL,
    ) -> None:
        self._value = value
        self._path = path
        self._clock = clock
        self._interval = interval
        self._file_value: bytes | None = None
        self._file_stamp: tuple[int, int, int] | None = None
        self._checked_at = float("-inf")
        self.last_error: str | None = None
        if value is not None:
            _warn_if_short(value, source="environment")

    @property
    def configured(self) -> bool:
        return self._value is not None or self._path is not None

    def get(self, now: float | None = None) -> bytes | None:
        """The current secret, or None when none is available."""
        if self._value is not None:
            return self._value
        if self._path is None:
            return None
        now = self._clock() if now is None else now
        if now - self._checked_at >= self._interval:
            self._checked_at = now
            self._reload()
        return self._file_value

    def _reload(self) -> None:
        assert self._path is not None
        try:
            st = os.stat(self._path)
            stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
            if stamp == self._file_stamp:
                return
            with open(self._path, "rb") as file:
                value = file.read().strip()
        except OSError as exc:
            self._set_error(f"cannot read the secret file: {exc.strerror}")
            self._file_value, self._file_stamp = None, None
            return
        self._file_stamp = stamp
        self._file_value = value or None
        if value:
            self.last_error = None
            _warn_if_short(value, source="file")
        else:
            self._set_error("the secret file is empty")

    def _set_error(self, problem: str) -> None:
        if problem != self.last_error:  # once per change, not once per request
            log.get_logger().warning(log.BRIDGE_SECRET_UNREADABLE, path=self._path, problem=problem)
        self.last_error = problem


def _warn_if_short(secret: bytes, *, source: str) -> None:
    if len(secret) < SHORT_SECRET_BYTES:
        log.get_logger().warning(
            log.BRIDGE_SECRET_SHORT,
            source=source,
            length=len(secret),
            advice=f"use at least {SHORT_SECRET_BYTES} random bytes",
        )


@functools.lru_cache(maxsize=4)  # the secret, and the few it rotates through
def _keyed(secret: bytes) -> hmac.HMAC:
    return hmac.new(secret, digestmod=hashlib.sha256)


_HEADER = base64.urlsafe_b64encode(b'{"alg":"HS256","typ":"JWT"}').rstrip(b"=")


def mint(secret: bytes, *, sub: str, email: str | None, role: str, now: float | None = None) -> str:
    """A compact HS256 JWS: ``{"alg":"HS256","typ":"JWT"}`` + the bridge claims.

    The claims are compact JSON in this order (orjson: every character escaped
    correctly, a fifth of ``json.dumps``'s cost), signed with HMAC-SHA256 from a
    keyed state prepared once per secret (``copy()`` skips the key set-up, half the
    cost of a one-shot HMAC); this runs on every proxied request.
    """
    iat = int(time.time() if now is None else now)
    claims = orjson.dumps(
        {"sub": sub, "email": email or "", "role": role, "iat": iat,
         "exp": iat + BRIDGE_TTL_SECONDS, "typ": "session", "jti": hex_id()}
    )  # fmt: skip
    signing_input = _HEADER + b"." + base64.urlsafe_b64encode(claims).rstrip(b"=")
    mac = _keyed(secret).copy()
    mac.update(signing_input)
    signature = base64.urlsafe_b64encode(mac.digest())
    return (signing_input + b"." + signature.rstrip(b"=")).decode("ascii")
