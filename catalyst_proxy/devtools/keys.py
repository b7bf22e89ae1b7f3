"""RSA keys, JWKS documents and operator tokens for probes, tests and ``dev``."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import secrets
import tempfile
import time
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _uint(value: int) -> str:
    return _b64(value.to_bytes((value.bit_length() + 7) // 8 or 1, "big"))


def new_private_key(bits: int = 2048) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def public_jwk(key: rsa.RSAPublicKey | rsa.RSAPrivateKey, kid: str | None = None) -> dict[str, str]:
    """The public JWK of ``key``; ``kid`` defaults to its RFC 7638 thumbprint."""
    public = key.public_key() if isinstance(key, rsa.RSAPrivateKey) else key
    numbers = public.public_numbers()
    jwk = {"e": _uint(numbers.e), "kty": "RSA", "n": _uint(numbers.n)}
    return {**jwk, "kid": kid or thumbprint(jwk), "use": "sig", "alg": "RS256"}


def thumbprint(jwk: dict[str, str]) -> str:
    """RFC 7638: SHA-256 over the required members, sorted, no white space."""
    required = {name: jwk[name] for name in ("e", "kty", "n")}
    canonical = json.dumps(required, separators=(",", ":"), sort_keys=True)
    return _b64(hashlib.sha256(canonical.encode()).digest())


def private_pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def public_pem(key: rsa.RSAPrivateKey | rsa.RSAPublicKey) -> bytes:
    public = key.public_key() if isinstance(key, rsa.RSAPrivateKey) else key
    return public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def keygen(out: Path) -> str:
    """Write private.pem (0600), public.pem and jwks.json into ``out``; return the kid.

    Each file is written whole under a fresh name and then renamed over the old one: a
    crash leaves the old key or the new one, never half of one, and a symbolic link
    planted at ``out/private.pem`` is replaced, not followed (the key never lands in a
    file someone else made)."""
    out.mkdir(parents=True, exist_ok=True)
    key = new_private_key()
    jwk = public_jwk(key)
    _replace(out / "private.pem", private_pem(key), 0o600)  # owner-only from its first byte
    _replace(out / "public.pem", public_pem(key), 0o644)
    _replace(out / "jwks.json", (json.dumps({"keys": [jwk]}, indent=2) + "\n").encode(), 0o644)
    return jwk["kid"]


def _replace(path: Path, data: bytes, mode: int) -> None:
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # O_EXCL, 0600
    try:
        with os.fdopen(fd, "wb") as file:
            os.fchmod(fd, mode)
            file.write(data)
            file.flush()
            os.fsync(fd)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def load_private_key(path: Path) -> rsa.RSAPrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ValueError(f"{path} is not an RSA private key")
    return key


def operator_token(
    key: rsa.RSAPrivateKey,
    *,
    sub: str,
    email: str | None = None,
    realm_roles: list[str] | tuple[str, ...] = (),
    tier: str | None = None,
    ttl: float = 3600,
    kid: str | None = None,
    iss: str | None = None,
    aud: str | None = None,
    now: float | None = None,
    extra: dict[str, Any] | None = None,
) -> str:
    """A Keycloak-shaped RS256 operator token."""
    issued = int(time.time() if now is None else now)
    claims: dict[str, Any] = {
        "sub": sub,
        "iat": issued,
        "exp": int(issued + ttl),
        "jti": secrets.token_hex(8),
        "typ": "Bearer",
        "realm_access": {"roles": list(realm_roles)},
    }
    if email is not None:
        claims["email"] = email
        claims["email_verified"] = True
    if tier is not None:
        claims["tier"] = tier
    if iss is not None:
        claims["iss"] = iss
    if aud is not None:
        claims["aud"] = aud
    claims.update(extra or {})
    headers = {"kid": kid} if kid else None
    return jwt.encode(claims, key, algorithm="RS256", headers=headers)
