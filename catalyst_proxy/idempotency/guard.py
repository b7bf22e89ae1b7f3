"""The proxy's side of idempotency: which routes, which key, one ``Attempt`` per keyed request.

Modes per route: the routes file's ``idempotency`` if the entry has one, else
``CATALYST_IDEMPOTENCY``: ``auto`` (optional where the upstream is ``POST
/api/billing/purchase``, its canonical name ``/api/billing/checkout``, or
``POST /api/billing/vouchers/issue``, off elsewhere), ``off``, ``optional`` or
``required``. With ``--workers`` above 1 and no shared store, ``auto`` is off
everywhere (each worker's memory would miss the retries that reach another)
and an explicit mode is a configuration error.

An ``Attempt`` is the life of one keyed request (see ``records.py``):
``begin()`` reserves the key or finds its record; a found record is judged
(409 in use, 409 outcome unknown, 422 another request, 409 replay
unavailable, or the answer to replay); a new one ends ``complete()``,
``unknown()`` or ``release()``d.

A request that may outlast its lease (a body or an answer that streams) keeps its
reservation alive: from ``Attempt.keep()`` on, it is renewed every half lease
until the attempt settles, so that it never reads as an orphan ("outcome
unknown") nor expires while its request is alive. A reservation whose process
died is not renewed: past its lease it reads as unknown, as the contract says.

With a shared store every update of a reservation runs as a task of its own
(a client that leaves cannot cut it off), and one the store refuses is tried
again in the background, backing off, until the reservation's lease is over:
a key must not stay reserved (and then read as "outcome unknown" for the
whole TTL) because the store blinked. A reservation whose reply never came
back (a lost reply, the client gone while it was on its way) is taken back
the same way: its owner token is known before it is sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Coroutine, Iterable
from typing import Any

from .. import log
from ..config import ConfigError, Settings
from ..errors import (
    IdempotencyKeyInUse,
    IdempotencyKeyMissing,
    IdempotencyKeyReused,
    IdempotencyOutcomeUnknown,
    IdempotencyReplayUnavailable,
    IdempotencyStoreUnavailable,
)
from ..metrics import Metrics
from ..routes import Route
from ..store import StorePaused, StoreRefused, StoreUnavailable
from .keys import parse_key, scope
from .memory import MemoryRecords
from .records import COMPLETED, RESERVED, UNKNOWN, Record, Records

# The SME side's /api/billing/purchase is an alias of its canonical /api/billing/checkout:
# a route to either is a purchase.
AUTO_UPSTREAMS = frozenset(
    {
        ("POST", "/api/billing/purchase"),
        ("POST", "/api/billing/checkout"),
        ("POST", "/api/billing/vouchers/issue"),
    }
)
LEASE_MARGIN = 30.0  # a reservation older than the budget plus this, unfinished, is unknown
RETRY_FIRST = 0.5  # s before a failed record update is tried again (then doubled, up to:)
RETRY_MOST = 5.0
CLOSE_PATIENCE = 5.0  # s the updates still on their way get at shutdown (see close())
CLOSE_LEAST = 1.0  # ... at least this when the server's grace is spent (a try and a retry)
HEADER = "Idempotency-Key"


def route_modes(
    settings: Settings, routes: Iterable[Route], *, workers: int = 1
) -> tuple[dict[str, str], str | None]:
    """Route path → off | optional | required, and why idempotency is off everywhere (or None)."""
    routes = tuple(routes)
    modes = {}
    for route in routes:
        mode = route.idempotency or settings.idempotency
        if mode == "auto":
            upstream = (route.upstream_method, route.upstream_path)
            mode = "optional" if upstream in AUTO_UPSTREAMS else "off"
        modes[route.path] = mode
    if workers > 1 and settings.redis_url is None:
        settings.check_workers(workers)  # an explicit CATALYST_IDEMPOTENCY: exit 2
        for route in routes:
            if route.idempotency in ("optional", "required"):
                raise ConfigError(
                    "CATALYST_ROUTES_FILE",
                    f"{settings.routes_file}: {route.path}: idempotency {route.idempotency!r} "
                    f"with --workers {workers} needs CATALYST_REDIS_URL",
                )
        if any(mode != "off" for mode in modes.values()):
            reason = (
                f"--workers {workers} without CATALYST_REDIS_URL: each worker's memory store "
                "would miss retries that reach another worker"
            )
            return dict.fromkeys(modes, "off"), reason
    return modes, None


class Idempotency:
    def __init__(
        self,
        modes: dict[str, str],
        records: Records,
        metrics: Metrics,
        *,
        lease_seconds: float,
        max_body_bytes: int,
        shared: bool,
        off_reason: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._modes = modes
        self._records = records
        self._metrics = metrics
        self._lease = lease_seconds
        self.max_body_bytes = max_body_bytes
        self.shared = shared
        # The store's calls complete without suspending (memory): no task needed around them.
        self._memory = records if isinstance(records, MemoryRecords) else None
        self.off_reason = off_reason
        self._clock = clock
        self._outcomes = metrics.idempotency
        self._pending: set[asyncio.Task[None]] = set()
        self._closing = asyncio.Event()  # set by close(): retries stop
        self._hurry = asyncio.Event()  # set as close() begins: retries stop backing off
        self.close_by: float | None = None  # the loop's time the server's grace ends (close())
        self._logger = log.get_logger()

    @property
    def active(self) -> bool:
        return any(mode != "off" for mode in self._modes.values())

    def mode(self, route: str) -> str:
        return self._modes.get(route, "off")

    def report(self) -> dict[str, Any]:
        on = sorted(path for path, mode in self._modes.items() if mode != "off")
        return {"store": "redis" if self.shared else "memory", "routes": on,
                "off_reason": self.off_reason}  # fmt: skip

    def key(self, route: str, headers: Any) -> str | None:
        """This request's key, if its route takes one (400 invalid / missing)."""
        mode = self._modes.get(route, "off")
        if mode == "off":
            return None
        key = parse_key(headers.getall(HEADER, []))
        if key is None and mode == "required":
            raise IdempotencyKeyMissing()
        return key

    async def begin(self, iss: str | None, sub: str, route: Route, key: str) -> Attempt:
        """Reserve the key, or find what it already holds (503 if the store is down)."""
        records = self._records
        where = records.slot(scope(iss, sub, route.upstream_method, route.upstream_path, key))
        owner = records.new_owner()
        lease_until = self._clock() + self._lease
        try:
            if self._memory is not None:
                existing = self._memory.reserve_now(where, owner, lease_until)
            else:
                existing = await records.reserve(where, Record(RESERVED, owner, lease_until))
        except StoreUnavailable as exc:
            self.count("store-error")
            if not isinstance(exc, (StorePaused, StoreRefused)):  # the reply may be what was lost
                self._take_back(where, owner)
            raise IdempotencyStoreUnavailable(str(exc)) from None
        except asyncio.CancelledError:
            self._take_back(where, owner)  # the client left while it was on its way
            raise
        if existing is None:
            self.count("new")
        return Attempt(self, where, owner, existing)

    def count(self, outcome: str) -> None:
        self._outcomes.add(outcome)

    def later(self, step: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run a record update that must not be lost to a cancelled request."""
        task = asyncio.get_running_loop().create_task(step)
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)
        return task

    async def close(self, patience: float | None = None) -> None:
        """Shutdown: the record updates on their way, and their retries, get up to ``patience``
        seconds to land (a release given up would leave its key reserved, then read as
        "outcome unknown" for the TTL, though nothing was forwarded); then retries stop.

        By default ``CLOSE_PATIENCE``, within what is left of the server's grace when it
        set ``close_by`` (but ``CLOSE_LEAST`` however little is left: ample for a store that
        answers; one that does not would not land them in any time a pod is given)."""
        loop = asyncio.get_running_loop()
        if patience is None:
            patience = CLOSE_PATIENCE
            if self.close_by is not None:
                patience = min(patience, max(self.close_by - loop.time(), CLOSE_LEAST))
        end = loop.time() + patience
        self._hurry.set()  # a retry backing off tries now, then every RETRY_FIRST
        # (A first try that fails meanwhile starts its retry as a new task: waited for too.)
        while self._pending and (left := end - loop.time()) > 0:
            await asyncio.wait(set(self._pending), timeout=left)
        self._closing.set()
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)
        self._closing, self._hurry = asyncio.Event(), asyncio.Event()

    async def _settle(self, where: str, owner: str, record: Record | None) -> None:
        """Replace (record) or release (None) a reservation of ours (see the module's text)."""
        if self._memory is not None:
            await self._update(where, owner, record)  # in memory: at once, never fails
        else:
            await asyncio.shield(self.later(self._update_or_retry(where, owner, record)))

    def _take_back(self, where: str, owner: str) -> None:
        """Release a reservation that may have been stored though no reply said so."""
        if self._memory is None:
            self.later(self._update_or_retry(where, owner, None, report=False))

    async def _update(self, where: str, owner: str, record: Record | None) -> None:
        if record is None:
            await self._records.release(where, owner)
        elif not await self._records.replace(where, owner, record):
            # Our reservation was gone and another request's record is in its place: it
            # stays (never overwritten), and ours is lost. Only a fault gets here.
            self._logger.warning(log.IDEMPOTENCY_RECORD_TAKEN, outcome=record.state)

    def _renew(self, where: str, owner: str) -> None:
        """One renewal of a reservation in flight (see the module's text)."""
        lease_until = self._clock() + self._lease
        if self._memory is not None:
            self._memory.renew_now(where, owner, lease_until)
        else:
            self.later(self._renew_shared(where, owner, lease_until))

    async def _renew_shared(self, where: str, owner: str, lease_until: float) -> None:
        with contextlib.suppress(StoreUnavailable):  # logged by the store; the next one tries
            await self._records.renew(where, owner, lease_until)

    async def _update_or_retry(
        self, where: str, owner: str, record: Record | None, *, report: bool = True
    ) -> None:
        """One try now; if the store refuses, counted and logged, and retried in the
        background (the caller does not wait for the retries)."""
        try:
            await self._update(where, owner, record)
            return
        except StoreUnavailable as exc:
            if report:
                self.count("store-error")
                self._logger.warning(log.IDEMPOTENCY_STORE_ERROR, reason=str(exc),
                                     outcome=_change(record))  # fmt: skip
        self.later(self._retry(where, owner, record))

    async def _retry(self, where: str, owner: str, record: Record | None) -> None:
        """Try a refused update again, backing off, until the lease is over or shutdown. (Until
        it lands, the reservation reads as in use, then as unknown: never a resend.)"""
        give_up_at = self._clock() + self._lease
        delay = RETRY_FIRST
        closing, hurry = self._closing, self._hurry
        reason = "shutdown"
        while True:
            # Back off; from the moment shutdown begins, no longer than RETRY_FIRST (a try now,
            # then every RETRY_FIRST, within close()'s patience), until close() gives up.
            wake = closing if hurry.is_set() else hurry
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), RETRY_FIRST if wake is closing else delay)
            if closing.is_set():
                break
            try:
                await self._update(where, owner, record)
                return
            except StoreUnavailable as exc:
                reason = str(exc)
                if self._clock() >= give_up_at:
                    break
            delay = min(delay * 2, RETRY_MOST)
        self._logger.warning(log.IDEMPOTENCY_STORE_ERROR, reason=reason,
                             outcome=_change(record), gave_up=True)  # fmt: skip


