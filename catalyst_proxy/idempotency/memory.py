"""Idempotency records in this process's memory: the default store, for one process.

Records expire after the TTL and the set is bounded (count and bytes): past a
bound the oldest records go first, counted in
``catalyst_proxy_idempotency_evictions_total``; a reservation still within
its lease is never dropped (that could let a retry through twice).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

from .records import RESERVED, Record

MAX_RECORDS = 100_000
MAX_BYTES = 64 * 1024 * 1024


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
        self._records: OrderedDict[str, tuple[Record, float]] = OrderedDict()  # oldest first
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._records)

    async def reserve(self, slot: str, record: Record) -> Record | None:
        existing = self._get(slot)
        if existing is not None:
            return existing
        self._put(slot, record)
        return None

    async def replace(self, slot: str, owner: str, record: Record) -> bool:
        existing = self._get(slot)
        if existing is None or existing.owner != owner:
            return False
        self._put(slot, record)
        return True

    async def release(self, slot: str, owner: str) -> bool:
        existing = self._get(slot)
        if existing is None or existing.owner != owner:
            return False
        self._drop(slot)
        return True

    def _get(self, slot: str) -> Record | None:
        entry = self._records.get(slot)
        if entry is None:
            return None
        if entry[1] <= self._clock():
            self._drop(slot)
            return None
        return entry[0]

    def _put(self, slot: str, record: Record) -> None:
        if slot in self._records:
            self._drop(slot)
        self._records[slot] = (record, self._clock() + self._ttl)
        self._bytes += record.size()
        self._bound()

    def _drop(self, slot: str) -> None:
        record, _ = self._records.pop(slot)
        self._bytes -= record.size()

    def _bound(self) -> None:
        now = self._clock()
        spared = 0  # reservations within their lease, moved to the back
        while (
            len(self._records) > self._max_records or self._bytes > self._max_bytes
        ) and spared < len(self._records):
            slot, (record, expires) = next(iter(self._records.items()))
            if expires > now and record.state == RESERVED and record.lease_until > now:
                self._records.move_to_end(slot)
                spared += 1
                continue
            self._drop(slot)
            if expires > now and self._on_evict is not None:
                self._on_evict()
