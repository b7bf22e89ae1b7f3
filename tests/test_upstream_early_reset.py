"""An upstream that answers before it has the whole request body, then resets the connection.

The SME gateway may answer (and act) before it has read the whole body, then
close, which resets a connection the gateway is still writing the body to. The
answer is the request's outcome: it must reach the client, never turn into a
502 that says nothing was forwarded (the client would send the purchase
again). And once a final answer has begun, a failure can no longer say the
request was not acted on.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import AsyncIterator

import pytest

from catalyst_proxy.upstream import Breaker
from catalyst_proxy.upstream.client import Client, Progress
from catalyst_proxy.upstream.failures import BadResponse

ANSWER = b"HTTP/1.1 201 Created\r\nContent-Length: 5\r\n\r\nFIRST"


async def listener() -> tuple[socket.socket, str]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    sock.setblocking(False)
    return sock, f"http://127.0.0.1:{sock.getsockname()[1]}"


async def read_through(peer: socket.socket, end: bytes) -> None:
    """The upstream side reads until what it read ends with ``end``."""
    loop = asyncio.get_running_loop()
    got = b""
    while not got.endswith(end):
        data = await loop.sock_recv(peer, 65536)
        assert data, "the gateway's side closed early"
        got += data


def reset(peer: socket.socket) -> None:
    """Close with SO_LINGER 0: the peer's next write finds a reset."""
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    peer.close()


async def held_body(first: bytes, gate: asyncio.Event, rest: bytes) -> AsyncIterator[bytes]:
    yield first
    await gate.wait()  # the client has not sent the rest yet
    yield rest


@pytest.fixture
async def client_and_upstream() -> AsyncIterator[tuple[Client, socket.socket, str]]:
    sock, url = await listener()
    client = Client(url, timeout=5.0, max_connections=1, max_pending=1, idle_seconds=15,
                    breaker=Breaker(5, 5.0))  # fmt: skip
    await client.start()
    try:
        yield client, sock, url
    finally:
        await client.close()
        sock.close()


async def test_an_answer_sent_before_a_reset_is_read_though_a_body_write_found_the_reset_first(
    client_and_upstream: tuple[Client, socket.socket, str],
) -> None:
    """The upstream reads part of the body, answers 201 whole and resets the connection; the
    gateway's next body write (before its loop has read the socket) finds the reset: the
    201 is still the answer, read from what the socket held, not a 502 'not sent'."""
    client, sock, _ = client_and_upstream
    loop = asyncio.get_running_loop()
    gate = asyncio.Event()
    body = held_body(b"x" * 10, gate, b"y" * 20)
    request = asyncio.create_task(client.request(b"POST", b"/buy", b"", body, 30))
    peer, _ = await loop.sock_accept(sock)
    await read_through(peer, b"x" * 10)
    peer.setblocking(True)
    peer.sendall(ANSWER)
    reset(peer)
    # The pump's wake-up is queued ahead of the loop's next look at the socket: its write
    # of the rest is the first to meet the reset.
    gate.set()
    response = await asyncio.wait_for(request, 5)
    assert (response.status, response.complete) == (201, True)
    assert response.body() == b"FIRST"
    response.release()


@pytest.mark.parametrize(
    ("answered", "may_have_acted"),
    [
        (b"HTTP/1.1 201 Crea", True),  # a final status line, cut off
        (b"HTTP/1.1 201 Created\r\nContent-Le", True),  # a final head, cut off
        (b"HTTP/1.1 100 Continue\r\n\r\n", False),  # an interim answer only: an invitation
    ],
    ids=["status-line", "head", "interim-only"],
)
async def test_a_failure_once_a_final_answer_began_counts_as_sent(
    client_and_upstream: tuple[Client, socket.socket, str],
    answered: bytes,
    may_have_acted: bool,
) -> None:
    """The upstream begins an answer while the body is still on its way, then closes: a 502
    whose request may have been acted on (sent), unless all it sent was an interim 1xx."""
    client, sock, _ = client_and_upstream
    loop = asyncio.get_running_loop()
    gate = asyncio.Event()
    progress = Progress()
    body = held_body(b"x" * 10, gate, b"y" * 20)
    request = asyncio.create_task(client.request(b"POST", b"/buy", b"", body, 30, progress))
    peer, _ = await loop.sock_accept(sock)
    await read_through(peer, b"x" * 10)
    await loop.sock_sendall(peer, answered)
    peer.close()
    with pytest.raises(BadResponse) as failure:
        await asyncio.wait_for(request, 5)
    assert failure.value.sent is may_have_acted
    assert progress.may_have_acted is may_have_acted
    assert not progress.sent
    gate.set()
