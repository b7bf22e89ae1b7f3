"""Real things for tests to talk to: servers on 127.0.0.1, keys, tokens.

- ``Gateway``: the real app on a real socket, with the production server options.
- ``JWKSServer``: a real HTTP JWKS endpoint whose keys and failure mode a test sets.
- ``RawUpstream``: an asyncio socket server scripted byte by byte, for faults
  that must be exact (close before the status line, garbage, stall mid-body);
  ``rawhttp.HTTPUpstream`` records what each connection sent.
- ``sign()``: any JWS at all, including ones no honest library would make.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from catalyst_proxy.app import PARTS, Parts
from catalyst_proxy.devtools.keys import public_jwk
from catalyst_proxy.runner import Runner


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def sign(
    header: dict[str, Any] | str,
    claims: dict[str, Any] | str,
    key: rsa.RSAPrivateKey | bytes | None = None,
) -> str:
    """A compact JWS signed RS256 with an RSA key, HS256 with bytes, or unsigned (None)."""
    h = header if isinstance(header, str) else b64(json.dumps(header).encode())
    c = claims if isinstance(claims, str) else b64(json.dumps(claims).encode())
    signing_input = f"{h}.{c}".encode()
    if key is None:
        sig = b""
    elif isinstance(key, bytes):
        sig = hmac.new(key, signing_input, hashlib.sha256).digest()
    else:
        sig = key.sign(signing_input, padding.PKCS1v15(), hashes.SHA256())
    return f"{h}.{c}.{b64(sig)}"


def cookie_signature(token: str, secret: bytes) -> str:
    return b64(hmac.new(secret, token.encode(), hashlib.sha256).digest())


def free_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


async def start_app(
    app: web.Application, runner_class: type[web.AppRunner] = web.AppRunner, **options: Any
) -> tuple[web.AppRunner, str]:
    runner = runner_class(app, **options)
    await runner.setup()
    site = web.SockSite(runner, free_socket())
    await site.start()
    return runner, site.name.rstrip("/")


@dataclass
class Gateway:
    """The gateway under test: ``url``, its ``parts``, and a plain client ``http``."""

    url: str
    app: web.Application
    runner: web.AppRunner
    http: aiohttp.ClientSession

    @property
    def parts(self) -> Parts:
        return self.app[PARTS]

    async def request(self, method: str, path: str, **kwargs: Any) -> tuple[int, Any, bytes]:
        """One request; returns (status, headers, body bytes)."""
        async with self.http.request(method, self.url + path, **kwargs) as resp:
            body = await resp.read()
            return resp.status, resp.headers, body

    async def metrics_text(self) -> str:
        status, _, body = await self.request("GET", "/metrics")
        assert status == 200
        return body.decode()

    async def close(self) -> None:
        await self.http.close()
        await self.runner.cleanup()


async def start_gateway(app: web.Application, **server: Any) -> Gateway:
    """``server``: Runner options besides the production ones (e.g. shorter timeouts)."""
    runner, url = await start_app(app, Runner, **server)
    http = aiohttp.ClientSession(
        auto_decompress=False,
        cookie_jar=aiohttp.DummyCookieJar(),
        skip_auto_headers=("Content-Type",),
    )
    return Gateway(url, app, runner, http)


@dataclass
class JWKSServer:
    """A JWKS endpoint. Set ``keys`` (public keys or JWK dicts) and ``mode`` at will.

    Modes: ``ok``; ``error`` (HTTP 500 page); ``hang`` (never answers);
    ``raw`` (serves ``raw_body`` with 200); ``endless`` (streams forever).
    """

    keys: list[Any] = field(default_factory=list)
    mode: str = "ok"
    raw_body: bytes = b""
    fetches: int = 0
    url: str = ""
    _runner: web.AppRunner | None = None
    _release: asyncio.Event = field(default_factory=asyncio.Event)

    def document(self) -> dict[str, Any]:
        jwks = []
        for key in self.keys:
            if isinstance(key, dict):
                jwks.append(key)
            else:
                kid = getattr(key, "test_kid", None)
                jwks.append(public_jwk(key, kid))
        return {"keys": jwks}

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.fetches += 1
        if self.mode == "error":
            return web.Response(status=500, text="<html>Internal Server Error</html>")
        if self.mode == "hang":
            await self._release.wait()
            return web.Response(status=503)
        if self.mode == "raw":
            return web.Response(body=self.raw_body, content_type="application/json")
        if self.mode == "endless":
            resp = web.StreamResponse()
            await resp.prepare(request)
            await resp.write(b'{"keys": [')
            while True:
                await resp.write(b" " * 65536)
        return web.json_response(self.document())

    async def start(self) -> JWKSServer:
        app = web.Application()
        app.router.add_get("/realms/sovereign/protocol/openid-connect/certs", self._handle)
        self._runner, base = await start_app(app, access_log=None)
        self.url = base + "/realms/sovereign/protocol/openid-connect/certs"
        return self

    async def close(self) -> None:
        self._release.set()
        if self._runner is not None:
            await self._runner.cleanup()


def with_kid(key: rsa.RSAPrivateKey, kid: str) -> rsa.RSAPrivateKey:
    """Tag a key so JWKSServer publishes it under ``kid``."""
    key.public_key().test_kid = kid  # type: ignore[attr-defined]
    return key


ConnectionScript = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@dataclass
class RawUpstream:
    """An asyncio socket server that runs ``script`` for every connection and counts them.

    ``tests/rawhttp.py`` builds the recording HTTP upstream (``HTTPUpstream``) on it.
    """

    script: ConnectionScript
    backlog: int = 100  # the listen queue (asyncio's default)
    sock: socket.socket | None = None  # a socket bound (not listening) beforehand; None: a new one
    connections: int = 0
    url: str = ""
    _server: asyncio.Server | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def start(self) -> RawUpstream:
        self._server = await asyncio.start_server(
            self._on_connection, sock=self.sock or free_socket(), backlog=self.backlog
        )
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def _on_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)  # type: ignore[arg-type]
        try:
            await self.script(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._tasks.discard(task)  # type: ignore[arg-type]
            writer.close()

    def stop_listening(self) -> None:
        """Close the listening socket only: the port refuses, open connections stay open."""
        assert self._server is not None
        self._server.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self._server.wait_closed()


async def read_chunked(reader: asyncio.StreamReader, into: bytearray) -> None:
    """Read a chunked body into ``into`` (partial on error, so callers can see how far it got)."""
    while True:
        size = int((await reader.readuntil(b"\r\n")).strip().split(b";")[0], 16)
        if size == 0:
            await reader.readuntil(b"\r\n")
            return
        into += await reader.readexactly(size)
        await reader.readexactly(2)


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """Read one HTTP/1.1 request (head, body) honouring Content-Length or chunked."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {
        k.strip().lower(): v.strip()
        for k, _, v in (line.partition(":") for line in lines[1:] if line)
    }
    body = bytearray()
    if "content-length" in headers:
        body += await reader.readexactly(int(headers["content-length"]))
    elif "chunked" in headers.get("transfer-encoding", "").lower():
        await read_chunked(reader, body)
    return head, bytes(body)


