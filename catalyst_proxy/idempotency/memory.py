"""Idempotency records in this process's memory: the default store, for one process.

Records expire after the TTL and the set is bounded (count and bytes): past a
bound the oldest records go first, counted in
``catalyst_proxy_idempotency_evictions_total``; a reservation still within
its lease is never dropped (that could let a retry through twice).

Records are kept encoded (one ``bytes`` each, keyed by the slot's digest):
about 600 bytes for a small answer, and nothing for the garbage collector to
walk (measured: keeping ``Record`` objects made every request ~40 µs dearer
as the set grew, from the cyclic collector's passes over it).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

from .records import OWNER_LENGTH, RESERVED, Record

_RESERVED = b'{"state":"' + RESERVED.encode() + b'"'  # how a reserved record starts

MAX_RECORDS = 50_000
MAX_BYTES = 16 * 1024 * 1024  # ~30,000 small answers, or 250 of the largest recorded
_OVERHEAD = 300  # per record: the key, the entry, the dict's share


class MemoryRecords:
    def __init__(
        self,
        ttl: float,
        *,
        max_records: int = MAX_RECORDS,
        max_bytes: int = MAX_BYTES,
        clock: Callable[[], float] = time.time,
        on_evict: Callable[[], None] | None = None,
    ) -> None:
        self._ttl = ttl
        self._max_records = max_records
        self._max_bytes = max_bytes
        self._clock = clock
        self._on_evict = on_evict
        # slot digest → (encoded record, expiry); oldest first
        self._records: OrderedDict[bytes, tuple[bytes, float]] = OrderedDict()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._records)

    async def reserve(self, slot: str, record: Record) -> Record | None:
        key = bytes.fromhex(slot)
        existing = self._live(key)
        if existing is not None:
            return Record.decode(existing)
        self._put(key, record)
        return None

    async def replace(self, slot: str, owner: str, record: Record) -> bool:
        key = bytes.fromhex(slot)
        if not self._owned(key, owner):
            return False
        self._put(key, record)
        return True

    async def release(self, slot: str, owner: str) -> bool:
        key = bytes.fromhex(slot)
        if not self._owned(key, owner):
            return False
        self._drop(key)
        return True

    def _live(self, key: bytes) -> bytes | None:
        """The record's bytes, unless there is none or it expired (then it goes)."""
        entry = self._records.get(key)
        if entry is None:
            return None
        if entry[1] <= self._clock():
            self._drop(key)
            return None
        return entry[0]

    def _owned(self, key: bytes, owner: str) -> bool:
        data = self._live(key)
        return data is not None and data[:OWNER_LENGTH] == owner.encode()

    def _put(self, key: bytes, record: Record) -> None:
        if key in self._records:
            self._drop(key)
        data = record.encode()
        self._records[key] = (data, self._clock() + self._ttl)
        self._bytes += len(data) + _OVERHEAD
        if len(self._records) > self._max_records or self._bytes > self._max_bytes:
            self._bound()

    def _drop(self, key: bytes) -> None:
        data, _ = self._records.pop(key)
        self._bytes -= len(data) + _OVERHEAD

    def _bound(self) -> None:
        now = self._clock()
        spared = 0  # reservations within their lease, moved to the back
        while (
            len(self._records) > self._max_records or self._bytes > self._max_bytes
        ) and spared < len(self._records):
            key, (data, expires) = next(iter(self._records.items()))
            if (
                expires > now
                and data[OWNER_LENGTH:].startswith(_RESERVED)
                and Record.decode(data).lease_until > now
            ):
                self._records.move_to_end(key)
                spared += 1
                continue
            self._drop(key)
            if expires > now and self._on_evict is not None:
                self._on_evict()
