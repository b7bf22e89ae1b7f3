"""The operator session (reference.md: *Operator session*): token sources and claim rules.

Every refusal is checked the same way: ``401 {"error":"unauthenticated"}``, the
RFC 6750 challenge, and nothing at all reached the SME stand-in. Every
acceptance is checked on the upstream side: one request carrying a bridge
token for the right ``sub``.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from multidict import CIMultiDict

from .auth_support import ORDER, PURCHASE, Clock, call, claims, present
from .rawhttp import exchange, request_bytes
from .support import b64, cookie_signature, sign

CHALLENGE = 'Bearer realm="catalyst-proxy"'
INVALID_TOKEN = 'Bearer realm="catalyst-proxy", error="invalid_token"'
COOKIE_SECRET = b"cookie-secret-for-tests-0123456789"
ISSUER = "https://kc.example.test/realms/sovereign"
AUDIENCE = "catalyst-proxy"


async def purchase(gw: Any, headers: dict[str, str] | CIMultiDict[str], **kwargs: Any) -> Any:
    """POST a purchase with ``headers`` (plus a JSON content type) → (status, headers, body)."""
    merged: CIMultiDict[str] = CIMultiDict(headers)
    merged.setdefault("Content-Type", "application/json")
    return await gw.request("POST", PURCHASE, headers=merged, data=ORDER, **kwargs)


def assert_refused(gw: Any, result: Any, *, presented: bool = True) -> None:
    status, headers, body = result
    assert status == 401, body
    assert json.loads(body) == {"error": "unauthenticated"}
    assert headers["WWW-Authenticate"] == (INVALID_TOKEN if presented else CHALLENGE)
    assert gw.sme.received == []


def assert_accepted(gw: Any, result: Any, sub: str = "op-1") -> None:
    status, _, body = result
    assert status == 200, body
    assert b"order_id" in body
    assert len(gw.sme.received) == 1
    seen = gw.sme.received[0]
    assert seen.complete
    assert seen.claims is not None
    assert seen.claims["sub"] == sub


def rs256(claim_set: dict[str, Any], key: Any, **header: Any) -> str:
    return sign({"alg": "RS256", "typ": "JWT", **header}, claim_set, key)


# --- token sources ---------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER", "bEaReR"])
async def test_bearer_scheme_is_case_insensitive(gateway, rsa_key, scheme):
    """The Authorization scheme ``Bearer`` is accepted in any capitalisation."""
    gw = await gateway()
    token = rs256(claims(), rsa_key)
    assert_accepted(gw, await purchase(gw, {"Authorization": f"{scheme} {token}"}))


async def test_raw_session_cookie_is_accepted(gateway, rsa_key):
    """Without a cookie secret, ``catalyst_session`` holding a raw compact JWT is a session."""
    gw = await gateway()
    token = rs256(claims(sub="cookie-op"), rsa_key)
    result = await purchase(gw, {"Cookie": f"theme=dark; catalyst_session={token}; lang=en"})
    assert_accepted(gw, result, sub="cookie-op")


async def test_hmac_cookie_with_right_signature_is_accepted(gateway, rsa_key):
    """With a cookie secret, ``<jwt>.<base64url(HMAC-SHA256(secret, jwt))>`` is a session."""
    gw = await gateway(session_cookie_secret=COOKIE_SECRET)
    token = rs256(claims(), rsa_key)
    cookie = f"{token}.{cookie_signature(token, COOKIE_SECRET)}"
    assert_accepted(gw, await purchase(gw, {"Cookie": f"catalyst_session={cookie}"}))


def _hmac_cookie_variants(token: str) -> dict[str, str]:
    right = cookie_signature(token, COOKIE_SECRET)
    return {
        "wrong secret": f"{token}.{cookie_signature(token, b'another-secret-0123456789abcdef')}",
        "missing signature": f"{token}.",
        "raw jwt": token,
        "signature of another token": f"{token}.{cookie_signature(token + 'x', COOKIE_SECRET)}",
        "truncated signature": f"{token}.{right[:-2]}",
        "padded signature": f"{token}.{right}=",
        "standard base64 alphabet": f"{token}.{right.replace('-', '+').replace('_', '/')}x",
        "signature only": f".{right}",
        "hex signature": f"{token}.{'00' * 32}",
    }


@pytest.mark.parametrize(
    "variant",
    [
        "wrong secret",
        "missing signature",
        "raw jwt",
        "signature of another token",
        "truncated signature",
        "padded signature",
        "standard base64 alphabet",
        "signature only",
        "hex signature",
    ],
)
async def test_hmac_cookie_without_the_right_signature_is_refused(gateway, rsa_key, variant):
    """With a cookie secret, a cookie whose HMAC is wrong, missing or altered is refused."""
    gw = await gateway(session_cookie_secret=COOKIE_SECRET)
    token = rs256(claims(), rsa_key)
    cookie = _hmac_cookie_variants(token)[variant]
    assert_refused(gw, await purchase(gw, {"Cookie": f"catalyst_session={cookie}"}))


async def test_a_cookie_with_a_byte_outside_ascii_is_refused_not_an_error(gateway, rsa_key):
    """With a cookie secret, a session cookie holding a byte outside ASCII (which no JWS or
    base64url signature holds) is 401, like any bad signature: never a 500."""
    gw = await gateway(session_cookie_secret=COOKIE_SECRET)
    token = rs256(claims(), rsa_key)
    cookie = f"catalyst_session={token}\xff.{cookie_signature(token, COOKIE_SECRET)}"
    request = request_bytes("POST", PURCHASE, [("Cookie", cookie), ("Content-Length", "2")], b"{}")
    [response] = await exchange(gw.url, request)
    assert (response.status, json.loads(response.body)) == (401, {"error": "unauthenticated"})
    assert gw.sme.received == []


async def test_bearer_needs_no_cookie_signature(gateway, rsa_key):
    """The cookie secret governs the cookie only: a Bearer token is accepted as it is."""
    gw = await gateway(session_cookie_secret=COOKIE_SECRET)
    assert_accepted(gw, await purchase(gw, present("header", rs256(claims(), rsa_key))))


@pytest.mark.parametrize("name", ["access_token", "token", "catalyst_session", "jwt"])
async def test_token_in_query_string_is_ignored(gateway, rsa_key, name):
    """A token in the query string is never accepted: 401 without a token, nothing upstream."""
    gw = await gateway()
    token = rs256(claims(), rsa_key)
    result = await purchase(gw, {}, params={name: token})
    assert_refused(gw, result, presented=False)


@pytest.mark.parametrize("name", ["access_token", "token", "catalyst_session"])
async def test_token_in_form_field_is_ignored(gateway, rsa_key, name):
    """A token in a form-encoded body is never accepted: 401, nothing upstream."""
    gw = await gateway()
    token = rs256(claims(), rsa_key)
    result = await gw.request(
        "POST",
        PURCHASE,
        headers={"Content-Type": "application/x-www-form-urlencoded"},
        data=f"{name}={token}".encode(),
    )
    assert_refused(gw, result, presented=False)


async def test_invalid_bearer_is_not_rescued_by_a_valid_cookie(gateway, rsa_key, other_key):
    """The first source present decides: a bad Bearer token with a good cookie is refused."""
    gw = await gateway()
    good = rs256(claims(), rsa_key)
    bad = rs256(claims(), other_key)
    headers = {"Authorization": f"Bearer {bad}", "Cookie": f"catalyst_session={good}"}
    assert_refused(gw, await purchase(gw, headers))


async def test_expired_bearer_is_not_rescued_by_a_valid_cookie(gateway, rsa_key):
    """The first source present decides even when the Bearer token fails only on a claim."""
    gw = await gateway()
    good = rs256(claims(), rsa_key)
    expired = rs256(claims(exp=1_000_000), rsa_key)
    headers = {"Authorization": f"Bearer {expired}", "Cookie": f"catalyst_session={good}"}
    assert_refused(gw, await purchase(gw, headers))


async def test_valid_bearer_wins_over_a_junk_cookie(gateway, rsa_key):
    """The Bearer header is the first source: a junk session cookie beside it is not looked at."""
    gw = await gateway()
    good = rs256(claims(sub="header-op"), rsa_key)
    headers = {"Authorization": f"Bearer {good}", "Cookie": "catalyst_session=junk"}
    assert_accepted(gw, await purchase(gw, headers), sub="header-op")


async def test_two_authorization_headers_are_ambiguous(gateway, rsa_key):
    """Two Authorization headers are refused as ambiguous, even when both hold valid tokens."""
    gw = await gateway()
    token = rs256(claims(), rsa_key)
    headers = CIMultiDict([("Authorization", f"Bearer {token}")] * 2)
    assert_refused(gw, await purchase(gw, headers))


async def test_two_session_cookies_in_one_header_are_ambiguous(gateway, rsa_key):
    """Two ``catalyst_session`` cookies in one Cookie header are refused as ambiguous."""
    gw = await gateway()
    token = rs256(claims(), rsa_key)
    other = rs256(claims(sub="op-2"), rsa_key)
    headers = {"Cookie": f"catalyst_session={token}; catalyst_session={other}"}
    assert_refused(gw, await purchase(gw, headers))


async def test_two_session_cookies_in_two_headers_are_ambiguous(gateway, rsa_key):
    """Two Cookie headers each naming ``catalyst_session`` are refused as ambiguous."""
    gw = await gateway()
    token = rs256(claims(), rsa_key)
    headers = CIMultiDict([("Cookie", f"catalyst_session={token}")] * 2)
    assert_refused(gw, await purchase(gw, headers))


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Cookie": "theme=dark; lang=en"},
        {"Authorization": "Basic b3A6cGFzc3dvcmQ="},
    ],
    ids=["nothing", "other-cookies", "basic-auth"],
)
async def test_no_token_gets_the_plain_challenge(gateway, headers):
    """With no session presented the challenge names the realm only, without ``error=``."""
    gw = await gateway()
    assert_refused(gw, await purchase(gw, headers), presented=False)


@pytest.mark.parametrize(
    "headers",
    [
        {"Authorization": "Bearer not-a-jwt"},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer a.b.c"},
        {"Cookie": "catalyst_session=not-a-jwt"},
        {"Cookie": "catalyst_session="},
    ],
    ids=["junk-bearer", "empty-bearer", "abc-bearer", "junk-cookie", "empty-cookie"],
)
async def test_presented_token_gets_invalid_token_challenge(gateway, headers):
    """When a token was presented and refused, the challenge adds ``error="invalid_token"``."""
    gw = await gateway()
    assert_refused(gw, await purchase(gw, headers))


def _token_with_line(key: Any, line_length: int, prefix: str) -> str:
    """A valid token whose header line ``prefix + token`` is exactly ``line_length`` long."""
    lo, hi = 0, line_length
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(prefix) + len(rs256(claims(pad="x" * mid), key)) <= line_length:
            lo = mid
        else:
            hi = mid - 1
    return rs256(claims(pad="x" * lo), key)


@pytest.mark.parametrize(
    ("source", "prefix"),
    [("header", "Authorization: Bearer "), ("cookie", "Cookie: catalyst_session=")],
)
async def test_header_line_just_under_16_kib_is_accepted(gateway, rsa_key, source, prefix):
    """A ~15.9 KiB session header line (a large Keycloak token) reaches the upstream."""
    gw = await gateway()
    token = _token_with_line(rsa_key, 16_280, prefix)
    assert 16_200 < len(prefix) + len(token) <= 16_384
    assert_accepted(gw, await purchase(gw, present(source, token)))


@pytest.mark.parametrize("source", ["header", "cookie"])
async def test_header_line_over_16_kib_is_refused(gateway, rsa_key, source):
    """A session header line over 16 KiB gets 431 request-header-fields-too-large and
    reaches nothing."""
    gw = await gateway()
    token = _token_with_line(rsa_key, 17_500, "Authorization: Bearer ")
    status, _, body = await purchase(gw, present(source, token))
    assert status == 431
    assert json.loads(body) == {"error": "request-header-fields-too-large"}
    assert gw.sme.received == []


@pytest.mark.parametrize("source", ["header", "cookie"])
async def test_over_long_header_refusal_does_not_echo_the_token(gateway, rsa_key, source):
    """The 431 for an over-long session header never quotes the token back to the client."""
    gw = await gateway()
    token = _token_with_line(rsa_key, 17_500, "Authorization: Bearer ")
    status, _, body = await purchase(gw, present(source, token))
    assert status == 431
    assert token[:24].encode() not in body
    assert b"eyJ" not in body


# --- claim rules (clock seam) ------------------------------------------------------

LEEWAY = 30.0


async def _one(gateway: Any, key: Any, claim_set: dict[str, Any], **settings: Any) -> Any:
    gw = await gateway(**settings)
    return gw, await purchase(gw, present("header", rs256(claim_set, key)))


NOW = 1_900_000_000.0  # a fixed "now" for the clock seam (2030)


@pytest.mark.parametrize(
    ("offset", "accepted"),
    [(-600, True), (0, True), (LEEWAY - 1, True), (LEEWAY - 0.001, True),
     (LEEWAY, False), (LEEWAY + 0.001, False), (LEEWAY + 1, False), (86_400, False)],
)  # fmt: skip
async def test_exp_with_leeway_edge(gateway, rsa_key, offset, accepted):
    """A token is valid while now < exp + leeway (30 s) and refused from exp + leeway on."""
    exp = int(NOW)
    gw = await gateway(clock=Clock(exp + offset))
    result = await purchase(gw, present("header", rs256(claims(now=NOW - 3600, exp=exp), rsa_key)))
    (assert_accepted if accepted else assert_refused)(gw, result)


@pytest.mark.parametrize(("offset", "accepted"), [(-1, True), (0, False), (1, False)])
async def test_exp_without_leeway(gateway, rsa_key, offset, accepted):
    """With CATALYST_TOKEN_LEEWAY_SECONDS=0 a token expires exactly at ``exp``."""
    exp = int(NOW)
    gw = await gateway(clock=Clock(exp + offset), token_leeway_seconds=0.0)
    result = await purchase(gw, present("header", rs256(claims(now=NOW - 3600, exp=exp), rsa_key)))
    (assert_accepted if accepted else assert_refused)(gw, result)


@pytest.mark.parametrize("name", ["nbf", "iat"])
@pytest.mark.parametrize(
    ("ahead", "accepted"),
    [(0, True), (LEEWAY - 1, True), (LEEWAY, True), (LEEWAY + 0.5, False), (LEEWAY + 1, False),
     (3600, False)],
)  # fmt: skip
async def test_nbf_and_iat_in_the_future(gateway, rsa_key, name, ahead, accepted):
    """``nbf`` and ``iat`` may lie at most the leeway in the future; further ahead is refused."""
    gw = await gateway(clock=Clock(NOW))
    claim_set = claims(now=NOW, exp=int(NOW) + 3600, **{name: NOW + ahead})
    result = await purchase(gw, present("header", rs256(claim_set, rsa_key)))
    (assert_accepted if accepted else assert_refused)(gw, result)


async def test_token_expired_by_wall_clock_is_refused(gateway, rsa_key):
    """With the real clock an expired token (beyond the leeway) is refused."""
    gw = await gateway()
    result = await purchase(gw, present("header", rs256(claims(exp=1_000_000_000), rsa_key)))
    assert_refused(gw, result)


@pytest.mark.parametrize(
    "exp",
    [None, "1900000600", "", True, [1900000600], {"t": 1}, 10**400, 1e400, float("nan"), -1e400],
    ids=["missing", "string", "empty", "bool", "list", "object", "huge-int", "inf", "nan", "-inf"],
)
async def test_exp_missing_or_of_wrong_type(gateway, rsa_key, exp):
    """``exp`` is required and must be a finite number; anything else is refused, never a 5xx."""
    claim_set = claims(now=NOW)
    claim_set.pop("exp")
    header = b64(json.dumps({"alg": "RS256", "typ": "JWT"}).encode())
    payload = dict(claim_set)
    if exp is not None:
        payload["exp"] = exp
    # json.dumps writes inf/nan as Infinity/NaN and big ints verbatim, which Python parses.
    token = sign(header, b64(json.dumps(payload).encode()), rsa_key)
    gw = await gateway(clock=Clock(NOW))
    assert_refused(gw, await purchase(gw, present("header", token)))


@pytest.mark.parametrize("name", ["nbf", "iat"])
@pytest.mark.parametrize(
    "value", ["0", True, [0], {"t": 0}, 10**400], ids=["string", "bool", "list", "object", "huge"]
)
async def test_nbf_and_iat_of_wrong_type(gateway, rsa_key, name, value):
    """``nbf`` and ``iat``, when present, must be numbers; a wrong type is refused, never a 5xx."""
    gw = await gateway(clock=Clock(NOW))
    claim_set = claims(now=NOW, **{name: value})
    assert_refused(gw, await purchase(gw, present("header", rs256(claim_set, rsa_key))))


@pytest.mark.parametrize(
    "sub",
    ["", "   ", 42, 0, ["op-1"], {"id": "op-1"}, True, "DROP"],
    ids=["empty", "blank", "number", "zero", "list", "object", "bool", "missing"],
)
async def test_sub_missing_empty_or_not_a_string(gateway, rsa_key, sub):
    """``sub`` is required and must be a non-empty string."""
    claim_set = claims()
    if sub == "DROP":
        claim_set.pop("sub")
    else:
        claim_set["sub"] = sub
    gw = await gateway()
    assert_refused(gw, await purchase(gw, present("header", rs256(claim_set, rsa_key))))


@pytest.mark.parametrize("name", ["sub", "email", "iss"])
async def test_a_claim_that_is_not_unicode_text_is_refused(gateway, rsa_key, name):
    """A ``sub``, ``email`` or ``iss`` holding a lone surrogate (JSON allows ``"\\ud800"``;
    UTF-8 cannot carry it) is refused as a bad claim: it would go on into the bridge token,
    the log line and the idempotency key, where it cannot be written (it was a 500 with no
    log line)."""
    claim_set = claims()
    claim_set[name] = "op-\ud800-1"
    gw = await gateway()
    assert_refused(gw, await purchase(gw, present("header", rs256(claim_set, rsa_key))))
    claim_set[name] = "op-\u00e9-1"  # any other text is taken as it is
    assert_accepted(gw, await purchase(gw, present("header", rs256(claim_set, rsa_key))),
                    sub=claim_set["sub"])  # fmt: skip


@pytest.mark.parametrize(
    ("configured", "iss"),
    [
        ((ISSUER,), ISSUER),
        ((ISSUER, "https://other.example.test/realms/x"), ISSUER),
        (("https://other.example.test/realms/x", ISSUER), ISSUER),
    ],
)
async def test_issuer_exact_match_is_accepted(gateway, rsa_key, configured, iss):
    """``iss`` equal to one of the configured issuers (a comma list) is accepted."""
    gw, result = await _one(gateway, rsa_key, claims(iss=iss), token_issuers=configured)
    assert_accepted(gw, result)


@pytest.mark.parametrize(
    "iss",
    [
        None,
        "",
        ISSUER[:-1],  # prefix
        "https://kc.example.test/realms/sov",  # prefix
        "kc.example.test",  # substring (CVE-2024-53861 class)
        "realms/sovereign",  # substring
        ISSUER + "x",  # extension
        ISSUER + "/",
        ISSUER.upper(),
        " " + ISSUER,
        f"{ISSUER},https://evil.example.test",
        [ISSUER],
        {"iss": ISSUER},
        42,
        "https://evil.example.test/realms/sovereign",
    ],
    ids=lambda v: repr(v)[:40],
)
async def test_issuer_must_match_exactly(gateway, rsa_key, iss):
    """When an issuer is configured, anything but an exact string match is refused."""
    claim_set = claims(iss=iss)
    gw, result = await _one(gateway, rsa_key, claim_set, token_issuers=(ISSUER,))
    assert_refused(gw, result)


@pytest.mark.parametrize(
    ("configured", "aud"),
    [
        ((AUDIENCE,), AUDIENCE),
        ((AUDIENCE,), ["account", AUDIENCE]),
        (("console", AUDIENCE), AUDIENCE),
        (("console", AUDIENCE), ["console"]),
    ],
)
async def test_audience_including_a_configured_one_is_accepted(gateway, rsa_key, configured, aud):
    """``aud`` (string or list) that includes a configured audience is accepted."""
    gw, result = await _one(gateway, rsa_key, claims(aud=aud), token_audiences=configured)
    assert_accepted(gw, result)


@pytest.mark.parametrize(
    "aud",
    [
        None,
        "",
        [],
        "catalyst",  # substring
        "proxy",  # substring
        "catalyst-proxy-evil",  # extension
        "xcatalyst-proxy",
        "Catalyst-Proxy",
        f"{AUDIENCE},account",  # a comma list inside one string is one audience
        [f"{AUDIENCE} "],
        ["catalyst", "proxy"],
        [AUDIENCE, 5],  # a list with a non-string
        [[AUDIENCE]],
        42,
        {"aud": AUDIENCE},
        True,
    ],
    ids=lambda v: repr(v)[:40],
)
async def test_audience_must_match_exactly(gateway, rsa_key, aud):
    """When an audience is configured, partial matches and wrong types are refused."""
    gw, result = await _one(gateway, rsa_key, claims(aud=aud), token_audiences=(AUDIENCE,))
    assert_refused(gw, result)


async def test_iss_and_aud_ignored_when_not_configured(gateway, rsa_key):
    """Without CATALYST_TOKEN_ISSUER/AUDIENCE any ``iss``/``aud`` is accepted."""
    gw, result = await _one(gateway, rsa_key, claims(iss="anything", aud=["whatever"]))
    assert_accepted(gw, result)


# --- the verified-token cache -----------------------------------------------------


async def test_cached_token_is_refused_after_expiry(gateway, rsa_key):
    """A token verified (and cached) earlier is refused once the clock passes exp + leeway."""
    clock = Clock(NOW)
    gw = await gateway(clock=clock)
    headers = present("header", rs256(claims(now=NOW, exp=int(NOW) + 60), rsa_key))
    assert (await purchase(gw, headers))[0] == 200
    assert (await purchase(gw, headers))[0] == 200  # served from the cache
    clock.now = NOW + 60 + LEEWAY - 1
    assert (await purchase(gw, headers))[0] == 200
    assert len(gw.sme.received) == 3
    clock.now = NOW + 60 + LEEWAY
    status, resp_headers, body = await purchase(gw, headers)
    assert status == 401, body
    assert json.loads(body) == {"error": "unauthenticated"}
    assert resp_headers["WWW-Authenticate"] == INVALID_TOKEN
    assert len(gw.sme.received) == 3


async def test_cache_does_not_accept_a_different_token(gateway, rsa_key):
    """The cache is keyed by the exact token: a tampered copy of a cached token is refused."""
    gw = await gateway()
    token = rs256(claims(), rsa_key)
    assert (await purchase(gw, present("header", token)))[0] == 200
    head, _payload, sig = token.split(".")
    forged = f"{head}.{b64(json.dumps(claims(sub='intruder')).encode())}.{sig}"
    status, _, _ = await purchase(gw, present("header", forged))
    assert status == 401
    assert [r.claims["sub"] for r in gw.sme.received] == ["op-1"]


@pytest.mark.parametrize(("method", "path"), [("GET", "/api/v1/sme/billing/vouchers/list")])
async def test_sub_and_email_reach_the_bridge_token(gateway, rsa_key, method, path):
    """The verified ``sub`` and ``email`` are what the bridge token names upstream."""
    gw = await gateway()
    token = rs256(claims(sub="op-42", email="Op42@Example.test"), rsa_key)
    status, _, body = await call(gw, method, path, present("cookie", token))
    assert status == 200, body
    (seen,) = gw.sme.received
    assert seen.claims is not None
    assert (seen.claims["sub"], seen.claims["email"]) == ("op-42", "Op42@Example.test")
    assert "Cookie" not in seen.headers


async def test_verified_token_cache_is_bounded(public_key_file, token):
    """The verified-token cache never holds more than its bound; the oldest entries go first."""
    from multidict import CIMultiDict

    from catalyst_proxy.auth import Authenticator
    from catalyst_proxy.config import Settings
    from catalyst_proxy.jwks import KeySet, load_local_keys

    settings = Settings(public_key_file=str(public_key_file))
    auth = Authenticator(settings, KeySet(local_keys=load_local_keys(str(public_key_file))),
                         cache_size=8)  # fmt: skip
    tokens = [token(sub=f"op-{n}") for n in range(20)]
    for t in tokens:
        await auth.authenticate(CIMultiDict(Authorization=f"Bearer {t}"))
    assert len(auth._cache) == 8
    assert list(auth._cache) == tokens[-8:]
