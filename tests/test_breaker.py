"""Fail fast (reference.md: "The upstream exchange", the breaker), end to end over real sockets.

Every case runs the real gateway on 127.0.0.1 against an upstream that is
really dead, really slow or really there:

- a **black hole** (``BlackHole``): a listener whose accept queue is full, so
  SYNs are dropped and a connection attempt hangs until the budget runs out.
  Its ``attempts()`` reads the kernel's socket table (``/proc/net/tcp``) for
  sockets in SYN-SENT towards it that are not its own fillers: every
  connection attempt the gateway has under way, observed from outside it;
- a **dead port** (``dead_port``): bound but not listening, so a connection is
  refused at once; later a real ``HTTPUpstream`` can listen on that very port
  (the ``upstream`` fixture's ``sock=``) and count what connects to it, or the port can become a
  black hole (``BlackHole(sock)``).

The breaker's clock is the fake ``monotonic`` given to ``create_app``: a test
moves it past the cooldown instead of waiting. Connection attempts run on real
time (``upstream_timeout_seconds``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import signal
import socket
import struct
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from .conftest import BRIDGE_SECRET
from .rawhttp import (
    Respond,
    Seen,
    answer,
    never_answer,
    raw_client,
    read_response,
    request_bytes,
    write_then_close,
)
from .serve_proc import ServeProcess
from .support import free_socket

PURCHASE = "/api/v1/billing/purchase"
ORDER = b'{"order_id": "ord_1", "paid_by_credit": false, "session_url": null}'
BUDGET = 1.0  # upstream_timeout_seconds where a black-holed attempt must use it all
COOLDOWN = 5.0  # breaker_cooldown_seconds (on the fake clock: never waited for)
IMMEDIATE = 0.05  # "at once": far below any budget


# --- what the tests talk to ------------------------------------------------------------------


class FakeClock:
    """The gateway's ``monotonic``: moves only when the test says so."""

    def __init__(self, now: float = 10_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def syn_sent_to(port: int) -> set[int]:
    """Local ports of the sockets in SYN-SENT towards 127.0.0.1:``port`` (the kernel's table)."""
    found = set()
    with open("/proc/net/tcp") as table:
        next(table)  # the column names
        for line in table:
            fields = line.split()
            local, remote, state = fields[1], fields[2], fields[3]
            if remote == f"0100007F:{port:04X}" and state == "02":  # 02: TCP_SYN_SENT
                found.add(int(local.split(":")[1], 16))
    return found


class BlackHole:
    """A 127.0.0.1 port whose accept queue is full: SYNs are dropped, never answered or refused.

    Takes a bound socket (a dead port turns into a black hole) or binds a new one.
    """

    def __init__(self, sock: socket.socket | None = None) -> None:
        self._listener = sock or free_socket()
        self._listener.listen(0)
        self.port = self._listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._fillers: list[socket.socket] = []
        for _ in range(4):
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", self.port))
            self._fillers.append(filler)
        self._filler_ports = {filler.getsockname()[1] for filler in self._fillers}
        # The fillers past the queue's one place hang in SYN-SENT: seeing them proves that
        # attempts() can see an attempt on this machine (it is never blind, so never vacuous).
        assert syn_sent_to(self.port) & self._filler_ports, "SYN-SENT sockets are not visible"

    def attempts(self) -> int:
        """Connection attempts to this port under way right now, other than the fillers."""
        return len(syn_sent_to(self.port) - self._filler_ports)

    def close(self) -> None:
        for filler in self._fillers:
            filler.close()
        self._listener.close()


@contextlib.contextmanager
def black_hole(sock: socket.socket | None = None) -> Iterator[BlackHole]:
    hole = BlackHole(sock)
    try:
        yield hole
    finally:
        hole.close()


@pytest.fixture
def dead_port() -> Iterator[socket.socket]:
    """A socket bound to a 127.0.0.1 port without listening: connections to it are refused."""
    sock = free_socket()
    yield sock
    sock.close()


def url_of(sock: socket.socket) -> str:
    return f"http://127.0.0.1:{sock.getsockname()[1]}"


def held_until(release: asyncio.Event, *, keep_alive: bool) -> Respond:
    """A ``respond`` that takes the whole request and answers 200 once ``release`` is set."""
    reply = answer(200, ORDER, keep_alive=keep_alive)

    async def respond(
        seen: Seen, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        await release.wait()
        return await reply(seen, reader, writer)

    return respond


@dataclass
class Answer:
    status: int
    headers: Any
    body: bytes
    seconds: float  # from sending the request to having the whole answer

    @property
    def error(self) -> str:
        return str(json.loads(self.body)["error"])

    @property
    def forwarded(self) -> str:
        return str(self.headers["X-Catalyst-Forwarded"])


async def purchase(
    gw: Any, headers: dict[str, str], http: aiohttp.ClientSession | None = None
) -> Answer:
    started = time.monotonic()
    async with (
        asyncio.timeout(30),
        (http or gw.http).post(gw.url + PURCHASE, headers=headers, data=b"{}") as resp,
    ):
        body = await resp.read()
    return Answer(resp.status, resp.headers, body, time.monotonic() - started)


def assert_unreachable(got: Answer, *, retry_after: str | None) -> None:
    """503 sme-gateway-unreachable, nothing forwarded, Retry-After as given (None: absent)."""
    assert (got.status, got.error, got.forwarded) == (503, "sme-gateway-unreachable", "no"), got
    assert json.loads(got.body)["detail"]
    assert got.headers.get("Retry-After") == retry_after, got


async def breaker_view(gw: Any) -> dict[str, Any]:
    """/readyz's "breaker" object; /readyz is 200 whatever the breaker's state."""
    status, _, body = await gw.request("GET", "/readyz")
    assert status == 200, body
    answer = json.loads(body)
    assert answer["status"] == "ready"
    return dict(answer["breaker"])


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text (0 when absent)."""
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    return 0.0


def breaker_metrics(text: str) -> dict[str, Any]:
    """The breaker's series: state gauge, transitions by state entered, refusals."""
    states = ("closed", "open", "half-open")
    return {
        "state": {s: sample(text, "catalyst_proxy_breaker_state", state=s) for s in states},
        "to": {s: sample(text, "catalyst_proxy_breaker_transitions_total", to=s) for s in states},
        "refused": sample(text, "catalyst_proxy_upstream_failures_total", kind="breaker_open"),
        "unreachable": sample(text, "catalyst_proxy_upstream_failures_total", kind="unreachable"),
    }


def current(state: str) -> dict[str, float]:
    return {s: 1.0 if s == state else 0.0 for s in ("closed", "open", "half-open")}


async def until(condition: Callable[[], Awaitable[bool]], timeout: float = 5.0) -> None:
    """Ask again (each ask is a real request to the gateway) until ``condition()`` holds."""
    async with asyncio.timeout(timeout):
        while not await condition():
            pass


# --- opening: connection failures in a row ---------------------------------------------------


async def test_three_slow_failures_open_it_then_answers_come_at_once_and_nothing_connects(
    gateway, bearer
):
    """Against a black hole with a 1 s budget and a threshold of 3, the first three purchases
    each spend the budget connecting (503 unreachable), and from then on every purchase is
    answered at once with Retry-After while no connection is attempted."""
    clock = FakeClock()
    with black_hole() as hole:
        gw = await gateway(
            upstream=hole.url,
            upstream_timeout_seconds=BUDGET,
            breaker_failures=3,
            breaker_cooldown_seconds=COOLDOWN,
            monotonic=clock,
        )
        headers = bearer()
        for count in (1, 2, 3):
            got = await purchase(gw, headers)
            assert_unreachable(got, retry_after=None)  # a real attempt: no Retry-After
            assert BUDGET - 0.05 <= got.seconds < BUDGET + 0.5, got.seconds
            view = await breaker_view(gw)
            assert (view["state"], view["failures_in_a_row"]) == (
                ("open", 3) if count == 3 else ("closed", count)
            )
        assert view["retry_after_seconds"] == COOLDOWN

        got = await purchase(gw, headers)
        assert got.seconds < IMMEDIATE, got.seconds
        assert_unreachable(got, retry_after=str(int(COOLDOWN)))
        assert hole.attempts() == 0

        started = time.monotonic()
        burst = await asyncio.gather(*(purchase(gw, headers) for _ in range(20)))
        assert time.monotonic() - started < 0.5  # one attempt alone would take 1 s
        for got in burst:
            assert_unreachable(got, retry_after="5")
        assert hole.attempts() == 0  # none started in the background either

        # Retry-After is the cooldown left, rounded up; /readyz says it exactly.
        clock.advance(2.5)
        assert_unreachable(await purchase(gw, headers), retry_after="3")
        assert (await breaker_view(gw))["retry_after_seconds"] == 2.5
        clock.advance(2.499)
        assert_unreachable(await purchase(gw, headers), retry_after="1")
        assert hole.attempts() == 0

        metrics = breaker_metrics(await gw.metrics_text())
    assert metrics == {
        "state": current("open"),
        "to": {"closed": 0, "open": 1, "half-open": 0},
        "refused": 23,
        "unreachable": 3,
    }


async def test_a_quiet_breaker_reads_half_open_once_its_cooldown_is_over(
    gateway, bearer, dead_port
):
    """/readyz and the state gauge say what the breaker is now: once the cooldown is over it
    is half-open although no request came to find that out (a quiet worker must not read
    "open" with 0 s left for good); the next purchase is its trial."""
    clock = FakeClock()
    gw = await gateway(upstream=url_of(dead_port), breaker_failures=2,
                       breaker_cooldown_seconds=COOLDOWN, monotonic=clock)  # fmt: skip
    headers = bearer()
    for _ in range(2):
        assert_unreachable(await purchase(gw, headers), retry_after=None)
    assert (await breaker_view(gw))["state"] == "open"
    clock.advance(COOLDOWN)
    assert breaker_metrics(await gw.metrics_text())["state"] == current("half-open")
    view = await breaker_view(gw)
    assert (view["state"], view["retry_after_seconds"]) == ("half-open", 0.0)
    assert_unreachable(await purchase(gw, headers), retry_after=None)  # the trial: a real try
    assert (await breaker_view(gw))["state"] == "open"


@contextlib.contextmanager
def out_of_descriptors() -> Iterator[None]:
    """This process can open no new file descriptor (the soft limit at the lowest one free)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (_lowest_free_descriptor(), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _lowest_free_descriptor() -> int:
    fd = 0
    while True:
        try:
            os.fstat(fd)  # (opens nothing, as listing /proc/self/fd would)
        except OSError:
            return fd
        fd += 1


async def test_a_connect_that_fails_for_want_of_descriptors_is_overloaded_not_unreachable(
    gateway, bearer, upstream
):
    """A connect that fails because this process is out of file descriptors (EMFILE: a flood
    of clients) is the gateway's own limit, not the SME gateway's: 503 gateway-overloaded,
    nothing sent, and the breaker (one failure would open it) counts nothing, so that once
    the flood is gone the next purchase goes through."""
    up = await upstream(answer(200, b'{"ok": true}'))
    gw = await gateway(upstream=up.url, breaker_failures=1, monotonic=FakeClock())
    reader, writer = await raw_client(gw.url)  # (its descriptors, before they run out)
    try:
        request = request_bytes(
            "POST", PURCHASE, [*bearer().items(), ("Content-Length", "2")], b"{}"
        )
        with out_of_descriptors():
            writer.write(request)
            async with asyncio.timeout(10):
                refused = await read_response(reader)
        assert refused is not None
        assert (refused.status, json.loads(refused.body)["error"]) == (503, "gateway-overloaded")
        assert refused.headers["X-Catalyst-Forwarded"] == "no"
        assert up.requests == []
        assert (await breaker_view(gw))["state"] == "closed"
        assert (await purchase(gw, bearer())).status == 200
    finally:
        writer.close()


async def test_requests_that_got_no_connection_are_not_upstream_latency(gateway, bearer, dead_port):
    """The upstream latency histogram (and the access line's upstream_ms) is for exchanges:
    a failed connect and a breaker's refusal add no sample (a near-zero one per refusal would
    drag the quantiles to 0 just while the SME gateway is down)."""
    gw = await gateway(upstream=url_of(dead_port), breaker_failures=2, monotonic=FakeClock())
    headers = bearer()
    for _ in range(3):  # two failed connects, then the breaker's refusal
        got = await purchase(gw, headers)
        assert (got.status, got.error) == (503, "sme-gateway-unreachable")
    text = await gw.metrics_text()
    assert sample(text, "catalyst_proxy_upstream_duration_seconds_count") == 0
    assert breaker_metrics(text)["refused"] == 1


async def test_failures_in_a_row_only_a_connection_in_between_starts_the_count_over(
    gateway, bearer, dead_port, upstream
):
    """A connection made between two refused ones (whatever its answer, here a 500) resets the
    count: the breaker opens only on the threshold of failures in a row."""
    gw = await gateway(upstream=url_of(dead_port), breaker_failures=2, monotonic=FakeClock())
    headers = bearer()
    assert_unreachable(await purchase(gw, headers), retry_after=None)
    assert (await breaker_view(gw))["failures_in_a_row"] == 1

    up = await upstream(answer(500, b'{"error": "boom"}', keep_alive=False), sock=dead_port)
    got = await purchase(gw, headers)
    assert (got.status, got.body, got.forwarded) == (500, b'{"error": "boom"}', "yes")
    assert (await breaker_view(gw))["failures_in_a_row"] == 0
    await up.close()  # the port refuses again

    assert_unreachable(await purchase(gw, headers), retry_after=None)
    view = await breaker_view(gw)
    assert (view["state"], view["failures_in_a_row"]) == ("closed", 1)
    assert_unreachable(await purchase(gw, headers), retry_after=None)
    view = await breaker_view(gw)
    assert (view["state"], view["failures_in_a_row"]) == ("open", 2)
    assert up.connections == 1


async def reset_after_reading(
    seen: Seen, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> bool:
    """A ``respond`` that takes the whole request and answers with a TCP reset (RST)."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    return False  # the helper closes it: with linger 0, that is a reset


@dataclass(frozen=True)
class AfterConnecting:
    """Something that goes wrong (or not) once the connection was made."""

    respond: Respond
    status: int
    error: str | None  # None: the upstream's own answer
    forwarded: str


AFTER_CONNECTING = {
    "answer-500": AfterConnecting(answer(500, b'{"error": "x"}'), 500, None, "yes"),
    "answer-502": AfterConnecting(answer(502, b'{"error": "x"}'), 502, None, "yes"),
    "answer-503": AfterConnecting(
        answer(503, b'{"error": "x"}', [("Retry-After", "7")], keep_alive=False), 503, None, "yes"
    ),
    "answer-504": AfterConnecting(answer(504, b'{"error": "x"}'), 504, None, "yes"),
    "timeout-after-sending": AfterConnecting(never_answer, 504, "sme-gateway-timeout", "unknown"),
    "closed-after-sending": AfterConnecting(
        write_then_close(b""), 502, "sme-gateway-bad-response", "unknown"
    ),
    "reset-after-sending": AfterConnecting(
        reset_after_reading, 502, "sme-gateway-bad-response", "unknown"
    ),
}


@pytest.mark.parametrize("case", AFTER_CONNECTING)
async def test_nothing_after_a_connection_was_made_ever_counts(gateway, bearer, upstream, case):
    """Upstream answers of any status, timeouts after sending and connections closed or reset
    after the request was sent never count: even with a threshold of 1, eight in a row leave
    the breaker closed and every request reaches the upstream."""
    spec = AFTER_CONNECTING[case]
    up = await upstream(spec.respond)
    gw = await gateway(
        upstream=up.url,
        upstream_timeout_seconds=0.2,
        breaker_failures=1,
        monotonic=FakeClock(),
    )
    headers = bearer()
    for _ in range(8):
        got = await purchase(gw, headers)
        assert (got.status, got.forwarded) == (spec.status, spec.forwarded), got
        if spec.error is None:
            assert got.body == b'{"error": "x"}'
        else:
            assert got.error == spec.error
        view = await breaker_view(gw)
        assert (view["state"], view["failures_in_a_row"]) == ("closed", 0)
    assert len(up.complete) == 8
    metrics = breaker_metrics(await gw.metrics_text())
    assert metrics["state"] == current("closed")
    assert metrics["to"] == {"closed": 0, "open": 0, "half-open": 0}
    assert metrics["refused"] == 0


async def test_zero_failures_disables_it_every_request_tries_for_itself(gateway, bearer):
    """With CATALYST_BREAKER_FAILURES=0 the breaker never opens: every purchase against a black
    hole tries to connect and spends its own budget, however many failed before."""
    budget = 0.3
    with black_hole() as hole:
        gw = await gateway(
            upstream=hole.url,
            upstream_timeout_seconds=budget,
            breaker_failures=0,
            monotonic=FakeClock(),
        )
        headers = bearer()
        for _ in range(7):  # more than the default threshold of 5
            got = await purchase(gw, headers)
            assert_unreachable(got, retry_after=None)
            assert budget - 0.05 <= got.seconds < budget + 0.5, got.seconds
            assert (await breaker_view(gw))["state"] == "closed"
        assert hole.attempts() == 0  # each attempt ended with its request
        metrics = breaker_metrics(await gw.metrics_text())
    assert metrics == {
        "state": current("closed"),
        "to": {"closed": 0, "open": 0, "half-open": 0},
        "refused": 0,
        "unreachable": 7,
    }


# --- after the cooldown: the one trial -------------------------------------------------------


async def test_after_the_cooldown_one_trial_goes_out_others_are_refused_and_its_failure_reopens(
    gateway, bearer
):
    """Once the cooldown is over exactly one of ten concurrent purchases tries to connect (the
    other nine get the immediate 503 with Retry-After: 1 while it is under way); when the trial
    fails the breaker is open again for a whole cooldown."""
    clock = FakeClock()
    with black_hole() as hole:
        gw = await gateway(
            upstream=hole.url,
            upstream_timeout_seconds=BUDGET,
            breaker_failures=1,
            breaker_cooldown_seconds=COOLDOWN,
            monotonic=clock,
        )
        headers = bearer()
        assert_unreachable(await purchase(gw, headers), retry_after=None)
        assert (await breaker_view(gw))["state"] == "open"

        clock.advance(COOLDOWN)
        pending = {asyncio.create_task(purchase(gw, headers)) for _ in range(10)}
        refused: list[Answer] = []
        while len(refused) < 9:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            refused += [task.result() for task in done]
        assert (len(refused), len(pending)) == (9, 1)  # the trial is still connecting
        assert hole.attempts() == 1  # exactly one attempt is out
        view = await breaker_view(gw)
        assert view["state"] == "half-open"
        for got in refused:
            assert_unreachable(got, retry_after="1")
            assert got.seconds < 0.5

        [trial_task] = pending
        trial = await trial_task
        assert_unreachable(trial, retry_after=None)  # it really tried
        assert trial.seconds >= BUDGET - 0.05
        view = await breaker_view(gw)
        assert view == {"state": "open", "failures_in_a_row": 2, "retry_after_seconds": COOLDOWN}
        got = await purchase(gw, headers)
        assert got.seconds < IMMEDIATE
        assert_unreachable(got, retry_after="5")
        assert hole.attempts() == 0
        metrics = breaker_metrics(await gw.metrics_text())
    assert metrics == {
        "state": current("open"),
        "to": {"closed": 0, "open": 2, "half-open": 1},
        "refused": 10,
        "unreachable": 2,
    }


async def test_a_real_upstream_the_dead_port_is_found_by_the_trial_and_closes_it(
    gateway, bearer, dead_port, upstream
):
    """When a real upstream appears on the dead port, nothing connects to it while the breaker
    is open; after the cooldown the trial connects, the breaker closes (count reset), requests
    flow again, and each transition is logged as a breaker.state event."""
    clock = FakeClock()
    with capture_logs() as logs:
        gw = await gateway(
            upstream=url_of(dead_port),
            upstream_timeout_seconds=BUDGET,
            breaker_failures=2,
            breaker_cooldown_seconds=COOLDOWN,
            monotonic=clock,
        )
        headers = bearer()
        for _ in range(2):
            got = await purchase(gw, headers)
            assert_unreachable(got, retry_after=None)
            assert got.seconds < BUDGET / 2  # refused: no need to wait for the budget
        assert (await breaker_view(gw))["state"] == "open"

        up = await upstream(answer(200, ORDER), sock=dead_port)
        for _ in range(5):
            assert_unreachable(await purchase(gw, headers), retry_after="5")
        assert up.connections == 0  # reachable now, but nobody tried

        clock.advance(COOLDOWN)
        trial = await purchase(gw, headers)
        assert (trial.status, trial.body, trial.forwarded) == (200, ORDER, "yes")
        assert up.connections == 1
        view = await breaker_view(gw)
        assert view == {"state": "closed", "failures_in_a_row": 0, "retry_after_seconds": 0}

        flowing = await asyncio.gather(*(purchase(gw, headers) for _ in range(10)))
        assert [(got.status, got.body) for got in flowing] == [(200, ORDER)] * 10
        assert len(up.complete) == 11
        metrics = breaker_metrics(await gw.metrics_text())
    assert metrics == {
        "state": current("closed"),
        "to": {"closed": 1, "open": 1, "half-open": 1},
        "refused": 5,
        "unreachable": 2,
    }
    events = [entry for entry in logs if entry["event"] == "breaker.state"]
    assert [(e["state"], e["failures_in_a_row"], e["log_level"]) for e in events] == [
        ("open", 2, "warning"),
        ("half-open", 2, "info"),
        ("closed", 0, "info"),
    ]


async def test_a_trial_whose_client_goes_away_lets_the_next_request_be_the_trial(
    gateway, bearer, dead_port
):
    """A trial abandoned by its client (the request is cancelled mid-connect) does not keep the
    breaker half-open for good: the next request is the new trial and really tries."""
    clock = FakeClock()
    gw = await gateway(
        upstream=url_of(dead_port),
        upstream_timeout_seconds=BUDGET,
        breaker_failures=1,
        breaker_cooldown_seconds=COOLDOWN,
        monotonic=clock,
    )
    headers = bearer()
    assert_unreachable(await purchase(gw, headers), retry_after=None)  # refused: open
    with black_hole(dead_port) as hole:  # the port now swallows SYNs: a trial hangs
        clock.advance(COOLDOWN)
        _, writer = await raw_client(gw.url)
        writer.write(
            request_bytes("POST", PURCHASE, [*headers.items(), ("Content-Length", "2")], b"{}")
        )
        await writer.drain()

        async def half_open() -> bool:
            return (await breaker_view(gw))["state"] == "half-open"

        await until(half_open)
        assert hole.attempts() == 1
        writer.close()  # the trial's client goes away

        async def only_this_request_in_flight() -> bool:
            text = await gw.metrics_text()
            return sample(text, "catalyst_proxy_requests_in_flight") == 1

        await until(only_this_request_in_flight)
        assert hole.attempts() == 0  # the abandoned attempt was stopped

        got = await purchase(gw, headers)
        assert_unreachable(got, retry_after=None)  # the new trial, not a refusal
        assert got.seconds >= BUDGET - 0.05
        assert (await breaker_view(gw))["state"] == "open"


# --- when it opens: the line and the idle connections ----------------------------------------


async def test_requests_waiting_for_a_connection_are_answered_at_once_when_it_opens(
    gateway, bearer, dead_port, upstream
):
    """Requests waiting in line for a connection when the breaker opens are answered at once
    (503 with Retry-After), not left to wait out their budget."""
    release = asyncio.Event()
    up = await upstream(held_until(release, keep_alive=False), sock=dead_port)
    gw = await gateway(
        upstream=up.url,
        upstream_timeout_seconds=3.0,
        upstream_max_connections=1,
        breaker_failures=1,
        breaker_cooldown_seconds=COOLDOWN,
        monotonic=FakeClock(),
    )
    headers = bearer()
    first = asyncio.create_task(purchase(gw, headers))  # holds the pool's one connection
    await up.until(lambda: len(up.complete) == 1)
    in_line = [asyncio.create_task(purchase(gw, headers)) for _ in range(5)]

    async def five_waiting() -> bool:
        text = await gw.metrics_text()
        return sample(text, "catalyst_proxy_upstream_waiting") == 5

    await until(five_waiting)
    up.raw.stop_listening()  # from now on the port refuses
    release.set()  # the answer closes the connection: its place goes to the first in line
    started = time.monotonic()
    assert (await first).status == 200
    answers = await asyncio.gather(*in_line)
    assert time.monotonic() - started < 0.5  # their budget is 3 s
    tried = [got for got in answers if "Retry-After" not in got.headers]
    assert len(tried) == 1  # the first in line connected, was refused, and opened it
    assert_unreachable(tried[0], retry_after=None)
    for got in answers:
        if got is not tried[0]:
            assert_unreachable(got, retry_after="5")
    assert up.connections == 1
    assert (await breaker_view(gw))["state"] == "open"
    text = await gw.metrics_text()
    assert sample(text, "catalyst_proxy_upstream_waiting") == 0


async def test_idle_connections_are_closed_when_it_opens(gateway, bearer, dead_port, upstream):
    """When the breaker opens, idle keep-alive connections to the upstream are closed at once
    rather than kept for later requests."""
    release = asyncio.Event()
    up = await upstream(held_until(release, keep_alive=True), sock=dead_port)
    port = dead_port.getsockname()[1]
    gw = await gateway(
        upstream=up.url,
        upstream_timeout_seconds=BUDGET,
        upstream_max_connections=2,
        upstream_idle_seconds=60,
        breaker_failures=1,
        monotonic=FakeClock(),
    )
    headers = bearer()
    first = asyncio.create_task(purchase(gw, headers))
    await up.until(lambda: len(up.complete) == 1)
    up.raw.stop_listening()
    hole_socket = socket.socket()
    hole_socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    hole_socket.bind(("127.0.0.1", port))
    with black_hole(hole_socket) as hole:  # the same port now swallows new connections
        second = asyncio.create_task(purchase(gw, headers))  # needs a second connection

        async def second_is_connecting() -> bool:
            await gw.request("GET", "/healthz")
            return hole.attempts() == 1

        await until(second_is_connecting)
        release.set()
        got = await first
        assert (got.status, got.body) == (200, ORDER)  # its connection is idle in the pool now
        assert not up.closed[0].is_set()
        assert (await breaker_view(gw))["state"] == "closed"
        assert_unreachable(await second, retry_after=None)  # the attempt timed out: open
        async with asyncio.timeout(1):
            await up.closed[0].wait()  # the idle connection was closed by the gateway
        assert (await breaker_view(gw))["state"] == "open"
        text = await gw.metrics_text()
    assert sample(text, "catalyst_proxy_upstream_connections") == 0
    assert up.connections == 1


async def test_a_connection_released_while_open_does_not_keep_it_half_open(
    gateway, bearer, dead_port, upstream
):
    """After the cooldown the request let through is the one trial: once it has its answer the
    breaker is closed or open again, never left half-open, even when a connection that was busy
    when it opened has come back to the pool since."""
    clock = FakeClock()
    release = asyncio.Event()
    up = await upstream(held_until(release, keep_alive=True), sock=dead_port)
    gw = await gateway(
        upstream=up.url,
        upstream_timeout_seconds=BUDGET,
        upstream_max_connections=2,
        upstream_idle_seconds=60,
        breaker_failures=1,
        breaker_cooldown_seconds=COOLDOWN,
        monotonic=clock,
    )
    headers = bearer()
    first = asyncio.create_task(purchase(gw, headers))  # busy on the first connection
    await up.until(lambda: len(up.complete) == 1)
    up.raw.stop_listening()
    assert_unreachable(await purchase(gw, headers), retry_after=None)  # refused: open
    release.set()
    assert (await first).status == 200  # its connection is back in the pool, idle
    assert_unreachable(await purchase(gw, headers), retry_after="5")

    clock.advance(COOLDOWN)
    trial = await purchase(gw, headers)
    state = (await breaker_view(gw))["state"]
    assert state != "half-open", (trial.status, state, len(up.requests))


# --- no pile-up ------------------------------------------------------------------------------


async def test_200_concurrent_purchases_against_a_dead_upstream_do_not_pile_up(gateway, bearer):
    """200 concurrent purchases against a black hole with a pool of 4 are all answered 503
    (nothing forwarded) within about one budget, and right after nothing is left in flight,
    waiting for a connection or connecting."""
    with black_hole() as hole:
        gw = await gateway(
            upstream=hole.url,
            upstream_timeout_seconds=BUDGET,
            breaker_failures=3,
            breaker_cooldown_seconds=COOLDOWN,
            upstream_max_connections=4,
            monotonic=FakeClock(),
        )
        headers = bearer()
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
            started = time.monotonic()
            answers = await asyncio.gather(*(purchase(gw, headers, http) for _ in range(200)))
            elapsed = time.monotonic() - started
        text = await gw.metrics_text()
        attempts_left = hole.attempts()
    assert elapsed < BUDGET + 1.0, elapsed
    errors: dict[str, int] = {}
    for got in answers:
        assert (got.status, got.forwarded) == (503, "no"), got
        errors[got.error] = errors.get(got.error, 0) + 1
    assert set(errors) <= {"sme-gateway-unreachable", "gateway-overloaded"}, errors
    assert sample(text, "catalyst_proxy_requests_in_flight") == 1  # the /metrics request
    assert sample(text, "catalyst_proxy_upstream_waiting") == 0
    assert sample(text, "catalyst_proxy_upstream_connections") == 0
    assert attempts_left == 0
    metrics = breaker_metrics(text)
    assert metrics["state"] == current("open")
    assert metrics["refused"] > 0
    # Connection attempts: at most the pool's 4, plus one per failure before it opened.
    assert metrics["unreachable"] <= 4 + 3
    overloaded = sample(text, "catalyst_proxy_upstream_failures_total", kind="overloaded")
    assert metrics["refused"] + metrics["unreachable"] + overloaded == 200


# --- what the process writes -----------------------------------------------------------------


async def test_the_real_server_writes_a_breaker_state_line_when_it_opens(
    bearer, public_key_file: Path, dead_port
):
    """`catalyst-proxy serve` writes one JSON breaker.state line (state, failures_in_a_row) at
    warning level when the breaker opens."""
    env = {
        "CATALYST_SESSION_PUBLIC_KEY_FILE": str(public_key_file),
        "CATALYST_SME_JWT_SECRET": BRIDGE_SECRET.decode(),
        "CATALYST_SME_GATEWAY_URL": url_of(dead_port),
        "CATALYST_BREAKER_FAILURES": "1",
        "CATALYST_SHUTDOWN_GRACE_SECONDS": "2",
    }
    proc = await ServeProcess(["serve", "--host", "127.0.0.1", "--port", "0"], env).start()
    try:
        url = await proc.wait_listening()
        async with aiohttp.ClientSession() as http:
            async with http.post(url + PURCHASE, headers=bearer(), data=b"{}") as resp:
                assert resp.status == 503
            async with http.post(url + PURCHASE, headers=bearer(), data=b"{}") as resp:
                assert resp.status == 503
                assert 1 <= int(resp.headers["Retry-After"]) <= 5
        event = await proc.wait_for_event("breaker.state")
        proc.signal(signal.SIGTERM)
        assert await proc.wait() == 0
    finally:
        await proc.stop()
    assert {k: event[k] for k in ("state", "failures_in_a_row", "level")} == {
        "state": "open",
        "failures_in_a_row": 1,
        "level": "warning",
    }
    assert [line["event"] for line in proc.json_lines()].count("breaker.state") == 1


async def test_an_open_breaker_refuses_before_inviting_the_body(gateway, bearer, dead_port):
    """With Expect: 100-continue and the breaker open, the 503 comes at once, with no
    100 Continue first: the client is not invited to upload a body nobody will take."""
    gw = await gateway(upstream=url_of(dead_port), breaker_failures=1, monotonic=FakeClock())
    headers = bearer()
    assert_unreachable(await purchase(gw, headers), retry_after=None)  # opens it
    assert (await breaker_view(gw))["state"] == "open"
    body = b'{"sku": "starter"}'
    request = request_bytes(
        "POST", PURCHASE,
        [*headers.items(), ("Expect", "100-continue"), ("Content-Length", str(len(body)))],
    )  # fmt: skip
    reader, writer = await raw_client(gw.url)
    try:
        writer.write(request)  # the head only: the body waits for the invitation
        first = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    finally:
        writer.close()
    assert first.startswith(b"HTTP/1.1 503 "), first
    assert b"Retry-After:" in first
