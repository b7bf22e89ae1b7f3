"""Idempotency records in Redis/Valkey, shared by every worker and replica.

- Reservation: a Lua script that stores the record unless one is there
  (returned instead), atomic: of two gateways racing on one key exactly one
  reserves it. A reservation outlives its lease by the TTL, whatever the TTL:
  it must never expire while its request may still be in flight (a retry
  would be forwarded again).
- A reservation is fenced in time: the script stores nothing once the
  server's clock is past half the lease (``TIME``; the gateway's wall clock
  sets the fence). A reservation whose reply the gateway stopped waiting for
  (a stalled server: the client was told 503, nothing forwarded) is taken back
  in the background until the lease is over; one that a stalled server runs
  later than that would hold the key as "outcome unknown" for the whole TTL,
  for a request that never went anywhere. With the fence it runs as a no-op
  (clocks may disagree by up to half the lease: ~16 s by default). A take-back
  that finds no reservation of ours leaves a marker of the owner token (a
  ``catalyst-idem:taken:`` key, for a lease, in the record's hash slot) that
  the reservation checks: one held up on its way (a connection whose bytes a
  lossy path delivers late) and run after its take-back stores nothing,
  though it is inside its fence. (No take-back follows an error reply: the
  reservation is known to have stored nothing.)
- Completion, "unknown" and release: compare-and-set on the record's owner
  token in a Lua script, never a plain ``SET``: a first attempt that outlived
  its record can never overwrite a newer one. A completion (or "unknown") that
  finds no record at all (the store lost the reservation: a restart without
  persistence, a flush, an eviction) is written all the same, and logged: the
  answer is known, and every retry from then on is replayed, not forwarded.
- Renewal: a request still in flight at half its lease renews its reservation
  (a compare-and-set on the owner and the reserved state: never over its own
  completion), so that no reservation expires, or reads as an orphan, while its
  request is alive however long its body or answer streams.
- Keys are ``catalyst-idem:`` + a SHA-256 of scope and key: the client's key
  is never stored. Completed and unknown records expire after the TTL.

Redis must not evict them (``maxmemory-policy noeviction``: an evicted
reservation would let a retry through twice); ``check_policy()`` warns when the
server says otherwise, each time the store comes up (start-up, reconnection).
Replication is asynchronous: a failover can lose the last writes, which this
store cannot prevent (a completion then writes its record anew, see above).
"""

from __future__ import annotations

from typing import Any

import orjson

from .. import log
from ..ids import hex_id
from ..store import Store, StoreRefused, StoreUnavailable
from .keys import slot
from .records import OWNER_LENGTH, RESERVED, Record

PREFIX = "catalyst-idem:"
TAKEN = PREFIX + "taken:"  # its reservation was taken back (one prefix for both: ACLs)


def taken(slot: str, owner: str) -> str:
    """The take-back marker of ``owner``'s reservation at ``slot``: under the record's own key
    as its hash tag, so that a cluster files both in one hash slot (a script's keys must be)."""
    return f"{TAKEN}{{{PREFIX}{slot}}}:{owner}"


