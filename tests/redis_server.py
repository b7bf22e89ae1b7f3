"""A real redis-server for tests: its own process, port and directory.

``RedisServer`` runs ``redis-server`` (or ``valkey-server``) with no config
file on a free 127.0.0.1 port, persistence off (``--save '' --appendonly no``)
and ``--maxmemory-policy noeviction``, and waits until it answers PING::

    with RedisServer() as server:              # started; closed at the end
        server.command("SET", "k", "v")        # b"v" comes back from GET
        server.stop()                          # outage: connections are refused
        server.start()                         # back, on the same port, empty

While it is stopped the port stays bound (not listening) by this process, so
nothing else takes it and ``start()`` brings the server back at the same
``url``. ``command()`` is a tiny RESP2 client, one connection per call, so
assertions do not go through the client under test. ``RedisServer(password=...)``
starts it with ``requirepass``; ``url`` never carries the password,
``url_with_password()`` does.

``tests/install-test-packages.sh`` (run by ``make test``) installs Debian's
redis-server when it is missing.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO
from urllib.parse import quote

from .support import free_socket

BINARIES = ("redis-server", "valkey-server")
START_TIMEOUT_SECONDS = 10.0
STOP_TIMEOUT_SECONDS = 10.0


class RedisServerError(RuntimeError):
    """redis-server is missing, or did not start or stop as it should."""


class RedisReplyError(Exception):
    """The server answered a command with an error (``-ERR ...``, ``-NOAUTH ...``)."""


def find_binary() -> str:
    """The redis-server (or valkey-server) on PATH, or a RedisServerError saying what to install."""
    for name in BINARIES:
        path = shutil.which(name)
        if path is not None:
            return path
    raise RedisServerError(
        "redis-server is not on PATH: the Redis tests need a real one; install Debian's "
        "redis-server (apt-get install redis-server; `make test` does it when run as root)"
    )


class RedisServer:
    """One redis-server process on 127.0.0.1; see the module docstring."""

    def __init__(self, *, password: str | None = None, tls: bool = False) -> None:
        self.password = password
        self.tls_port: int | None = None  # with ``tls``: a TLS port too (``tls_url``)
        # Bound (SO_REUSEADDR) but never listening: redis-server, which also sets
        # SO_REUSEADDR, can bind and listen on the port, and while it is stopped
        # the port is still ours, refusing connections.
        self._reservation = free_socket()
        self.port: int = self._reservation.getsockname()[1]
        self.directory = Path(tempfile.mkdtemp(prefix="catalyst-redis-"))
        self._proc: subprocess.Popen[bytes] | None = None
        if tls:
            self._tls_reservation = free_socket()
            self.tls_port = self._tls_reservation.getsockname()[1]
            self_signed(self.directory, "tls")

    @property
    def tls_url(self) -> str:
        """``rediss://127.0.0.1:TLS_PORT/0`` trusting this server's own certificate."""
        assert self.tls_port is not None, "this server has no TLS port"
        ca = quote(str(self.directory / "tls.crt"), safe="")
        return f"rediss://127.0.0.1:{self.tls_port}/0?ssl_ca_certs={ca}"

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0``, without the password."""
        return f"redis://127.0.0.1:{self.port}/0"

    def url_with_password(self, password: str | None = None) -> str:
        """``redis://:PASSWORD@127.0.0.1:PORT/0``, with this server's password by default."""
        secret = self.password if password is None else password
        assert secret is not None, "this server has no password"
        return f"redis://:{quote(secret, safe='')}@127.0.0.1:{self.port}/0"

    @property
    def log_file(self) -> Path:
        return self.directory / "redis.log"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> RedisServer:
        """Start the server (a no-op when it runs) and return once it answers PING."""
        if self.running:
            return self
        # Its log goes to stdout (no --logfile), so start-up errors, which it
        # writes before any log is open, land in the same file.
        with self.log_file.open("ab") as log:
            self._proc = subprocess.Popen(
                [find_binary(), *self._arguments()],
                cwd=self.directory,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self._wait_until_ready(self._proc)
        return self

    def _arguments(self) -> list[str]:
        # No config file: everything is on the command line, so nothing on the
        # machine (/etc/redis/redis.conf included) changes how the tests run.
        arguments = [
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.directory),
            "--daemonize", "no",
            "--save", "",
            "--appendonly", "no",
            "--maxmemory-policy", "noeviction",
        ]  # fmt: skip
        if self.password is not None:
            arguments += ["--requirepass", self.password]
        if self.tls_port is not None:
            cert, key = self.directory / "tls.crt", self.directory / "tls.key"
            arguments += ["--tls-port", str(self.tls_port), "--tls-cert-file", str(cert),
                          "--tls-key-file", str(key), "--tls-ca-cert-file", str(cert),
                          "--tls-auth-clients", "no"]  # fmt: skip
        return arguments

    def _wait_until_ready(self, proc: subprocess.Popen[bytes]) -> None:
        # Poll with PING until the deadline. Each pause is a wait on the child,
        # so a server that exits (bad argument, port taken) is seen at once.
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while True:
            try:
                if self.command("PING") == "PONG":
                    return
            except (ConnectionRefusedError, ConnectionResetError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RedisServerError(self._failure("did not answer PING in time"))
            try:
                proc.wait(timeout=0.02)
            except subprocess.TimeoutExpired:
                continue
            raise RedisServerError(self._failure(f"exited with status {proc.returncode}"))

    def _failure(self, what: str) -> str:
        log = self.log_file.read_text(errors="replace") if self.log_file.exists() else ""
        tail = "\n".join(log.splitlines()[-20:])
        return f"redis-server on port {self.port} {what}; its log ({self.log_file}):\n{tail}"

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL); the port stays reserved for start()."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=STOP_TIMEOUT_SECONDS)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._proc = None

    @contextlib.contextmanager
    def stalled(self) -> Iterator[None]:
        """The server frozen (SIGSTOP) inside the block, as a stalled host or a long GC pause
        would freeze it: connections stay open, what clients send waits in its sockets."""
        assert self._proc is not None
        self._proc.send_signal(signal.SIGSTOP)
        try:
            yield
        finally:
            self._proc.send_signal(signal.SIGCONT)

    def flush(self) -> None:
        """Empty every database and the Lua script cache."""
        self.command("FLUSHALL")
        self.command("SCRIPT", "FLUSH")

    def close(self) -> None:
        """Stop the server, release the port and delete its directory."""
        self.stop()
        self._reservation.close()
        if self.tls_port is not None:
            self._tls_reservation.close()
        shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def command(self, *args: str | bytes | int | float) -> Any:
        """Run one command on a new connection (authenticated when there is a password).

        Returns the RESP2 reply: ``str`` for a status (``"OK"``), ``bytes`` for a
        bulk string, ``int``, ``None`` or a list; an error reply raises
        RedisReplyError. A stopped server raises ConnectionRefusedError.
        """
        commands = [args] if self.password is None else [("AUTH", self.password), args]
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
            sock.sendall(b"".join(encode(command) for command in commands))
            with sock.makefile("rb") as stream:
                replies = [read_reply(stream) for _ in commands]
        return replies[-1]


