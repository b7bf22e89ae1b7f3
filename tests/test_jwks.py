"""The operator keys: the realm JWKS and local PEM keys (reference.md: *Operator session*, keys).

A real JWKS endpoint on 127.0.0.1 serves the keys (``WatchedJWKS``: its
``fetches`` count is the number of GETs that reached it). The gateway's
``monotonic=`` seam moves the miss-refresh rate limit's time; its
``parts.keys.wait_refreshes(n)`` waits for the n-th completed fetch, so no test
sleeps to synchronise.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm
from structlog.testing import capture_logs

from catalyst_proxy.devtools.keys import new_private_key, public_jwk
from catalyst_proxy.jwks import KeySet

from .auth_support import PURCHASE, Clock, WatchedJWKS, claims, metric, present
from .conftest import Assurance
from .rawhttp import raw_client, read_response, request_bytes
from .support import b64, sign

JWKS_TIMEOUT = 0.5
REFRESHES = "catalyst_proxy_jwks_refreshes_total"


@pytest.fixture(scope="module")
def key_a() -> rsa.RSAPrivateKey:
    return new_private_key()


@pytest.fixture(scope="module")
def key_b() -> rsa.RSAPrivateKey:
    return new_private_key()


@pytest.fixture
async def jwks(key_a: rsa.RSAPrivateKey) -> AsyncIterator[WatchedJWKS]:
    """The realm JWKS, serving ``key_a`` as kid ``a``."""
    server = await WatchedJWKS(keys=[public_jwk(key_a, "a")]).start()
    yield server
    await server.close()


def tok(key: rsa.RSAPrivateKey, kid: str | None = None, **overrides: Any) -> str:
    header: dict[str, Any] = {"alg": "RS256", "typ": "JWT"}
    if kid is not None:
        header["kid"] = kid
    return sign(header, claims(**overrides), key)


async def purchase(gw: Any, token: str) -> tuple[int, Any, bytes]:
    headers = {**present("header", token), "Content-Type": "application/json"}
    result: tuple[int, Any, bytes] = await gw.request(
        "POST", PURCHASE, headers=headers, data=b'{"sku": "starter"}'
    )
    return result


async def loaded(gw: Any, refreshes: int = 1) -> Any:
    await gw.parts.keys.wait_refreshes(refreshes)
    return gw


async def jwks_only(gateway: Any, jwks: WatchedJWKS, **settings: Any) -> Any:
    """A gateway whose only key source is the JWKS, once its first fetch completed."""
    settings.setdefault("jwks_timeout_seconds", JWKS_TIMEOUT)
    return await loaded(await gateway(jwks_url=jwks.url, public_key_file=None, **settings))


def refused(result: tuple[int, Any, bytes]) -> bool:
    status, headers, body = result
    return (
        status == 401
        and json.loads(body) == {"error": "unauthenticated"}
        and headers["WWW-Authenticate"] == 'Bearer realm="catalyst-proxy", error="invalid_token"'
    )


# --- which key verifies which token -------------------------------------------------


async def test_token_with_kid_uses_the_jwks_key(gateway, jwks, key_a):
    """A token whose kid names a JWKS key is verified with that key (local key differs)."""
    gw = await loaded(await gateway(jwks_url=jwks.url))
    status, _, body = await purchase(gw, tok(key_a, "a"))
    assert status == 200, body
    assert len(gw.sme.received) == 1


async def test_token_without_kid_uses_local_keys_only(gateway, jwks, key_a, rsa_key):
    """A token without kid is verified with the local keys only, never with the JWKS keys."""
    gw = await loaded(await gateway(jwks_url=jwks.url))
    assert refused(await purchase(gw, tok(key_a)))
    assert gw.sme.received == []
    assert (await purchase(gw, tok(rsa_key)))[0] == 200
    assert len(gw.sme.received) == 1
    assert jwks.fetches == 1


async def test_unknown_kid_falls_back_to_local_keys(gateway, jwks, rsa_key):
    """A kid the JWKS does not hold (after one refresh) falls back to the local keys."""
    gw = await loaded(await gateway(jwks_url=jwks.url))
    status, _, body = await purchase(gw, tok(rsa_key, "not-in-the-jwks"))
    assert status == 200, body
    assert len(gw.sme.received) == 1
    assert jwks.fetches == 2  # the start-up fetch and one refresh for the unknown kid


async def test_known_kid_with_local_key_signature_falls_back(gateway, jwks, rsa_key):
    """A token naming a JWKS kid but signed by the local key is still verified (fallback)."""
    gw = await loaded(await gateway(jwks_url=jwks.url))
    assert (await purchase(gw, tok(rsa_key, "a")))[0] == 200
    assert jwks.fetches == 1


async def test_a_kid_naming_two_keys_verifies_with_the_one_that_fits(gateway, key_a):
    """RFC 7517 lets one kid name keys of different types: with an EC key listed first under
    the kid ``a`` and the RSA key after it, an RS256 token of ``a`` verifies with the RSA key
    (the first entry does not shadow the second)."""
    ec_jwk = json.loads(ECAlgorithm.to_jwk(ec.generate_private_key(ec.SECP256R1()).public_key()))
    server = await WatchedJWKS(keys=[{**ec_jwk, "kid": "a", "use": "sig"},
                                     public_jwk(key_a, "a")]).start()  # fmt: skip
    try:
        gw = await jwks_only(gateway, server)
        status, _, body = await purchase(gw, tok(key_a, "a"))
        assert status == 200, body
        assert len(gw.sme.received) == 1
    finally:
        await server.close()


async def test_jwks_only_token_without_kid_is_refused(gateway, jwks, key_a):
    """With only a JWKS (no local key) a token without kid has no key: 401, not 503."""
    gw = await jwks_only(gateway, jwks)
    assert refused(await purchase(gw, tok(key_a)))
    assert gw.sme.received == []


async def test_jwk_alg_pins_the_algorithm(gateway, jwks, key_a):
    """A JWKS key published with ``alg: RS512`` does not verify an RS256 token."""
    jwks.keys = [{**public_jwk(key_a, "a"), "alg": "RS512"}]
    gw = await jwks_only(gateway, jwks)
    assert refused(await purchase(gw, tok(key_a, "a")))
    assert gw.sme.received == []


# --- rotation and the verified-token cache -------------------------------------------


async def test_key_rotation_is_picked_up_without_restart(gateway, jwks, key_a, key_b):
    """A token signed by a newly published key is accepted at once (one refresh)."""
    gw = await jwks_only(gateway, jwks)
    assert (await purchase(gw, tok(key_a, "a")))[0] == 200
    jwks.keys = [public_jwk(key_b, "b")]
    status, _, body = await purchase(gw, tok(key_b, "b"))
    assert status == 200, body
    assert [seen.claims["sub"] for seen in gw.sme.received] == ["op-1", "op-1"]
    assert jwks.fetches == 2


async def test_fifty_concurrent_requests_with_a_rotated_kid_cost_one_fetch(
    gateway, jwks, key_a, key_b
):
    """50 concurrent requests naming a freshly rotated kid cost exactly one extra fetch."""
    gw = await jwks_only(gateway, jwks)
    jwks.keys = [public_jwk(key_a, "a"), public_jwk(key_b, "b")]
    tokens = [tok(key_b, "b", sub=f"op-{i}") for i in range(50)]
    results = await asyncio.gather(*(purchase(gw, t) for t in tokens))
    assert [status for status, _, _ in results] == [200] * 50
    assert jwks.fetches == 2
    assert gw.parts.keys.refreshes == 2
    assert sorted(seen.claims["sub"] for seen in gw.sme.received) == sorted(
        f"op-{i}" for i in range(50)
    )


async def test_cached_token_is_refused_after_its_key_leaves_the_jwks(gateway, jwks, key_a, key_b):
    """A cached token stops working once a refresh shows its key was removed from the JWKS."""
    jwks.keys = [public_jwk(key_a, "a"), public_jwk(key_b, "b")]
    gw = await jwks_only(gateway, jwks)
    token_b = tok(key_b, "b")
    assert (await purchase(gw, token_b))[0] == 200
    assert (await purchase(gw, token_b))[0] == 200  # now served from the cache
    jwks.keys = [public_jwk(key_a, "a")]
    # An unknown kid makes the gateway refresh now; the refresh drops "b".
    assert refused(await purchase(gw, tok(key_a, "unknown")))
    await gw.parts.keys.wait_refreshes(2)
    assert refused(await purchase(gw, token_b))
    assert (await purchase(gw, tok(key_a, "a")))[0] == 200
    assert len(gw.sme.received) == 3


async def test_periodic_refresh_drops_a_removed_key(gateway, jwks, key_a, key_b):
    """The background refresh (CATALYST_JWKS_CACHE_SECONDS) alone retires a removed key."""
    jwks.keys = [public_jwk(key_a, "a"), public_jwk(key_b, "b")]
    gw = await jwks_only(gateway, jwks, jwks_cache_seconds=0.05)
    token_b = tok(key_b, "b")
    assert (await purchase(gw, token_b))[0] == 200
    jwks.keys = [public_jwk(key_a, "a")]
    await gw.parts.keys.wait_refreshes(gw.parts.keys.refreshes + 2)
    assert refused(await purchase(gw, token_b))
    assert len(gw.sme.received) == 1


async def test_replaced_key_under_the_same_kid_retires_old_tokens(gateway, jwks, key_a, key_b):
    """When kid ``a`` is re-published with another key, cached tokens of the old key stop."""
    gw = await jwks_only(gateway, jwks)
    old = tok(key_a, "a")
    assert (await purchase(gw, old))[0] == 200
    jwks.keys = [public_jwk(key_b, "a")]
    assert refused(await purchase(gw, tok(key_b, "never-seen")))  # forces the refresh
    await gw.parts.keys.wait_refreshes(2)
    assert refused(await purchase(gw, old))
    assert (await purchase(gw, tok(key_b, "a")))[0] == 200


async def test_unchanged_refresh_keeps_the_cache(gateway, jwks, key_a):
    """A refresh that returns the same keys does not count as a key change (cache stays)."""
    gw = await jwks_only(gateway, jwks)
    generation = gw.parts.keys.generation
    assert refused(await purchase(gw, tok(key_a, "unknown")))
    await gw.parts.keys.wait_refreshes(2)
    assert gw.parts.keys.generation == generation


# --- the unknown-kid flood ------------------------------------------------------------


async def _flood(gw: Any, count: int, width: int = 64) -> list[int]:
    """``count`` requests with random unknown kids, ``width`` at a time; their statuses.

    The signatures are junk (never checked: no key has such a kid), which keeps
    thousands of tokens cheap to make. ``width`` stays under the test client's
    connection pool (100), so other requests of the test are never queued behind.
    """
    gate = asyncio.Semaphore(width)
    payload = b64(json.dumps(claims()).encode())
    junk_signature = b64(bytes(256))

    async def one() -> int:
        header = b64(json.dumps({"alg": "RS256", "kid": secrets.token_hex(8)}).encode())
        async with gate:
            return (await purchase(gw, f"{header}.{payload}.{junk_signature}"))[0]

    return list(await asyncio.gather(*(one() for _ in range(count))))


async def test_unknown_kid_flood_costs_one_fetch_per_30_seconds(gateway, jwks, key_a):
    """Thousands of unknown kids cost at most one JWKS fetch per 30 s (monotonic seam)."""
    clock = Clock(1_000.0)
    gw = await jwks_only(gateway, jwks, monotonic=clock)
    assert await _flood(gw, 2_000) == [401] * 2_000
    assert jwks.fetches == 2  # start-up + one miss refresh
    clock.now += 29.9
    assert await _flood(gw, 300) == [401] * 300
    assert jwks.fetches == 2
    clock.now += 0.2  # 30.1 s after the miss refresh
    assert await _flood(gw, 300) == [401] * 300
    assert jwks.fetches == 3
    Assurance().add("unknown-kid flood: requests", 2_600)
    Assurance().add("unknown-kid flood: JWKS fetches (start-up + 1 per 30 s)", jwks.fetches)
    assert gw.sme.received == []
    assert metric(await gw.metrics_text(), "catalyst_proxy_auth_failures_total",
                  reason="unknown_key") == 2_600  # fmt: skip


async def test_valid_requests_stay_fast_while_unknown_kids_wait(gateway, jwks, key_a):
    """While a flood of unknown kids waits on a hanging JWKS, known-kid requests are instant."""
    gw = await jwks_only(gateway, jwks, jwks_timeout_seconds=2.0)
    jwks.mode = "hang"
    flood = asyncio.ensure_future(_flood(gw, 1_000, width=50))
    await jwks.wait_fetches(2)  # the flood's one refresh is now hanging
    good = tok(key_a, "a")
    for _ in range(20):
        status, _, _ = await purchase(gw, good)
        assert status == 200
    # All twenty were served while the flood still waited on the fetch (it ends at the
    # JWKS timeout, 2 s): none of them waited on it.
    assert not flood.done()
    assert gw.parts.keys.refreshes == 1  # the start-up fetch only: the flood's still hangs
    assert await flood == [401] * 1_000
    assert jwks.fetches == 2
    assert len(gw.sme.received) == 20


async def test_a_refusal_after_the_body_broke_is_the_connections_last_answer(gateway, jwks, key_a):
    """A chunked purchase whose token names an unknown kid waits on a hanging JWKS refresh;
    meanwhile its body goes bad (the parser gives up on it). The 401 that follows is the
    connection's last answer: it closes, and aiohttp's own answer to the refused bytes is
    never sent after it (a client that pools connections would take it for its next one)."""
    gw = await jwks_only(gateway, jwks, jwks_timeout_seconds=JWKS_TIMEOUT)
    jwks.mode = "hang"
    headers = [*present("header", tok(key_a, "unknown")).items(),
               ("Transfer-Encoding", "chunked")]  # fmt: skip
    reader, writer = await raw_client(gw.url)
    writer.write(request_bytes("POST", PURCHASE, headers))
    await jwks.wait_fetches(2)  # the request waits on the refresh
    writer.write(b"ZZ\r\nhello\r\n0\r\n\r\n")
    async with asyncio.timeout(5):
        response = await read_response(reader)
        rest = await reader.read()
    writer.close()
    assert response is not None
    assert response.status == 401
    assert rest == b""
    assert gw.sme.received == []


# --- stale on error, failed refreshes -------------------------------------------------


async def test_jwks_down_after_a_good_fetch_keeps_serving(gateway, key_a):
    """With the JWKS endpoint down, the last good key set keeps verifying tokens."""
    jwks = await WatchedJWKS(keys=[public_jwk(key_a, "a")]).start()
    gw = await jwks_only(gateway, jwks)
    await jwks.close()  # connection refused from now on
    assert refused(await purchase(gw, tok(key_a, "unknown")))
    await gw.parts.keys.wait_refreshes(2)
    status, _, body = await purchase(gw, tok(key_a, "a"))
    assert status == 200, body
    text = await gw.metrics_text()
    assert metric(text, REFRESHES, result="error") == 1
    assert metric(text, REFRESHES, result="ok") == 1
    status, _, body = await gw.request("GET", "/readyz")
    assert status == 200, body


def _bad_documents(key_a: rsa.RSAPrivateKey, key_b: rsa.RSAPrivateKey) -> dict[str, Any]:
    """name → (server mode, raw body, metric result)."""
    good = public_jwk(key_b, "b")
    private = key_b.private_numbers()

    def uint(value: int) -> str:
        return b64(value.to_bytes((value.bit_length() + 7) // 8, "big"))

    with_d = {**good, "d": uint(private.d), "p": uint(private.p), "q": uint(private.q)}
    bodies: dict[str, Any] = {
        "error-page": ("error", b"", "error"),
        "html-200": ("raw", b"<html><body>Service Unavailable</body></html>", "invalid"),
        "not-an-object": ("raw", b'[{"kty": "RSA"}]', "invalid"),
        "keys-not-a-list": ("raw", b'{"keys": {"b": 1}}', "invalid"),
        "empty-key-list": ("raw", b'{"keys": []}', "empty"),
        "no-keys-member": ("raw", b"{}", "invalid"),
        "keys-missing-members": (
            "raw",
            json.dumps(
                {
                    "keys": [
                        {"kty": "RSA", "kid": "b"},
                        {"kty": "RSA", "kid": "b", "e": good["e"]},
                        {"kty": "RSA", "kid": "b", "n": good["n"]},
                        {k: v for k, v in good.items() if k != "kid"},
                        {k: v for k, v in good.items() if k != "kty"},
                    ]
                }
            ).encode(),
            "empty",
        ),
        "use-enc": ("raw", json.dumps({"keys": [{**good, "use": "enc"}]}).encode(), "empty"),
        "private-d": ("raw", json.dumps({"keys": [with_d]}).encode(), "empty"),
        "symmetric-oct": (
            "raw",
            json.dumps(
                {"keys": [{"kty": "oct", "kid": "b", "k": "c2VjcmV0", "alg": "HS256"}]}
            ).encode(),
            "empty",
        ),
        "alg-none-jwk": (
            "raw",
            json.dumps({"keys": [{**good, "alg": "none"}]}).encode(),
            "empty",
        ),
        "alg-hs256-rsa-jwk": (
            "raw",
            json.dumps({"keys": [{**good, "alg": "HS256"}]}).encode(),
            "empty",
        ),
        "kid-not-a-string": ("raw", json.dumps({"keys": [{**good, "kid": 7}]}).encode(), "empty"),
        "nesting-bomb": ("raw", b'{"keys": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", "invalid"),
        "endless": ("endless", b"", "invalid"),
        "hang": ("hang", b"", "timeout"),
    }
    return bodies


BAD_DOCUMENTS = [
    "error-page", "html-200", "not-an-object", "keys-not-a-list", "no-keys-member",
    "nesting-bomb", "endless", "hang",
]  # fmt: skip
# A JWKS (a JSON object with a "keys" list) holding no usable signing key: the realm's keys
# are withdrawn, not the endpoint down.
WITHDRAWING_DOCUMENTS = [
    "empty-key-list", "keys-missing-members", "use-enc", "private-d", "symmetric-oct",
    "alg-none-jwk", "alg-hs256-rsa-jwk", "kid-not-a-string",
]  # fmt: skip


@pytest.mark.parametrize("name", BAD_DOCUMENTS)
async def test_failed_refresh_keeps_the_last_good_keys(gateway, jwks, key_a, key_b, name):
    """A refresh that fails, or answers something that is not a JWKS, is counted by its
    result and keeps the last good keys serving."""
    mode, body, result = _bad_documents(key_a, key_b)[name]
    gw = await jwks_only(gateway, jwks)
    jwks.mode, jwks.raw_body = mode, body
    # Key "b" is only in the bad document: asking for it forces the refresh.
    started = time.perf_counter()
    assert refused(await purchase(gw, tok(key_b, "b")))
    assert time.perf_counter() - started < JWKS_TIMEOUT + 1.0
    await gw.parts.keys.wait_refreshes(2)
    assert jwks.fetches == 2
    text = await gw.metrics_text()
    assert metric(text, REFRESHES, result=result) == 1
    assert metric(text, REFRESHES, result="ok") == 1
    status, _, body = await purchase(gw, tok(key_a, "a"))
    assert status == 200, body
    assert len(gw.sme.received) == 1
    assert (await gw.request("GET", "/readyz"))[0] == 200


@pytest.mark.parametrize("name", WITHDRAWING_DOCUMENTS)
async def test_a_jwks_with_no_usable_key_withdraws_the_keys_it_replaces(
    gateway, jwks, key_a, key_b, name
):
    """A JWKS holding no usable signing key (the realm's key removed, say after a compromise)
    replaces the key set: a token of the withdrawn key, verified and cached before, is refused
    at once (503 operator-keys-unavailable: no key is left), ``/readyz`` says why, the fetch
    counts as ``empty``, and it is fetched again on the failure schedule until a key is back."""
    mode, body, result = _bad_documents(key_a, key_b)[name]
    assert result == "empty"
    gw = await jwks_only(gateway, jwks)
    old = tok(key_a, "a")
    assert (await purchase(gw, old))[0] == 200  # verified, and cached
    jwks.mode, jwks.raw_body = mode, body
    # Key "b" is not (usably) in the new document: asking for it forces the refresh.
    status, headers, answer = await purchase(gw, tok(key_b, "b"))
    assert (status, json.loads(answer)) == (503, {"error": "operator-keys-unavailable"})
    await gw.parts.keys.wait_refreshes(2)
    status, headers, answer = await purchase(gw, old)
    assert (status, json.loads(answer)) == (503, {"error": "operator-keys-unavailable"})
    assert headers["X-Catalyst-Forwarded"] == "no"
    assert len(gw.sme.received) == 1
    status, _, ready = await gw.request("GET", "/readyz")
    assert status == 503
    assert json.loads(ready)["reasons"] == [
        "no operator verification key is usable (the JWKS not fetched, or holding none)"
    ]
    text = await gw.metrics_text()
    assert metric(text, REFRESHES, result="empty") == 1
    assert metric(text, REFRESHES, result="invalid") == 0
    jwks.mode = "ok"  # the key is published again: the next scheduled fetch (1 s) finds it
    await gw.parts.keys.wait_refreshes(3)
    assert (await purchase(gw, old))[0] == 200
    assert len(gw.sme.received) == 2


async def test_a_withdrawn_jwks_key_falls_back_to_the_local_keys(gateway, jwks, key_a, rsa_key):
    """With a local key configured, a JWKS that withdraws every key leaves the local key
    verifying: a token of the withdrawn JWKS key is 401, a local key's token still 200."""
    gw = await loaded(await gateway(jwks_url=jwks.url))
    old = tok(key_a, "a")
    assert (await purchase(gw, old))[0] == 200
    jwks.mode, jwks.raw_body = "raw", b'{"keys": []}'
    assert refused(await purchase(gw, tok(key_a, "other")))  # forces the refresh
    await gw.parts.keys.wait_refreshes(2)
    assert refused(await purchase(gw, old))
    assert (await purchase(gw, tok(rsa_key)))[0] == 200
    assert (await gw.request("GET", "/readyz"))[0] == 200


async def test_good_keys_beside_broken_entries_are_used(gateway, jwks, key_a, key_b):
    """Broken or unusable entries are skipped; a good key in the same document is used."""
    good = public_jwk(key_b, "b")
    entries = [
        {"kty": "RSA", "kid": "broken"},
        {**public_jwk(key_a, "enc"), "use": "enc"},
        {**good, "kid": "none-alg", "alg": "none"},
        "not-an-object",
        good,
    ]
    jwks.mode, jwks.raw_body = "raw", json.dumps({"keys": entries}).encode()
    gw = await jwks_only(gateway, jwks)
    assert (await purchase(gw, tok(key_b, "b")))[0] == 200
    assert refused(await purchase(gw, tok(key_a, "enc")))  # an enc key is not a signing key
    await gw.parts.keys.wait_refreshes(2)  # "enc" was unknown, so it was looked for once
    text = await gw.metrics_text()
    assert metric(text, REFRESHES, result="ok") == 2
    assert metric(text, REFRESHES, result="invalid") == 0


async def test_refresh_loop_survives_a_bad_document(gateway, jwks, key_a):
    """After a failed start-up fetch the background loop retries by itself and recovers."""
    jwks.mode = "raw"
    jwks.raw_body = json.dumps({"keys": [{**public_jwk(key_a, "a"), "alg": "none"}]}).encode()
    gw = await gateway(jwks_url=jwks.url, public_key_file=None, jwks_timeout_seconds=JWKS_TIMEOUT)
    await gw.parts.keys.wait_refreshes(1)
    assert (await gw.request("GET", "/readyz"))[0] == 503
    jwks.mode = "ok"
    await gw.parts.keys.wait_refreshes(2)  # the loop's own retry, no request involved
    assert (await gw.request("GET", "/readyz"))[0] == 200
    assert (await purchase(gw, tok(key_a, "a")))[0] == 200


# --- junk never reaches the identity provider -----------------------------------------


def _junk_with_kids(key: rsa.RSAPrivateKey) -> dict[str, str]:
    now = int(time.time())
    return {
        "expired": tok(key, "new-1", exp=now - 120),
        "not-yet-valid": tok(key, "new-2", nbf=now + 3600),
        "issued-in-future": tok(key, "new-3", iat=now + 3600),
        "no-sub": tok(key, "new-4", sub=None),
        "no-exp": tok(key, "new-5", exp=None),
        "alg-none": sign({"alg": "none", "kid": "new-6"}, claims(), None),
        "hs256": sign({"alg": "HS256", "kid": "new-7"}, claims(), b"secret"),
        "crit": sign({"alg": "RS256", "kid": "new-8", "crit": ["x"]}, claims(), key),
        "payload-not-json": sign({"alg": "RS256", "kid": "new-9"}, "bm90LWpzb24", key),
        "two-parts": tok(key, "new-10").rsplit(".", 1)[0],
        "kid-object": sign({"alg": "RS256", "kid": {"x": 1}}, claims(), key),
        "kid-too-long": tok(key, "k" * 300),
        "wrong-audience": tok(key, "new-11", aud="someone-else"),
        "wrong-issuer": tok(key, "new-12", iss="https://evil.example.test"),
    }


async def test_malformed_and_expired_tokens_cause_no_jwks_fetch(gateway, jwks, key_a):
    """Tokens that fail a keyless check never trigger a JWKS fetch, whatever their kid."""
    gw = await jwks_only(
        gateway, jwks, token_audiences=("catalyst-proxy",), token_issuers=("https://kc",)
    )
    for name, token in _junk_with_kids(key_a).items():
        assert refused(await purchase(gw, token)), name
    assert jwks.fetches == 1
    # Control: a well-formed token with an unknown kid does fetch.
    good = tok(key_a, "new-13", aud="catalyst-proxy", iss="https://kc")
    assert refused(await purchase(gw, good))
    assert jwks.fetches == 2
    assert gw.sme.received == []


# --- no usable key yet ---------------------------------------------------------------


@pytest.mark.parametrize("mode", ["hang", "error"])
async def test_no_usable_keys_answers_503_with_retry_after(gateway, jwks, key_a, mode):
    """JWKS never fetched and no local key → 503 operator-keys-unavailable with Retry-After."""
    jwks.mode = mode
    gw = await gateway(jwks_url=jwks.url, public_key_file=None, jwks_timeout_seconds=JWKS_TIMEOUT)
    for token in (tok(key_a, "a"), tok(key_a)):
        started = time.perf_counter()
        status, headers, body = await purchase(gw, token)
        elapsed = time.perf_counter() - started
        assert status == 503, body
        assert json.loads(body) == {"error": "operator-keys-unavailable"}
        assert int(headers["Retry-After"]) > 0
        assert elapsed < JWKS_TIMEOUT + 1.0
    assert gw.sme.received == []
    status, _, _ = await gw.request("POST", PURCHASE, data=b"{}")
    assert status == 401  # no token at all is still plain 401


async def test_hanging_jwks_at_startup_leaves_healthz_instant(gateway, jwks, key_a):
    """A JWKS that hangs at start-up: /healthz instant, /readyz 503, requests bounded by timeout."""
    jwks.mode = "hang"
    gw = await gateway(jwks_url=jwks.url, public_key_file=None, jwks_timeout_seconds=JWKS_TIMEOUT)
    assert gw.parts.keys.refreshes == 0  # serving, and the start-up fetch not over: no wait
    await jwks.wait_fetches(1)  # the start-up fetch is now hanging
    status, _, body = await gw.request("GET", "/healthz")
    assert (status, json.loads(body)) == (200, {"status": "ok"})
    assert gw.parts.keys.refreshes == 0  # answered while the fetch still hangs
    status, _, body = await gw.request("GET", "/readyz")
    assert status == 503
    assert json.loads(body)["status"] == "not-ready"
    started = time.perf_counter()
    status, _, body = await purchase(gw, tok(key_a, "a"))
    assert time.perf_counter() - started < JWKS_TIMEOUT + 0.6
    assert status == 503
    assert json.loads(body) == {"error": "operator-keys-unavailable"}
    assert gw.sme.received == []


async def test_readyz_turns_ready_once_keys_are_usable(gateway, jwks, key_a):
    """/readyz answers 503 until the first good JWKS fetch, then 200 (no restart)."""
    jwks.mode = "error"
    gw = await gateway(jwks_url=jwks.url, public_key_file=None, jwks_timeout_seconds=JWKS_TIMEOUT)
    await gw.parts.keys.wait_refreshes(1)
    status, _, body = await gw.request("GET", "/readyz")
    assert status == 503
    assert json.loads(body)["reasons"]
    jwks.mode = "ok"
    await gw.parts.keys.wait_refreshes(2)  # the loop's retry after its back-off
    status, _, body = await gw.request("GET", "/readyz")
    assert status == 200, body
    assert (await purchase(gw, tok(key_a, "a")))[0] == 200


async def test_readyz_ready_at_once_with_a_local_key(gateway, jwks):
    """With a local key the gateway is ready even while the JWKS is still unreachable."""
    jwks.mode = "hang"
    gw = await gateway(jwks_url=jwks.url, jwks_timeout_seconds=JWKS_TIMEOUT)
    status, _, body = await gw.request("GET", "/readyz")
    assert status == 200, body


async def test_readyz_never_shows_jwks_url_credentials(gateway, jwks, key_a):
    """A JWKS URL with user:password works, and /readyz shows it without the credentials."""
    url = jwks.url.replace("http://", "http://reader:s3cr3t-pw@")
    gw = await loaded(await gateway(jwks_url=url, public_key_file=None))
    assert (await purchase(gw, tok(key_a, "a")))[0] == 200
    status, _, body = await gw.request("GET", "/readyz")
    assert status == 200
    assert b"s3cr3t-pw" not in body
    assert json.loads(body)["operator_keys"]["jwks_url"] == jwks.url


async def test_readyz_never_shows_the_jwks_urls_query(gateway, jwks, key_a):
    """A JWKS URL whose query carries a credential works; /readyz shows the query as ``?...``."""
    gw = await loaded(await gateway(jwks_url=jwks.url + "?access_token=s3cr3t-q",
                                    public_key_file=None))  # fmt: skip
    assert (await purchase(gw, tok(key_a, "a")))[0] == 200
    status, _, body = await gw.request("GET", "/readyz")
    assert status == 200
    assert b"s3cr3t-q" not in body
    assert json.loads(body)["operator_keys"]["jwks_url"] == jwks.url + "?..."


@pytest.mark.parametrize(
    "answer",
    [b"HTTP/1.1 2x0 OK\r\n\r\n", b"HTTP/1.1 200 OK\r\nContent-Length: abc\r\n\r\n{}",
     b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", b"echo", b"echo-long"],
    ids=["status-line", "content-length", "chunk-size", "echoed-request-line",
         "echoed-target-in-a-long-header-line"],
)  # fmt: skip
async def test_a_failed_fetch_never_logs_the_urls_query_or_password(answer):
    """aiohttp's error for a malformed JWKS answer quotes the request's URL, and the bytes it
    refused (a server may echo the request line): the reason logged (``jwks.refresh``) holds
    neither the URL's query nor its user info, and still says what went wrong."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        line = head.split(b"\r\n", 1)[0]
        if answer == b"echo":
            writer.write(line + b"\r\n\r\n")
        elif answer == b"echo-long":  # aiohttp quotes the first 100 bytes of a line too long
            target = line.split(b" ")[1]
            writer.write(b"HTTP/1.1 200 OK\r\nX-Original-URI: " + target + b"x" * 9000 +
                         b"\r\n\r\n")  # fmt: skip
        else:
            writer.write(answer)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    keys = KeySet(jwks_url=f"http://reader:pw-s3cr3t@127.0.0.1:{port}/certs?t=it's-q-s3cr3t",
                  timeout=2)  # fmt: skip
    try:
        with capture_logs() as lines:
            await keys.start()
            await keys.wait_refreshes(1)
    finally:
        await keys.close()
        server.close()
        await server.wait_closed()
    refresh = [line for line in lines if line["event"] == "jwks.refresh"]
    assert refresh[0]["result"] == "error"
    assert refresh[0]["reason"].startswith(("ClientResponseError: 400", "ClientPayloadError"))
    assert "s3cr3t" not in json.dumps(lines)
