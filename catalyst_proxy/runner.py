"""The HTTP server around the app: protocol limits, the dispatcher, answers to unparsable requests.

``Runner`` runs the app's lifecycle (start-up and cleanup) like aiohttp's
``AppRunner``, but serves each request with the app's ``Dispatcher`` through
aiohttp's low-level server: no router resolution, no middleware chain, no
``web.Request`` per request (the profile showed those cost a tenth of a hop).

aiohttp answers a request it cannot parse (a header line over the limit, a bad
request line, a bad chunk size) before any handler runs, with a text body that
quotes the offending bytes, and logs the same text with a traceback. The
offending bytes are often an ``Authorization`` or ``Cookie`` line, that is, a
token. ``Runner`` serves the app with a protocol handler that answers those
with a JSON body naming only the kind of error, and logs only the exception's
type.

It also bounds a request head as a whole (``MAX_HEAD_BYTES``), which aiohttp
bounds only line by line, and closes a connection that sends no whole head in
time (``HEAD_TIMEOUT``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, HttpProcessingError, LineTooLong
from aiohttp.http_parser import RawRequestMessage
from aiohttp.streams import EMPTY_PAYLOAD, StreamReader
from aiohttp.web_protocol import RequestHandler, _ErrInfo

from . import log
from .app import PARTS
from .dispatch import Dispatcher, error_response
from .errors import BadRequest, HeaderFieldsTooLarge, InternalError, ProxyError
from .ids import hex_id
from .proxy import (
    PATIENCE_ALMOST,
    PATIENCE_CHECKS,
    SEND_PATIENCE,
    close_with_reset,
    waiting_for_client,
)

# Server-side protocol settings (web.AppRunner keyword arguments).
SERVER_OPTIONS: dict[str, Any] = {
    "handler_cancellation": True,  # a client that goes away cancels its upstream request
    "auto_decompress": False,  # never inflate a request body (we refuse encoded bodies: 415)
    "max_line_size": 16 * 1024,
    "max_field_size": 16 * 1024,  # Keycloak tokens approach 8 KiB; the default is 8190
    "access_log": None,  # our middleware writes the access log
    # An idle keep-alive connection (or one holding part of its next request's head) closes
    # after this (nginx's keepalive_timeout; aiohttp's own default is an hour): a client,
    # no token needed, could otherwise hold a descriptor per connection for that long.
    "keepalive_timeout": 75.0,
}
# A new connection that has not sent a whole request head by then closes (nginx's
# client_header_timeout); after its first request the keep-alive timeout takes over.
HEAD_TIMEOUT = 60.0
# A whole request head (request line and header lines) past this is 431, at once: aiohttp
# bounds each line (16 KiB) and their number (128), not their sum, and it keeps a head it is
# still reading twice over (bytes and text): 128 lines were ~4 MB per connection, held until
# the head timeout, with no token needed. (Envoy's default is 60 KiB, nginx's 4 x 8 KiB.)
MAX_HEAD_BYTES = 64 * 1024
HEAD_SLICE = 16 * 1024  # a longer read is parsed in slices of this (see data_received)
# All the unfinished heads a process holds, together (their bytes, as counted for
# MAX_HEAD_BYTES). Each costs ~2.5 times its bytes in memory until it ends or its timeout:
# 2,000 connections each holding 64 KB of a head that never ends, no token needed, took
# ~310 MB, past a pod's memory limit. A connection whose unfinished head would take the
# total past this is closed, unanswered. A head that arrives in one read is never counted.
HEADS_BUDGET = 16 * 1024 * 1024


_parse = RequestHandler.data_received


def _head_end(before: bytes, data: bytes) -> int:
    """How many of ``data``'s bytes the head in progress takes: up to and with its blank
    line, found with the last bytes read ``before`` it (aiohttp's parser ends lines with
    CRLF only); all of them if there is none (a more lenient parser)."""
    end = (before + data).find(b"\r\n\r\n")
    return end + 4 - len(before) if end >= 0 else len(data)


def _open(body: StreamReader) -> bool:
    """Still being delivered: not ended, and not failed."""
    return not body.is_eof() and body.exception() is None


def cut(handlers: Iterable[RequestHandler]) -> None:
    """The server is done and the process exits: ``handlers``' connections, some still
    flushing their buffers, are about to be dropped with it."""
    for handler in handlers:
        if isinstance(handler, _RequestHandler):
            handler.cut()


def _end_with_an_error(body: StreamReader) -> None:
    """End a request body the parser gave up on: its reader gets the error (never the
    parser's own, whose text quotes the refused bytes: a cookie, a token), and the body
    counts as ended, so that aiohttp does not read on from it after the answer (it would
    log the error as unhandled, a traceback per request)."""
    body.set_exception(BadHttpMessage("the request body could not be parsed"))
    body.feed_eof()


class _RequestHandler(RequestHandler):
    __slots__ = (
        "_body", "_closed", "_ended", "_head_bytes", "_head_refused", "_head_timer", "_held",
        "_last3", "_send_left", "_send_since", "_send_watch", "close_framed",
    )  # fmt: skip

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._body: StreamReader | None = None  # the last request's body on this connection
        self._head_timer: asyncio.TimerHandle | None = None  # until the first head is in
        self._head_bytes = 0  # a head's bytes (or a trailer section's) since the last message
        self._last3 = b""  # the last 3 bytes parsed: a head's blank line may span two reads
        self._head_refused = False  # over MAX_HEAD_BYTES: answered 431, nothing more parsed
        self._ended: StreamReader | None = None  # the last body seen at its end
        self._held = b""  # the rest of a read that came while aiohttp had stopped reading
        # An answer framed by the close: "streaming", then "handed" to the transport (proxy.py).
        self.close_framed: str | None = None
        self._closed: asyncio.Transport | None = None  # closed by force_close(), maybe flushing
        self._send_watch: asyncio.TimerHandle | None = None  # while the client is not reading
        self._send_left = 0  # what waited for the client when it was last seen to take some
        self._send_since = 0.0  # ... and when
        super().__init__(*args, **kwargs)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        patience = getattr(self._manager, "head_timeout", HEAD_TIMEOUT)
        self._head_timer = self._loop.call_later(patience, self._head_overdue)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        if self._send_watch is not None:
            self._send_watch.cancel()
            self._send_watch = None
        if self._head_bytes:
            self._holding(0)
        super().connection_lost(exc)

    # A client that stops reading (a stream of pipelined requests whose answers it never
    # takes; any answer, the gateway's own as much as the SME gateway's) would hold its
    # connection, and the answers buffered for it, for ever: aiohttp waits for the buffer to
    # drain with no time limit, and a close waits for it to empty. While writing is paused
    # (the transport's buffer over its high-water mark), and while a close waits on what the
    # buffer holds, what waits for the client (the buffer and the kernel's send queue) is
    # looked at PATIENCE_CHECKS times per send patience (60 s, nginx's
    # send_timeout), and a client seen to take nothing for that long is let go: the
    # connection is aborted, with a reset. A streamed answer also has its own watch
    # (proxy._send), which ends its transfer in the answer's framing first.
    def pause_writing(self) -> None:
        super().pause_writing()
        transport = self.transport
        if self._send_watch is None and transport is not None:
            self._watch_sending(transport)

    def _watch_sending(self, transport: asyncio.Transport) -> None:
        self._send_left = waiting_for_client(transport)
        self._send_since = self._loop.time()
        self._send_watch = self._loop.call_later(self._patience() / PATIENCE_CHECKS,
                                                 self._look_at_sending)  # fmt: skip

    def resume_writing(self) -> None:
        closing = self._closed is not None  # (its close waits for the rest: still watched)
        if self._send_watch is not None and not closing:
            self._send_watch.cancel()
            self._send_watch = None
        super().resume_writing()

    def _patience(self) -> float:
        return float(getattr(self._manager, "send_patience", SEND_PATIENCE))

    def _look_at_sending(self) -> None:
        self._send_watch = None
        transport = self.transport or self._closed
        if transport is None or not transport.get_write_buffer_size():
            return  # nothing waits for the client
        now, left = self._loop.time(), waiting_for_client(transport)
        if left != self._send_left:
            # Less: the client took some. More: an answer's write went on after the pause
            # began (its drain waits next, so this happens once per write, not at will).
            self._send_left, self._send_since = left, now
        elif now - self._send_since >= self._patience() * PATIENCE_ALMOST:
            # It took nothing for the whole patience: let go, with a reset (an answer framed
            # by the connection's end must not look whole: the kernel would send what it
            # holds, then a FIN).
            close_with_reset(transport)
            transport.abort()
            return
        self._send_watch = self._loop.call_later(self._patience() / PATIENCE_CHECKS,
                                                 self._look_at_sending)  # fmt: skip

    def force_close(self) -> None:
        if self.close_framed == "streaming" and self.transport is not None:
            close_with_reset(self.transport)  # mid-answer: a FIN would complete it
        transport = self._closed = self.transport or self._closed  # (aiohttp forgets it here)
        if self._head_bytes:  # nothing more is parsed from it
            self._holding(0)
        super().force_close()
        # The close waits for what the buffer holds: a client that does not read would keep
        # it for ever (the keep-alive timeout's close too). The send watch lets it go.
        if transport is not None:
            self._watch_closing(transport)

    async def start(self) -> None:
        try:
            await super().start()
        finally:
            # After the last answer of a connection not kept alive (`Connection: close`,
            # HTTP/1.0), aiohttp closes the transport itself, not through force_close(): the
            # close waits for what the buffer holds, for ever if the client reads nothing
            # (a zero window answers the kernel's probes). Watched as any close.
            transport = self.transport
            if transport is not None and transport.is_closing():
                self._watch_closing(transport)

    def _watch_closing(self, transport: asyncio.Transport) -> None:
        """A close that waits for what the buffer holds is watched until it ends (and
        resume_writing() keeps that watch)."""
        self._closed = transport
        if self._send_watch is None and transport.get_write_buffer_size():
            self._watch_sending(transport)

    def cut(self) -> None:
        """The process exits, and this connection with it. An answer framed by the close
        whose last bytes are still in the transport's buffer (not yet the kernel's: what
        the kernel has, it still delivers) would end short with a FIN: a reset."""
        transport = self.transport or self._closed
        if (
            self.close_framed == "handed"
            and transport is not None
            and transport.get_write_buffer_size()
        ):
            close_with_reset(transport)

    def _head_overdue(self) -> None:
        self._head_timer = None
        self.force_close()  # nothing was read as a request: no one to answer

    def data_received(self, data: bytes) -> None:
        if self._head_refused:
            return
        if data and self._held:  # (not expected: aiohttp reads nothing while it is stopped)
            data, self._held = self._held + data, b""  # the bytes stay in their order
        if len(data) > HEAD_SLICE:
            # A long read is parsed a slice at a time, so that a head's bytes are counted
            # wherever the head begins in it (after a whole request, at the end of a body).
            # It is what a client sending smaller pieces causes: the parser holds no more.
            for start in range(0, len(data), HEAD_SLICE):
                if self._reading_paused or len(self._messages) >= self._max_msg_queue_size:
                    # aiohttp stopped reading (a body's reader is full, or its queue of
                    # pipelined requests): its parser would keep the rest unparsed, then
                    # parse it on resuming, uncounted. Held here until it resumes instead.
                    self._held += data[start:]
                    return
                self.data_received(data[start : start + HEAD_SLICE])
            return
        messages = self._messages
        queued = len(messages)
        body = self._body
        fed = 0 if body is None else body.total_bytes
        before = self._last3
        self._last3 = data[-3:] if len(data) >= 3 else (before + data)[-3:]
        _parse(self, data)  # aiohttp's (super() would cost a lookup on every read)
        if len(messages) != queued:  # a head, or bytes refused: else a piece of a body
            if (
                self._head_bytes + len(data) > MAX_HEAD_BYTES
                and self._head_bytes + _head_end(before, data) > MAX_HEAD_BYTES
            ):  # (a head that began in an earlier read, ended in this one: by its bytes)
                for _ in range(len(messages) - queued):
                    messages.pop()  # it, and what followed it: never handled
                self._refuse_head()
                return
            if self._head_bytes:
                self._holding(0)
            for index in range(queued, len(messages)):
                message, payload = messages[index]
                if isinstance(message, RawRequestMessage) and (message.chunked or message.upgrade):
                    self._last_on_this_connection(index, message, payload)
            self._parsed()
        elif body is not None and body.total_bytes != fed:
            if self._head_bytes:
                self._holding(0)  # the body's content moved on
            if body.is_eof():
                self._ended = body  # (to its end: what comes next is a head, counted)
        elif not data or self._reading_paused or self._closing():
            pass  # (paused for a body's reader, the parser keeps what it is given unparsed)
        elif body is not None and body is not self._ended and body.is_eof():
            # The body ended here on framing alone (its last chunk, its trailer section): the
            # request is whole, and its handler has it. The rest of this read, if any, begins
            # a head; it is not counted (a slice at most). Nothing to refuse.
            self._ended = body
            if self._head_bytes:
                self._holding(0)
        else:
            # A head's bytes (no body, or its body is over), or a body's framing with no
            # content: a chunked body's trailer section, which the parser keeps as it keeps a
            # head, or chunk extensions. (Also while aiohttp's queue of pipelined requests is
            # full: the parser still parses what it is given, up to the next request.)
            if not self._holding(self._head_bytes + len(data)):
                return  # over the heads' budget: closed
            if self._head_bytes > MAX_HEAD_BYTES:
                self._refuse_head()
        if (
            not data  # aiohttp resuming: what it kept is parsed; now what was held here
            and self._held
            and not self._reading_paused
            and len(messages) < self._max_msg_queue_size  # (else: at its next resumption)
        ):
            held, self._held = self._held, b""
            self.data_received(held)

    def _last_on_this_connection(
        self, index: int, message: RawRequestMessage, payload: StreamReader
    ) -> None:
        """A request with a chunked body is answered with ``Connection: close`` and ends its
        connection: nothing after it on the connection is handled.

        aiohttp's compiled parser reads the trailer section of a chunked body with the same
        callbacks as a head's fields, and never files the last trailer field when the body
        ends: it is filed with the next request's headers. An ``Authorization`` trailer
        then authenticated the request after it (one that came with no credential, or with
        another operator's cookie), an ``Idempotency-Key`` trailer keyed it. The next
        request, already parsed (pipelined) or parsed while this one is answered, is never
        handled: the client, told the connection closes, sends it again on a new one.

        So does a request asking to upgrade the connection (``Upgrade: h2c`` with
        ``Connection: Upgrade``, as ``curl --http2`` sends on ``http://``): it is served as
        any request (the upgrade is not made, nor forwarded), but the parser stops at its
        end and aiohttp keeps what follows as the upgraded protocol's bytes: the requests
        after it went unanswered until the keep-alive timeout, or, parsed again later from
        the middle of one (a body's bytes as a request of their own), desynchronized."""
        if not message.should_close:
            self._messages[index] = (message._replace(should_close=True), payload)

    def _holding(self, size: int) -> bool:
        """This connection's unfinished head is now ``size`` bytes; False (and the connection
        closed, unanswered) if that takes the process's heads past HEADS_BUDGET."""
        manager: Any = self._manager
        held = manager.heads_held = manager.heads_held + size - self._head_bytes
        self._head_bytes = size
        if held <= manager.heads_budget or not size:
            return True
        self._holding(0)
        self._head_refused = True  # nothing more is parsed from it
        self.force_close()  # (watched while it closes, as any close)
        return False

    def _closing(self) -> bool:
        return self._close or self._force_close  # (aiohttp parses nothing more then)

    def _refuse_head(self) -> None:
        """Answer 431 as aiohttp answers the parser's refusals (the same path: access line,
        count, JSON body, connection closed) and parse nothing more from this connection."""
        self._head_refused = True
        too_long = LineTooLong("the request head", MAX_HEAD_BYTES)
        refusal = _ErrInfo(status=431, exc=too_long, message=too_long.message)
        self._messages.append((refusal, EMPTY_PAYLOAD))
        self._request_count += 1
        self._parsed()
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _parsed(self) -> None:
        """What a read that made a new message also does (once a request, not once a read)."""
        if self._head_timer is not None:  # a head is in (or refused: answered, then closed)
            self._head_timer.cancel()
            self._head_timer = None
        message, payload = self._messages[-1]
        if isinstance(message, RawRequestMessage):
            self._body = payload
            if payload.is_eof():  # no body, or all of it in this read: not ended later
                self._ended = payload
            return
        # The parser refused these bytes (aiohttp queues an answer to them). Inside a body
        # it was delivering (a bad chunk size, a trailer section over the limits), it drops
        # that body without a word: its reader would wait for more until the time budget ran
        # out, and the 504 would blame the SME gateway for the client's bytes. The body ends
        # with an error instead, as when the client leaves mid-body: 400, nothing forwarded.
        body = self._body
        if body is None or not _open(body):
            return
        if self._read_by_a_handler(body):
            _end_with_an_error(body)
        else:
            # Dispatched a moment ago, its handler's task not started yet (Python 3.11 starts
            # it at the loop's next pass), or answered already and read on by aiohttp alone
            # (lingering): the next pass tells which. Only the first gets the error.
            self._loop.call_soon(self._end_if_read, body)

    def _read_by_a_handler(self, body: StreamReader) -> bool:
        """The body of the request being handled, or of one queued to be."""
        current = self._current_request
        if current is not None and current.content is body:
            return True
        return any(payload is body for _, payload in self._messages)

    def _end_if_read(self, body: StreamReader) -> None:
        if _open(body) and self._read_by_a_handler(body):  # (still: a loop pass went by)
            _end_with_an_error(body)

    def handle_error(
        self,
        request: Any,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        request_id = hex_id()
        # The parser's refusals come with a message; a handler's exception (which the
        # dispatcher has logged and accounted already) comes without.
        unparsable = isinstance(exc, HttpProcessingError) and message is not None
        error: ProxyError
        if isinstance(exc, LineTooLong):
            error = HeaderFieldsTooLarge()
        elif status >= 500:
            error = InternalError()
        else:
            error = BadRequest()
        if unparsable:
            # `message` and `exc` quote the request's bytes: log the kind only. The `error`
            # is the answer's, as every request.refused line's is.
            reason = type(exc).__name__
            log.get_logger().info(
                log.REFUSED, request_id=request_id, error=error.code, reason=reason
            )
        else:
            self.log_exception("Error handling request", exc_info=exc)
        if request.writer.output_size > 0:
            raise ConnectionError("response already started; closing the connection")
        if unparsable:  # never reached the dispatcher: its access line and count are here
            dispatcher = self._manager.request_handler  # type: ignore[union-attr]
            if isinstance(dispatcher, Dispatcher):
                dispatcher.unparsable(request_id, error)
        response = error_response(error, request_id)
        response.force_close()
        return response


class _Server(web.Server):
    def __call__(self) -> RequestHandler:
        return _RequestHandler(self, loop=self._loop, **self._kwargs)


class Runner(web.AppRunner):
    """``web.AppRunner`` with SERVER_OPTIONS and the non-echoing protocol handler."""

    def __init__(
        self,
        app: web.Application,
        *,
        head_timeout: float = HEAD_TIMEOUT,
        heads_budget: int = HEADS_BUDGET,
        **kwargs: Any,
    ) -> None:
        super().__init__(app, **{**SERVER_OPTIONS, **kwargs})
        self._head_timeout = head_timeout
        self._heads_budget = heads_budget

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()  # runs the app's start-up
        server.__class__ = _Server  # same server, our protocol handler class
        server.head_timeout = self._head_timeout  # type: ignore[attr-defined]
        server.heads_budget = self._heads_budget  # type: ignore[attr-defined]
        server.heads_held = 0  # type: ignore[attr-defined]  # (see _RequestHandler._holding)
        server.send_patience = self.app[PARTS].tuning.send_patience  # type: ignore[attr-defined]
        server.request_handler = self.app[PARTS].dispatcher
        server.request_factory = server._make_request  # a plain BaseRequest
        return server
