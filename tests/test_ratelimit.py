"""Per-operator rate limits end to end (reference.md: "Rate limits", and where they come in).

The real gateway on 127.0.0.1 in front of the SME stand-in, its counters in the
process or in the session's real redis-server (``backend``: every rule that
holds for both runs on both). Outages are real: ``redis_server.stop()`` and
``.start()`` on the same port, and the tests wait on what a client can see (a
429 coming back, ``/readyz``), with a deadline. The command line runs as a
child process for what only it does: the start-up line, exit status 2.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from catalyst_proxy import log, native
from catalyst_proxy.config import Rate, Settings, parse_rate_limit
from catalyst_proxy.ratelimit import MemoryCounters, RedisCounters
from catalyst_proxy.store import Store

from .conftest import BRIDGE_SECRET
from .redis_server import RedisServer
from .serve_proc import ServeProcess, run_cli
from .support import SlowLink, free_socket

PURCHASE = "/api/v1/billing/purchase"
ALIAS = "/api/v1/sme/billing/purchase"  # same upstream, its own row: its own budget
REVOKE = "/api/v1/sme/billing/vouchers/revoke/"
REVOKE_ROUTE = REVOKE + "{code}"
THREE_A_MINUTE = parse_rate_limit("3/minute")
POLICY = '"3-per-minute";q=3;w=60'
PASSWORD = "redis-pw-4f9a1c77e2"
DEADLINE = 10.0  # for waits on something observable; they end well within it


# --- helpers ---------------------------------------------------------------------------------


@dataclass
class Answer:
    status: int
    headers: Any
    body: bytes

    @property
    def error(self) -> str | None:
        try:
            return json.loads(self.body).get("error")
        except ValueError:
            return None


async def call(gw: Any, headers: dict[str, str], path: str = PURCHASE, **kwargs: Any) -> Answer:
    """One request (POST with an order body unless told otherwise)."""
    method = kwargs.pop("method", "POST")
    if method == "POST":
        kwargs.setdefault("data", b'{"sku": "starter"}')
    status, got, body = await gw.request(method, path, headers=headers, **kwargs)
    return Answer(status, got, body)


def assert_rate_limited(answer: Answer, *, policy: str = POLICY, name: str = "3-per-minute"):
    """429 rate-limited with exactly one of each header, in the draft's structured-field syntax,
    Retry-After and `t` the same whole number of seconds, at least 1 and at most two windows."""
    assert answer.status == 429, answer.body
    assert json.loads(answer.body) == {"error": "rate-limited"}
    assert answer.headers["X-Catalyst-Forwarded"] == "no"
    for field in ("Retry-After", "RateLimit-Policy", "RateLimit"):
        assert len(answer.headers.getall(field)) == 1, field
    assert answer.headers["RateLimit-Policy"] == policy
    retry_after = answer.headers["Retry-After"]
    assert re.fullmatch(r"[1-9][0-9]*", retry_after), retry_after
    assert answer.headers["RateLimit"] == f'"{name}";r=0;t={retry_after}'
    window = int(re.search(rf'"{re.escape(name)}";q=[0-9]+;w=([0-9]+)', policy).group(1))
    assert int(retry_after) <= 2 * window


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample of the Prometheus text; fails if it is not exposed at all."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    raise AssertionError(f"no sample {name}{labels}")


async def refusals(gw: Any, route: str = PURCHASE) -> float:
    return metric(await gw.metrics_text(), "catalyst_proxy_rate_limited_total", route=route)


async def store_errors(gw: Any) -> dict[str, float]:
    text = await gw.metrics_text()
    name = "catalyst_proxy_rate_limit_store_errors_total"
    return {action: metric(text, name, action=action) for action in ("allowed", "refused")}


async def readyz(gw: Any) -> tuple[int, dict[str, Any]]:
    status, _, body = await gw.request("GET", "/readyz")
    return status, json.loads(body)


async def until_store(gw: Any, state: str) -> dict[str, Any]:
    """Poll /readyz until the store reports ``state``; its report."""
    deadline = time.monotonic() + DEADLINE
    while True:
        status, body = await readyz(gw)
        assert status == 200, body  # the store never makes the gateway unready
        if body["store"]["state"] == state:
            return dict(body["store"])
        assert time.monotonic() < deadline, f"store still {body['store']}"
        await asyncio.sleep(0.02)


async def until_status(
    gw: Any, headers: dict[str, str], status: int, path: str = PURCHASE
) -> list[Answer]:
    """Send requests until one answers ``status`` (deadline); every answer, in order."""
    deadline = time.monotonic() + DEADLINE
    answers = []
    while True:
        answers.append(await call(gw, headers, path))
        if answers[-1].status == status:
            return answers
        assert time.monotonic() < deadline, [a.status for a in answers[-5:]]
        await asyncio.sleep(0.02)


@pytest.fixture(params=["memory", "redis"])
def backend(request: pytest.FixtureRequest) -> dict[str, Any]:
    """Settings overrides for the counters' home: this process, or the session's Redis."""
    if request.param == "memory":
        return {}
    return {"redis_url": request.getfixturevalue("redis_url")}


@pytest.fixture
def password_server() -> Iterator[RedisServer]:
    """A redis-server of this test's own, with ``requirepass PASSWORD``."""
    with RedisServer(password=PASSWORD) as server:
        yield server


