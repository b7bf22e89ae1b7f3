"""One keep-alive HTTP/1.1 connection to the SME gateway: its states, its parser, its bytes.

A connection's life, as explicit states (only IDLE is reusable, and "a byte
was written" is the state SENDING, not a flag found out later)::

    CONNECTING ─> RESERVED ─> SENDING ─> SENT ─> RECEIVING ─> IDLE ─> RESERVED ─> ...
                     │           │  └────────────────┘ │       │
                     └───────────┴──────────┴──────────┴───────┴──> CLOSED

- RESERVED: taken for one request, nothing written yet. The one safe moment to
  drop a connection found closed and use another (the pool does that).
- SENDING: at least one byte of the request is on its way; from here on a
  failure ends the request, it is never sent again anywhere.
- SENT: the whole request was handed to the transport.
- RECEIVING: the final response head arrived (possibly before the request was
  complete: an early answer); the body is being read.
- IDLE again only when both messages were complete, the upstream keeps the
  connection alive, and not one byte arrived after the response (an
  unsolicited second answer closes the connection, so answers never desync).
  Reserving an IDLE connection asks the socket itself (``poll``) whether
  anything arrived that the event loop has not delivered yet: bytes, a close
  or a reset found then drop the connection while that is still safe.

An upstream may answer, and act, before it has read the whole request (an
early answer), then close, which resets the connection while the request
body is still being written. A write that finds the reset closes the
transport at once, before it reads what arrived ahead of the reset: the
answer would be lost, and the request would look as if it never reached
anyone. So a plaintext connection keeps a second descriptor of its socket,
and a connection lost mid-exchange first reads what the socket still holds
(``_salvage``). And a failure once a final answer has begun counts as sent
(``may_have_acted``), however much of the request was written.

The parser is httptools (llhttp). Its callbacks run inside ``feed_data()``;
they only record, and every decision is taken after ``feed_data()`` returns.
Framing is the parser's: Content-Length, chunked, or (for a response with
neither) the connection's end, and only a clean end (the upstream's FIN, not a
reset); interim 1xx answers are skipped. Trailer fields are read and dropped
(bounded like the head): they never become the answer's header fields. A
transfer coding other than ``chunked`` is a bad response (the gateway never
decodes one, and dropping the header would pass coded bytes off as the body).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import math
import os
import select
from collections.abc import Callable
from typing import cast

import httptools

from ..headers import only_chunked
from .failures import BadResponse, BodyBroken, BodyFailed, ResponseTimeout
from .flow import ReadBuffer, WriteFlow
from .watchdog import Watchdog

# Limits on what the upstream may send before its body (aiohttp's client allows 8 KiB
# lines; Envoy allows 60 KiB of response headers): a bigger head is a bad response.
MAX_HEAD_BYTES = 32 * 1024
MAX_HEADER_FIELDS = 128
MAX_TRAILER_BYTES = MAX_HEAD_BYTES  # trailer fields are dropped, but not read without end
_TRANSFER_ENCODING = b"transfer-encoding"
_INTERIM_BODY = "an interim (1xx) answer with a body"
# Anything to read on an idle connection (bytes, or the peer's FIN); errors and hang-ups
# are always reported. (POLLRDHUP is Linux's; select.poll is missing on Windows, where
# reuse goes unchecked, as before.)
_READABLE = select.POLLIN | getattr(select, "POLLRDHUP", 0)
_HAS_POLL = hasattr(select, "poll")
_SALVAGE_READ = 64 * 1024


class State(enum.Enum):
    CONNECTING = "connecting"
    RESERVED = "reserved"
    SENDING = "sending"
    SENT = "sent"
    RECEIVING = "receiving"
    IDLE = "idle"
    CLOSED = "closed"


CONNECTING, RESERVED, SENDING, SENT, RECEIVING, IDLE, CLOSED = State
_EXCHANGING = frozenset({SENDING, SENT, RECEIVING})  # bytes from the upstream are expected


class Connection(asyncio.Protocol):
    """The protocol object of one upstream connection (created by the pool)."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        on_closed: Callable[[Connection], None],
        watchdog: Watchdog,
    ) -> None:
        self._loop = loop
        self._on_closed = on_closed
        self._watchdog = watchdog
        self._transport: asyncio.Transport | None = None
        self._poll: select.poll | None = None  # the socket, asked directly before a reuse
        self._spare_fd: int | None = None  # a second descriptor of the socket (_salvage)
        self._eof = False  # the upstream's clean end of the stream (FIN)
        self._parser = httptools.HttpResponseParser(self)
        self._write = WriteFlow(loop)
        self._body = ReadBuffer()
        self._waiter: asyncio.Future[bool] | None = None
        self.state = CONNECTING
        self.pooled = False  # counted by the pool (set by it once connected)
        self.idle_since = 0.0
        self._reset()

    def _reset(self) -> None:
        """Forget the last exchange (a new one starts on this connection)."""
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self._head_done = False
        self._interim = False
        self._answering = False  # a final answer began (its status line, at least in part)
        self._complete = False
        self._keep_alive = False
        self._extra = False  # bytes arrived after the complete response
        self._failure: str | None = None
        self._body_error: BaseException | None = None
        self._head_received = 0
        self._expired_at = -math.inf  # the latest deadline the watchdog expired
        self._head_size = 0
        self._trailer_size = 0
        self._codings: list[bytes] = []  # Transfer-Encoding values
        self._skip_body = False
        self.request_complete = False
        self._body.clear()

    # --- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        self._transport = cast(asyncio.Transport, transport)
        self._body.attach(self._transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and _HAS_POLL:
            self._poll = select.poll()
            self._poll.register(sock.fileno(), _READABLE)
        if sock is not None and transport.get_extra_info("sslcontext") is None:
            with contextlib.suppress(OSError):  # out of descriptors: no salvage, as before
                self._spare_fd = os.dup(sock.fileno())

    def data_received(self, data: bytes) -> None:
        if self.state is not SENDING and self.state is not SENT and self.state is not RECEIVING:
            self.close()  # bytes nobody asked for (idle, or not yet written to): desynced
            return
        if not self._head_done:
            self._head_received += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._failure = self._failure or "the upstream switched protocols"
        except httptools.HttpParserError as exc:
            if self._complete:
                self._extra = True  # garbage after a complete answer
            else:
                self._failure = self._failure or f"unparsable response: {exc}"
        if not self._head_done and self._failure is None and self._head_received > MAX_HEAD_BYTES:
            self._failure = "response head over the size limit"
        if self._failure is not None or self._extra:
            self._transport_close()  # stop reading; what is buffered may still be delivered
        else:
            self._body.check()
        self._wake()

    def eof_received(self) -> bool:
        self._eof = True
        return False  # close the transport; connection_lost() does the rest

    def connection_lost(self, exc: Exception | None) -> None:
        spare, self._spare_fd = self._spare_fd, None
        if spare is not None:
            try:
                if self.state in _EXCHANGING and not self._complete:
                    self._salvage(spare)
            finally:
                os.close(spare)
        if self._head_done and not self._complete and self._failure is None:
            if self._eof and exc is None and self._delimited_by_close():
                self._complete = True  # the upstream's FIN ends a body framed by the close
            elif exc is not None and not self._eof:
                self._failure = "the upstream reset the connection mid-body"
            else:
                self._failure = "the upstream closed the connection mid-body"
        elif not self._head_done and self._failure is None:
            self._failure = "the upstream closed the connection before a complete response head"
        self._write.connection_lost()
        self._mark_closed()
        self._wake()

    def pause_writing(self) -> None:
        self._write.pause()

    def resume_writing(self) -> None:
        self._write.resume()

    # --- httptools callbacks: record only ---------------------------------------------------

    def on_message_begin(self) -> None:
        if self._complete:
            self._extra = True
        else:
            self._answering = True  # until it turns out to be an interim answer

    # Once the response is complete, whatever follows (an unsolicited second answer) is
    # noted by on_message_begin() and otherwise ignored: it must not touch this answer.

    def on_status(self, reason: bytes) -> None:
        self._head_size += len(reason) + 16  # the reason phrase, and the rest of the line

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._extra:
            return
        if self._interim:  # a trailer field of an interim answer: it had a body
            self._failure = self._failure or _INTERIM_BODY
            return
        if self._head_done:  # a trailer field: dropped, and bounded
            self._trailer_size += len(name) + len(value) + 4
            if self._trailer_size > MAX_TRAILER_BYTES:
                self._failure = self._failure or "response trailers over the size limit"
            return
        self.headers.append((name, value))
        self._head_size += len(name) + len(value) + 4
        if len(name) == 17 and name.lower() == _TRANSFER_ENCODING:
            self._codings.append(value)

    def on_headers_complete(self) -> None:
        if self._extra or self._failure is not None:  # (an answer already refused: no head)
            return
        status = self._parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            self._interim = True  # 100 Continue, 103 Early Hints: skipped
            self.headers = []
            self._head_size = 0
            self._codings = []
        elif status < 100 or status == 101 or status > 599:
            self._failure = f"unacceptable status {status}"
        elif self._head_size > MAX_HEAD_BYTES or len(self.headers) > MAX_HEADER_FIELDS:
            self._failure = "response head over the size limit"
        elif self._codings and not only_chunked(self._codings):
            self._failure = "a transfer coding other than chunked"
        else:
            self.status = status
            self._head_done = True
            if self._skip_body:
                self._complete = True  # a HEAD answer: whatever its framing says, no body

    def on_body(self, body: bytes) -> None:
        if self._interim:  # llhttp frames a 1xx besides 100-103 like any answer; it has none
            self._failure = self._failure or _INTERIM_BODY
        elif not self._skip_body and not self._extra:
            self._body.append(body)

    def on_message_complete(self) -> None:
        if self._extra:
            return
        if self._interim:
            self._interim = False
            self._answering = False
        elif self._failure is None:  # (trailers over the limit: never a clean end)
            self._complete = True
            # Only valid now: llhttp clears the message's flags once this callback returns.
            self._keep_alive = self._parser.should_keep_alive()

    # --- the exchange -----------------------------------------------------------------------

    @property
    def transport(self) -> asyncio.Transport | None:
        return self._transport

    @property
    def is_idle(self) -> bool:
        return self.state is IDLE

    def reserve(self) -> bool:
        """Take this connection for one request; False if it turned out to be closed, or
        anything arrived on it while idle (delivered or still in the socket)."""
        transport = self._transport
        if (
            self.state is not IDLE
            or transport is None
            or transport.is_closing()
            or (self._poll is not None and self._poll.poll(0))
        ):
            if self.state is not CLOSED:
                self.close()
            return False
        self.state = RESERVED
        return True

    def connected(self) -> None:
        """A new connection, straight to its first request."""
        self.state = RESERVED

    def send(self, data: bytes, *, skip_body: bool = False) -> None:
        """Write request bytes (the first call moves RESERVED → SENDING)."""
        if self.state is RESERVED:
            self.state = SENDING
            self._skip_body = skip_body
        if self._transport is not None and self.state is not CLOSED:
            self._transport.write(data)

    def request_sent(self) -> None:
        """The whole request has been handed to the transport."""
        self.request_complete = True
        if self.state is SENDING:
            self.state = SENT

    def body_failed(self, exc: BaseException) -> None:
        """The request body's source failed: the upstream must never see it complete."""
        self._body_error = exc
        self.abort()
        self._wake()

    async def drain(self) -> None:
        await self._write.drain()

    async def response_head(self, deadline: float) -> None:
        """Wait for the final response head; raise the failure table's kinds otherwise."""
        while True:
            if self._head_done:
                self.state = RECEIVING
                return
            if self._body_error is not None:
                raise BodyFailed(self._body_error)
            if self._failure is not None:
                raise BadResponse(self._failure, sent=self.may_have_acted)
            if not await self._wait(deadline):
                raise ResponseTimeout(
                    "no response head within the budget", sent=self.may_have_acted
                )

    @property
    def may_have_acted(self) -> bool:
        """The upstream may have acted on the request: it had all of it, or it began a final
        answer (an upstream may answer, and act, before it has read the whole body)."""
        return self.request_complete or self._answering

    @property
    def body_complete(self) -> bool:
        return self._complete

    def take_body(self) -> bytes:
        """The whole body, when ``body_complete`` already (no waiting)."""
        return self._body.take_all()

    async def read(self, budget: float) -> bytes:
        """The next piece of the body, b"" at its end; BodyBroken if it broke or stalled,
        BodyFailed if the request's body failed meanwhile (an early answer cut with it)."""
        while True:
            if self._body.size:
                return self._body.take()
            if self._complete:
                return b""
            if self._body_error is not None:  # the client's body broke: the answer with it
                raise BodyFailed(self._body_error)
            if self._failure is not None:
                raise BodyBroken(self._failure)
            if not await self._wait(self._loop.time() + budget):
                raise BodyBroken("the response body stalled past the budget", stalled=True)

    def finish(self) -> bool:
        """The exchange is over: back to IDLE if the connection is reusable, else closed."""
        reusable = (
            self.state is RECEIVING
            and self._complete
            and self.request_complete
            and not self._extra
            and not self._skip_body  # the parser still expects that HEAD answer's body
            and self._body.size == 0
            and self._transport is not None
            and not self._transport.is_closing()
            and self._keep_alive
        )
        if not reusable:
            self.abort() if not (self._complete and self.request_complete) else self.close()
            return False
        self._reset()
        self.state = IDLE
        self.idle_since = self._loop.time()
        return True

    def close(self) -> None:
        """Close (after flushing what was written)."""
        self._transport_close()
        self._mark_closed()

    def abort(self) -> None:
        """Close at once, dropping unsent bytes: a half-sent request must stay incomplete."""
        if self._transport is not None:
            self._transport.abort()
        self._mark_closed()

    def discard(self) -> None:
        """Its connect was given up (see ``Pool._connect``): close what it holds, the socket's
        second descriptor included, whether or not ``connection_lost()`` ever comes (it finds
        nothing left to close if it does)."""
        spare, self._spare_fd = self._spare_fd, None
        if spare is not None:
            os.close(spare)
        self.abort()

    # --- internals --------------------------------------------------------------------------

    def _transport_close(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.close()

    def _mark_closed(self) -> None:
        if self.state is not CLOSED:
            self.state = CLOSED
            self._on_closed(self)

    def _salvage(self, fd: int) -> None:
        """Read what the socket still holds into the parser (see the module's text): the bytes
        the upstream sent before it reset the connection, which a write that failed on the
        reset left unread. Bounded by the socket's receive buffer."""
        os.set_blocking(fd, False)  # (shared with the transport's descriptor: it already is)
        while not self._complete and self._failure is None and not self._extra:
            try:
                data = os.read(fd, _SALVAGE_READ)
            except OSError:  # nothing more (EAGAIN), or the reset itself
                return
            if not data:
                return
            self.data_received(data)

    def _delimited_by_close(self) -> bool:
        """RFC 9112 §6.3: a response with neither a chunked coding nor a length ends at close."""
        if self._codings:
            return False  # chunked (any other coding was refused with the head)
        return not any(name.lower() == b"content-length" for name, _ in self.headers)

    async def _wait(self, deadline: float) -> bool:
        """Wait for news (bytes, close, a body failure); False if ``deadline`` passed first.

        A deadline the watchdog has expired stays expired, even when news came first in the
        same loop turn (it woke the wait, and the expiry found it woken): a head trickled
        a byte at a time must not win a new wait, and a new look, with every byte."""
        if deadline <= self._expired_at:
            return False
        waiter = self._waiter = self._loop.create_future()
        self._watchdog.watch(self, deadline)
        try:
            return bool(await waiter)
        finally:
            self._watchdog.unwatch(self)
            self._waiter = None

    def expire(self, deadline: float) -> None:
        """The watchdog: ``deadline``, the current wait's, passed."""
        self._expired_at = max(self._expired_at, deadline)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(False)

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(True)