def encode(command: tuple[str | bytes | int | float, ...]) -> bytes:
    """One command as a RESP array of bulk strings."""
    parts = [arg if isinstance(arg, bytes) else str(arg).encode() for arg in command]
    return b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)


def read_reply(stream: BinaryIO) -> Any:
    """One RESP2 reply from ``stream``."""
    line = stream.readline()
    if not line.endswith(b"\r\n"):
        raise ConnectionError(f"redis-server closed the connection mid-reply: {line!r}")
    kind, rest = line[:1], line[1:-2]
    if kind == b"+":
        return rest.decode()
    if kind == b"-":
        raise RedisReplyError(rest.decode())
    if kind == b":":
        return int(rest)
    if kind == b"$":
        size = int(rest)
        if size < 0:
            return None
        data = stream.read(size + 2)
        if len(data) != size + 2:
            raise ConnectionError("redis-server closed the connection mid-reply")
        return data[:-2]
    if kind == b"*":
        count = int(rest)
        return None if count < 0 else [read_reply(stream) for _ in range(count)]
    raise RedisReplyError(f"not a RESP2 reply: {line!r}")


def self_signed(directory: Path, stem: str, *, password: bytes | None = None) -> None:
    """``STEM.crt`` and ``STEM.key`` in ``directory``: a certificate for 127.0.0.1, its own CA,
    and its key (PKCS#8; encrypted with ``password`` if one is given)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(
            "127.0.0.1"))]), critical=False)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    sealed = (serialization.BestAvailableEncryption(password) if password
              else serialization.NoEncryption())  # fmt: skip
    (directory / f"{stem}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / f"{stem}.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, sealed))  # fmt: skip
