"""Attacks on the operator session and on the role mapping (issue 4, sections 1 and 2).

Every attack token is sent through the ``Authorization`` header and through the
``catalyst_session`` cookie, on every proxied route, to a gateway that trusts
both a local key and a live JWKS (so ``kid`` values really reach the key
lookup). Expected: ``401 {"error":"unauthenticated"}`` every time (never a
5xx), nothing at all at the SME stand-in, and zero connections to the canary
listener that ``jku``/``x5u`` point at.

Role escalation sends valid tokens with hostile claim shapes and asserts the
``role`` claim of the bridge token the SME stand-in actually received.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

from catalyst_proxy.bridge import mint
from catalyst_proxy.devtools.keys import public_jwk, public_pem

from .auth_support import ROUTES, SOURCES, WatchedJWKS, call, claims, expected_status, present
from .conftest import BRIDGE_SECRET, Assurance
from .support import RawUpstream, b64, sign

ISSUER = "https://kc.example.test/realms/sovereign"
AUDIENCE = "catalyst-proxy"
JWKS_KID = "k1"


# --- the arena: a gateway with local + JWKS keys, and a canary --------------------


@pytest.fixture
async def canary() -> AsyncIterator[RawUpstream]:
    """A socket server that only counts connections: ``jku``/``x5u`` point here."""

    async def hang_up(reader: Any, writer: Any) -> None:
        writer.close()

    server = await RawUpstream(hang_up).start()
    yield server
    await server.close()


@pytest.fixture
async def jwks(rsa_key: rsa.RSAPrivateKey) -> AsyncIterator[WatchedJWKS]:
    server = await WatchedJWKS(keys=[public_jwk(rsa_key, JWKS_KID)]).start()
    yield server
    await server.close()


@pytest.fixture
async def arena(gateway: Any, jwks: WatchedJWKS) -> Any:
    """The gateway under attack, its JWKS loaded; issuer and audience enforced."""
    gw = await gateway(
        jwks_url=jwks.url,
        jwks_timeout_seconds=0.5,
        token_issuers=(ISSUER,),
        token_audiences=(AUDIENCE,),
    )
    await gw.parts.keys.wait_refreshes(1)
    assert gw.parts.keys.jwks_loaded
    return gw


def good_claims(**overrides: Any) -> dict[str, Any]:
    return claims(**{"iss": ISSUER, "aud": AUDIENCE, **overrides})


async def assert_all_refused(gw: Any, token: str, canary: RawUpstream) -> None:
    """``token`` is refused on every route through both sources; nothing went anywhere."""
    ASSURANCE.add("attack tokens tried")
    for source in SOURCES:
        for method, path in ROUTES:
            status, headers, body = await call(gw, method, path, present(source, token))
            ASSURANCE.add("attack requests sent (token x source x route)")
            ASSURANCE.add("attack requests accepted (must be 0)", int(status < 400))
            ASSURANCE.add("5xx answers to bad tokens (must be 0)", int(status >= 500))
            where = f"{source} {method} {path}"
            assert status == 401, (where, status, body)
            assert json.loads(body) == {"error": "unauthenticated"}, where
            assert headers["WWW-Authenticate"] == (
                'Bearer realm="catalyst-proxy", error="invalid_token"'
            ), where
    ASSURANCE.add("attack requests that reached the upstream (must be 0)", len(gw.sme.received))
    ASSURANCE.add("canary (jku/x5u) connections (must be 0)", canary.connections)
    assert gw.sme.received == []
    assert canary.connections == 0
    metrics = await gw.metrics_text()
    assert 'status="5' not in metrics  # no 5xx was ever answered


# --- attack tokens -----------------------------------------------------------------


@dataclass(frozen=True)
class Ctx:
    """What an attacker can get hold of: the public key, a valid token, another key."""

    key: rsa.RSAPrivateKey  # the trusted key (tests only use it to make "almost" tokens)
    attacker: rsa.RSAPrivateKey
    canary_url: str

    @property
    def valid(self) -> str:
        return sign({"alg": "RS256", "typ": "JWT"}, good_claims(), self.key)

    @property
    def public(self) -> rsa.RSAPublicKey:
        return self.key.public_key()


def enc(value: Any) -> str:
    return b64(json.dumps(value).encode())


def hmac_token(header: dict[str, Any], claim_set: dict[str, Any], secret: bytes) -> str:
    """A JWS MAC'd with ``secret`` under the hash ``header["alg"]`` names (HS256/384/512)."""
    digest = {"256": hashlib.sha256, "384": hashlib.sha384, "512": hashlib.sha512}
    signing_input = f"{enc(header)}.{enc(claim_set)}"
    mac = hmac.new(secret, signing_input.encode(), digest[header["alg"][-3:]]).digest()
    return f"{signing_input}.{b64(mac)}"


