"""Idempotency records in this process's memory: the default store, for one process.

Records expire after the TTL and the set is bounded (count and bytes): past a
bound the oldest records go first, counted in
``catalyst_proxy_idempotency_evictions_total``; a reservation still within
its lease is never dropped (that could let a retry through twice). Records
are kept as they are (no encoding: measured, encoding and decoding each record
cost more than it saved), each weighed once, when stored.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

from .records import RESERVED, Record

MAX_RECORDS = 20_000
MAX_BYTES = 8 * 1024 * 1024  # by the weights of records.py: ~6,000 typical answers


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
        # slot → (record, its expiry, its weight); oldest first
        self._records: OrderedDict[str, tuple[Record, float, int]] = OrderedDict()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._records)

    async def reserve(self, slot: str, record: Record) -> Record | None:
        return self.reserve_now(slot, record)

    async def replace(self, slot: str, owner: str, record: Record) -> bool:
        return self.replace_now(slot, owner, record)

    # The same, without a coroutine (the guard's fast path: these run on every keyed request).

    def reserve_now(self, slot: str, record: Record) -> Record | None:
        records = self._records
        entry = records.get(slot)
        now = self._clock()
        if entry is not None:
            if entry[1] > now:
                return entry[0]
            self._drop(slot)  # expired
        weight = record.size()
        records[slot] = (record, now + self._ttl, weight)
        self._bytes += weight
        if len(records) > self._max_records or self._bytes > self._max_bytes:
            self._bound()
        return None

    def replace_now(self, slot: str, owner: str, record: Record) -> bool:
        records = self._records
        entry = records.get(slot)
        now = self._clock()
        if entry is None or entry[1] <= now or entry[0].owner != owner:
            return False
        del records[slot]  # and back in at the end: the newest
        weight = record.size()
        records[slot] = (record, now + self._ttl, weight)
        self._bytes += weight - entry[2]
        if self._bytes > self._max_bytes:
            self._bound()
        return True

    async def release(self, slot: str, owner: str) -> bool:
        entry = self._records.get(slot)
        if entry is None or entry[1] <= self._clock() or entry[0].owner != owner:
            return False
        self._drop(slot)
        return True

    def _drop(self, slot: str) -> None:
        self._bytes -= self._records.pop(slot)[2]

    def _bound(self) -> None:
        now = self._clock()
        spared = 0  # reservations within their lease, moved to the back
        while (
            len(self._records) > self._max_records or self._bytes > self._max_bytes
        ) and spared < len(self._records):
            slot, (record, expires, weight) = self._records.popitem(last=False)
            if expires > now and record.state == RESERVED and record.lease_until > now:
                self._records[slot] = (record, expires, weight)  # to the back
                spared += 1
                continue
            self._bytes -= weight
            if expires > now and self._on_evict is not None:
                self._on_evict()
