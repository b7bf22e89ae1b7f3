"""Logs (reference.md: Operations; issue 3): the real server's every byte, and no secret in it."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import aiohttp
import pytest
import structlog
from yarl import URL

from catalyst_proxy import log
from catalyst_proxy.devtools.keys import public_jwk
from catalyst_proxy.devtools.sme import SME

from .conftest import Assurance
from .serve_proc import JWS_SHAPE, ServeProcess
from .support import RawUpstream, cookie_signature, free_socket, read_request, sign, start_app

REQUEST_FIELDS = {
    "request_id", "method", "path", "route", "status", "duration_ms", "upstream_status",
    "upstream_ms", "sub", "email", "role", "error", "idempotency",
}  # fmt: skip
STRUCTLOG_FIELDS = {"event", "level", "timestamp"}

BRIDGE = b"log-test-bridge-secret-0123456789abcdef-Q7"
COOKIE_SECRET = b"log-test-cookie-secret-0123456789abcd-W3"
KID = "kid-logging"
PURCHASE = "/api/v1/billing/purchase"


@pytest.fixture
async def stand_in() -> AsyncIterator[tuple[SME, str]]:
    sme = SME(BRIDGE)
    runner, url = await start_app(sme.app(), access_log=None)
    yield sme, url
    await runner.cleanup()


@pytest.fixture
async def servers() -> AsyncIterator[Callable[..., Awaitable[ServeProcess]]]:
    """Factory: ``await servers(env)`` starts `catalyst-proxy serve` on a free port."""
    started: list[ServeProcess] = []

    async def start(env: dict[str, str]) -> ServeProcess:
        proc = await ServeProcess(["serve", "--host", "127.0.0.1", "--port", "0"], env).start()
        started.append(proc)
        return proc

    yield start
    for proc in started:
        await proc.stop()


def base_env(jwks_url: str, upstream: str, **extra: str) -> dict[str, str]:
    return {
        "CATALYST_JWKS_URL": jwks_url,
        "CATALYST_JWKS_TIMEOUT_SECONDS": "1",
        "CATALYST_SME_GATEWAY_URL": upstream,
        "CATALYST_SME_JWT_SECRET": BRIDGE.decode(),
        "CATALYST_SESSION_COOKIE_SECRET": COOKIE_SECRET.decode(),
        "CATALYST_UPSTREAM_TIMEOUT_SECONDS": "0.3",
        "CATALYST_SHUTDOWN_GRACE_SECONDS": "2",
        "OPERATOR_EMAIL": "owner@example.test",
        **extra,
    }


async def fetch(http: aiohttp.ClientSession, method: str, url: str, **kw: Any) -> tuple[int, bytes]:
    async with http.request(method, URL(url, encoded=True), **kw) as resp:
        return resp.status, await resp.read() + str(dict(resp.headers)).encode()


class Mix:
    """A full mix of requests; remembers every secret-bearing value it sent or saw."""

    def __init__(self, token: Callable[..., str], other_key: Any) -> None:
        self.token = token
        self.other_key = other_key
        self.secrets: set[str] = {BRIDGE.decode(), COOKIE_SECRET.decode()}
        self.bodies: list[bytes] = []

    def remember(self, *values: str) -> None:
        self.secrets.update(v for v in values if v)

    async def run(self, http: aiohttp.ClientSession, base: str) -> None:
        good = self.token(kid=KID, realm_roles=["catalyst-owner"])
        member = self.token(kid=KID, sub="member-1", email="member@example.test")
        expired = self.token(kid=KID, now=time.time() - 7200, ttl=60)
        foreign = self.token(kid=KID, key=self.other_key)
        unknown_kid = self.token(kid="kid-nobody")
        none_alg = sign({"alg": "none"}, {"sub": "x", "exp": int(time.time()) + 60})
        hs_forged = sign({"alg": "HS256", "kid": KID}, {"sub": "x", "exp": 2**31}, b"guess")
        sig = cookie_signature(good, COOKIE_SECRET)
        bad_sig = cookie_signature(good, b"wrong-secret")
        junk = "junk-token-LEAK-9f8e7d"
        self.remember(good, member, expired, foreign, unknown_kid, none_alg, hs_forged, sig,
                      bad_sig, junk)  # fmt: skip
        requests: list[tuple[str, str, dict[str, Any]]] = [
            ("POST", PURCHASE, {"headers": {"Authorization": f"Bearer {good}"}, "data": b"{}"}),
            ("POST", "/api/v1/sme/billing/purchase?utm=x",
             {"headers": {"Authorization": f"bearer {member}"}, "data": b"{}"}),
            ("GET", "/api/v1/sme/billing/vouchers/list",
             {"headers": {"Cookie": f"catalyst_session={good}.{sig}"}}),
            ("GET", "/api/v1/sme/billing/vouchers/list",
             {"headers": {"Cookie": f"catalyst_session={good}.{bad_sig}"}}),
            ("GET", "/api/v1/sme/billing/vouchers/list",
             {"headers": {"Cookie": f"catalyst_session={good}"}}),
            ("POST", "/api/v1/sme/billing/vouchers/issue",
             {"headers": {"Authorization": f"Bearer {good}"}, "data": b'{"code": "LOGV1"}'}),
            ("DELETE", "/api/v1/sme/billing/vouchers/revoke/LOGV1",
             {"headers": {"Authorization": f"Bearer {good}"}}),
            ("POST", PURCHASE, {"headers": {"Authorization": f"Bearer {expired}"}}),
            ("POST", PURCHASE, {"headers": {"Authorization": f"Bearer {foreign}"}}),
            ("POST", PURCHASE, {"headers": {"Authorization": f"Bearer {unknown_kid}"}}),
            ("POST", PURCHASE, {"headers": {"Authorization": f"Bearer {none_alg}"}}),
            ("POST", PURCHASE, {"headers": {"Authorization": f"Bearer {hs_forged}"}}),
            ("POST", PURCHASE, {"headers": {"Authorization": f"Bearer {junk}"}}),
            ("POST", PURCHASE, {"headers": {"Authorization": f"Basic {junk}"}}),
            ("POST", PURCHASE + f"?access_token={good}", {}),
            ("POST", PURCHASE, {"headers": {"Authorization": f"Bearer {good}",
                                            "Content-Encoding": "gzip"}, "data": b"x"}),
            ("GET", PURCHASE, {"headers": {"Authorization": f"Bearer {good}"}}),
            ("GET", "/nowhere", {"headers": {"Authorization": f"Bearer {good}"}}),
        ]  # fmt: skip
        oversized = self.token(kid=KID, extra={"pad": "p" * 17_000})
        self.remember(oversized)
        for header in ({"Authorization": f"Bearer {oversized}"},
                       {"Cookie": f"catalyst_session={oversized}"}):  # fmt: skip
            requests.append(("POST", PURCHASE, {"headers": header}))
        for method, path, kwargs in requests:
            status, body = await fetch(http, method, base + path, **kwargs)
            assert status < 500 or status == 503, (path, status, body)
            self.bodies.append(body)


def scan(text: str, secrets: set[str]) -> list[str]:
    """Every secret (or its distinctive middle) found in ``text``, and any JWS shape."""
    hits = [s[:12] + "..." for s in secrets if s in text]
    for secret in secrets:
        parts = secret.split(".")
        if len(parts) == 3 and len(parts[2]) >= 20:  # a JWS: its signature is the secret part
            hits += [f"signature:{parts[2][:8]}"] if parts[2][:20] in text else []
        elif len(secret) > 40 and secret[10:40] in text:
            hits.append(secret[:12] + "...")
    hits += [f"jws-shape:{m.group(0)[:12]}" for m in JWS_SHAPE.finditer(text)]
    return hits


async def test_no_secret_anywhere_the_process_wrote(
    servers, stand_in, jwks_server, token, rsa_key, other_key
):
    """After a full mix no token, bridge token, secret, cookie, signature or Authorization leaks."""
    sme, sme_url = stand_in
    jwks_server.keys = [public_jwk(rsa_key, KID)]
    main = await servers(base_env(jwks_server.url, sme_url))

    async def faulty(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        _, body = await read_request(reader)
        if body == b"garbage":
            writer.write(b"HTTP/9 banana\r\n\r\n")
        elif body == b"hang":
            await reader.read()
        # b"close": close before the status line

    raw = await RawUpstream(faulty).start()
    dead = free_socket()
    dead_url = f"http://127.0.0.1:{dead.getsockname()[1]}"
    dead.close()
    faults = await servers(base_env(jwks_server.url, raw.url))
    unreachable = await servers(base_env(jwks_server.url, dead_url))
    mix = Mix(token, other_key)
    try:
        bases = [await p.wait_listening() for p in (main, faults, unreachable)]
        async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http:
            await mix.run(http, bases[0])
            good = token(kid=KID, realm_roles=["catalyst-owner"])
            mix.remember(good)
            auth = {"Authorization": f"Bearer {good}"}
            statuses = []
            for body in (b"garbage", b"hang", b"close"):
                statuses.append((await fetch(http, "POST", bases[1] + PURCHASE, headers=auth,
                                             data=body))[0])  # fmt: skip
            statuses.append((await fetch(http, "POST", bases[2] + PURCHASE, headers=auth))[0])
            assert statuses == [502, 504, 502, 503]
            for base in bases:
                status, metrics = await fetch(http, "GET", base + "/metrics")
                assert status == 200
                mix.bodies.append(metrics)
                mix.bodies.append((await fetch(http, "GET", base + "/readyz"))[1])
        for proc in (main, faults, unreachable):
            proc.signal(signal.SIGTERM)
        for proc in (main, faults, unreachable):
            assert await proc.wait() == 0
    finally:
        await raw.close()

    bridge_tokens = [r.headers["Authorization"].split(" ", 1)[1] for r in sme.received]
    assert len(bridge_tokens) >= 5
    mix.remember(*bridge_tokens)
    for proc in (main, faults, unreachable):
        hits = scan(proc.output, mix.secrets)
        Assurance().add("leak scan: bytes of process output scanned", len(proc.output))
        Assurance().add("leak scan: hits (must be 0)", len(hits))
        assert hits == [], [line[:300] for line in proc.output.splitlines() if "eyJ" in line]
    assert scan(b"\n".join(mix.bodies).decode("utf-8", "replace"), mix.secrets) == []
    # and the output is not empty: the requests were logged
    requests = [line for line in main.json_lines() if line["event"] == "request"]
    assert len(requests) >= 18


async def test_one_json_line_per_request_with_exactly_the_contract_fields(
    servers, stand_in, jwks_server, token, rsa_key
):
    """Each request writes exactly one JSON "request" line holding exactly the contract's fields."""
    _sme, sme_url = stand_in
    jwks_server.keys = [public_jwk(rsa_key, KID)]
    proc = await servers(base_env(jwks_server.url, sme_url))
    base = await proc.wait_listening()
    good = token(kid=KID, sub="op-log", email="Owner@Example.test", realm_roles=[])
    async with aiohttp.ClientSession() as http:
        cases = [
            ("POST", PURCHASE + "?secretish=1", {"Authorization": f"Bearer {good}",
                                                  "X-Request-ID": "req-ok-1"}),
            ("POST", PURCHASE, {"X-Request-ID": "req-401"}),
            ("DELETE", "/api/v1/sme/billing/vouchers/revoke/a%20b%2Fc?x=1",
             {"Authorization": f"Bearer {good}", "X-Request-ID": "req-revoke"}),
            ("GET", "/nowhere?q=1", {"X-Request-ID": "req-404"}),
        ]  # fmt: skip
        for method, path, headers in cases:
            await fetch(http, method, base + path, headers=headers, data=b"{}")
    proc.signal(signal.SIGTERM)
    assert await proc.wait() == 0

    lines = [line for line in proc.json_lines() if line["event"] == "request"]
    by_id = {line["request_id"]: line for line in lines}
    assert len(lines) == len(by_id) == 4
    for line in lines:
        assert set(line) == REQUEST_FIELDS | STRUCTLOG_FIELDS, sorted(line)
        assert isinstance(line["duration_ms"], int | float)
    ok = by_id["req-ok-1"]
    assert ok["method"] == "POST"
    assert ok["path"] == PURCHASE
    assert ok["route"] == PURCHASE
    assert (ok["status"], ok["upstream_status"]) == (200, 200)
    assert ok["upstream_ms"] >= 0
    assert ok["duration_ms"] >= ok["upstream_ms"]
    assert (ok["sub"], ok["email"], ok["role"], ok["error"]) == (
        "op-log", "Owner@Example.test", "superadmin", None
    )  # fmt: skip
    refused = by_id["req-401"]
    assert (refused["status"], refused["error"]) == (401, "unauthenticated")
    assert (refused["sub"], refused["upstream_status"], refused["upstream_ms"]) == (
        None,
        None,
        None,
    )
    revoke = by_id["req-revoke"]
    assert revoke["path"] == "/api/v1/sme/billing/vouchers/revoke/a%20b%2Fc"
    assert revoke["route"] == "/api/v1/sme/billing/vouchers/revoke/{code}"
    assert revoke["status"] == 404  # the SME stand-in has no such voucher
    missing = by_id["req-404"]
    assert (missing["path"], missing["route"], missing["status"]) == ("/nowhere", "none", 404)
    assert missing["error"] == "not-found"
    assert all(line.count("\n") == 0 for line in proc.stdout_lines)