# --- the answer over the limit ------------------------------------------------------------


async def test_the_request_over_the_limit_is_429_with_the_three_headers(gateway, bearer, backend):
    """The N+1th request of an operator on a route gets 429 rate-limited with Retry-After,
    RateLimit-Policy and RateLimit, X-Catalyst-Forwarded: no, and nothing reaches upstream."""
    gw = await gateway(rate_limit=THREE_A_MINUTE, **backend)
    headers = bearer()
    for _ in range(3):
        answer = await call(gw, headers)
        assert (answer.status, answer.headers["X-Catalyst-Forwarded"]) == (200, "yes")
    refused = await call(gw, headers)
    assert_rate_limited(refused)
    assert len(gw.sme.received) == 3
    assert await refusals(gw) == 1
    assert_rate_limited(await call(gw, headers))  # and it stays refused
    assert len(gw.sme.received) == 3
    assert await refusals(gw) == 2
    assert (gw.parts.store is None) == ("redis_url" not in backend)


async def test_other_operators_and_other_routes_keep_their_budgets(gateway, bearer, backend):
    """One operator over the limit on one route leaves another operator on that route, and
    the same operator on another row (an alias included), untouched."""
    gw = await gateway(rate_limit=THREE_A_MINUTE, **backend)
    mine = bearer(sub="op-1")
    for _ in range(3):
        assert (await call(gw, mine)).status == 200
    assert_rate_limited(await call(gw, mine))

    theirs = bearer(sub="op-2", email="op2@example.test")
    for _ in range(3):
        assert (await call(gw, theirs)).status == 200
    for _ in range(3):
        assert (await call(gw, mine, ALIAS)).status == 200
    assert (await call(gw, mine, "/api/v1/sme/billing/vouchers/list", method="GET")).status == 200
    assert_rate_limited(await call(gw, mine))
    assert_rate_limited(await call(gw, theirs))
    assert_rate_limited(await call(gw, mine, ALIAS))
    assert len(gw.sme.received) == 10
    assert (await refusals(gw), await refusals(gw, ALIAS)) == (3, 1)


async def test_voucher_codes_share_their_route_budget(gateway, bearer, backend):
    """The budget is per route-table row: different voucher codes on the revoke route share it."""
    gw = await gateway(rate_limit=THREE_A_MINUTE, **backend)
    headers = bearer()
    for code in ("A1", "B2", "C3"):
        answer = await call(gw, headers, REVOKE + code, method="DELETE")
        assert (answer.status, answer.headers["X-Catalyst-Forwarded"]) == (404, "yes")
    assert_rate_limited(await call(gw, headers, REVOKE + "D4", method="DELETE"))
    assert len(gw.sme.received) == 3
    assert await refusals(gw, REVOKE_ROUTE) == 1


async def test_bad_tokens_spend_nothing(gateway, bearer, token, other_key, backend):
    """Requests that fail authentication (401) spend nothing of the operator's budget, and a bad
    token is still 401, not 429, once that operator is over the limit."""
    gw = await gateway(rate_limit=THREE_A_MINUTE, **backend)
    forged = {"Authorization": "Bearer " + token(sub="op-1", key=other_key)}
    expired = {"Authorization": "Bearer " + token(sub="op-1", now=time.time() - 7200)}
    junk = {"Authorization": "Bearer not-a-token"}
    for headers in (forged, expired, junk, {}) * 3:
        assert (await call(gw, headers)).status == 401
    good = bearer(sub="op-1")
    for _ in range(3):
        assert (await call(gw, good)).status == 200
    assert_rate_limited(await call(gw, good))
    assert (await call(gw, forged)).status == 401
    assert await refusals(gw) == 1
    assert len(gw.sme.received) == 3


