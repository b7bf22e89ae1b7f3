"""Operations endpoints (reference.md: Operations; issue 3): /healthz, /readyz, /metrics."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from catalyst_proxy.app import PARTS, create_app
from catalyst_proxy.config import Settings
from catalyst_proxy.metrics import Metrics
from catalyst_proxy.server import serve

from .support import RawUpstream, free_socket, read_request, sign, start_app

PURCHASE = "/api/v1/billing/purchase"


def families(text: str) -> dict[str, Any]:
    return {family.name: family for family in text_string_to_metric_families(text)}


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample (0 when absent)."""
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    return 0.0


class Held:
    """An upstream that holds every request until ``release`` is set."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.arrived = asyncio.Event()
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        await request.read()
        self.arrived.set()
        await self.release.wait()
        return web.json_response({"order_id": "ord_held", "paid_by_credit": False,
                                  "session_url": None})  # fmt: skip


@pytest.fixture
async def held() -> AsyncIterator[Held]:
    upstream = Held()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", upstream.handle)
    runner, upstream.url = await start_app(app, access_log=None)
    yield upstream
    upstream.release.set()
    await runner.cleanup()


async def test_healthz(gateway):
    """/healthz answers 200 {"status":"ok"} while the process serves."""
    gw = await gateway()
    status, headers, body = await gw.request("GET", "/healthz")
    assert (status, json.loads(body)) == (200, {"status": "ok"})
    assert headers["X-Request-ID"]


async def test_healthz_needs_no_keys(gateway, jwks_server):
    """/healthz stays 200 even when no operator key is usable (liveness is not readiness)."""
    jwks_server.mode = "hang"
    gw = await gateway(public_key_file=None, jwks_url=jwks_server.url, jwks_timeout_seconds=0.5)
    status, _, _ = await gw.request("GET", "/healthz")
    assert status == 200


@pytest.mark.parametrize(("secret", "shown"), [(b"x" * 32, "set"), (None, "unset")])
async def test_readyz_ready_with_local_key(gateway, secret, shown):
    """/readyz is 200 with a usable key, and reports the bridge secret without failing on it."""
    gw = await gateway(bridge_secret=secret)
    status, _, body = await gw.request("GET", "/readyz")
    answer = json.loads(body)
    assert status == 200
    assert answer["status"] == "ready"
    assert answer["reasons"] == []
    assert answer["bridge_secret"] == shown
    assert "x" * 32 not in body.decode()


async def test_readyz_bridge_secret_file(gateway, tmp_path):
    """A secret file that is missing reads as unset; once written it reads as set."""
    path = tmp_path / "JWT_SECRET"
    gw = await gateway(bridge_secret=None, bridge_secret_file=str(path), monotonic=lambda: 0.0)
    _, _, body = await gw.request("GET", "/readyz")
    assert json.loads(body)["bridge_secret"] == "unset"


@pytest.mark.parametrize("mode", ["error", "hang", "raw"])
async def test_readyz_503_without_usable_keys(gateway, jwks_server, mode):
    """/readyz is 503 with reasons while no operator key is usable (JWKS down, no local key)."""
    jwks_server.mode = mode
    jwks_server.raw_body = b'{"keys": []}'
    gw = await gateway(public_key_file=None, jwks_url=jwks_server.url, jwks_timeout_seconds=0.3)
    status, _, body = await gw.request("GET", "/readyz")
    answer = json.loads(body)
    assert status == 503
    assert answer["status"] == "not-ready"
    assert answer["reasons"]
    assert all(isinstance(reason, str) and reason for reason in answer["reasons"])
    assert answer["bridge_secret"] == "set"


async def test_readyz_turns_ready_after_first_jwks_fetch(gateway, jwks_server, rsa_key):
    """Once the JWKS has been fetched, /readyz answers 200."""
    jwks_server.keys = [rsa_key]
    gw = await gateway(public_key_file=None, jwks_url=jwks_server.url, jwks_timeout_seconds=1)
    await gw.parts.keys.wait_refreshes(1)
    status, _, body = await gw.request("GET", "/readyz")
    assert status == 200, body
    assert json.loads(body)["operator_keys"]["jwks_keys"] == 1


async def test_readyz_503_from_the_moment_shutdown_begins(held, public_key_file, bearer):
    """During the drain /readyz is 503 ("shutting down") while in-flight requests still finish."""
    settings = Settings(
        gateway_url=held.url, public_key_file=str(public_key_file), bridge_secret=b"s" * 32
    )
    app = create_app(settings, metrics=Metrics())
    ops = app[PARTS].ops
    sock = free_socket()
    port = sock.getsockname()[1]
    stop = asyncio.Event()
    server = asyncio.create_task(serve(app, "127.0.0.1", port, sock=sock, stop=stop))

    async with aiohttp.ClientSession() as http:
        # the server is listening once the socket accepts: the purchase waits at the upstream
        purchase = asyncio.create_task(
            http.post(f"http://127.0.0.1:{port}{PURCHASE}", headers=bearer(), data=b"{}")
        )
        await held.arrived.wait()
        ready = await ops.readyz(None)  # type: ignore[arg-type]
        assert ready.status == 200
        stop.set()
        async with asyncio.timeout(5):
            while not ops.draining:  # shutdown begins on the next turn of the loop
                await asyncio.sleep(0)
        drained = await ops.readyz(None)  # type: ignore[arg-type]
        assert drained.status == 503
        assert "shutting down" in json.loads(drained.body)["reasons"]  # type: ignore[arg-type]
        assert not purchase.done()
        held.release.set()
        async with await purchase as resp:
            assert resp.status == 200
            assert (await resp.json())["order_id"] == "ord_held"
    await asyncio.wait_for(server, 10)


# --- /metrics ---------------------------------------------------------------------------------

EXPECTED = {
    "catalyst_proxy_requests": ("counter", {"route", "method", "status"}),
    "catalyst_proxy_request_duration_seconds": ("histogram", {"route"}),
    "catalyst_proxy_upstream_duration_seconds": ("histogram", {"route"}),
    "catalyst_proxy_upstream_failures": ("counter", {"kind"}),
    "catalyst_proxy_auth_failures": ("counter", {"reason"}),
    "catalyst_proxy_jwks_refreshes": ("counter", {"result"}),
    "catalyst_proxy_bridge_unwired": ("counter", set()),
    "catalyst_proxy_requests_in_flight": ("gauge", set()),
}


async def test_every_metric_has_its_type_and_labels(gateway, bearer):
    """Every metric of issue 3 is exported with the right type, name suffix and label names."""
    gw = await gateway()
    await gw.request("POST", PURCHASE, headers=bearer(), data=b"{}")
    await gw.request("POST", "/api/v1/billing/purchase", data=b"{}")
    text = await gw.metrics_text()
    found = families(text)
    for name, (kind, labels) in EXPECTED.items():
        assert name in found, name
        family = found[name]
        assert family.type == kind, name
        main = [s for s in family.samples if not s.name.endswith("_created")]
        assert main, name
        for s in main:
            assert set(s.labels) - {"le"} == labels, (name, s.labels)
            if kind == "counter":
                assert s.name == name + "_total"
    assert "# TYPE catalyst_proxy_requests_total counter" in text or (
        "# TYPE catalyst_proxy_requests counter" in text
    )
    buckets = {
        float(s.labels["le"])
        for s in found["catalyst_proxy_request_duration_seconds"].samples
        if s.name.endswith("_bucket")
    }
    assert 0.001 in buckets
    assert 3.0 in buckets
    assert min(buckets) <= 0.001
    for kind in ("unreachable", "timeout", "bad_response"):
        assert f'catalyst_proxy_upstream_failures_total{{kind="{kind}"}}' in text
    for reason in ("missing", "invalid", "expired", "keys_unavailable"):
        assert f'catalyst_proxy_auth_failures_total{{reason="{reason}"}}' in text
    for result in ("ok", "error"):
        assert f'catalyst_proxy_jwks_refreshes_total{{result="{result}"}}' in text


async def test_metrics_content_type(gateway):
    """/metrics answers Prometheus text format 0.0.4."""
    gw = await gateway()
    status, headers, _ = await gw.request("GET", "/metrics")
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain; version=0.0.4")


async def test_request_counter_by_route_method_status(gateway, bearer):
    """Requests are counted by route template, method and status."""
    gw = await gateway()
    for _ in range(2):
        await gw.request("POST", PURCHASE, headers=bearer(), data=b"{}")
    await gw.request("POST", PURCHASE, data=b"{}")
    await gw.request("GET", PURCHASE, headers=bearer())
    await gw.request("DELETE", "/api/v1/sme/billing/vouchers/revoke/NOPE", headers=bearer())
    await gw.request("GET", "/nowhere")
    text = await gw.metrics_text()
    name = "catalyst_proxy_requests_total"
    assert sample(text, name, route=PURCHASE, method="POST", status="200") == 2
    assert sample(text, name, route=PURCHASE, method="POST", status="401") == 1
    assert sample(text, name, route=PURCHASE, method="GET", status="405") == 1
    revoke = "/api/v1/sme/billing/vouchers/revoke/{code}"
    assert sample(text, name, route=revoke, method="DELETE", status="404") == 1
    assert sample(text, name, route="none", method="GET", status="404") == 1
    duration = "catalyst_proxy_request_duration_seconds_count"
    assert sample(text, duration, route=PURCHASE) == 4
    upstream = "catalyst_proxy_upstream_duration_seconds_count"
    assert sample(text, upstream, route=PURCHASE) == 2


async def hang(reader, writer) -> None:
    await read_request(reader)
    await reader.read()  # until the gateway gives up


async def garbage(reader, writer) -> None:
    await read_request(reader)
    writer.write(b"NOT HTTP AT ALL\r\n\r\n")
    await writer.drain()


@pytest.mark.parametrize(
    ("kind", "status", "error"),
    [
        ("unreachable", 503, "sme-gateway-unreachable"),
        ("timeout", 504, "sme-gateway-timeout"),
        ("bad_response", 502, "sme-gateway-bad-response"),
    ],
)
async def test_upstream_failures_by_kind(gateway, bearer, kind, status, error):
    """Each upstream failure counts once under its kind."""
    if kind == "unreachable":
        sock = free_socket()
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        sock.close()
        upstream = None
    else:
        upstream = await RawUpstream(hang if kind == "timeout" else garbage).start()
        url = upstream.url
    try:
        gw = await gateway(upstream=url, upstream_timeout_seconds=0.3)
        got, _, body = await gw.request("POST", PURCHASE, headers=bearer(), data=b"{}")
        assert (got, json.loads(body)["error"]) == (status, error)
        text = await gw.metrics_text()
    finally:
        if upstream is not None:
            await upstream.close()
    assert sample(text, "catalyst_proxy_upstream_failures_total", kind=kind) == 1
    others = {"unreachable", "timeout", "bad_response"} - {kind}
    for other in others:
        assert sample(text, "catalyst_proxy_upstream_failures_total", kind=other) == 0


async def test_auth_failures_by_reason(gateway, token, rsa_key):
    """Refused sessions count under their reason: missing, invalid, expired."""
    gw = await gateway()
    expired = token(now=time.time() - 7200, ttl=60)
    forged = sign({"alg": "none", "typ": "JWT"}, {"sub": "x", "exp": int(time.time()) + 60})
    for headers in ({}, {"Authorization": f"Bearer {expired}"},
                    {"Authorization": f"Bearer {forged}"}):  # fmt: skip
        status, _, _ = await gw.request("POST", PURCHASE, headers=headers, data=b"{}")
        assert status == 401
    text = await gw.metrics_text()
    name = "catalyst_proxy_auth_failures_total"
    assert sample(text, name, reason="missing") == 1
    assert sample(text, name, reason="expired") == 1
    assert sample(text, name, reason="invalid") == 1
    assert gw.sme.received == []


async def test_auth_failure_keys_unavailable(gateway, jwks_server, token):
    """No usable key: 503 operator-keys-unavailable, counted as keys_unavailable."""
    jwks_server.mode = "error"
    gw = await gateway(public_key_file=None, jwks_url=jwks_server.url, jwks_timeout_seconds=0.3)
    await gw.parts.keys.wait_refreshes(1)
    status, headers, body = await gw.request(
        "POST", PURCHASE, headers={"Authorization": f"Bearer {token(kid='k1')}"}, data=b"{}"
    )
    assert (status, json.loads(body)["error"]) == (503, "operator-keys-unavailable")
    assert headers["Retry-After"]
    text = await gw.metrics_text()
    assert sample(text, "catalyst_proxy_auth_failures_total", reason="keys_unavailable") == 1
    assert sample(text, "catalyst_proxy_jwks_refreshes_total", result="error") >= 1


async def test_jwks_refreshes_by_result(gateway, jwks_server, rsa_key):
    """A good JWKS fetch counts under result="ok"."""
    jwks_server.keys = [rsa_key]
    gw = await gateway(public_key_file=None, jwks_url=jwks_server.url, jwks_timeout_seconds=1)
    await gw.parts.keys.wait_refreshes(1)
    text = await gw.metrics_text()
    assert sample(text, "catalyst_proxy_jwks_refreshes_total", result="ok") == 1


async def test_bridge_unwired_counter(gateway, bearer):
    """Each request refused for want of a bridge secret counts once."""
    gw = await gateway(bridge_secret=None)
    for _ in range(3):
        status, _, _ = await gw.request("POST", PURCHASE, headers=bearer(), data=b"{}")
        assert status == 503
    text = await gw.metrics_text()
    assert sample(text, "catalyst_proxy_bridge_unwired_total") == 3


async def test_in_flight_gauge(gateway, bearer, held):
    """The in-flight gauge counts a held request while it waits and drops when it finishes."""
    gw = await gateway(upstream=held.url)
    assert sample(await gw.metrics_text(), "catalyst_proxy_requests_in_flight") == 1  # itself
    request = asyncio.create_task(gw.request("POST", PURCHASE, headers=bearer(), data=b"{}"))
    await held.arrived.wait()
    assert sample(await gw.metrics_text(), "catalyst_proxy_requests_in_flight") == 2
    held.release.set()
    status, _, _ = await request
    assert status == 200
    assert sample(await gw.metrics_text(), "catalyst_proxy_requests_in_flight") == 1


async def test_labels_never_carry_paths_codes_or_emails(gateway, token):
    """No raw path, voucher code, email or subject ever becomes a metric label."""
    gw = await gateway()
    code = "LEAKCHECK-7Q2Z9"
    email = "leak.check+7q2z9@unique.example"
    sub = "subject-7q2z9"
    headers = {
        "Authorization": f"Bearer {token(sub=sub, email=email, realm_roles=['catalyst-owner'])}"
    }
    await gw.request("DELETE", f"/api/v1/sme/billing/vouchers/revoke/{code}", headers=headers)
    await gw.request("POST", f"/api/v1/sme/billing/vouchers/revoke/{code}?x=unique7q2z9")
    await gw.request("GET", "/probe-7q2z9/../etc", headers=headers)
    await gw.request("POST", "/api/v1/billing/purchase/7q2z9", headers=headers)
    text = await gw.metrics_text()
    assert "7q2z9" not in text.lower()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            route = s.labels.get("route", "none")
            assert route == "none" or route.startswith("/api/v1/"), route
            assert code not in route


async def test_arbitrary_methods_do_not_create_metric_series(gateway):
    """Exotic methods (the parser knows dozens) are counted as "other", not one series each."""
    gw = await gateway()
    for method in ("PROPFIND", "MKCOL", "LOCK", "PURGE", "SEARCH"):
        status, _, _ = await gw.request(method, "/nowhere")
        assert status == 404
    text = await gw.metrics_text()
    assert "PROPFIND" not in text
    assert 'catalyst_proxy_requests_total{method="other",route="none",status="404"} 5.0' in text