def _change(record: Record | None) -> str:
    return record.state if record is not None else "release"


class Attempt:
    """One keyed request. ``outcome`` is the access log's ``idempotency`` field."""

    __slots__ = ("_guard", "_owner", "_renewal", "_where", "existing", "outcome", "settled")

    def __init__(self, guard: Idempotency, where: str, owner: str, existing: Record | None):
        self._guard = guard
        self._where = where
        self._owner = owner
        self.existing = existing
        self.outcome = "new" if existing is None else ""
        self.settled = existing is not None  # nothing of ours to settle
        self._renewal: asyncio.TimerHandle | None = None

    def keep(self) -> None:
        """What follows may outlast the lease (a body or an answer streams): renew the
        reservation every half lease until the attempt settles. (Not needed before: an
        exchange whose body and answer come whole is over within the budget.)"""
        if self._renewal is None and not self.settled:
            self._renewal = asyncio.get_running_loop().call_later(
                self._guard._lease / 2, self._renew
            )

    def _renew(self) -> None:
        if self.settled:
            return
        self._guard._renew(self._where, self._owner)
        self._renewal = asyncio.get_running_loop().call_later(self._guard._lease / 2, self._renew)

    def _stop(self) -> None:
        """Settled: no more renewals."""
        self.settled = True
        if self._renewal is not None:
            self._renewal.cancel()

    def check_pending(self) -> None:
        """A found record that is not a completed answer: 409 in use or 409 unknown."""
        record = self.existing
        assert record is not None
        if record.state == RESERVED and record.lease_until > self._guard._clock():
            self._refuse("in-use", IdempotencyKeyInUse())
        if record.state != COMPLETED:
            self._refuse("unknown", IdempotencyOutcomeUnknown(f"recorded as {record.state}"))

    def judge(self, fingerprint: bytes) -> Record:
        """A completed record and this request's fingerprint: the answer to replay, or 422/409."""
        record = self.existing
        assert record is not None
        assert record.state == COMPLETED
        if record.fingerprint != fingerprint:
            self._refuse("reused", IdempotencyKeyReused("another request under this key"))
        self.outcome = "replayed"
        self._guard.count("replayed")
        if record.body is None:
            raise IdempotencyReplayUnavailable("the answer was too large to record, or dropped")
        return record

    def complete(
        self,
        fingerprint: bytes,
        status: int,
        headers: Iterable[tuple[bytes, bytes]],
        body: bytes | None,
    ) -> Coroutine[Any, Any, None] | None:
        """The SME gateway's answer is complete: record it (``body`` None: too large).

        The memory store records it at once (None); for a shared store this is the
        write to await (a task of its own, as every update: a leaving client cannot stop
        it). The attempt counts as settled from this call on, so that nothing (a
        cancellation racing the write) can mark it unknown behind it."""
        if self.settled:  # released or marked already: a completion now would undo that
            return None
        self._stop()
        memory = self._guard._memory
        if memory is not None:
            if not memory.complete_now(self._where, self._owner, fingerprint, status, headers,
                                       body):  # fmt: skip
                self._guard._logger.warning(log.IDEMPOTENCY_RECORD_TAKEN, outcome=COMPLETED)
            return None
        record = Record(COMPLETED, self._owner, 0.0, fingerprint, status, tuple(headers), body)
        return self._guard._settle(self._where, self._owner, record)

    async def unknown(self) -> None:
        """It may have been acted on (502/504 after sending, the client gone mid-exchange)."""
        if not self.settled:
            self._mark_unknown()
            await self._settle(Record(UNKNOWN, self._owner, 0.0))

    async def release(self) -> None:
        """Refused before anything was forwarded: the client may use the key again."""
        await self._settle(None)

    def settle_later(self, *, sent: bool) -> None:
        """From a request being cancelled: unknown if it was sent, else released."""
        if self.settled:
            return
        if sent:
            self._mark_unknown()
        self._stop()
        record = Record(UNKNOWN, self._owner, 0.0) if sent else None
        self._guard.later(self._guard._settle(self._where, self._owner, record))

    def _mark_unknown(self) -> None:
        self.outcome = "unknown"
        self._guard.count("unknown")

    async def _settle(self, record: Record | None) -> None:
        if self.settled:
            return
        self._stop()
        await self._guard._settle(self._where, self._owner, record)

    def _refuse(self, outcome: str, error: Exception) -> None:
        self.outcome = outcome
        self._guard.count(outcome)
        raise error
