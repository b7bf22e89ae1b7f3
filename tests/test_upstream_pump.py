"""The request body's pump: when a streamed request counts as sent.

A request counts as sent (its outcome unknown, its idempotency key never
released) from the moment its last byte is handed to the connection, not once
the upstream has drained it or the client's body stream has said it ended: a
client that leaves in between must never get its key back for a request the
upstream may already hold whole.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from catalyst_proxy.upstream.client import _pump


class SlowUpstream:
    """The connection as the pump sees it, to an upstream that reads the first ``drains``
    pieces at once and then stops reading: every later ``drain()`` waits for good."""

    def __init__(self, drains: int) -> None:
        self.written = bytearray()
        self.sent = False
        self.failed: BaseException | None = None
        self._drains = drains

    def send(self, data: bytes) -> None:
        self.written += data

    def request_sent(self) -> None:
        self.sent = True

    def body_failed(self, exc: BaseException) -> None:
        self.failed = exc

    async def drain(self) -> None:
        self._drains -= 1
        if self._drains < 0:
            await asyncio.Event().wait()  # the upstream has stopped reading


async def body(*pieces: bytes, then: asyncio.Event | None = None) -> AsyncIterator[bytes]:
    for piece in pieces:
        yield piece
    if then is not None:
        await then.wait()  # the client's stream has not said it ended yet


async def test_a_body_of_declared_length_is_sent_once_its_last_byte_is_handed_over() -> None:
    """With a declared length, the request is sent as soon as the last piece is handed to the
    connection: neither a drain still waiting on the upstream nor a source that has not yet
    said it ended holds that back."""
    conn = SlowUpstream(drains=1)
    ended = asyncio.Event()
    pump = _pump(conn, body(b"ab", b"cd", then=ended), 4)  # type: ignore[arg-type]
    await asyncio.wait_for(pump, 5)
    assert (bytes(conn.written), conn.sent, conn.failed) == (b"abcd", True, None)
    assert not ended.is_set()  # it never waited for the source to end


async def test_a_chunked_body_is_sent_with_its_final_chunk() -> None:
    """Without a declared length the body goes chunked, and the request is sent once the
    final (empty) chunk is handed to the connection."""
    conn = SlowUpstream(drains=2)
    await asyncio.wait_for(_pump(conn, body(b"ab", b"cd"), None), 5)  # type: ignore[arg-type]
    assert bytes(conn.written) == b"2\r\nab\r\n2\r\ncd\r\n0\r\n\r\n"
    assert conn.sent