async def test_startup_jwks_and_shutdown_events(servers, stand_in, jwks_server, rsa_key):
    """Start-up shows the effective config (secrets as set/unset), then JWKS and shutdown events."""
    _, sme_url = stand_in
    jwks_server.keys = [public_jwk(rsa_key, KID)]
    proc = await servers(base_env(jwks_server.url, sme_url + "/"))
    startup = await proc.wait_for_event("startup")
    refresh = await proc.wait_for_event("jwks.refresh")
    proc.signal(signal.SIGTERM)
    assert await proc.wait() == 0

    assert startup["level"] == "info"
    assert startup["upstream"] == sme_url
    assert startup["bridge_secret"] == "set"
    assert startup["session_cookie_secret"] == "set"
    assert startup["operator_keys"]["jwks_url"] == jwks_server.url
    assert startup["shutdown_grace_seconds"] == 2
    assert PURCHASE in startup["routes"]
    assert BRIDGE.decode() not in proc.output
    assert COOKIE_SECRET.decode() not in proc.output
    assert "owner@example.test" not in json.dumps(startup)

    assert refresh["result"] == "ok"
    assert refresh["keys"] == 1
    assert refresh["kids"] == [KID]

    events = [line["event"] for line in proc.json_lines()]
    assert events.index("startup") < events.index("shutdown.begin") < events.index("shutdown.done")
    assert events[-1] == "shutdown.done"
    assert proc.stderr_lines == []