async def test_the_limit_is_checked_before_the_bridge_secret_and_the_body(gateway, bearer):
    """The rate limit comes right after authentication: an operator over it gets 429 where the
    next checks (bridge secret 503, body 415/413) would have refused too."""
    unwired = await gateway(rate_limit=THREE_A_MINUTE, bridge_secret=None)
    headers = bearer()
    for _ in range(3):
        assert (await call(unwired, headers)).error == "sme-jwt-bridge-unwired"
    assert_rate_limited(await call(unwired, headers))

    gw = await gateway(rate_limit=THREE_A_MINUTE, max_body_bytes=32)
    assert (await call(gw, {**headers, "Content-Encoding": "gzip"})).status == 415
    assert (await call(gw, headers, data=b"x" * 33)).status == 413
    assert (await call(gw, headers)).status == 200  # the third request of the three
    assert_rate_limited(await call(gw, {**headers, "Content-Encoding": "gzip"}))
    assert_rate_limited(await call(gw, headers, data=b"x" * 33))
    assert len(gw.sme.received) == 1


async def test_no_rate_limit_means_no_limit(gateway, bearer):
    """Without CATALYST_RATE_LIMIT (and no per-route rate_limit) nothing is ever refused."""
    gw = await gateway()
    headers = bearer()
    answers = await asyncio.gather(*(call(gw, headers) for _ in range(30)))
    assert [answer.status for answer in answers] == [200] * 30
    assert "RateLimit-Policy" not in answers[0].headers


async def test_several_rates_name_the_one_exceeded(gateway, bearer, backend):
    """With `2/minute;10/hour` the policy lists both rates and the refusal names the minute."""
    gw = await gateway(rate_limit=parse_rate_limit("2/minute;10/hour"), **backend)
    headers = bearer()
    assert [(await call(gw, headers)).status for _ in range(2)] == [200, 200]
    assert_rate_limited(
        await call(gw, headers),
        policy='"2-per-minute";q=2;w=60, "10-per-hour";q=10;w=3600',
        name="2-per-minute",
    )


@pytest.mark.parametrize("spec", ["1/minute;3/hour", "3/hour;1/minute"])
async def test_a_refusal_spends_nothing_of_the_other_rates(gateway, bearer, backend, spec):
    """A request refused by one rate is not counted by the others, whatever the order they are
    written in: after one request served, every refusal still names the minute's rate (the
    hour has 2 of its 3 left)."""
    gw = await gateway(rate_limit=parse_rate_limit(spec), **backend)
    headers = bearer()
    assert (await call(gw, headers)).status == 200
    policy = ", ".join(
        f'"{rate.amount}-per-{rate.period}";q={rate.amount};w={rate.seconds}'
        for rate in parse_rate_limit(spec)
    )
    for _ in range(4):
        assert_rate_limited(await call(gw, headers), policy=policy, name="1-per-minute")


# --- the routes file ---------------------------------------------------------------------------

ORG_PURCHASE = {
    "methods": ["POST"],
    "path": "/api/v1/org/billing/purchase",
    "upstream_method": "POST",
    "upstream_path": "/api/billing/purchase",
}
ORG_LIST = {
    "methods": ["GET"],
    "path": "/api/v1/org/billing/vouchers",
    "upstream_method": "GET",
    "upstream_path": "/api/billing/vouchers/list",
}


def routes_file(tmp_path: Path, *entries: dict[str, Any]) -> str:
    path = tmp_path / "routes.json"
    path.write_text(json.dumps({"routes": list(entries)}))
    return str(path)


async def test_a_route_with_its_own_rate_limit_overrides_the_default(
    gateway, bearer, backend, tmp_path
):
    """A routes-file entry's rate_limit replaces CATALYST_RATE_LIMIT for that route; an entry
    without one, and the built-in routes, keep the default."""
    path = routes_file(tmp_path, {**ORG_PURCHASE, "rate_limit": "1/minute"}, ORG_LIST)
    gw = await gateway(rate_limit=THREE_A_MINUTE, routes_file=path, **backend)
    headers = bearer()
    assert (await call(gw, headers, ORG_PURCHASE["path"])).status == 200
    assert_rate_limited(
        await call(gw, headers, ORG_PURCHASE["path"]),
        policy='"1-per-minute";q=1;w=60',
        name="1-per-minute",
    )
    for path_, method in ((ORG_LIST["path"], "GET"), (PURCHASE, "POST")):
        for _ in range(3):
            assert (await call(gw, headers, path_, method=method)).status == 200
        assert_rate_limited(await call(gw, headers, path_, method=method))
    assert await refusals(gw, ORG_PURCHASE["path"]) == 1