# The record there (bytes), or 1: stored ours; 0: too late (past ARGV[3], Unix ms; 0: no fence);
# 2: taken back already (KEYS[2] is there). (replicate_commands: a write after TIME needs it
# before Redis 5; a no-op since.)
_RESERVE = """
if redis.replicate_commands then redis.replicate_commands() end
local fence = tonumber(ARGV[3])
if fence > 0 then
  local now = redis.call('TIME')
  if tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) > fence then
    return 0
  end
end
if redis.call('EXISTS', KEYS[2]) == 1 then
  return 2
end
local found = redis.call('GET', KEYS[1])
if found then
  return found
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""

# 1: replaced our record; 2: written where there was none (lost); 0: another's record is there.
_REPLACE = f"""
local current = redis.call('GET', KEYS[1])
if not current then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 2
end
if string.sub(current, 1, {OWNER_LENGTH}) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0
"""

# ARGV[1]: the start of our reservation's bytes (owner, then the state): only that is renewed.
_RENEW = """
local current = redis.call('GET', KEYS[1])
if current and string.sub(current, 1, string.len(ARGV[1])) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0
"""
_RESERVED_STATE = orjson.dumps({"state": RESERVED})[:-1]  # b'{"state":"reserved"', as encoded

# 1: deleted our record. 0: none of ours there; then a reservation of ours still on its way
# must store nothing when it runs: KEYS[2] says so for ARGV[2] ms (its fence is sooner).
_RELEASE = f"""
local current = redis.call('GET', KEYS[1])
if current and string.sub(current, 1, {OWNER_LENGTH}) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
redis.call('SET', KEYS[2], '1', 'PX', ARGV[2])
return 0
"""


class RedisRecords:
    def __init__(self, store: Store, ttl: float, *, lease: float) -> None:
        """``lease``: how long a reservation may be in flight (the guard's lease)."""
        self._store = store
        self._redis = store.redis
        self._ttl_ms = max(int(ttl * 1000), 1)
        self._hold_ms = self._ttl_ms + int(lease * 1000)  # a reservation: its lease, then TTL
        self._fence = lease / 2  # before its lease ends: a reservation runs by then or never
        self._lease_ms = max(int(lease * 1000), 1)  # a take-back's marker: past any fence
        self._reserve = self._redis.register_script(_RESERVE)
        self._replace = self._redis.register_script(_REPLACE)
        self._release = self._redis.register_script(_RELEASE)
        self._renew = self._redis.register_script(_RENEW)

    def slot(self, scope: str) -> str:
        return slot(scope)  # never the client's key: a digest of it

    def new_owner(self) -> str:
        return hex_id()  # 128 random bits: unique across workers and replicas

    async def reserve(self, slot: str, record: Record) -> Record | None:
        if record.state == RESERVED:
            hold_ms, fence_ms = self._hold_ms, int((record.lease_until - self._fence) * 1000)
        else:
            hold_ms, fence_ms = self._ttl_ms, 0
        args: list[Any] = [record.encode(), hold_ms, fence_ms]
        keys = [PREFIX + slot, taken(slot, record.owner)]
        found: Any = await self._store.run(lambda: self._reserve(keys=keys, args=args))
        if isinstance(found, bytes):
            try:
                return Record.decode(found)
            except (ValueError, KeyError, TypeError, AttributeError):
                # Not a record of ours (another program writes into this keyspace, or it was
                # truncated): this key is refused (503, nothing forwarded) until it expires,
                # and the store is not paused for every other key.
                raise StoreRefused("a record under this key could not be read") from None
        if found == 1:
            return None
        if found == 2:  # only a reservation no one waits for any more gets here
            raise StoreUnavailable("the reservation ran after it was taken back")
        raise StoreUnavailable(  # only a server clock far ahead of ours gets here at once
            f"the store ran the reservation past its fence: is its clock more than "
            f"{self._fence:.0f} s ahead of this host's?"
        )

    async def replace(self, slot: str, owner: str, record: Record) -> bool:
        args: list[Any] = [owner, record.encode(), self._ttl_ms]
        done = await self._store.run(lambda: self._replace(keys=[PREFIX + slot], args=args))
        if done == 2:
            log.get_logger().warning(
                log.IDEMPOTENCY_RECORD_LOST, outcome=record.state,
                advice="the store lost a reservation (restart without persistence, flush or "
                "eviction): a retry in between may have been forwarded again",
            )  # fmt: skip
        return bool(done)

    async def renew(self, slot: str, owner: str, lease_until: float) -> bool:
        data = Record(RESERVED, owner, lease_until).encode()
        args: list[Any] = [owner.encode() + _RESERVED_STATE, data, self._hold_ms]
        done = await self._store.run(lambda: self._renew(keys=[PREFIX + slot], args=args))
        return bool(done)

    async def release(self, slot: str, owner: str) -> bool:
        keys = [PREFIX + slot, taken(slot, owner)]
        args: list[Any] = [owner, self._lease_ms]
        done = await self._store.run(lambda: self._release(keys=keys, args=args))
        return bool(done)

    async def check_policy(self) -> None:
        """Warn if the server may evict records, or keeps none across a restart (managed
        servers may refuse CONFIG: fine, nothing is said)."""
        policy = await self._config("maxmemory-policy")
        if await self._config("appendonly") == "no" and await self._config("save") == "":
            log.get_logger().warning(
                log.IDEMPOTENCY_NO_PERSISTENCE,
                advice="the server persists nothing (no snapshots, no append-only file): a "
                "restart forgets every record, and a retry after it is forwarded again",
            )  # fmt: skip
        if policy and policy != "noeviction":
            log.get_logger().warning(
                log.IDEMPOTENCY_EVICTION,
                maxmemory_policy=policy,
                advice="set maxmemory-policy noeviction: an evicted reservation lets a retry "
                "through twice",
            )

    async def _config(self, name: str) -> str | None:
        """A server setting, or None if the server will not say."""
        try:
            reply: Any = await self._redis.config_get(name)
        except Exception:
            return None
        value = (reply or {}).get(name, (reply or {}).get(name.encode()))
        return value.decode() if isinstance(value, bytes) else value
