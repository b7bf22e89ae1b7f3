"""Idempotency records in this process's memory: the default store, for one process.

Records expire after the TTL (a reservation after its lease and then the TTL:
it never expires while its request may be in flight) and the store is bounded,
twice over. The answers (the passed-through header fields and the body a replay
would send) have a budget of their own: past it the oldest answers (by
completion) are dropped first, down to 3/4 of it, counted in
``catalyst_proxy_idempotency_answers_dropped_total``, and their records stay, so a
retry under such a key is told ``409 idempotency-replay-unavailable``, as for an
answer too large to record: never forwarded again. An answer larger than a
quarter of the budget is not kept at all (as if too large to record), so that one
answer cannot empty the store of all the others. Without its answer a record is a
few hundred bytes, whatever the SME gateway sends, so answers cannot push records
out. The records themselves are bounded by count and bytes: past a bound the
oldest records (by reservation) go first, counted in
``catalyst_proxy_idempotency_evictions_total``; a retry under an evicted key is
forwarded again. That takes a flood (~10,000 purchases in a process within the
TTL, at the defaults). A reservation is
not dropped for room: in this store it belongs to a request of this process,
still in flight however long its answer streams (dropping it would let a retry
through twice). Within its lease that holds without exception; past it, for at
most ``max_in_flight`` of them (as many requests as the process can have in
flight: upstream connections plus waiters). More than that can only be
reservations a fault left unsettled; they go, oldest first, rather than pin the
store. Eviction works in batches, down to 1/32 below the bound, so that a full
store does not pay an eviction pass on every request.

A record is kept as one flat tuple of plain values: its fields, the answer's
header fields joined into one bytes object (NUL-separated: the upstream
parser refuses a NUL in a name or a value), its expiry and its weight. The
collector stops tracking such a tuple at its first pass. Under load that is
much of what the feature costs: measured under callgrind with 50 connections,
a record kept as a ``Record`` holding the answer's header list meant ~20 more
objects per request to allocate, track, collect and free (cold) at eviction,
and twice the last-level cache misses. Records are filed under the scope
itself (it never leaves the process: hashing it would buy nothing), and owner
tokens are a counter's (unique within the process, the store's whole reach).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable
from itertools import chain
from typing import Final

from ..headers import replayable
from .records import COMPLETED, RESERVED, Record

MAX_RECORDS = 20_000
MAX_IN_FLIGHT = 1_100  # the contract's defaults: 100 upstream connections, 1,000 waiting
MAX_BYTES = 6 * 1024 * 1024  # records without their answers: ~10,000 (121-character slots)
MAX_ANSWER_BYTES = 8 * 1024 * 1024  # answers: ~120 of 64 KiB, ~3,900 of 2 KiB (answer_budget)
# An entry's bytes besides its slot's characters, which are added to it: the tuple, the
# objects it holds (the answer's objects, not their bytes: those count against
# MAX_ANSWER_BYTES) and its places in the dicts (measured with tracemalloc: 870 bytes in
# all for a 121-character slot, 118 header bytes and a 120-byte body, when the records
# were in an OrderedDict; ~45 bytes less in a plain dict, so the figure errs on the heavy
# side).
ENTRY_WEIGHT = 512
# An answer's header fields are kept as they came (a replay filters them, as it does the
# first answer's), but past this many bytes only those a replay sends are kept: an SME
# gateway's cookies must not take the room of other answers.
HEAD_FILTERED = 1024

# A full store walks all of itself for expired records at most this often (s; a quarter
# of the TTL if shorter): a walk of ~10,000 records is ~1 ms, too much for every pass.
SWEEP_EVERY = 60.0
HEAD_ALLOWANCE = 32 * 1024  # an answer's header block at most (the upstream client's bound)


def answer_budget(max_body_bytes: int) -> int:
    """The answers' budget for a recordable body of ``max_body_bytes``: ``MAX_ANSWER_BYTES``,
    or room for four of the largest answers if that is more (an answer over a quarter of
    the budget is not kept: every answer the configuration says is recorded must fit)."""
    return max(MAX_ANSWER_BYTES, 4 * (max_body_bytes + HEAD_ALLOWANCE))


_SEPARATOR = b"\0"  # between the header fields' names and values
_BARE = Record(RESERVED, "", 0.0)[3:]  # what a reservation leaves at the defaults

# An entry: the record's fields (the header fields as one bytes object), expiry, weight;
# its places (Final: mypy types an index by a literal).
Entry = tuple[str, str, float, bytes, int, bytes, bytes | None, float, int]
_STATE: Final = 0
_OWNER: Final = 1
_LEASE_UNTIL: Final = 2
_FINGERPRINT: Final = 3
_STATUS: Final = 4
_HEAD: Final = 5
_BODY: Final = 6
_EXPIRES: Final = 7
_WEIGHT: Final = 8


class MemoryRecords:
    def __init__(
        self,
        ttl: float,
        *,
        max_records: int = MAX_RECORDS,
        max_bytes: int = MAX_BYTES,
        max_answer_bytes: int = MAX_ANSWER_BYTES,
        clock: Callable[[], float] = time.time,
        on_evict: Callable[[int], None] | None = None,
        on_drop_answers: Callable[[int], None] | None = None,
        max_in_flight: int = MAX_IN_FLIGHT,
    ) -> None:
        self._ttl = ttl
        self._max_in_flight = max_in_flight
        self._max_records = max_records
        self._max_bytes = max_bytes
        # Where an eviction pass stops: a little below the bounds.
        self._low_records = max_records - max_records // 32
        self._low_bytes = max_bytes - max_bytes // 32
        self._max_answer_bytes = max_answer_bytes
        self._low_answer_bytes = max_answer_bytes - max_answer_bytes // 4
        self._largest_answer = max_answer_bytes // 4  # one larger is not kept
        self._clock = clock
        self._on_evict = on_evict
        self._on_drop_answers = on_drop_answers
        self._records: dict[str, Entry] = {}  # slot → entry, oldest reservation first
        self._bytes = 0  # the entries' weights
        self._answer_bytes = 0  # their answers' bytes (header fields and bodies)
        self._answers: dict[str, None] = {}  # the slots holding an answer, oldest first
        self._owners = itertools.count(1)
        # When a full store next walks all of itself for expired records (_bound): those
        # go before any live one, though records expire out of reservation order.
        self._next_sweep = 0.0
        self._sweep_every = min(SWEEP_EVERY, ttl / 4)

    def __len__(self) -> int:
        return len(self._records)

    def slot(self, scope: str) -> str:
        return scope

    def new_owner(self) -> str:
        return hex(next(self._owners))

    async def reserve(self, slot: str, record: Record) -> Record | None:
        found = self.reserve_now(slot, record.owner, record.lease_until)
        if found is None and (record.state != RESERVED or record[3:] != _BARE):
            self._replace_with(slot, record.owner, record)  # more than a reservation
        return found

    async def replace(self, slot: str, owner: str, record: Record) -> bool:
        return self._replace_with(slot, owner, record)

    async def renew(self, slot: str, owner: str, lease_until: float) -> bool:
        return self.renew_now(slot, owner, lease_until)

    async def release(self, slot: str, owner: str) -> bool:
        entry = self._records.get(slot)
        if entry is None or entry[_EXPIRES] <= self._clock() or entry[_OWNER] != owner:
            return False
        self._drop(slot)
        return True

    # The guard's fast path, without a coroutine or a Record on the way (every keyed request).

    def reserve_now(self, slot: str, owner: str, lease_until: float) -> Record | None:
        """``reserve()`` of a reservation."""
        records = self._records
        entry = records.get(slot)
        now = self._clock()
        if entry is not None:
            if entry[_EXPIRES] > now:
                return _record(entry)
            self._drop(slot)  # expired
        weight = ENTRY_WEIGHT + len(slot)
        # Its lease, then the TTL.
        expires = (lease_until if lease_until > now else now) + self._ttl
        records[slot] = (RESERVED, owner, lease_until, b"", 0, b"", b"", expires, weight)
        self._bytes += weight
        if len(records) > self._max_records or self._bytes > self._max_bytes:
            self._bound()
        return None

    def complete_now(
        self,
        slot: str,
        owner: str,
        fingerprint: bytes,
        status: int,
        headers: Iterable[tuple[bytes, bytes]],
        body: bytes | None,
    ) -> bool:
        """``replace()`` with the completed answer."""
        head = _SEPARATOR.join(chain.from_iterable(headers))
        records = self._records
        entry = records.get(slot)
        now = self._clock()
        if entry is None or entry[_OWNER] != owner or entry[_EXPIRES] <= now:  # (a fault)
            return self._replace(slot, owner, COMPLETED, 0.0, fingerprint, status, head, body)
        # Our reservation, as on every request: in its place, the answer.
        head, body, size = self._kept(head, body)
        records[slot] = (COMPLETED, owner, 0.0, fingerprint, status, head, body,
                         now + self._ttl, entry[_WEIGHT])  # fmt: skip
        if entry[_BODY] or entry[_HEAD]:  # (not a bare reservation: not the guard's way)
            self._answer_bytes -= _answer_size(entry)
            self._answers.pop(slot, None)
        self._answer_bytes += size
        if size:
            self._answers[slot] = None
            if self._answer_bytes > self._max_answer_bytes:
                self._drop_answers()
        return True

    def renew_now(self, slot: str, owner: str, lease_until: float) -> bool:
        """``renew()``: a reservation of ``owner``'s holds until ``lease_until``, then the TTL."""
        entry = self._records.get(slot)
        if entry is None or entry[_OWNER] != owner or entry[_STATE] != RESERVED:
            return False
        self._records[slot] = (RESERVED, owner, lease_until, *entry[3:7],
                               lease_until + self._ttl, entry[_WEIGHT])  # fmt: skip
        return True

    # ------------------------------------------------------------------ internals

    def _replace_with(self, slot: str, owner: str, record: Record) -> bool:
        head = _SEPARATOR.join(chain.from_iterable(record.headers))
        return self._replace(slot, owner, record.state, record.lease_until, record.fingerprint,
                             record.status, head, record.body)  # fmt: skip

    def _replace(
        self,
        slot: str,
        owner: str,
        state: str,
        lease_until: float,
        fingerprint: bytes,
        status: int,
        head: bytes,
        body: bytes | None,
    ) -> bool:
        records = self._records
        entry = records.get(slot)
        now = self._clock()
        if entry is not None and entry[_EXPIRES] <= now:
            self._drop(slot)  # expired: as good as gone
            entry = None
        if entry is not None and entry[_OWNER] != owner:
            return False  # another request's record: never overwritten
        # Ours, or none left (it expired or was evicted): the answer is known, keep it.
        head, body, size = self._kept(head, body)
        weight = ENTRY_WEIGHT + len(slot)
        records[slot] = (state, owner, lease_until, fingerprint, status, head, body,
                         now + self._ttl, weight)  # fmt: skip
        self._bytes += weight
        self._answer_bytes += size
        if entry is not None:
            self._bytes -= entry[_WEIGHT]
            self._answer_bytes -= _answer_size(entry)
        self._answers.pop(slot, None)
        if size:
            self._answers[slot] = None  # (a new answer: the newest)
            if self._answer_bytes > self._max_answer_bytes:
                self._drop_answers()
        if self._bytes > self._max_bytes or len(records) > self._max_records:
            self._bound()
        return True

    def _kept(self, head: bytes, body: bytes | None) -> tuple[bytes, bytes | None, int]:
        """What of an answer is kept (its header block, its body) and their size. A long header
        block keeps only the fields a replay sends; an answer over a quarter of the budget, or
        one with no body (too large to record), is not kept: it is never replayed."""
        if len(head) > HEAD_FILTERED:
            head = _replayable(head)
        size = len(head) + len(body) if body is not None else 0
        if body is None or size > self._largest_answer:
            return b"", None, 0
        return head, body, size

    def _drop(self, slot: str) -> None:
        entry = self._records.pop(slot)
        self._bytes -= entry[_WEIGHT]
        if self._answers.pop(slot, 0) is None:
            self._answer_bytes -= _answer_size(entry)

    def _drop_answers(self) -> None:
        """Drop the oldest answers (by completion) until they are back under 3/4 of their
        bound: their records stay, each now an answer that cannot be replayed (409
        replay-unavailable, never forwarded again), unless already expired (those go, and
        are not counted). Down to 3/4 rather than just under the bound, so that a pass runs
        once per quarter of the bound, not on every answer."""
        records, answers = self._records, self._answers
        size, low = self._answer_bytes, self._low_answer_bytes
        emptied: list[str] = []
        for slot in answers:
            if size <= low:
                break
            emptied.append(slot)
            size -= _answer_size(records[slot])
        now = self._clock()
        dropped = 0
        for slot in emptied:
            del answers[slot]
            state, owner, lease_until, fingerprint, status, _, _, expires, weight = records[slot]
            if expires <= now:  # expired: as good as gone, so it goes, and is not counted
                del records[slot]
                self._bytes -= weight
                continue
            dropped += 1
            records[slot] = (state, owner, lease_until, fingerprint, status, b"", None,
                             expires, weight)  # fmt: skip
        self._answer_bytes = size
        if dropped and self._on_drop_answers is not None:
            self._on_drop_answers(dropped)

    def _bound(self) -> None:
        """Drop the oldest records until the set is back under both bounds, with a margin:
        the expired first (all of them, at most once per ``SWEEP_EVERY``), then the oldest
        by reservation."""
        records = self._records
        now = self._clock()
        if now >= self._next_sweep:
            self._next_sweep = now + self._sweep_every
            for slot in [slot for slot, entry in records.items() if entry[_EXPIRES] <= now]:
                self._drop(slot)  # as good as gone: not counted as evicted
        count, size = len(records), self._bytes
        low_records, low_bytes = self._low_records, self._low_bytes
        victims: list[str] = []
        spared: list[str] = []  # reservations within their lease: moved to the back
        past_lease = 0  # reservations past it, spared (up to max_in_flight)
        expired = 0  # of the victims: not counted as evicted
        for slot, entry in records.items():
            if count <= low_records and size <= low_bytes:
                break
            if entry[_STATE] == RESERVED and entry[_EXPIRES] > now:
                if entry[_LEASE_UNTIL] > now:
                    spared.append(slot)
                    continue
                if past_lease < self._max_in_flight:
                    past_lease += 1  # left in place: every pass counts it against the cap
                    continue
            victims.append(slot)
            count -= 1
            size -= entry[_WEIGHT]
            if entry[_EXPIRES] <= now:
                expired += 1
        answers = self._answers
        for slot in victims:
            entry = records.pop(slot)
            if answers.pop(slot, 0) is None:
                self._answer_bytes -= _answer_size(entry)
        for slot in spared:
            records[slot] = records.pop(slot)
        self._bytes = size
        evicted = len(victims) - expired
        if evicted and self._on_evict is not None:
            self._on_evict(evicted)


def _replayable(head: bytes) -> bytes:
    """The header block ``head`` with only the fields a replay sends."""
    parts = head.split(_SEPARATOR)
    pairs = zip(parts[0::2], parts[1::2], strict=True)
    return _SEPARATOR.join(chain.from_iterable(replayable(pairs)))


def _answer_size(entry: Entry) -> int:
    body = entry[_BODY]
    return len(entry[_HEAD]) + len(body) if body is not None else 0


def _record(entry: Entry) -> Record:
    """The Record an entry holds (a lookup that finds one: a replay, a 409)."""
    head = entry[_HEAD]
    parts = head.split(_SEPARATOR) if head else []
    headers = tuple(zip(parts[0::2], parts[1::2], strict=True))
    return Record(entry[_STATE], entry[_OWNER], entry[_LEASE_UNTIL], entry[_FINGERPRINT],
                  entry[_STATUS], headers, entry[_BODY])  # fmt: skip