async def test_a_route_limit_without_a_default(gateway, bearer, backend, tmp_path):
    """With no CATALYST_RATE_LIMIT only the routes-file entry with a rate_limit is limited."""
    path = routes_file(tmp_path, {**ORG_PURCHASE, "rate_limit": "2 per minute"})
    gw = await gateway(routes_file=path, **backend)
    headers = bearer()
    for _ in range(2):
        assert (await call(gw, headers, ORG_PURCHASE["path"])).status == 200
    assert_rate_limited(
        await call(gw, headers, ORG_PURCHASE["path"]),
        policy='"2-per-minute";q=2;w=60',
        name="2-per-minute",
    )
    for _ in range(6):
        assert (await call(gw, headers)).status == 200


# --- the counters behind it, memory and Redis ---------------------------------------------


@pytest.fixture(params=["memory", "redis"])
async def counters(request: pytest.FixtureRequest) -> AsyncIterator[Any]:
    """The counters themselves: in this process, or in the session's Redis through a Store."""
    if request.param == "memory":
        yield MemoryCounters()
        return
    url = request.getfixturevalue("redis_url")
    store = Store(Settings(jwks_url="http://keys.test/jwks", redis_url=url))
    yield RedisCounters(store)
    await store.close()


@pytest.mark.slow
async def test_a_refused_hit_is_never_reported_as_allowed(counters):
    """Hit after hit for two and a half seconds on a `1/second` budget, one key is allowed at
    most once per one-second window (three windows at most): a refusal is never counted as
    allowed, not even at a window's edge."""
    rate = Rate(1, "second")
    allowed = []
    started = time.monotonic()
    while (elapsed := time.monotonic() - started) < 2.5:
        if await counters.hit("op-1", rate) == 0.0:
            allowed.append(round(elapsed, 4))
    assert 1 <= len(allowed) <= 3, allowed


# --- one limit for every gateway sharing a Redis ---------------------------------------------


async def test_gateways_sharing_a_redis_enforce_one_limit(gateway, bearer, redis_server, redis_url):
    """Two gateways (own processes' worth of state, own metrics) sharing one Redis count one
    budget per operator and route: the 4th request is refused whichever gateway gets it."""
    first = await gateway(rate_limit=THREE_A_MINUTE, redis_url=redis_url)
    second = await gateway(rate_limit=THREE_A_MINUTE, redis_url=redis_url)
    headers = bearer()
    assert [(await call(gw, headers)).status for gw in (first, second, first)] == [200] * 3
    assert_rate_limited(await call(second, headers))
    assert_rate_limited(await call(first, headers))
    assert (await call(second, bearer(sub="op-2"))).status == 200
    assert (await refusals(first), await refusals(second)) == (1, 1)
    assert redis_server.command("KEYS", "catalyst-ratelimit*")  # the counters are in Redis


@pytest.mark.parametrize("rates", ["3/minute", "3/minute;100/hour"])
@pytest.mark.parametrize("foreign", [("HSET", "field", "value"), ("SET", "not-a-number")],
                         ids=["another-type", "not-a-number"])  # fmt: skip
async def test_counters_of_another_type_refuse_that_operator_alone(
    gateway, bearer, redis_server, redis_url, rates, foreign
):
    """An operator whose counters another program has overwritten (a value of another type:
    WRONGTYPE; or a string that is no number) is served as the store-error setting says
    (``refuse``: 503, never a 500), and the store is not paused: other operators' requests
    are counted and served as before."""
    gw = await gateway(rate_limit=parse_rate_limit(rates), redis_url=redis_url,
                       rate_limit_on_store_error="refuse")  # fmt: skip
    victim, other = bearer(sub="op-wrongtype"), bearer(sub="op-fine")
    assert (await call(gw, victim)).status == 200
    counters = redis_server.command("KEYS", "catalyst-ratelimit*op-wrongtype*")
    assert counters
    for name in counters:
        redis_server.command("DEL", name)
        redis_server.command(foreign[0], name, *foreign[1:])
    refused = await call(gw, victim)
    assert (refused.status, refused.headers["X-Catalyst-Forwarded"]) == (503, "no")
    assert (await call(gw, other)).status == 200
    assert (await until_store(gw, "ok"))["last_error"] is None
    assert await store_errors(gw) == {"allowed": 0, "refused": 1}


