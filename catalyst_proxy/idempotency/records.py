"""An idempotency record's life and its bytes.

::

    (none) ── reserve ──> reserved ──┬── the answer ──────────────> completed (replayed)
                              │       ├── 502/504 after sending, ─> unknown (never again)
                              │       │   the client gone mid-exchange
                              │       └── refused, nothing forwarded ─> (none): released
                              └── its process died: past its lease ──> read as unknown

Every change after the reservation is a compare-and-set on the ``owner``
token the reservation drew: a first attempt whose record expired and was
replaced by a newer one can never overwrite it. A stored record is the owner
(32 hex digits), a JSON line with the rest, and the answer's body bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import orjson

RESERVED, COMPLETED, UNKNOWN = "reserved", "completed", "unknown"
OWNER_LENGTH = 32
RECORD_WEIGHT = 480  # the record, its strings and its entry in the memory store
HEADER_WEIGHT = 130  # a header's tuple and two strings


@dataclass(slots=True)
class Record:
    state: str
    owner: str
    lease_until: float  # wall-clock seconds: a reservation past it is read as unknown
    fingerprint: str = ""
    status: int = 0
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes | None = b""  # None: the answer was too large to record

    def encode(self) -> bytes:
        meta = {"state": self.state, "lease_until": self.lease_until,
                "fingerprint": self.fingerprint, "status": self.status,
                "headers": self.headers, "stored": self.body is not None}  # fmt: skip
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
            meta["fingerprint"],
            int(meta["status"]),
            [(str(name), str(value)) for name, value in meta["headers"]],
            body if meta["stored"] else None,
        )

    def size(self) -> int:
        """About what the record weighs in memory (for the memory store's byte bound;
        measured with tracemalloc: the objects around the text and the body)."""
        headers = sum(len(n) + len(v) + HEADER_WEIGHT for n, v in self.headers)
        return RECORD_WEIGHT + len(self.body or b"") + headers


class Records(Protocol):
    """Where records live: this process's memory, or Redis/Valkey. Each call is atomic."""

    async def reserve(self, slot: str, record: Record) -> Record | None:
        """Store ``record`` unless the slot holds one; return that one, or None if stored."""
        ...

    async def replace(self, slot: str, owner: str, record: Record) -> bool:
        """Compare-and-set: store ``record`` only if the slot's record belongs to ``owner``."""
        ...

    async def release(self, slot: str, owner: str) -> bool:
        """Compare-and-delete: forget the slot only if its record belongs to ``owner``."""
        ...
