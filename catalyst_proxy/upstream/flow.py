"""Back-pressure on an upstream connection, both ways, in two small pieces.

- ``WriteFlow``: the transport calls ``pause_writing()`` when its send buffer
  passes the high-water mark and ``resume_writing()`` when it drains; whoever
  writes awaits ``drain()`` after a write while paused. A slow SME gateway so
  stops the gateway from reading the client's body (aiohttp then stops reading
  the client's socket).
- ``ReadBuffer``: body bytes the parser produced and nobody has taken yet.
  Past ``HIGH_WATER`` the transport stops reading from the socket; below
  ``LOW_WATER`` it reads again. A slow client so stops the gateway from
  reading the SME gateway's answer. Each piece counts ``PIECE_COST`` bytes
  besides its own (the object that holds it), and pieces are taken joined, up
  to ``TAKE_MOST``: an answer in one-byte chunks is passed on in large pieces,
  not a write (and a chunk to the client, and a timer) per byte.

Memory per connection is bounded by these marks whatever the body sizes and
however the SME gateway chunks them.
"""

from __future__ import annotations

import asyncio
from collections import deque

HIGH_WATER = 256 * 1024
LOW_WATER = 64 * 1024
PIECE_COST = 64  # a bytes object's header and its place in the deque, rounded up
TAKE_MOST = 64 * 1024  # small pieces are joined up to this much (a large one stays whole)


class WriteFlow:
    __slots__ = ("_loop", "_waiter", "lost", "paused")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.paused = False
        self.lost = False
        self._waiter: asyncio.Future[None] | None = None

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused = False
        self._wake()

    def connection_lost(self) -> None:
        self.lost = True
        self._wake()

    async def drain(self) -> None:
        """Return once the transport takes more; ConnectionError if the connection is gone."""
        if self.lost:
            raise ConnectionResetError("upstream connection lost")
        if not self.paused:
            return
        waiter = self._waiter = self._loop.create_future()
        try:
            await waiter
        finally:
            self._waiter = None
        if self.lost:
            raise ConnectionResetError("upstream connection lost")

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class ReadBuffer:
    __slots__ = ("_chunks", "_paused", "_transport", "size")

    def __init__(self) -> None:
        self._chunks: deque[bytes] = deque()
        self.size = 0
        self._transport: asyncio.Transport | None = None
        self._paused = False

    def attach(self, transport: asyncio.Transport) -> None:
        self._transport = transport

    def append(self, data: bytes) -> None:
        """A parser callback: record only (the pause decision is ``check()``'s)."""
        self._chunks.append(data)
        self.size += len(data) + PIECE_COST

    def check(self) -> None:
        """After a feed: stop reading from the socket if the buffer is past the high mark."""
        if self.size > HIGH_WATER and not self._paused and self._transport is not None:
            self._paused = True
            self._transport.pause_reading()

    def take(self) -> bytes:
        """The oldest piece, joined with the next ones while they fit in ``TAKE_MOST`` (b"" if
        none); reading resumes once the buffer is below the low mark."""
        chunks = self._chunks
        if not chunks:
            return b""
        data = chunks.popleft()
        count = 1
        if chunks and len(data) + len(chunks[0]) <= TAKE_MOST:
            parts, size = [data], len(data)
            while chunks and size + len(chunks[0]) <= TAKE_MOST:
                piece = chunks.popleft()
                parts.append(piece)
                size += len(piece)
            count = len(parts)
            data = b"".join(parts)
        self.size -= len(data) + count * PIECE_COST
        if self._paused and self.size < LOW_WATER and self._transport is not None:
            self._paused = False
            if not self._transport.is_closing():
                self._transport.resume_reading()
        return data

    def take_all(self) -> bytes:
        """Everything buffered, joined (used when the whole body is already here)."""
        data = b"".join(self._chunks)
        self.clear()
        return data

    def clear(self) -> None:
        """Drop what is buffered; a connection kept for another exchange reads again."""
        self._chunks.clear()
        self.size = 0
        if self._paused and self._transport is not None:
            self._paused = False
            if not self._transport.is_closing():
                self._transport.resume_reading()