def rsa_sig(key: rsa.RSAPrivateKey, signing_input: str, hash_: Any = None) -> bytes:
    return key.sign(signing_input.encode(), padding.PKCS1v15(), hash_ or hashes.SHA256())


def resign(header: dict[str, Any], claim_set: dict[str, Any], key: rsa.RSAPrivateKey) -> str:
    return sign(header, claim_set, key)


def self_signed_cert(key: rsa.RSAPrivateKey) -> bytes:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kc.example.test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.DER)


def _public_encodings(ctx: Ctx) -> dict[str, bytes]:
    pem = public_pem(ctx.key)
    spki_der = ctx.public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    pkcs1_pem = ctx.public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.PKCS1
    )
    pkcs1_der = ctx.public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.PKCS1
    )
    ssh = ctx.public.public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    jwk = public_jwk(ctx.key, JWKS_KID)
    return {
        "pem": pem,
        "pem-no-newline": pem.rstrip(b"\n"),
        "pem-crlf": pem.replace(b"\n", b"\r\n"),
        "der": spki_der,
        "pkcs1-pem": pkcs1_pem,
        "pkcs1-der": pkcs1_der,
        "openssh": ssh,
        "jwk-json": json.dumps(jwk).encode(),
        "jwk-json-compact": json.dumps(jwk, separators=(",", ":"), sort_keys=True).encode(),
        "jwks-json": json.dumps({"keys": [jwk]}).encode(),
        "modulus": base64.urlsafe_b64decode(jwk["n"] + "=="),
    }


Attack = Callable[[Ctx], str]
ATTACKS: dict[str, Attack] = {}


def attack(name: str) -> Callable[[Attack], Attack]:
    def register(fn: Attack) -> Attack:
        ATTACKS[name] = fn
        return fn

    return register


# alg none, in every capitalisation, with and without a signature part
for _alg in ("none", "None", "NONE", "nOnE", "NoNe", "nONE"):
    ATTACKS[f"alg-{_alg}"] = lambda ctx, a=_alg: f"{enc({'alg': a})}.{enc(good_claims())}."
    ATTACKS[f"alg-{_alg}-with-sig"] = lambda ctx, a=_alg: (
        f"{enc({'alg': a, 'typ': 'JWT'})}.{enc(good_claims())}.{ctx.valid.split('.')[2]}"
    )
ATTACKS["alg-none-with-kid"] = lambda ctx: (
    f"{enc({'alg': 'none', 'kid': JWKS_KID})}.{enc(good_claims())}."
)
ATTACKS["alg-missing"] = lambda ctx: f"{enc({'typ': 'JWT'})}.{enc(good_claims())}.{'A' * 342}"
ATTACKS["alg-empty"] = lambda ctx: f"{enc({'alg': ''})}.{enc(good_claims())}."
ATTACKS["alg-null"] = lambda ctx: f"{enc({'alg': None})}.{enc(good_claims())}."
ATTACKS["alg-list"] = lambda ctx: resign({"alg": ["RS256"]}, good_claims(), ctx.key)

# HS* forged with the public key, in every encoding an HMAC library might be handed
for _enc in (
    "pem", "pem-no-newline", "pem-crlf", "der", "pkcs1-pem", "pkcs1-der", "openssh",
    "jwk-json", "jwk-json-compact", "jwks-json", "modulus",
):  # fmt: skip
    ATTACKS[f"hs256-public-{_enc}"] = lambda ctx, e=_enc: hmac_token(
        {"alg": "HS256", "typ": "JWT"}, good_claims(), _public_encodings(ctx)[e]
    )
    ATTACKS[f"hs256-public-{_enc}-kid"] = lambda ctx, e=_enc: hmac_token(
        {"alg": "HS256", "kid": JWKS_KID}, good_claims(), _public_encodings(ctx)[e]
    )
for _hs in ("HS384", "HS512"):
    ATTACKS[f"{_hs.lower()}-public-pem"] = lambda ctx, a=_hs: hmac_token(
        {"alg": a}, good_claims(), public_pem(ctx.key)
    )