async def test_a_key_error_allowed_through_is_logged(gateway, bearer, redis_server, redis_url):
    """Under `allow` (the default) a store error is "counted in the metrics and logged",
    also one that is about one operator's counters alone (the store stays "ok", so no
    `store.state` line says anything): one `ratelimit.store_error` line, with the reason and
    the decision; the Redis URL's password and the operator's token are not in it."""
    gw = await gateway(rate_limit=THREE_A_MINUTE, redis_url=redis_url)
    victim = bearer(sub="op-wrongtype")
    assert (await call(gw, victim)).status == 200
    for name in redis_server.command("KEYS", "catalyst-ratelimit*op-wrongtype*"):
        redis_server.command("DEL", name)
        redis_server.command("HSET", name, "field", "value")
    with capture_logs() as logs:
        served = await call(gw, victim)
    assert (served.status, served.headers["X-Catalyst-Forwarded"]) == (200, "yes")
    assert await store_errors(gw) == {"allowed": 1, "refused": 0}
    lines = [line for line in logs if line["event"] == log.RATE_LIMIT_STORE_ERROR]
    assert [(line["decision"], line["requests"]) for line in lines] == [("allowed", 1)]
    assert "cannot use" in lines[0]["reason"]
    assert victim["Authorization"].split()[1] not in repr(logs)
    assert (await until_store(gw, "ok"))["last_error"] is None


async def test_a_store_that_answers_each_command_slowly_is_a_store_error_within_one_bound(
    gateway, bearer, redis_server, redis_url
):
    """With four rates a request makes eight round trips to the store. Each reply held back
    0.2 s (under the command timeout) made a request take 1.6 s, the store never counted as
    failing; all of a request's round trips now have one command timeout together: past it
    the request is a store error (allowed here, by the default setting)."""
    link = await SlowLink(redis_server.port).start()
    try:
        gw = await gateway(rate_limit=parse_rate_limit("100/second;1000/minute;10000/hour;"
                                                       "100000/day"),
                           redis_url=link.url)  # fmt: skip
        headers = bearer()
        assert (await call(gw, headers)).status == 200  # the scripts are loaded, at full speed
        link.reply_delay = 0.2
        assert (await call(gw, headers)).status == 200
        assert await store_errors(gw) == {"allowed": 1, "refused": 0}
    finally:
        await link.close()


async def test_the_counters_use_the_password_file(gateway, bearer, password_server, tmp_path):
    """With CATALYST_REDIS_PASSWORD_FILE the counters authenticate with the file's password."""
    secret = tmp_path / "redis-password"
    secret.write_text(PASSWORD + "\n")
    gw = await gateway(
        rate_limit=THREE_A_MINUTE,
        redis_url=password_server.url,
        redis_password_file=str(secret),
    )
    headers = bearer()
    for _ in range(3):
        assert (await call(gw, headers)).status == 200
    assert_rate_limited(await call(gw, headers))
    assert password_server.command("KEYS", "catalyst-ratelimit*")
    assert (await store_errors(gw)) == {"allowed": 0, "refused": 0}
    assert (await until_store(gw, "ok"))["url"] == password_server.url


# --- the store: start-up, outage, recovery -----------------------------------------------------


async def test_readyz_reports_the_store(gateway, backend):
    """/readyz reports the store (URL without password, state, last error), or null for memory."""
    gw = await gateway(rate_limit=THREE_A_MINUTE, **backend)
    if not backend:
        assert (await readyz(gw))[1]["store"] is None
        return
    assert await until_store(gw, "ok") == {
        "url": backend["redis_url"],
        "state": "ok",
        "last_error": None,
    }


@pytest.fixture
def silent_redis() -> Iterator[str]:
    """A ``redis://`` URL whose listener completes the TCP handshake and never answers."""
    sock = free_socket()
    sock.listen(8)
    try:
        yield f"redis://127.0.0.1:{sock.getsockname()[1]}/0"
    finally:
        sock.close()


async def test_start_up_does_not_wait_for_the_store(gateway, bearer, silent_redis):
    """The gateway serves before its store has answered: /readyz is 200 with the store
    `connecting`, then `unavailable` once the first PING times out, and requests are allowed."""
    gw = await gateway(rate_limit=THREE_A_MINUTE, redis_url=silent_redis)
    status, body = await readyz(gw)
    assert (status, body["store"]["state"]) == (200, "connecting")
    report = await until_store(gw, "unavailable")
    assert report == {"url": silent_redis, "state": "unavailable", "last_error": "TimeoutError"}
    for _ in range(4):
        assert (await call(gw, bearer())).status == 200
    assert (await store_errors(gw))["allowed"] == 4


