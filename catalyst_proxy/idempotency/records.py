"""An idempotency record's life and its bytes.

::

    (none) ── reserve ──> reserved ──┬── the answer ──────────────> completed (replayed)
                              │       ├── 502/504 after sending, ─> unknown (never again)
                              │       │   the client gone mid-exchange
                              │       └── refused, nothing forwarded ─> (none): released
                              └── its process died: past its lease ──> read as unknown

Every change after the reservation is a compare-and-set on the ``owner``
token the reservation drew: a first attempt whose record expired and was
replaced by a newer one can never overwrite it. A completed record keeps the
answer as the SME gateway sent it (status, header fields, body): a replay
renders it through the same allow-list as the first answer. A stored record is
the owner (32 hex digits), a JSON line with the rest, and the answer's body
bytes.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import orjson

from ..headers import replayable

RESERVED, COMPLETED, UNKNOWN = "reserved", "completed", "unknown"
OWNER_LENGTH = 32  # a shared store's owner tokens: 32 hex digits, first in a stored record


class Record(NamedTuple):
    """What a store hands back and takes: plain values (a store keeps it its own way)."""

    state: str
    owner: str
    lease_until: float  # wall-clock seconds: a reservation past it is read as unknown
    fingerprint: bytes = b""  # SHA-256 (its 32 bytes; hex in a stored record)
    status: int = 0
    headers: tuple[tuple[bytes, bytes], ...] = ()  # as received, raw
    body: bytes | None = b""  # None: the answer was too large to record (or was dropped)

    def encode(self) -> bytes:
        # Only what a replay may send leaves the process (the memory store keeps the list
        # as the client parsed it, the cheaper way: a replay filters it the same way).
        headers = [(name.decode("latin-1"), value.decode("latin-1"))
                   for name, value in replayable(self.headers)]  # fmt: skip
        meta = {"state": self.state, "lease_until": self.lease_until,
                "fingerprint": self.fingerprint.hex(), "status": self.status,
                "headers": headers, "stored": self.body is not None}  # fmt: skip
        return self.owner.encode() + orjson.dumps(meta) + b"\n" + (self.body or b"")

    @classmethod
    def decode(cls, data: bytes) -> Record:
        owner, rest = data[:OWNER_LENGTH].decode(), data[OWNER_LENGTH:]
        line, _, body = rest.partition(b"\n")
        meta = orjson.loads(line)
        return cls(
            meta["state"],
            owner,
            float(meta["lease_until"]),
            bytes.fromhex(meta["fingerprint"]),
            int(meta["status"]),
            tuple(
                (name.encode("latin-1"), value.encode("latin-1")) for name, value in meta["headers"]
            ),
            body if meta["stored"] else None,
        )


class Records(Protocol):
    """Where records live: this process's memory, or Redis/Valkey. Each call is atomic."""

    def slot(self, scope: str) -> str:
        """Where this store files the record of ``scope`` (``keys.scope()``)."""
        ...

    def new_owner(self) -> str:
        """An owner token no other reservation in this store's reach has drawn."""
        ...

    async def reserve(self, slot: str, record: Record) -> Record | None:
        """Store ``record`` unless the slot holds one; return that one, or None if stored."""
        ...

    async def replace(self, slot: str, owner: str, record: Record) -> bool:
        """Compare-and-set: store ``record`` if the slot's record belongs to ``owner`` or the
        slot holds none (the store lost the reservation: the answer is still known)."""
        ...

    async def renew(self, slot: str, owner: str, lease_until: float) -> bool:
        """Extend ``owner``'s reservation (only a reservation) to ``lease_until``, then the TTL."""
        ...

    async def release(self, slot: str, owner: str) -> bool:
        """Compare-and-delete: forget the slot only if its record belongs to ``owner``."""
        ...