class SlowLink:
    """A TCP relay on 127.0.0.1 to ``port`` whose replies can be held back ``reply_delay``
    seconds: a server reached over a slow network (requests pass at once, answers late).
    ``reset()`` resets (RST) every connection its clients hold, as a sidecar, a load
    balancer or conntrack in front of the server may. A ``RawUpstream`` whose script is the
    relay."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reply_delay = 0.0
        self.url = ""
        self._server = RawUpstream(self._relay)
        self._clients: set[asyncio.StreamWriter] = set()

    def reset(self) -> int:
        """Reset every client connection now (linger 0, then close: a RST, not a FIN); how
        many there were."""
        clients, self._clients = self._clients, set()
        for writer in clients:
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
        return len(clients)

    async def start(self) -> SlowLink:
        await self._server.start()
        self.url = self._server.url.replace("http://", "redis://", 1) + "/0"
        return self

    async def _relay(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection("127.0.0.1", self.port)
        self._clients.add(client_w)
        try:
            await asyncio.gather(
                self._pipe(client_r, server_w, late=False),
                self._pipe(server_r, client_w, late=True),
            )
        finally:
            self._clients.discard(client_w)
            server_w.close()

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, late: bool
    ) -> None:
        while data := await reader.read(65536):
            if late and self.reply_delay:
                await asyncio.sleep(self.reply_delay)  # the network's delay, not a wait for sync
            writer.write(data)
            await writer.drain()
        writer.close()

    async def close(self) -> None:
        await self._server.close()


async def eventually(predicate: Callable[[], object], timeout: float = 5.0) -> None:
    """Return once ``predicate()`` holds about state the test cannot be told about (polled,
    not slept for a guessed time); fail after ``timeout`` seconds."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.005)


def memory(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (the peak) of a process, in bytes."""
    found = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            found[name] = int(value.split()[0]) * 1024
    return found


def reset_peak(pid: int) -> None:
    """Set the process's VmHWM (peak RSS) to its current RSS (Linux 4.0+)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")