async def test_an_outage_with_allow_keeps_serving_and_counts_it(
    gateway, bearer, redis_server, redis_url
):
    """With Redis down and `allow`, requests are served (and counted as allowed store errors),
    /readyz stays 200 and says `unavailable`; once Redis is back the limit applies again,
    without a restart."""
    gw = await gateway(rate_limit=THREE_A_MINUTE, redis_url=redis_url)
    headers = bearer()
    assert (await call(gw, headers)).status == 200
    redis_server.stop()
    answers = [await call(gw, headers) for _ in range(5)]
    assert [(a.status, a.headers["X-Catalyst-Forwarded"]) for a in answers] == [(200, "yes")] * 5
    assert len(gw.sme.received) == 6
    assert await store_errors(gw) == {"allowed": 5, "refused": 0}
    report = await until_store(gw, "unavailable")
    assert report["url"] == redis_url
    assert report["last_error"].startswith("ConnectionError")

    redis_server.start()  # empty: this operator's budget starts afresh
    answers = await until_status(gw, headers, 429)
    assert [a.status for a in answers[-4:]] == [200, 200, 200, 429]
    assert_rate_limited(answers[-1])
    assert (await until_store(gw, "ok"))["state"] == "ok"
    assert (await store_errors(gw))["allowed"] == 5 + len(answers) - 4
    assert await refusals(gw) == 1


async def test_an_outage_with_refuse_answers_503_and_forwards_nothing(
    gateway, bearer, redis_server, redis_url
):
    """With Redis down and `refuse`, requests get 503 rate-limit-store-unavailable with
    X-Catalyst-Forwarded: no and nothing upstream; once Redis is back they are served and
    limited again, without a restart."""
    gw = await gateway(
        rate_limit=THREE_A_MINUTE, redis_url=redis_url, rate_limit_on_store_error="refuse"
    )
    headers = bearer()
    assert (await call(gw, headers)).status == 200
    redis_server.stop()
    for _ in range(4):
        answer = await call(gw, headers)
        assert answer.status == 503
        assert json.loads(answer.body)["error"] == "rate-limit-store-unavailable"
        assert answer.headers["X-Catalyst-Forwarded"] == "no"
    assert len(gw.sme.received) == 1
    assert await store_errors(gw) == {"allowed": 0, "refused": 4}
    assert (await readyz(gw))[0] == 200

    redis_server.start()
    answers = await until_status(gw, headers, 200)
    assert {a.error for a in answers[:-1]} <= {"rate-limit-store-unavailable"}
    assert [(await call(gw, headers)).status for _ in range(2)] == [200, 200]
    assert_rate_limited(await call(gw, headers))
    assert len(gw.sme.received) == 4


# --- the real command line ---------------------------------------------------------------------

NATIVE = {"aiohttp_http_parser", "aiohttp_http_writer", "httptools", "uvloop"}


def serve_env(public_key_file: Path, **extra: str) -> dict[str, str]:
    return {"CATALYST_SESSION_PUBLIC_KEY_FILE": str(public_key_file), **extra}


@pytest.fixture
async def serving() -> AsyncIterator[Callable[..., Any]]:
    """Factory: ``await serving(env)`` starts `catalyst-proxy serve` on a free port."""
    started: list[ServeProcess] = []

    async def start(env: dict[str, str]) -> ServeProcess:
        proc = await ServeProcess(["serve", "--host", "127.0.0.1", "--port", "0"], env).start()
        started.append(proc)
        return proc

    yield start
    for proc in started:
        await proc.stop()


async def test_the_startup_line_reports_every_speed_up_compiled(
    serving, public_key_file, redis_url
):
    """`catalyst-proxy serve` runs on aiohttp's compiled parser and writer, httptools and uvloop
    (every value of the start-up line's `native` is true), and the line names the limit and
    the store."""
    proc = await serving(
        serve_env(
            public_key_file,
            CATALYST_RATE_LIMIT="5/second; 100 per hour",
            CATALYST_REDIS_URL=redis_url,
        )
    )
    startup = await proc.wait_for_event("startup")
    assert set(startup["native"]) == NATIVE
    assert startup["native"] == dict.fromkeys(NATIVE, True)
    assert startup["rate_limit"] == "5/second;100/hour"
    assert startup["rate_limit_on_store_error"] == "allow"
    assert startup["store"] == redis_url
    proc.signal(signal.SIGTERM)
    assert await proc.wait() == 0


async def test_the_startup_line_shows_a_pure_python_aiohttp(serving, public_key_file):
    """With aiohttp's extensions switched off the start-up line says so, so the check above
    does catch a gateway running without them."""
    proc = await serving(serve_env(public_key_file, AIOHTTP_NO_EXTENSIONS="1"))
    startup = await proc.wait_for_event("startup")
    assert startup["native"] == {
        "aiohttp_http_parser": False,
        "aiohttp_http_writer": False,
        "httptools": True,
        "uvloop": True,
    }
    assert startup["store"] == "memory (this process)"
    assert startup["rate_limit"] is None


def test_this_process_runs_the_compiled_extensions():
    """In this process too aiohttp's HTTP parser and writer and httptools are the compiled ones."""
    found = native.extensions()
    assert set(found) == NATIVE
    assert {name: found[name] for name in NATIVE - {"uvloop"}} == {
        "aiohttp_http_parser": True,
        "aiohttp_http_writer": True,
        "httptools": True,
    }


