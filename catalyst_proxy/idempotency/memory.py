"""Idempotency records in this process's memory: the default store, for one process.

Records expire after the TTL and the set is bounded (count and bytes): past a
bound the oldest records go first, counted in
``catalyst_proxy_idempotency_evictions_total``; a reservation still within
its lease is never dropped (that could let a retry through twice). Eviction
works in batches, down to 1/32 below the bound, so that a full store does not
pay an eviction pass on every request. Records are kept as they are (no
encoding: measured, encoding and decoding each record cost more than it
saved), each weighed once, when stored.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from .records import RESERVED, Record

MAX_RECORDS = 20_000
MAX_BYTES = 8 * 1024 * 1024  # by the weights of records.py: ~6,000 typical answers
_STATE, _OWNER, _LEASE_UNTIL = (
    Record._fields.index(name) for name in ("state", "owner", "lease_until")
)


class MemoryRecords:
    def __init__(
        self,
        ttl: float,
        *,
        max_records: int = MAX_RECORDS,
        max_bytes: int = MAX_BYTES,
        clock: Callable[[], float] = time.time,
        on_evict: Callable[[int], None] | None = None,
    ) -> None:
        self._ttl = ttl
        self._max_records = max_records
        self._max_bytes = max_bytes
        # Where an eviction pass stops: a little below the bounds.
        self._low_records = max_records - max_records // 32
        self._low_bytes = max_bytes - max_bytes // 32
        self._clock = clock
        self._on_evict = on_evict
        # slot → (the record's fields, its expiry, its weight); oldest first. Plain tuples
        # of plain values, which the garbage collector stops tracking (a Record, a tuple
        # subclass, it would traverse on every full pass).
        self._records: OrderedDict[str, tuple[tuple[Any, ...], float, int]] = OrderedDict()
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
                return Record._make(entry[0])
            self._drop(slot)  # expired
        weight = record.size()
        records[slot] = (tuple(record), now + self._ttl, weight)
        self._bytes += weight
        if len(records) > self._max_records or self._bytes > self._max_bytes:
            self._bound()
        return None

    def replace_now(self, slot: str, owner: str, record: Record) -> bool:
        records = self._records
        entry = records.get(slot)
        now = self._clock()
        if entry is None or entry[1] <= now or entry[0][_OWNER] != owner:
            return False
        weight = record.size()
        records[slot] = (tuple(record), now + self._ttl, weight)
        records.move_to_end(slot)  # the newest
        self._bytes += weight - entry[2]
        if self._bytes > self._max_bytes:
            self._bound()
        return True

    async def release(self, slot: str, owner: str) -> bool:
        entry = self._records.get(slot)
        if entry is None or entry[1] <= self._clock() or entry[0][_OWNER] != owner:
            return False
        self._drop(slot)
        return True

    def _drop(self, slot: str) -> None:
        self._bytes -= self._records.pop(slot)[2]

    def _bound(self) -> None:
        """Drop the oldest records until the set is back under both bounds, with a margin."""
        records = self._records
        now = self._clock()
        spared = evicted = 0  # spared: reservations within their lease, moved to the back
        while spared < len(records) and (
            len(records) > self._low_records or self._bytes > self._low_bytes
        ):
            slot, (fields, expires, weight) = records.popitem(last=False)
            if expires > now and fields[_STATE] == RESERVED and fields[_LEASE_UNTIL] > now:
                records[slot] = (fields, expires, weight)  # to the back
                spared += 1
                continue
            self._bytes -= weight
            evicted += expires > now
        if evicted and self._on_evict is not None:
            self._on_evict(evicted)