ATTACKS["hs256-lowercase-public-pem"] = lambda ctx: hmac_token(
    {"alg": "hs256"}, good_claims(), public_pem(ctx.key)
)
ATTACKS["hs256-empty-secret"] = lambda ctx: hmac_token({"alg": "HS256"}, good_claims(), b"")


# the right key, another algorithm
@attack("right-key-PS256")
def _ps256(ctx: Ctx) -> str:
    return jwt.encode(good_claims(), ctx.key, algorithm="PS256")


@attack("right-key-RS512")
def _rs512(ctx: Ctx) -> str:
    return jwt.encode(good_claims(), ctx.key, algorithm="RS512")


@attack("right-key-RS384-kid")
def _rs384(ctx: Ctx) -> str:
    return jwt.encode(good_claims(), ctx.key, algorithm="RS384", headers={"kid": JWKS_KID})


for _label, _name in {
    "rs256": "rs256", "Rs256": "Rs256", "trailing-space": "RS256 ", "leading-space": " RS256",
    "dash": "RS-256", "nul": "RS256\u0000", "ES256": "ES256", "EdDSA": "EdDSA",
}.items():  # fmt: skip
    ATTACKS[f"right-key-alg-{_label}"] = lambda ctx, a=_name: resign(
        {"alg": a, "typ": "JWT"}, good_claims(), ctx.key
    )


# signatures: stripped, truncated, transplanted, zero, wrong length
def _parts(token: str) -> list[str]:
    return token.split(".")