@pytest.mark.slow
async def test_the_redis_password_never_appears(
    serving, public_key_file, password_server, sme, token
):
    """A Redis password in CATALYST_REDIS_URL appears in no log line, /readyz, or answer of
    the real gateway, through an outage and the recovery (both logged as store.state)."""
    _, sme_url = sme
    proc = await serving(
        serve_env(
            public_key_file,
            CATALYST_SME_GATEWAY_URL=sme_url,
            CATALYST_SME_JWT_SECRET=BRIDGE_SECRET.decode(),
            CATALYST_RATE_LIMIT="2/minute",
            CATALYST_REDIS_URL=password_server.url_with_password(),
        )
    )
    base = await proc.wait_listening()
    seen: list[str] = []
    headers = {"Authorization": "Bearer " + token(realm_roles=["catalyst-owner"])}

    async with aiohttp.ClientSession() as http:

        async def get(path: str, method: str = "GET") -> int:
            async with http.request(method, base + path, headers=headers, data=b"{}") as resp:
                seen.append(str(resp.headers) + await resp.text())
                return resp.status

        async def store_state(state: str) -> None:
            deadline = time.monotonic() + DEADLINE
            while True:
                async with http.get(base + "/readyz") as resp:
                    body = await resp.text()
                seen.append(body)
                if json.loads(body)["store"]["state"] == state:
                    return
                assert time.monotonic() < deadline, body
                await asyncio.sleep(0.02)

        await store_state("ok")
        assert [await get(PURCHASE, "POST") for _ in range(3)] == [200, 200, 429]
        password_server.stop()
        assert await get(PURCHASE, "POST") == 200  # allowed while the store is down
        await store_state("unavailable")
        password_server.start()
        deadline = time.monotonic() + DEADLINE
        while await get(PURCHASE, "POST") != 429:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        await store_state("ok")
    proc.signal(signal.SIGTERM)
    assert await proc.wait() == 0

    states = [line for line in proc.json_lines() if line["event"] == "store.state"]
    assert [line["state"] for line in states] == ["ok", "unavailable", "ok"]
    assert {line["url"] for line in states} == {password_server.url}
    everything = proc.output + "\n".join(seen)
    assert PASSWORD not in everything
    assert "redis://:" not in everything


# --- start-up validation -------------------------------------------------------------------

BAD_VALUES: list[tuple[str, str]] = [
    ("CATALYST_UPSTREAM_MAX_CONNECTIONS", "0"),
    ("CATALYST_UPSTREAM_MAX_CONNECTIONS", "plenty"),
    ("CATALYST_UPSTREAM_MAX_PENDING", "-1"),
    ("CATALYST_UPSTREAM_IDLE_SECONDS", "0"),
    ("CATALYST_UPSTREAM_IDLE_SECONDS", "inf"),
    ("CATALYST_BREAKER_FAILURES", "five"),
    ("CATALYST_BREAKER_COOLDOWN_SECONDS", "-5"),
    ("CATALYST_RATE_LIMIT", "30/fortnight"),
    ("CATALYST_RATE_LIMIT", "0/minute"),
    ("CATALYST_RATE_LIMIT", "5/second;"),
    ("CATALYST_RATE_LIMIT_ON_STORE_ERROR", "ignore"),
    ("CATALYST_REDIS_URL", f"http://:{PASSWORD}@cache:6379/0"),
    ("CATALYST_REDIS_URL", f"redis://:{PASSWORD}@cache:port/0"),
    ("CATALYST_REDIS_URL", f"redis://:{PASSWORD}@/0"),
    ("CATALYST_REDIS_URL", f"rediss://:{PASSWORD}@cache:6379/zero"),
    ("CATALYST_REDIS_URL", f"redis://:{PASSWORD}@cache:6379/0?foo=bar"),
    ("CATALYST_REDIS_URL", f"redis://:{PASSWORD}@cache:6379/0?socket_timeout=abc"),
    ("CATALYST_REDIS_URL", f"rediss://:{PASSWORD}@cache:6379/0?ssl_cert_reqs=bogus"),
    ("CATALYST_REDIS_URL", f"redis://:{PASSWORD}@cache:6379/0?protocol=4"),
    ("CATALYST_REDIS_URL", f"redis://:{PASSWORD}@cache:6379/0?retry=x"),  # (a traceback)
    ("CATALYST_REDIS_URL", f"redis://cache:6379/0?password={PASSWORD}"),
    ("CATALYST_REDIS_URL", f"redis://cache:6379/0?{PASSWORD.lower()}"),  # never repeated
    ("CATALYST_REDIS_PASSWORD_FILE", "/nonexistent/redis-password"),
    ("CATALYST_REDIS_PASSWORD_FILE", "{file} with a password in the URL"),
    ("CATALYST_IDEMPOTENCY", "always"),
    ("CATALYST_IDEMPOTENCY_TTL_SECONDS", "0.5"),
    ("CATALYST_IDEMPOTENCY_MAX_BODY_BYTES", "64k"),
]


