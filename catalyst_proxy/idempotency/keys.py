"""The ``Idempotency-Key`` header, its scope and the request's fingerprint.

- Syntax (the IETF httpapi idempotency-key draft): 1-255 visible ASCII
  characters, bare (``Idempotency-Key: 8e03978e``) or as a structured-field
  string (``Idempotency-Key: "8e03978e"``, with ``\\"`` and ``\\\\`` escapes);
  the quotes are not part of the key, so both spellings are the same key. An
  empty or over-long key, any other byte, or two headers → ``400
  idempotency-key-invalid``.
- Scope: the operator (token ``iss`` and ``sub``) and the route's upstream
  method and path, with the key (``scope()``). A shared store sees only a
  SHA-256 of it (``slot()``), never the client's key; the memory store files
  records under the scope itself (they never leave the process).
- Fingerprint: SHA-256 over the upstream method, the upstream target (path and
  query) and the body, fed while the body streams.
"""

from __future__ import annotations

import hashlib

from ..errors import IdempotencyKeyInvalid

MAX_KEY_LENGTH = 255


def parse_key(values: list[str]) -> str | None:
    """The key of a request's ``Idempotency-Key`` headers, None if there is none."""
    if not values:
        return None
    if len(values) > 1:
        raise IdempotencyKeyInvalid("more than one Idempotency-Key header")
    raw = values[0]
    key = _unquote(raw) if raw.startswith('"') else raw
    if not 1 <= len(key) <= MAX_KEY_LENGTH:
        raise IdempotencyKeyInvalid(f"key length {len(key)} is not 1-{MAX_KEY_LENGTH}")
    if not (key.isascii() and key.isprintable()) or " " in key:  # VCHAR: %x21-7E
        raise IdempotencyKeyInvalid("the key holds a character that is not visible ASCII")
    return key


def _unquote(raw: str) -> str:
    if len(raw) < 2 or not raw.endswith('"'):
        raise IdempotencyKeyInvalid("an unterminated quoted key")
    out: list[str] = []
    inner = iter(raw[1:-1])
    for char in inner:
        if char == "\\":
            escaped = next(inner, "")
            if escaped not in ('"', "\\"):
                raise IdempotencyKeyInvalid("a bad escape in a quoted key")
            out.append(escaped)
        elif char == '"':
            raise IdempotencyKeyInvalid("a quote inside a quoted key")
        else:
            out.append(char)
    return "".join(out)


def scope(iss: str | None, sub: str, method: str, upstream_path: str, key: str) -> str:
    """The key and what it is scoped to, as one string, NUL-separated (a key never holds a
    NUL; the method and path are the routes file's; issuer and subject are from a verified
    token, signed by the one realm)."""
    return "\0".join((iss or "", sub, method, upstream_path, key))


def slot(scope: str) -> str:
    """Where a shared store files a scope's record: its SHA-256 (hex)."""
    return hashlib.sha256(scope.encode()).hexdigest()


def fingerprinter(method: bytes, target: bytes) -> hashlib._Hash:
    """A SHA-256 already fed the request's method and target; feed it the body."""
    return hashlib.sha256(b"".join((method, b" ", target, b"\n")))  # (cheaper than a %)


def partial_fingerprint(hasher: hashlib._Hash, covered: int) -> bytes:
    """The fingerprint of a request whose body never came whole (it stopped, or its client
    left, after an early answer): the digest of what came, then how many body bytes that
    was. A retry matches it when its body begins with those bytes (``covered()``)."""
    return hasher.digest() + covered.to_bytes(8, "big")


def covered(fingerprint: bytes) -> int | None:
    """How many body bytes a partial fingerprint covers; None for a whole one."""
    return int.from_bytes(fingerprint[32:], "big") if len(fingerprint) > 32 else None