ATTACKS["sig-stripped"] = lambda ctx: ".".join(_parts(ctx.valid)[:2]) + "."
ATTACKS["sig-part-missing"] = lambda ctx: ".".join(_parts(ctx.valid)[:2])
ATTACKS["sig-truncated-half"] = lambda ctx: ctx.valid[: -len(_parts(ctx.valid)[2]) // 2]
ATTACKS["sig-truncated-1-char"] = lambda ctx: ctx.valid[:-1]
ATTACKS["sig-truncated-4-chars"] = lambda ctx: ctx.valid[:-4]
ATTACKS["sig-extra-chars"] = lambda ctx: ctx.valid + "AAAA"
ATTACKS["sig-padded"] = lambda ctx: ctx.valid + "=="
ATTACKS["sig-transplanted"] = lambda ctx: ".".join(
    [*_parts(resign({"alg": "RS256"}, good_claims(sub="intruder"), ctx.attacker))[:2],
     _parts(ctx.valid)[2]]
)  # fmt: skip
ATTACKS["sig-transplanted-other-claims"] = lambda ctx: ".".join(
    [*_parts(ctx.valid)[:1], enc(good_claims(sub="op-2")),
     _parts(resign({"alg": "RS256"}, good_claims(), ctx.key))[2]]
)  # fmt: skip
for _n in (256, 255, 257, 512, 1, 128):
    ATTACKS[f"sig-zero-{_n}-bytes"] = lambda ctx, n=_n: (
        ".".join(_parts(ctx.valid)[:2]) + "." + b64(b"\x00" * n)
    )
ATTACKS["sig-leading-zero-byte"] = lambda ctx: (
    ".".join(_parts(ctx.valid)[:2])
    + "."
    + b64(b"\x00" + base64.urlsafe_b64decode(_parts(ctx.valid)[2] + "=="))
)
ATTACKS["sig-all-ff"] = lambda ctx: ".".join(_parts(ctx.valid)[:2]) + "." + b64(b"\xff" * 256)
ATTACKS["header-padded"] = lambda ctx: (lambda h, c, s: f"{h}==.{c}.{s}")(*_parts(ctx.valid))
ATTACKS["payload-standard-base64"] = lambda ctx: resign(
    {"alg": "RS256"},
    base64.b64encode(json.dumps(good_claims(pad="~~~???~")).encode()).decode(),
    ctx.key,
)
ATTACKS["sig-non-base64"] = lambda ctx: ".".join(_parts(ctx.valid)[:2]) + ".!!!!$$$$"
ATTACKS["sig-rs512-over-rs256-header"] = lambda ctx: (
    ".".join(_parts(ctx.valid)[:2])
    + "."
    + b64(rsa_sig(ctx.key, ".".join(_parts(ctx.valid)[:2]), hashes.SHA512()))
)
ATTACKS["sig-pss-over-rs256-header"] = lambda ctx: (
    ".".join(_parts(ctx.valid)[:2])
    + "."
    + b64(
        ctx.key.sign(
            ".".join(_parts(ctx.valid)[:2]).encode(),
            padding.PSS(padding.MGF1(hashes.SHA256()), padding.PSS.DIGEST_LENGTH),
            hashes.SHA256(),
        )
    )
)


# tampering: payload and header changed, signature kept
def _tamper_payload(ctx: Ctx, **changes: Any) -> str:
    head, _, sig = _parts(ctx.valid)
    return f"{head}.{enc(good_claims(**changes))}.{sig}"


ATTACKS["tampered-sub"] = lambda ctx: _tamper_payload(ctx, sub="op-2")
ATTACKS["tampered-exp"] = lambda ctx: _tamper_payload(ctx, exp=int(time.time()) + 10**6)
ATTACKS["tampered-roles"] = lambda ctx: _tamper_payload(
    ctx, realm_access={"roles": ["catalyst-owner", "catalyst-admin"]}
)
ATTACKS["tampered-one-bit"] = lambda ctx: (
    lambda h, c, s: f"{h}.{c[:-2]}{'B' if c[-2] != 'B' else 'C'}{c[-1]}.{s}"
)(*_parts(ctx.valid))
ATTACKS["tampered-header-kid"] = lambda ctx: (
    f"{enc({'alg': 'RS256', 'typ': 'JWT', 'kid': JWKS_KID})}.{_parts(ctx.valid)[1]}"
    f".{_parts(ctx.valid)[2]}"
)
ATTACKS["payload-whitespace-reencoded"] = lambda ctx: (
    f"{_parts(ctx.valid)[0]}.{b64(json.dumps(good_claims(), indent=1).encode())}"
    f".{_parts(ctx.valid)[2]}"
)

# untrusted keys
ATTACKS["attacker-key"] = lambda ctx: resign({"alg": "RS256"}, good_claims(), ctx.attacker)
ATTACKS["attacker-key-jwks-kid"] = lambda ctx: resign(
    {"alg": "RS256", "kid": JWKS_KID}, good_claims(), ctx.attacker
)

# hostile kid values, signed with the attacker's key
HOSTILE_KIDS: dict[str, Any] = {
    "path-traversal": "../../../../../../etc/passwd",
    "dev-null": "/dev/null",
    "url-encoded-traversal": "..%2f..%2f..%2fetc%2fpasswd",
    "sql-quote": "k1' OR '1'='1",
    "sql-drop": 'k1"; DROP TABLE keys; --',
    "sql-union": "x' UNION SELECT 'secret' --",
    "10kb": "k" * 10_240,
    "257-chars": "k" * 257,
    "nul-byte": "k1\u0000",
    "newline": "k1\r\nX-Injected: 1",
    "unicode": "k\u0131\u0307d",
    "empty": "",
    "integer": 1,
    "zero": 0,
    "float": 1.5,
    "huge-int": 10**400,
    "object": {"kid": JWKS_KID},
    "list": [JWKS_KID],
    "null": None,
    "true": True,
    "url": "http://127.0.0.1:1/evil",
}
for _label, _kid in HOSTILE_KIDS.items():
    ATTACKS[f"kid-{_label}"] = lambda ctx, k=_kid: sign(
        enc({"alg": "RS256", "typ": "JWT", "kid": k}), good_claims(), ctx.attacker
    )
ATTACKS["kid-dev-null-hs256-empty-key"] = lambda ctx: hmac_token(
    {"alg": "HS256", "kid": "/dev/null"}, good_claims(), b""
)
ATTACKS["kid-jwks-hs256-with-n"] = lambda ctx: hmac_token(
    {"alg": "HS256", "kid": JWKS_KID}, good_claims(), public_jwk(ctx.key)["n"].encode()
)


# keys from the token itself: jku / x5u (canary), jwk / x5c (attacker key)
@attack("jku-canary")
def _jku(ctx: Ctx) -> str:
    return resign({"alg": "RS256", "jku": ctx.canary_url}, good_claims(), ctx.attacker)


@attack("jku-canary-unknown-kid")
def _jku_kid(ctx: Ctx) -> str:
    header = {"alg": "RS256", "kid": "attacker-1", "jku": ctx.canary_url}
    return resign(header, good_claims(), ctx.attacker)


@attack("x5u-canary")
def _x5u(ctx: Ctx) -> str:
    header = {"alg": "RS256", "kid": "attacker-2", "x5u": ctx.canary_url + "/cert.pem"}
    return resign(header, good_claims(), ctx.attacker)


@attack("jwk-embedded")
def _jwk(ctx: Ctx) -> str:
    header = {"alg": "RS256", "jwk": public_jwk(ctx.attacker, "attacker-3")}
    return resign(header, good_claims(), ctx.attacker)


@attack("jwk-embedded-with-trusted-kid")
def _jwk_kid(ctx: Ctx) -> str:
    header = {"alg": "RS256", "kid": JWKS_KID, "jwk": public_jwk(ctx.attacker, JWKS_KID)}
    return resign(header, good_claims(), ctx.attacker)


@attack("x5c-embedded")
def _x5c(ctx: Ctx) -> str:
    cert = base64.b64encode(self_signed_cert(ctx.attacker)).decode()
    return resign({"alg": "RS256", "x5c": [cert]}, good_claims(), ctx.attacker)


@attack("x5c-embedded-with-kid")
def _x5c_kid(ctx: Ctx) -> str:
    cert = base64.b64encode(self_signed_cert(ctx.attacker)).decode()
    header = {"alg": "RS256", "kid": "attacker-4", "x5c": [cert], "x5u": ctx.canary_url}
    return resign(header, good_claims(), ctx.attacker)


# crit: unknown, b64, empty list, wrong type — refused even when properly signed
for _label, _crit in {
    "unknown": ["x-catalyst-unknown"],
    "b64": ["b64"],
    "empty-list": [],
    "string": "exp",
    "exp": ["exp"],
}.items():
    ATTACKS[f"crit-{_label}"] = lambda ctx, c=_crit: resign(
        {"alg": "RS256", "crit": c, "x-catalyst-unknown": 1}, good_claims(), ctx.key
    )
ATTACKS["crit-b64-false"] = lambda ctx: resign(
    {"alg": "RS256", "crit": ["b64"], "b64": False}, good_claims(), ctx.key
)
ATTACKS["b64-false-without-crit"] = lambda ctx: resign(
    {"alg": "RS256", "b64": False}, good_claims(), ctx.key
)

# claims just past the leeway edge, wrong types, partial iss/aud (properly signed)
_NOW = int(time.time())
for _label, _claims in {
    "exp-past-leeway": {"exp": _NOW - 45},
    "exp-missing": {"exp": None},
    "exp-string": {"exp": str(_NOW + 600)},
    "exp-huge-int": {"exp": 10**400},
    "nbf-past-leeway": {"nbf": _NOW + 120},
    "iat-past-leeway": {"iat": _NOW + 120},
    "nbf-string": {"nbf": "0"},
    "sub-number": {"sub": 1},
    "sub-list": {"sub": ["op-1"]},
    "sub-empty": {"sub": ""},
    "sub-missing": {"sub": None},
    "aud-number": {"aud": 1},
    "aud-substring": {"aud": "catalyst"},
    "aud-extended": {"aud": AUDIENCE + "-evil"},
    "aud-list-substring": {"aud": ["catalyst", "proxy"]},
    "aud-missing": {"aud": None},
    "iss-prefix": {"iss": ISSUER[:-3]},
    "iss-substring": {"iss": "kc.example.test"},
    "iss-extended": {"iss": ISSUER + ".evil.test"},
    "iss-list": {"iss": [ISSUER]},
    "iss-missing": {"iss": None},
}.items():
    ATTACKS[f"claim-{_label}"] = lambda ctx, c=_claims: resign(
        {"alg": "RS256", "typ": "JWT"}, good_claims(**c), ctx.key
    )


# a bridge token (HS256, the bridge secret) replayed as an operator session
@attack("bridge-token-replayed")
def _bridge(ctx: Ctx) -> str:
    return mint(BRIDGE_SECRET, sub="op-1", email="op1@example.test", role="superadmin")


@attack("bridge-secret-hs256-with-operator-claims")
def _bridge_operator(ctx: Ctx) -> str:
    return hmac_token({"alg": "HS256", "typ": "JWT"}, good_claims(), BRIDGE_SECRET)


@attack("bridge-secret-hs256-with-kid")
def _bridge_kid(ctx: Ctx) -> str:
    return hmac_token({"alg": "HS256", "kid": JWKS_KID}, good_claims(), BRIDGE_SECRET)


# shape: not a JWS, JWE, nesting bombs
ATTACKS["shape-two-dots-only"] = lambda ctx: ".."
ATTACKS["shape-four-parts"] = lambda ctx: ctx.valid + ".e30"
ATTACKS["shape-jwe-five-parts"] = lambda ctx: (
    f"{enc({'alg': 'RSA-OAEP', 'enc': 'A256GCM'})}.AAAA.AAAA.AAAA.AAAA"
)
ATTACKS["shape-header-not-json"] = lambda ctx: f"{b64(b'not json')}.{enc(good_claims())}.AAAA"
ATTACKS["shape-header-array"] = lambda ctx: f"{enc(['RS256'])}.{enc(good_claims())}.AAAA"
ATTACKS["shape-payload-array"] = lambda ctx: resign({"alg": "RS256"}, "W10", ctx.key)
ATTACKS["shape-payload-string"] = lambda ctx: resign({"alg": "RS256"}, enc("op-1"), ctx.key)
ATTACKS["shape-payload-invalid-utf8"] = lambda ctx: resign(
    {"alg": "RS256"}, b64(b'{"sub": "\xff\xfe"}'), ctx.key
)
_BOMB = b64(b'{"a":' * 2000 + b"1" + b"}" * 2000)
ATTACKS["shape-header-nesting-bomb"] = lambda ctx: f"{_BOMB}.{enc(good_claims())}.AAAA"
ATTACKS["shape-payload-nesting-bomb"] = lambda ctx: resign(
    {"alg": "RS256"}, b64(b'{"sub":"op-1","x":' + b"[" * 5000 + b"]" * 5000 + b"}"), ctx.key
)
ATTACKS["shape-duplicate-alg-none-last"] = lambda ctx: sign(
    b64(b'{"alg":"RS256","alg":"none"}'), good_claims(), ctx.key
)


ASSURANCE = Assurance()
ATTACK_NAMES = sorted(ATTACKS)


@pytest.mark.parametrize("name", ATTACK_NAMES)
async def test_attack_token_is_refused_everywhere(arena, canary, rsa_key, other_key, name):
    """An attack token is refused (401) on every route via header and cookie; nothing leaves."""
    ctx = Ctx(rsa_key, other_key, canary.url + "/jwks.json")
    token = ATTACKS[name](ctx)
    assert token.isascii()
    assert ";" not in token
    assert " " not in token
    await assert_all_refused(arena, token, canary)


async def test_control_a_good_token_is_accepted_everywhere(arena, canary, rsa_key):
    """Control: the arena accepts a good token (with and without kid) on every route and source."""
    for header in ({"alg": "RS256", "typ": "JWT"}, {"alg": "RS256", "kid": JWKS_KID}):
        token = sign(header, good_claims(), rsa_key)
        for source in SOURCES:
            for method, path in ROUTES:
                status, _, body = await call(arena, method, path, present(source, token))
                assert status == expected_status(method, path, "superadmin"), body
    assert len(arena.sme.received) == 2 * 2 * len(ROUTES)
    assert all(seen.claims["role"] == "superadmin" for seen in arena.sme.received)
    assert canary.connections == 0


async def test_jku_and_jwk_headers_are_ignored_on_a_good_token(arena, canary, rsa_key):
    """Keys never come from the token: ``jku``/``x5u``/``jwk`` on a trusted token change nothing."""
    header = {
        "alg": "RS256",
        "jku": canary.url,
        "x5u": canary.url,
        "jwk": public_jwk(rsa_key, "embedded"),
    }
    token = sign(header, good_claims(), rsa_key)
    status, _, body = await arena.request("POST", **_purchase(token))
    assert status == 200, body
    assert len(arena.sme.received) == 1
    assert canary.connections == 0


def _purchase(token: str) -> dict[str, Any]:
    return {"path": "/api/v1/billing/purchase", "headers": present("header", token),
            "data": b'{"sku": "starter"}'}  # fmt: skip


async def test_attack_tokens_never_reach_the_identity_provider_more_than_once(
    arena, jwks, canary, rsa_key, other_key
):
    """Every attack token in a row costs at most one JWKS fetch in total (rate limit)."""
    ctx = Ctx(rsa_key, other_key, canary.url)
    for name in ATTACK_NAMES:
        status, _, _ = await arena.request("POST", **_purchase(ATTACKS[name](ctx)))
        assert status == 401, name
    assert jwks.fetches <= 2
    assert arena.sme.received == []
    assert canary.connections == 0


# --- role escalation ---------------------------------------------------------------

OPERATOR = "owner@example.test"


@dataclass(frozen=True)
class RoleCase:
    overrides: dict[str, Any]
    role: str
    operator_email: str | None = None


def roles(*names: Any) -> dict[str, Any]:
    return {"realm_access": {"roles": list(names)}}


ESCALATIONS: dict[str, RoleCase] = {
    "roles-string": RoleCase({"realm_access": {"roles": "catalyst-owner"}}, "member"),
    "roles-string-list-lookalike": RoleCase(
        {"realm_access": {"roles": '["catalyst-owner"]'}}, "member"
    ),
    "roles-csv-string": RoleCase({"realm_access": {"roles": "member,catalyst-owner"}}, "member"),
    "roles-with-number": RoleCase(roles("catalyst-owner", 5), "member"),
    "roles-with-null": RoleCase(roles("catalyst-owner", None), "member"),
    "roles-with-bool": RoleCase(roles(True, "catalyst-owner"), "member"),
    "roles-nested-list": RoleCase(roles(["catalyst-owner"]), "member"),
    "roles-with-object": RoleCase(roles({"name": "catalyst-owner"}), "member"),
    "roles-object": RoleCase({"realm_access": {"roles": {"catalyst-owner": True}}}, "member"),
    "roles-null": RoleCase({"realm_access": {"roles": None}}, "member"),
    "realm-access-list": RoleCase({"realm_access": ["catalyst-owner"]}, "member"),
    "realm-access-string": RoleCase({"realm_access": "catalyst-owner"}, "member"),
    "realm-access-null": RoleCase({"realm_access": None}, "member"),
    "realm-access-number": RoleCase({"realm_access": 1}, "member"),
    "role-underscore": RoleCase(roles("catalyst_owner"), "member"),
    "role-suffix": RoleCase(roles("catalyst-owner-x"), "member"),
    "role-prefix": RoleCase(roles("xcatalyst-owner"), "member"),
    "role-plural": RoleCase(roles("catalyst-owners"), "member"),
    "role-zero-width": RoleCase(roles("catalyst\u200b-owner"), "member"),
    "role-trailing-zero-width": RoleCase(roles("catalyst-owner\u200b"), "member"),
    "role-fullwidth": RoleCase(roles("\uff43atalyst-owner"), "member"),
    "role-cyrillic": RoleCase(roles("c\u0430talyst-owner"), "member"),
    "role-nul": RoleCase(roles("catalyst-owner\u0000"), "member"),
    "client-roles-only": RoleCase(
        {
            "realm_access": {"roles": []},
            "resource_access": {"catalyst": {"roles": ["catalyst-owner"]}},
        },
        "member",
    ),
    "top-level-roles": RoleCase({"roles": ["catalyst-owner"], **roles()}, "member"),
    "role-claim": RoleCase({"role": "superadmin", **roles()}, "member"),
    "groups-claim": RoleCase({"groups": ["/catalyst-owner"], **roles()}, "member"),
    "tier-list": RoleCase({"tier": ["owner"], **roles()}, "member"),
    "tier-object": RoleCase({"tier": {"owner": True}, **roles()}, "member"),
    "tier-number": RoleCase({"tier": 1, **roles()}, "member"),
    "tier-bool": RoleCase({"tier": True, **roles()}, "member"),
    "tier-superadmin": RoleCase({"tier": "superadmin", **roles()}, "member"),
    "tier-owners": RoleCase({"tier": "owners", **roles()}, "member"),
    "tier-owner-suffix": RoleCase({"tier": "owner-x", **roles()}, "member"),
    "roles-bad-tier-bad": RoleCase(
        {"realm_access": {"roles": "catalyst-owner"}, "tier": ["owner"]}, "member"
    ),
    # OPERATOR_EMAIL: exact (ASCII case-insensitive, trimmed) and verified only
    "email-suffix-domain": RoleCase(
        {"email": OPERATOR + ".evil.test", **roles()}, "member", OPERATOR
    ),
    "email-prefix-local": RoleCase({"email": "x" + OPERATOR, **roles()}, "member", OPERATOR),
    "email-extra-char": RoleCase({"email": OPERATOR + "x", **roles()}, "member", OPERATOR),
    "email-plus-tag": RoleCase({"email": "owner+x@example.test", **roles()}, "member", OPERATOR),
    "email-double-at": RoleCase({"email": OPERATOR + "@evil.test", **roles()}, "member", OPERATOR),
    "email-list": RoleCase({"email": [OPERATOR], **roles()}, "member", OPERATOR),
    "email-csv": RoleCase({"email": f"{OPERATOR},x@evil.test", **roles()}, "member", OPERATOR),
    "email-cyrillic-a": RoleCase(
        {"email": "owner@ex\u0430mple.test", **roles()}, "member", OPERATOR
    ),
    "email-nul": RoleCase({"email": OPERATOR + "\u0000", **roles()}, "member", OPERATOR),
    "email-zero-width": RoleCase({"email": "\u200b" + OPERATOR, **roles()}, "member", OPERATOR),
    "email-kelvin": RoleCase(
        {"email": "\u212aate@example.test", **roles()}, "member", "kate@example.test"
    ),
    "email-dotted-capital-i": RoleCase(
        {"email": "\u0130ris@example.test", **roles()}, "member", "iris@example.test"
    ),
    "email-unverified": RoleCase(
        {"email": OPERATOR, "email_verified": False, **roles()}, "member", OPERATOR
    ),
    "email-missing": RoleCase({"email": None, **roles()}, "member", OPERATOR),
}

ROLE_TABLE: dict[str, RoleCase] = {
    "owner-role": RoleCase(roles("catalyst-owner"), "superadmin"),
    "owner-role-case-and-space": RoleCase(roles("  Catalyst-OWNER "), "superadmin"),
    "owner-after-other-roles": RoleCase(
        roles("offline_access", "uma_authorization", "catalyst-owner"), "superadmin"
    ),
    "catalyst-admin": RoleCase(roles("catalyst-admin"), "sovereign-admin"),
    "sovereign-admin": RoleCase(roles("sovereign-admin"), "sovereign-admin"),
    "application-admin": RoleCase(roles("Application-Admin"), "sovereign-admin"),
    "default-roles-only": RoleCase(roles("offline_access", "uma_authorization"), "member"),
    "no-roles": RoleCase(roles(), "member"),
    "no-realm-access": RoleCase({"realm_access": None}, "member"),
    "tier-owner": RoleCase({"tier": "owner", **roles()}, "superadmin"),
    "tier-admin": RoleCase({"tier": "admin", **roles()}, "sovereign-admin"),
    "tier-member": RoleCase({"tier": "member", **roles()}, "member"),
    "admin-role-beats-owner-tier": RoleCase(
        {"tier": "owner", **roles("catalyst-admin")}, "sovereign-admin"
    ),
    "bad-roles-fall-back-to-tier": RoleCase(
        {"tier": "owner", "realm_access": {"roles": ["catalyst-owner", 5]}}, "superadmin"
    ),
    "operator-email": RoleCase({"email": OPERATOR, **roles()}, "superadmin", OPERATOR),
    "operator-email-case-and-space": RoleCase(
        {"email": "  Owner@EXAMPLE.test ", **roles()}, "superadmin", OPERATOR
    ),
    "operator-email-verified-absent": RoleCase(
        {"email": OPERATOR, "email_verified": None, **roles()}, "superadmin", OPERATOR
    ),
    "operator-email-setting-case": RoleCase(
        {"email": OPERATOR, **roles()}, "superadmin", " OWNER@example.TEST "
    ),
    "operator-email-unverified-keeps-own-roles": RoleCase(
        {"email": OPERATOR, "email_verified": False, **roles("catalyst-admin")},
        "sovereign-admin",
        OPERATOR,
    ),
    "other-email-with-operator-set": RoleCase(
        {"email": "someone@example.test", **roles()}, "member", OPERATOR
    ),
}


async def _assert_role_everywhere(gateway: Any, key: rsa.RSAPrivateKey, case: RoleCase) -> None:
    gw = await gateway(operator_email=case.operator_email)
    token = sign({"alg": "RS256", "typ": "JWT"}, claims(**case.overrides), key)
    for source in SOURCES:
        for method, path in ROUTES:
            before = len(gw.sme.received)
            status, _, body = await call(gw, method, path, present(source, token))
            where = f"{source} {method} {path}"
            assert status == expected_status(method, path, case.role), (where, status, body)
            assert len(gw.sme.received) == before + 1, where
            seen = gw.sme.received[-1]
            assert seen.claims is not None, where
            assert seen.claims["role"] == case.role, where
    metrics = await gw.metrics_text()
    assert 'status="5' not in metrics


@pytest.mark.parametrize("name", sorted(ESCALATIONS))
async def test_role_escalation_attempt_maps_to_member(gateway, rsa_key, name):
    """Hostile role claim shapes never raise the role, on every route and source, and never 5xx."""
    await _assert_role_everywhere(gateway, rsa_key, ESCALATIONS[name])


@pytest.mark.parametrize("name", sorted(ROLE_TABLE))
async def test_role_table(gateway, rsa_key, name):
    """The contract's role table, asserted on the bridge token the upstream received."""
    await _assert_role_everywhere(gateway, rsa_key, ROLE_TABLE[name])