async def test_store_errors_held_back_are_logged_at_shutdown(serving, public_key_file, bearer):
    """Store errors the throttle holds back (one line per 10 s) are told at shutdown too: a pod
    stopped during an outage (every rolling deploy) logged 1 of 30 before. The lines' counts
    add up to the requests that met a store error."""
    dead = free_socket()  # bound, never listening: every connect is refused
    env = serve_env(public_key_file, CATALYST_SME_JWT_SECRET=BRIDGE_SECRET.decode(),
                    CATALYST_SME_GATEWAY_URL=f"http://127.0.0.1:{dead.getsockname()[1]}",
                    CATALYST_RATE_LIMIT="100/minute",
                    CATALYST_REDIS_URL=f"redis://127.0.0.1:{dead.getsockname()[1]}/0")  # fmt: skip
    try:
        proc = await serving(env)
        url = await proc.wait_listening()
        async with aiohttp.ClientSession() as http:
            for _ in range(6):
                async with http.post(url + PURCHASE, headers=bearer(), data=b"{}") as resp:
                    assert resp.status == 503  # (the SME gateway is not there either)
        proc.signal(signal.SIGTERM)
        assert await proc.wait() == 0
    finally:
        dead.close()
    lines = [line for line in proc.json_lines() if line["event"] == "ratelimit.store_error"]
    assert [line["requests"] for line in lines] == [1, 5]
    assert {line["decision"] for line in lines} == {"allowed"}


@pytest.mark.parametrize(("variable", "value"), BAD_VALUES)
async def test_a_bad_value_stops_serve_with_one_line(public_key_file, tmp_path, variable, value):
    """`catalyst-proxy serve` with a bad value exits 2 with one stderr line naming the variable,
    never repeating a Redis password."""
    env = serve_env(public_key_file, **{variable: value})
    if variable == "CATALYST_REDIS_PASSWORD_FILE":
        env["CATALYST_REDIS_URL"] = "redis://127.0.0.1:6379/0"
        if value.startswith("{file}"):
            secret = tmp_path / "redis-password"
            secret.write_text("other-secret")
            env[variable] = str(secret)
            env["CATALYST_REDIS_URL"] = f"redis://:{PASSWORD}@127.0.0.1:6379/0"
    status, out, err = await run_cli("serve", "--host", "127.0.0.1", "--port", "0", env=env)
    assert (status, out) == (2, ""), err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"catalyst-proxy: error: {variable}: ")
    assert PASSWORD not in err


def toml_entry(entry: dict[str, Any]) -> str:
    return "[[routes]]\n" + "".join(
        f"{key} = {json.dumps(value)}\n" for key, value in entry.items()
    )


@pytest.mark.parametrize(
    ("suffix", "entry", "named"),
    [
        ("json", {**ORG_LIST, "methods": ["GET", "FETCH"]}, '"methods"'),
        ("toml", {**ORG_LIST, "upstream_method": "FETCH"}, '"upstream_method"'),
        ("json", {**ORG_LIST, "rate_limit": "30/fortnight"}, '"rate_limit"'),
        ("toml", {**ORG_LIST, "rate_limit": "0 per minute"}, '"rate_limit"'),
        ("json", {**ORG_LIST, "rate_limit": 30}, '"rate_limit"'),
    ],
)
async def test_a_bad_routes_entry_stops_serve(public_key_file, tmp_path, suffix, entry, named):
    """A routes file with a non-standard method or a bad rate_limit makes `serve` exit 2 with
    one line naming the variable, the file and the entry."""
    path = tmp_path / f"routes.{suffix}"
    good = {**ORG_PURCHASE, "rate_limit": "1/minute"}
    if suffix == "json":
        path.write_text(json.dumps({"routes": [good, entry]}))
    else:
        path.write_text(toml_entry(good) + toml_entry(entry))
    env = serve_env(public_key_file, CATALYST_ROUTES_FILE=str(path))
    status, out, err = await run_cli("serve", "--host", "127.0.0.1", "--port", "0", env=env)
    assert (status, out) == (2, ""), err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"catalyst-proxy: error: CATALYST_ROUTES_FILE: {path}: routes[1]: ")
    assert named in lines[0]
