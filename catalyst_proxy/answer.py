"""An answer that is all here (status, header fields, body), written in one write, at once.

aiohttp's ``web.Response`` builds a header multidict, decides the framing,
formats every field and hands head and body to its writer after the handler
has returned. For the proxy's common answer (the SME gateway's answer that
arrived whole, or the replay of a recorded one) all of that is known up front,
and at a fixed request rate, where every request finds the caches cold, it
showed: the handler's return, the upstream connection's release and aiohttp's
response machinery stood between the last byte from the SME gateway and the
first byte to the client.

``Answer.send()`` serializes the head from bytes and writes head and body with
one ``write()`` as soon as the handler has them. aiohttp's server still owns the
connection: after the handler returns it calls ``prepare()``, which finds the
answer sent (and waits, as aiohttp's writer does, while a client is slow to take
a large one), and reads ``keep_alive`` as for any response.

Framing follows RFC 9112 §6, as aiohttp's own responses do: ``Content-Length``
always, except for 1xx, 204 and 304 answers (no body, no length); an answer to
``HEAD`` carries no body and states the length the SME gateway stated, if it
did. The connection stays open when the client asked for that (HTTP/1.1 by
default, HTTP/1.0 with ``Connection: keep-alive``) and nothing forced it closed.
"""

from __future__ import annotations

import time
from email.utils import formatdate
from http import HTTPStatus

from aiohttp import HttpVersion10, HttpVersion11, web
from multidict import CIMultiDict, CIMultiDictProxy

from .headers import SERVER, SERVER_NAME

_SERVER_FIELD = b"%s: %s\r\n" % (SERVER.encode(), SERVER_NAME.encode())  # never a version

_NO_BODY = frozenset({204, 304})
_REASONS = {status.value: status.phrase for status in HTTPStatus}
_NO_HEADERS: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict())
_DRAIN_ABOVE = 64 * 1024  # aiohttp's writer waits for the client past this much unsent


class Answer(web.StreamResponse):
    """A complete answer: ``fields`` are (name, value) pairs already allowed to cross."""

    def __init__(
        self,
        status: int,
        fields: list[tuple[bytes, bytes]],
        body: bytes,
        *,
        head_length: int | None = None,
    ) -> None:
        # Not StreamResponse.__init__: its header multidict would only mislead, since
        # the fields sent are ``fields``; ``headers`` is an empty read-only view instead.
        self._status = status
        self._reason = _REASONS.get(status, "")
        self._headers = _NO_HEADERS  # type: ignore[assignment]
        self._state = {}
        self._fields = fields
        self._content = body
        self._head_length = head_length  # an answer to HEAD: the length a GET's body has

    @property
    def body(self) -> bytes:
        return self._content

    def send(self, request: web.BaseRequest) -> None:
        """Write the whole answer now (once; later calls do nothing).

        Straight to the transport, as aiohttp's writer would for a write this size (no
        chunking, nothing to drain for), and counted in the writer's ``output_size`` as
        it would count it: aiohttp reads that to know an answer has started. A client
        already gone gets nothing, as with aiohttp's writer (which its server ignores)."""
        if self._eof_sent:
            return
        self._eof_sent = True
        transport = request.transport
        if transport is None or transport.is_closing():
            self._keep_alive = False
            return
        keep_alive = request.keep_alive if self._keep_alive is None else self._keep_alive
        self._keep_alive = keep_alive
        # The client's version when it is one we speak (a refused HTTP/0.9 or 2.0 request line
        # gets an HTTP/1.1 answer, never its own version echoed).
        version = HttpVersion10 if request.version == HttpVersion10 else HttpVersion11
        status = self._status
        body = self._content
        if status < 200 or status in _NO_BODY:
            framing, body = b"", b""
        elif request.method == "HEAD":
            length = self._head_length
            framing, body = b"" if length is None else b"Content-Length: %d\r\n" % length, b""
        else:
            framing = b"Content-Length: %d\r\n" % len(body)
        if not keep_alive and version == HttpVersion11:
            framing += b"Connection: close\r\n"
        elif keep_alive and version == HttpVersion10:
            framing += b"Connection: keep-alive\r\n"
        data = b"HTTP/%d.%d %d %s\r\n%s%sDate: %s\r\n%s\r\n%s" % (
            version.major, version.minor, status, self._reason.encode(),
            b"".join([b"%s: %s\r\n" % field for field in self._fields]),
            _SERVER_FIELD, http_date(), framing, body,
        )  # fmt: skip
        transport.write(data)
        request.writer.output_size += len(data)

    async def prepare(self, request: web.BaseRequest) -> None:
        """aiohttp's server, after the handler: send if not yet sent, and wait while the
        client is slow to read a large answer, as aiohttp's writer does (back-pressure:
        the connection's next answer waits)."""
        self.send(request)
        transport = request.transport
        if transport is not None and transport.get_write_buffer_size() > _DRAIN_ABOVE:
            await request.writer.drain()

    async def write_eof(self, data: bytes = b"") -> None:
        assert not data, "an Answer's body is given when it is made"


_date_cache: tuple[int, bytes] = (0, b"")


def http_date() -> bytes:
    """The ``Date`` field's value (RFC 9110 §6.6.1), formatted once a second."""
    global _date_cache
    now = int(time.time())
    second, text = _date_cache
    if second != now:
        text = formatdate(now, usegmt=True).encode()
        _date_cache = (now, text)
    return text