async def test_the_startup_line_says_unset_for_a_secret_file_that_cannot_be_read(
    servers, stand_in, jwks_server, tmp_path
):
    """The start-up line's `bridge_secret` is what /readyz says: `unset` when the secret is
    to come from a file that is missing (a Secret not yet mounted), as every proxied request
    then gets 503 sme-jwt-bridge-unwired; it said `set` (configured), with the file named."""
    _, sme_url = stand_in
    missing = tmp_path / "jwt-secret"
    env = base_env(jwks_server.url, sme_url, CATALYST_SME_JWT_SECRET_FILE=str(missing))
    del env["CATALYST_SME_JWT_SECRET"]
    proc = await servers(env)
    startup = await proc.wait_for_event("startup")
    url = await proc.wait_listening()
    async with aiohttp.ClientSession() as http, http.get(url + "/readyz") as resp:
        ready = await resp.json()
    proc.signal(signal.SIGTERM)
    assert await proc.wait() == 0
    assert (startup["bridge_secret"], ready["bridge_secret"]) == ("unset", "unset")
    assert startup["bridge_secret_file"] == str(missing)


async def test_a_jwks_urls_query_is_never_logged(servers, stand_in, jwks_server, rsa_key):
    """A credential in the JWKS URL's query reaches no log line: both lines show ``?...``."""
    _, sme_url = stand_in
    jwks_server.keys = [public_jwk(rsa_key, KID)]
    proc = await servers(base_env(jwks_server.url + "?access_token=s3cr3t-q", sme_url + "/"))
    startup = await proc.wait_for_event("startup")
    refresh = await proc.wait_for_event("jwks.refresh")
    proc.signal(signal.SIGTERM)
    assert await proc.wait() == 0
    assert refresh["result"] == "ok"  # the query was sent
    assert startup["operator_keys"]["jwks_url"] == jwks_server.url + "?..."
    assert refresh["url"] == jwks_server.url + "?..."
    assert "s3cr3t-q" not in proc.output


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled-parser", "python-parser"])
async def test_a_jwks_server_echoing_the_request_line_gets_no_secret_logged(
    servers, stand_in, compiled
):
    """A JWKS server that sends the request line back as its status line: aiohttp's error
    quotes it (the URL's query with it) in its text, with the compiled parser or without.
    The ``jwks.refresh`` warning names the fault, and no line holds the query."""

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        writer.write(head.split(b"\r\n", 1)[0] + b"\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    _, sme_url = stand_in
    extra = {} if compiled else {"AIOHTTP_NO_EXTENSIONS": "1"}
    url = f"http://127.0.0.1:{port}/certs?client_secret=TopSecretValue123"
    try:
        proc = await servers(base_env(url, sme_url + "/", **extra))
        refresh = await proc.wait_for_event("jwks.refresh")
        proc.signal(signal.SIGTERM)
        assert await proc.wait() == 0
    finally:
        server.close()
        await server.wait_closed()
    assert refresh["result"] == "error"
    assert refresh["reason"].startswith("ClientResponseError: 400")
    assert "TopSecretValue123" not in proc.output


async def test_jwks_failure_is_logged(servers, stand_in, jwks_server):
    """A failed JWKS fetch is logged as a warning with its result."""
    _, sme_url = stand_in
    jwks_server.mode = "error"
    proc = await servers(base_env(jwks_server.url, sme_url))
    refresh = await proc.wait_for_event("jwks.refresh")
    proc.signal(signal.SIGTERM)
    assert await proc.wait() == 0
    assert refresh["result"] == "error"
    assert refresh["level"] == "warning"


async def test_console_format(servers, stand_in, jwks_server, token, rsa_key):
    """CATALYST_LOG_FORMAT=console writes human-readable lines, not JSON, still without tokens."""
    _, sme_url = stand_in
    jwks_server.keys = [public_jwk(rsa_key, KID)]
    proc = await servers(base_env(jwks_server.url, sme_url, CATALYST_LOG_FORMAT="console"))
    line = await proc.wait_for_line(lambda text: "startup" in text)
    port = line.split("listen=")[1].split()[0].rsplit(":", 1)[1]
    good = token(kid=KID)
    async with aiohttp.ClientSession() as http:
        status, _ = await fetch(
            http,
            "POST",
            f"http://127.0.0.1:{port}{PURCHASE}",
            headers={"Authorization": f"Bearer {good}"},
            data=b"{}",
        )
    assert status == 200
    proc.signal(signal.SIGTERM)
    assert await proc.wait() == 0
    assert proc.stdout_lines
    assert not any(text.startswith("{") for text in proc.stdout_lines)
    request = [text for text in proc.stdout_lines if " request " in text]
    assert len(request) == 1
    assert "status=200" in request[0]
    assert f"path={PURCHASE}" in request[0]
    assert good not in proc.output
    assert BRIDGE.decode() not in proc.output


@pytest.mark.parametrize(
    ("level", "shown"),
    [("debug", True), ("info", True), ("warning", False), ("WARNING", False)],
)
async def test_log_level(stand_in, jwks_server, level, shown):
    """CATALYST_LOG_LEVEL hides events below the level; warnings still show at warning."""
    _, sme_url = stand_in
    jwks_server.mode = "error"  # a warning-level event soon after start-up
    sock = free_socket()
    port = sock.getsockname()[1]
    sock.close()
    env = base_env(jwks_server.url, sme_url, CATALYST_LOG_LEVEL=level,
                   CATALYST_SME_JWT_SECRET="short")  # fmt: skip
    proc = await ServeProcess(["serve", "--host", "127.0.0.1", "--port", str(port)], env).start()
    try:
        warning = await proc.wait_for_event("jwks.refresh")
        async with aiohttp.ClientSession() as http:
            # an answer means the server is listening and its signal handlers are in place
            status, _ = await fetch(http, "GET", f"http://127.0.0.1:{port}/healthz")
            assert status == 200
        proc.signal(signal.SIGTERM)
        assert await proc.wait() == 0
    finally:
        await proc.stop()
    events = {line["event"] for line in proc.json_lines()}
    assert ("startup" in events) is shown
    assert ("request" in events) is shown
    assert ("shutdown.done" in events) is shown
    assert "bridge_secret.short" in events
    assert warning["level"] == "warning"
    levels = {line["level"] for line in proc.json_lines()}
    assert levels <= ({"debug", "info", "warning"} if shown else {"warning"})


async def test_access_lines_are_written_within_moments_while_the_server_runs(
    servers, stand_in, jwks_server, token, rsa_key
):
    """Lines are batched, not held: a request's line reaches stdout within a second (the
    flush interval is 100 ms) while the server keeps running, and a burst's lines all do."""
    _sme, sme_url = stand_in
    jwks_server.keys = [public_jwk(rsa_key, KID)]
    proc = await servers(base_env(jwks_server.url, sme_url))
    base = await proc.wait_listening()
    good = token(kid=KID)
    async with aiohttp.ClientSession() as http:
        for n in range(25):
            headers = {"Authorization": f"Bearer {good}", "X-Request-ID": f"burst-{n}"}
            await fetch(http, "POST", base + PURCHASE, data=b"{}", headers=headers)
    # within a second of the last answer, or the wait fails
    await proc.wait_for_line(lambda text: '"request_id":"burst-24"' in text, timeout=1.0)
    ids = {line.get("request_id") for line in proc.json_lines() if line["event"] == "request"}
    assert {f"burst-{n}" for n in range(25)} <= ids
    assert proc.proc is not None
    assert proc.proc.returncode is None  # still serving


def test_console_tracebacks_show_no_local_variables_and_no_tokens() -> None:
    """A console line for an exception (CATALYST_LOG_FORMAT=console) carries a plain traceback:
    never the frames' local variables (a secret, a token in scope), and a token quoted in
    the exception's message is redacted."""
    render = log.console_renderer()
    jws = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJvcC0xIn0.c2lnbmF0dXJl"

    def fails(cookie_secret: bytes, token: str) -> None:
        raise ValueError(f"could not verify {token}")

    secret = os.urandom(16).hex().encode()  # in scope as a value, never in the source
    try:
        fails(secret, jws)
    except ValueError:
        line = render(None, "error", {"event": "handler.error", "exc_info": sys.exc_info()})
    assert "Traceback" in line
    assert "ValueError" in line
    assert secret.decode() not in line
    assert "eyJ" not in line


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    """``log.configure(fmt="json")`` into a buffer, this process's logging put back after."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    stream = io.StringIO()
    log.configure(fmt="json", stream=stream)
    yield stream
    structlog.reset_defaults()
    log._sink, log._fast_access = None, False
    root.handlers[:], root.level = handlers, level


def test_json_exceptions_carry_their_traceback_redacted(json_log: io.StringIO) -> None:
    """A JSON line for an exception (``worker.crashed``) holds the plain traceback in
    ``exception`` (it held only ``"exc_info": true``), a token its message quotes redacted."""
    stream = json_log
    jws = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJvcC0xIn0.c2lnbmF0dXJl"
    try:
        raise ValueError(f"could not verify {jws}")
    except ValueError:
        log.get_logger().exception(log.WORKER_CRASHED, worker=1)
    log.flush()
    (line,) = [json.loads(text) for text in stream.getvalue().splitlines()]
    assert line["event"] == log.WORKER_CRASHED
    assert "exc_info" not in line
    assert line["exception"].startswith("Traceback (most recent call last):")
    assert "ValueError: could not verify" in line["exception"]
    assert "eyJ" not in stream.getvalue()


def test_aiohttps_own_log_records_are_json_lines_too(json_log: io.StringIO) -> None:
    """In the JSON format a standard-library record (aiohttp's "Error handling request" with
    its traceback) is one JSON line of ours, with its logger, level and traceback, tokens in
    its message or traceback redacted; not plain text on stderr, which a collector reading
    the container's two streams as one would take for several broken lines."""
    stream = json_log
    jws = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJvcC0xIn0.c2lnbmF0dXJl"
    opaque = "Bearer opaque-0a1b2c3d4e5f-token; Cookie: catalyst_session=c00k1e-value-9f8e"
    try:
        raise RuntimeError(f"a handler's bug near {jws} {opaque}")
    except RuntimeError:
        logging.getLogger("aiohttp.server").exception("Error handling %s %s", jws, opaque)
    logging.getLogger("aiohttp.access").info("below WARNING: not written")
    log.flush()
    (line,) = [json.loads(text) for text in stream.getvalue().splitlines()]
    assert (line["logger"], line["level"]) == ("aiohttp.server", "error")
    assert line["event"].startswith("Error handling")
    assert line["exception"].startswith("Traceback (most recent call last):")
    assert "RuntimeError: a handler's bug near" in line["exception"]
    assert "eyJ" not in stream.getvalue()
    assert "opaque-0a1b2c3d4e5f-token" not in stream.getvalue()
    assert "c00k1e-value-9f8e" not in stream.getvalue()


def test_a_value_orjson_refuses_still_makes_one_json_line(json_log: io.StringIO) -> None:
    """A lone surrogate (an environment variable's byte that is not UTF-8) or an integer past
    64 bits in a field costs nothing: the line is written, valid JSON, escaped. (Such a
    start-up line was a traceback, and a worker that crashed on it was restarted forever.)"""
    stream = json_log
    log.get_logger().info(log.STARTUP, token_issuers=["ab\udcffcd"], max_body_bytes=2**64)
    log.access({"request_id": "r-1", "method": "POST", "path": "/p", "sub": "op-\ud800",
                "email": None, "status": 500})  # fmt: skip
    log.flush()
    startup, request = [json.loads(text) for text in stream.getvalue().splitlines()]
    assert (startup["token_issuers"], startup["max_body_bytes"]) == (["ab\udcffcd"], 2**64)
    assert (request["event"], request["sub"], request["status"]) == ("request", "op-\ud800", 500)


def test_console_lines_leave_ordinary_words_alone() -> None:
    """The console format redacts what a traceback may quote, not ordinary fields: a word
    holding "eyJ" or following "Bearer " stays as it is (fields are redacted by key and by
    the shape of a JWS before they are rendered)."""
    render = log.console_renderer()
    line = render(None, "warning", {"event": "auth.refused", "detail": "empty Bearer credentials",
                                    "sub": "monkeyJump", "path": "/heyJude"})  # fmt: skip
    assert "empty Bearer credentials" in line
    assert "monkeyJump" in line
    assert "/heyJude" in line


_WRITER = """
import asyncio, sys
from catalyst_proxy.log import LineSink

async def main(worker: int) -> None:
    sink = LineSink(sys.stdout)
    for n in range({lines}):
        sink.line('{{"worker": %d, "n": %d, "pad": "%s"}}' % (worker, n, "x" * 300))
        if n % 500 == 0:
            await asyncio.sleep(0)  # let the flush timer run now and then, as a server does
    sink.flush()

asyncio.run(main(int(sys.argv[1])))
"""


def test_workers_sharing_a_pipe_never_write_into_each_others_lines() -> None:
    """Two processes (as ``serve --workers 2``) write batches of access lines into one pipe, as
    a container's stdout is: every line arrives whole, none cut by the other's."""
    lines = 20_000
    read_end, write_end = os.pipe()
    script = _WRITER.format(lines=lines)
    writers = [
        subprocess.Popen([sys.executable, "-c", script, str(worker)], stdout=write_end)
        for worker in (1, 2)
    ]
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        received = []
        while piece := pipe.read1(1024):  # a slow reader: the pipe fills, writers block
            received.append(piece)
    for writer in writers:
        assert writer.wait(30) == 0
    seen: dict[int, int] = {1: 0, 2: 0}
    for raw in b"".join(received).splitlines():
        line = json.loads(raw)  # a line cut by another's would not parse
        assert line["n"] == seen[line["worker"]]  # and each worker's lines in their order
        seen[line["worker"]] += 1
    assert seen == {1: lines, 2: lines}


async def test_a_credential_in_the_request_target_is_masked_in_the_access_line(
    json_log: io.StringIO, gateway: Any, bearer: Any
) -> None:
    """The access line's `path` is the client's: an operator token in it is masked also when
    its dots are percent-encoded (`%2E`, which the SME gateway decodes, so it is forwarded as
    the voucher code), and so is the password of an absolute-form target's user info
    (`DELETE http://user:password@host/...`). Both were logged in clear."""
    gw = await gateway()
    token = bearer()["Authorization"].split(" ", 1)[1]
    signature = token.rsplit(".", 1)[1]
    revoke = "/api/v1/sme/billing/vouchers/revoke/"
    targets = [revoke + token.replace(".", "%2E"), revoke + token.replace(".", "%2e"),
               revoke + token.replace(".", "%252E"),  # encoded twice
               "http://alice:S3cretPassw0rd@gw/api/v1/billing/purchase"]  # fmt: skip
    for target in targets:
        reader, writer = await asyncio.open_connection(URL(gw.url).host, URL(gw.url).port)
        writer.write(f"DELETE {target} HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n"
                     f"Authorization: Bearer {token}\r\n\r\n".encode())  # fmt: skip
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 "), head
        writer.close()
    log.flush()
    lines = [json.loads(text) for text in json_log.getvalue().splitlines()]
    paths = [line["path"] for line in lines if line["event"] == log.REQUEST]
    assert len(paths) == 4, lines
    assert signature not in json_log.getvalue()
    assert "S3cretPassw0rd" not in json_log.getvalue()
    assert paths[:3] == [revoke + "[redacted-jws]"] * 3
    assert paths[3] == "http://[redacted]@gw/api/v1/billing/purchase"


@pytest.mark.parametrize(
    "shape",
    [
        "{jws}",
        "{jwe}",
        "{spaced}",
        "{jws_twice_encoded}",
        "{jws_four_times_encoded}",
        "x/{jws}/y",
        "{jws}%2F",
        "x-{jws_encoded}",
    ],
)
def test_a_client_field_is_masked_whatever_the_tokens_shape(shape: str) -> None:
    """``masked`` (the access line's client fields: path, request ID) masks a JWS, a JWE (five
    parts, the second not a JSON object), one whose JSON begins '{ "' (eyAi), and one whose
    dots are percent-encoded twice (%252E); ordinary paths and emails stay as they are."""
    signature = "c2lnbmF0dXJlLXNlY3JldC0wMTIz-_"
    jws = f"eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJvcC0xIn0.{signature}"
    spaced = base64.urlsafe_b64encode(b'{ "alg": "RS256"}').rstrip(b"=").decode()
    value = shape.format(
        jws=jws,
        jwe=f"eyJhbGciOiJSU0EtT0FFUCJ9.a2V5.aXY.{signature}.dGFn",
        spaced=f"{spaced}.{spaced}.{signature}",
        jws_twice_encoded=jws.replace(".", "%252E"),
        jws_four_times_encoded=jws.replace(".", "%2525252e"),
        jws_encoded=jws.replace(".", "%2E"),
    )
    assert signature not in log.masked(value)
    assert "[redacted-jws]" in log.masked(value)
    ordinary_values = (
        "/api/v1/sme/billing/vouchers/revoke/SUMMER-24",
        "op1@example.test",
        "/heyJude",
        "/survey/money",
        "/revoke/50%25-off",
        "/eyJust/a/path",
    )
    for ordinary in ordinary_values:
        assert log.masked(ordinary) == ordinary


@pytest.mark.parametrize(
    "spelling",
    [
        "Authorization: Bearer  {opaque}",  # two spaces
        "Authorization: Bearer\t{opaque}",
        "Authorization: Bearer\u00a0{opaque}",
        "Bearer:{opaque}",
        "Authorization=Bearer%20{opaque}",
        "authorization={opaque}",
        "catalyst_session = {opaque}",
        'Cookie: catalyst_session="{opaque}"',
        "b'Authorization: Bearer {opaque}\\x01'",  # a bytes repr
        "{jws_percent}",  # a JWS whose dots are %2E
        "{jws_spaced}",  # a JWS whose JSON begins '{{ "' (eyAi)
        "{jws_standard}",  # a JWS in the standard base64 alphabet
        "{jws_twice}",  # a JWS whose dots are %252E
        "/x/{jws_percent}",  # ... after a slash, as in a URL path
        "eyJhbGciOiJSU0EtT0FFUCJ9.{opaque}.a.b.c",  # a JWE
    ],
)
def test_free_text_is_redacted_whatever_the_spelling(spelling: str) -> None:
    """``redact_text`` (tracebacks, aiohttp's and other libraries' messages) masks a credential
    however it is written next to its name: any white space, ':' or '=' or %20 after
    Bearer, a quoted or spaced cookie, a percent-encoded or otherwise spelt JWS."""
    opaque = "opaqueSECRET0123456789"
    segment = base64.urlsafe_b64encode(b'{ "alg": "RS256"}').rstrip(b"=").decode()
    signature = "c2lnbmF0dXJlLXNlY3JldC0wMTIz-_"
    jws = f"eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJvcC0xIn0.{signature}"
    text = spelling.format(
        opaque=opaque,
        jws_percent=jws.replace(".", "%2E"),
        jws_spaced=f"{segment}.{segment}.{signature}",
        jws_standard=jws.replace("-", "+").replace("_", "/"),
        jws_twice=jws.replace(".", "%252E"),
    )
    assert log.redact_text("Authorization header missing") == "Authorization header missing"
    masked = log.redact_text(f"could not handle {text} here")
    assert opaque not in masked
    assert signature[:20] not in masked  # (its first 20 are alike in both alphabets)
    assert masked.startswith("could not handle ")
    assert masked.endswith(" here")
