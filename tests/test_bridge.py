"""The bridge (reference.md: Role mapping and the bridge token): role, claims, secret sources."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from structlog.testing import capture_logs

from catalyst_proxy.app import create_app
from catalyst_proxy.bridge import BRIDGE_TTL_SECONDS, BridgeSecret, hmac_sha256, map_role, mint
from catalyst_proxy.config import Settings

from .conftest import BRIDGE_SECRET
from .support import start_gateway
from .test_breaker import out_of_descriptors

PURCHASE = "/api/v1/billing/purchase"


def claims_seen(received: Any, secret: bytes = BRIDGE_SECRET) -> dict[str, Any]:
    """The bridge token the SME stand-in received, verified with ``secret``."""
    scheme, token = received.headers["Authorization"].split(" ")
    assert scheme == "Bearer"
    return dict(jwt.decode(token, secret, algorithms=["HS256"]))


def segment(token: str, index: int) -> bytes:
    part = token.split(".")[index]
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


ROLE_TABLE: list[tuple[dict[str, Any], str]] = [
    ({"realm_access": {"roles": ["catalyst-owner"]}}, "superadmin"),
    ({"realm_access": {"roles": [" Catalyst-Owner "]}}, "superadmin"),
    ({"realm_access": {"roles": ["catalyst-admin"]}}, "sovereign-admin"),
    ({"realm_access": {"roles": ["sovereign-admin"]}}, "sovereign-admin"),
    ({"realm_access": {"roles": ["APPLICATION-ADMIN"]}}, "sovereign-admin"),
    ({"realm_access": {"roles": ["offline_access", "catalyst-admin", "catalyst-owner"]}},
     "sovereign-admin"),
    ({"realm_access": {"roles": ["catalyst-owner", "catalyst-admin"]}}, "superadmin"),
    ({"realm_access": {"roles": ["uma_authorization"]}}, "member"),
    ({"realm_access": {"roles": []}}, "member"),
    ({}, "member"),
    ({"tier": "owner"}, "superadmin"),
    ({"tier": " Owner "}, "superadmin"),
    ({"tier": "admin"}, "sovereign-admin"),
    ({"tier": "member"}, "member"),
    ({"tier": "superadmin"}, "member"),
    ({"realm_access": {"roles": ["catalyst-admin"]}, "tier": "owner"}, "sovereign-admin"),
    ({"realm_access": {"roles": ["viewer"]}, "tier": "admin"}, "sovereign-admin"),
    ({"realm_access": {"roles": "catalyst-owner"}}, "member"),
    ({"realm_access": {"roles": ["catalyst-owner", 1]}}, "member"),
    ({"realm_access": {"roles": [None, "catalyst-admin"]}}, "member"),
    ({"realm_access": ["catalyst-owner"]}, "member"),
    ({"realm_access": "catalyst-owner"}, "member"),
    ({"realm_access": None, "tier": "admin"}, "sovereign-admin"),
    ({"tier": ["owner"]}, "member"),
    ({"tier": {"name": "owner"}}, "member"),
    ({"tier": 1}, "member"),
    ({"realm_access": {"roles": ["catalyst-owner-lite", "xcatalyst-admin"]}}, "member"),
    # trimmed of ASCII white space and case-folded in ASCII only: look-alikes never match
    ({"realm_access": {"roles": ["catalyst-owner\u00a0"]}}, "member"),
    ({"realm_access": {"roles": ["\u3000catalyst-admin"]}}, "member"),
    ({"realm_access": {"roles": ["\tcatalyst-admin\r\n"]}}, "sovereign-admin"),
    ({"realm_access": {"roles": ["application-admın"]}}, "member"),  # dotless i
    ({"tier": "owner\u2028"}, "member"),
    ({"tier": "OWNER\x0b"}, "superadmin"),
    ({"resource_access": {"console": {"roles": ["catalyst-owner"]}}}, "member"),
]  # fmt: skip


@pytest.mark.parametrize(("claims", "role"), ROLE_TABLE)
def test_map_role(claims, role):
    """map_role follows the contract's table; claims of the wrong type count as absent."""
    assert map_role(claims) == role
    assert map_role({**claims, "email": "x@example.test"}, operator_email=None) == role


@pytest.mark.parametrize(
    ("realm_roles", "tier", "role"),
    [
        (["catalyst-owner"], None, "superadmin"),
        (["Sovereign-Admin"], None, "sovereign-admin"),
        (["offline_access"], "admin", "sovereign-admin"),
        ([], "owner", "superadmin"),
        (["offline_access"], None, "member"),
    ],
)
async def test_role_reaches_the_bridge_token(gateway, token, realm_roles, tier, role):
    """The role the SME stand-in receives is the role the table maps the session to."""
    gw = await gateway()
    status, _, _ = await gw.request(
        "GET",
        "/api/v1/sme/billing/vouchers/list",
        headers={"Authorization": f"Bearer {token(realm_roles=realm_roles, tier=tier)}"},
    )
    assert status == 200
    assert claims_seen(gw.sme.received[0])["role"] == role


async def test_member_cannot_issue_vouchers_upstream(gateway, token):
    """A member's bridge token gets the SME gateway's own 403 on issuing vouchers."""
    gw = await gateway()
    status, _, body = await gw.request(
        "POST",
        "/api/v1/sme/billing/vouchers/issue",
        headers={"Authorization": f"Bearer {token(realm_roles=[])}"},
        data=b"{}",
    )
    assert (status, json.loads(body)) == (403, {"error": "forbidden"})
    assert claims_seen(gw.sme.received[0])["role"] == "member"


OWNER = "owner@example.test"


@pytest.mark.parametrize(
    ("email", "extra", "stamped"),
    [
        ("owner@example.test", {}, True),
        ("OWNER@Example.TEST", {}, True),
        ("  owner@example.test ", {}, True),
        ("owner@example.test", {"email_verified": True}, True),
        ("owner@example.test", {"email_verified": False}, False),
        ("owner@example.test.evil.test", {}, False),
        ("evil-owner@example.test", {}, False),
        ("owner@example.tes", {}, False),
        ("owner@example.test\x00", {}, False),
        ("owner@exampl\u0435.test", {}, False),  # Cyrillic ie, not e
        ("owner@example.\u0130est".lower(), {}, False),
        ("owner@example.test,other@example.test", {}, False),
        ("\towner@example.test\r\n", {}, True),  # ASCII white space is trimmed
        ("owner@example.test\u00a0", {}, False),  # other white space is not
        ("\u3000owner@example.test", {}, False),
        ("owner@example.test\u2028", {}, False),
        ("owner@example.test\x1f", {}, False),
        ("owner@example.test\x85", {}, False),
    ],
)
def test_operator_email_stamping(email, extra, stamped):
    """OPERATOR_EMAIL makes its owner superadmin: ASCII case-insensitive, trimmed, exact only."""
    claims = {"email": email, "realm_access": {"roles": []}, **extra}
    assert map_role(claims, operator_email=OWNER) == ("superadmin" if stamped else "member")


def test_operator_email_setting_is_trimmed_and_case_folded():
    """The OPERATOR_EMAIL value itself is compared trimmed and case-insensitively."""
    assert map_role({"email": "owner@example.test"}, operator_email=" Owner@Example.Test ") == (
        "superadmin"
    )
    assert map_role({"email": "owner@example.test"}, operator_email="") == "member"
    assert map_role({"email": 42}, operator_email="42") == "member"
    assert map_role({}, operator_email=OWNER) == "member"


def test_kelvin_sign_is_not_k():
    """Unicode case folding never creates a match (the Kelvin sign is not 'k')."""
    assert map_role({"email": "\u212aate@example.test"}, operator_email="kate@example.test") == (
        "member"
    )


async def test_operator_email_end_to_end(gateway, token):
    """The operator named by OPERATOR_EMAIL reaches the SME gateway as superadmin."""
    gw = await gateway(operator_email="Owner@Example.test")
    for email, extra in (
        ("owner@example.test", {}),
        ("owner@example.test", {"email_verified": False}),
    ):
        headers = {"Authorization": f"Bearer {token(email=email, realm_roles=[], extra=extra)}"}
        status, _, _ = await gw.request("POST", PURCHASE, headers=headers, data=b"{}")
        assert status == 200
    roles = [claims_seen(r)["role"] for r in gw.sme.received]
    assert roles == ["superadmin", "member"]


async def test_every_bridge_claim(gateway, token):
    """The bridge token: exact header, sub, email, role, iat, exp = iat + 300, typ, random jti."""
    gw = await gateway()
    headers = {
        "Authorization": f"Bearer {token(sub='op-42', email='op42@example.test', tier='admin')}"
    }
    before = int(time.time())
    for _ in range(3):
        status, response_headers, body = await gw.request("POST", PURCHASE, headers=headers)
        assert status == 200
    after = int(time.time())
    tokens = [r.headers["Authorization"].split(" ")[1] for r in gw.sme.received]
    jtis = set()
    for bridge in tokens:
        assert segment(bridge, 0) == b'{"alg":"HS256","typ":"JWT"}'
        claims = json.loads(segment(bridge, 1))
        assert set(claims) == {"sub", "email", "role", "iat", "exp", "typ", "jti"}
        assert claims["sub"] == "op-42"
        assert claims["email"] == "op42@example.test"
        assert claims["role"] == "sovereign-admin"
        assert before <= claims["iat"] <= after
        assert claims["exp"] == claims["iat"] + 300 == claims["iat"] + BRIDGE_TTL_SECONDS
        assert claims["typ"] == "session"
        assert isinstance(claims["jti"], str)
        assert len(claims["jti"]) >= 16
        jtis.add(claims["jti"])
        assert claims_seen_token(bridge) == claims
        assert bridge not in body.decode()
        assert bridge not in str(dict(response_headers))
    assert len(jtis) == 3


@pytest.mark.parametrize("size", [1, 31, 32, 63, 64, 65, 128, 1000])
def test_hmac_is_rfc_2104_for_keys_of_every_size(size):
    """hmac_sha256() equals the standard library's HMAC-SHA256 for keys shorter than,
    equal to and longer than SHA-256's 64-byte block (hashed first), on messages of
    several lengths, and prepared states are never changed by a call."""
    secret = bytes(range(256))[:size] if size <= 256 else b"\xa5" * size
    for message in (b"", b"x", b"m" * 55, b"m" * 64, b"m" * 1000):
        expected = hmac.new(secret, message, hashlib.sha256).digest()
        assert hmac_sha256(secret, message) == expected
        assert hmac_sha256(secret, message) == expected  # the same again: states untouched


def claims_seen_token(bridge: str) -> dict[str, Any]:
    return dict(jwt.decode(bridge, BRIDGE_SECRET, algorithms=["HS256"]))


def test_mint_is_a_valid_hs256_jws():
    """mint() makes a compact HS256 JWS that PyJWT verifies with the secret."""
    bridge = mint(b"k" * 32, sub="s", email=None, role="member", now=1_000_000)
    claims = jwt.decode(bridge, b"k" * 32, algorithms=["HS256"], options={"verify_exp": False})
    assert claims["iat"] == 1_000_000
    assert claims["exp"] == 1_000_300
    assert claims["email"] == ""
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(bridge, b"x" * 32, algorithms=["HS256"], options={"verify_exp": False})


# --- the secret's sources ---------------------------------------------------------------------


async def gateway_from_env(env: dict[str, str], sme_url: str, public_key_file: Path) -> Any:
    """A gateway configured the way `serve` configures it: from an environment mapping."""
    settings = Settings.from_env(
        {
            "CATALYST_SME_GATEWAY_URL": sme_url,
            "CATALYST_SESSION_PUBLIC_KEY_FILE": str(public_key_file),
            **env,
        }
    )
    return await start_gateway(create_app(settings))


@pytest.mark.parametrize(
    "env",
    [
        {"CATALYST_SME_JWT_SECRET": BRIDGE_SECRET.decode()},
        {"CATALYST_ORG_JWT_SECRET": BRIDGE_SECRET.decode()},
        {"CATALYST_SME_JWT_SECRET": BRIDGE_SECRET.decode(), "CATALYST_ORG_JWT_SECRET": "wrong"},
        {"CATALYST_SME_JWT_SECRET": BRIDGE_SECRET.decode(), "CATALYST_SME_JWT_SECRET_FILE": "/x"},
    ],
    ids=["sme", "org", "sme-over-org", "sme-over-file"],
)
async def test_secret_from_environment(sme, public_key_file, bearer, env):
    """CATALYST_SME_JWT_SECRET, else CATALYST_ORG_JWT_SECRET, signs the bridge token."""
    stand_in, url = sme
    gw = await gateway_from_env(env, url, public_key_file)
    try:
        status, _, body = await gw.request("POST", PURCHASE, headers=bearer(), data=b"{}")
    finally:
        await gw.close()
    assert status == 200, body
    assert claims_seen(stand_in.received[0])["sub"] == "op-1"


async def test_secret_from_file(sme, public_key_file, bearer, tmp_path):
    """CATALYST_SME_JWT_SECRET_FILE (trailing newline trimmed) signs the bridge token."""
    stand_in, url = sme
    secret_file = tmp_path / "JWT_SECRET"
    secret_file.write_bytes(BRIDGE_SECRET + b"\n")
    gw = await gateway_from_env(
        {"CATALYST_SME_JWT_SECRET_FILE": str(secret_file)}, url, public_key_file
    )
    try:
        status, _, _ = await gw.request("POST", PURCHASE, headers=bearer(), data=b"{}")
    finally:
        await gw.close()
    assert status == 200
    claims_seen(stand_in.received[0])


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_secret_file_is_rechecked_at_most_once_per_interval(tmp_path):
    """The file is read at most once per interval; a change is picked up after it."""
    path = tmp_path / "JWT_SECRET"
    path.write_bytes(b"first-secret")
    clock = Clock()
    secret = BridgeSecret(path=str(path), clock=clock, interval=1.0)
    assert secret.get() == b"first-secret"
    replace_file(path, b"second-secret")
    clock.now += 0.5
    assert secret.get() == b"first-secret"
    clock.now += 0.5
    assert secret.get() == b"second-secret"
    assert secret.get(now=clock.now + 0.1) == b"second-secret"


def test_a_secret_file_this_process_cannot_open_for_want_of_descriptors_stays(tmp_path):
    """Out of file descriptors (a flood of clients), the secret file cannot be opened: the
    secret read last stands (every purchase was "bridge unwired", 503, the marketplace said
    to be off), where a file gone is no secret at all."""
    path = tmp_path / "JWT_SECRET"
    path.write_bytes(b"the-secret-0123456789-abcdef")
    clock = Clock()
    secret = BridgeSecret(path=str(path), clock=clock, interval=1.0)
    assert secret.get() == b"the-secret-0123456789-abcdef"
    clock.now += 1.0
    with out_of_descriptors():
        assert secret.get() == b"the-secret-0123456789-abcdef"
    assert secret.last_error is not None
    path.unlink()
    clock.now += 1.0
    assert secret.get() is None


def test_a_rewrite_that_keeps_size_and_mtime_is_still_seen(tmp_path):
    """A secret rewritten in place with one of the same length, its mtime put back (a copy
    that keeps times; two rotations within one tick of a coarse clock, where even the ctime
    stays), is picked up: the file's content is what is compared."""
    path = tmp_path / "JWT_SECRET"
    path.write_bytes(b"first-secret-0123456789")
    before = os.stat(path)
    clock = Clock()
    secret = BridgeSecret(path=str(path), clock=clock, interval=1.0)
    assert secret.get() == b"first-secret-0123456789"
    with open(path, "r+b") as file:
        file.write(b"other-secret-9876543210")
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = os.stat(path)
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (
        before.st_ino, before.st_size, before.st_mtime_ns
    )  # fmt: skip
    clock.now += 1
    assert secret.get() == b"other-secret-9876543210"


def replace_file(path: Path, content: bytes) -> None:
    """Rotate the way Kubernetes does: write a new file, then rename it over the old one."""
    new = path.with_suffix(".new")
    new.write_bytes(content)
    os.replace(new, path)


def test_secret_file_missing_empty_and_back(tmp_path):
    """A missing or empty secret file means no secret (with a reason); it comes back when fixed."""
    path = tmp_path / "JWT_SECRET"
    clock = Clock()
    secret = BridgeSecret(path=str(path), clock=clock)
    assert secret.configured
    assert secret.get() is None
    assert "cannot read" in (secret.last_error or "")
    path.write_bytes(b"  \n")
    clock.now += 1
    assert secret.get() is None
    assert secret.last_error == "the secret file is empty"
    replace_file(path, b"now-a-secret\n")
    clock.now += 1
    assert secret.get() == b"now-a-secret"
    assert secret.last_error is None


def test_fixed_secret_wins_over_file(tmp_path):
    """A secret from the environment is used as is; the file is not read."""
    secret = BridgeSecret(b"from-env", str(tmp_path / "absent"))
    assert secret.get() == b"from-env"
    assert secret.last_error is None


async def test_secret_file_rotation_without_restart(gateway, bearer, tmp_path):
    """A rotated secret file signs the next request after the re-check: no restart needed."""
    path = tmp_path / "JWT_SECRET"
    path.write_bytes(BRIDGE_SECRET)
    clock = Clock()
    gw = await gateway(bridge_secret=None, bridge_secret_file=str(path), monotonic=clock)
    status, _, _ = await gw.request("POST", PURCHASE, headers=bearer(), data=b"{}")
    assert status == 200
    claims_seen(gw.sme.received[-1], BRIDGE_SECRET)

    rotated = b"rotated-bridge-secret-0123456789abcdef"
    replace_file(path, rotated)
    gw.sme.secret = rotated  # the SME gateway rotated too
    clock.now += 1.0
    status, _, _ = await gw.request("POST", PURCHASE, headers=bearer(), data=b"{}")
    assert status == 200
    claims_seen(gw.sme.received[-1], rotated)
    assert len(gw.sme.received) == 2


@pytest.mark.parametrize(
    "overrides",
    [
        {"bridge_secret": None},
        {"bridge_secret": None, "bridge_secret_file": "/nonexistent/JWT_SECRET"},
    ],
    ids=["unset", "unreadable-file"],
)
async def test_no_secret_is_503_unwired(gateway, bearer, overrides):
    """Without a bridge secret: 503 sme-jwt-bridge-unwired with a detail, nothing upstream."""
    gw = await gateway(**overrides)
    for method, path in (("POST", PURCHASE), ("DELETE", "/api/v1/sme/billing/vouchers/revoke/V")):
        status, _, body = await gw.request(method, path, headers=bearer(), data=b"{}")
        answer = json.loads(body)
        assert status == 503
        assert answer["error"] == "sme-jwt-bridge-unwired"
        assert isinstance(answer["detail"], str)
        assert answer["detail"]
        assert set(answer) == {"error", "detail"}
    assert gw.sme.received == []


async def test_unwired_is_checked_after_the_session(gateway):
    """No session and no secret: the session is checked first (401), nothing upstream."""
    gw = await gateway(bridge_secret=None)
    status, _, body = await gw.request("POST", PURCHASE, data=b"{}")
    assert (status, json.loads(body)["error"]) == (401, "unauthenticated")
    assert gw.sme.received == []


def test_short_secret_warns_at_start_up():
    """A secret under 32 bytes is accepted, with a warning that does not show the secret."""
    with capture_logs() as logs:
        create_app(Settings(jwks_url="http://k/j", bridge_secret=b"shorty"))
    warnings = [entry for entry in logs if entry["event"] == "bridge_secret.short"]
    assert len(warnings) == 1
    assert warnings[0]["length"] == 6
    assert warnings[0]["log_level"] == "warning"
    assert "shorty" not in repr(logs)


def test_short_secret_file_warns_when_read(tmp_path):
    """A short secret read from the file warns too, once per change of the file."""
    path = tmp_path / "JWT_SECRET"
    path.write_bytes(b"short-file-secret")
    clock = Clock()
    with capture_logs() as logs:
        secret = BridgeSecret(path=str(path), clock=clock)
        assert secret.get() == b"short-file-secret"
        clock.now += 5
        assert secret.get() == b"short-file-secret"
    assert [entry["event"] for entry in logs] == ["bridge_secret.short"]
    assert "short-file-secret" not in repr(logs)


def test_short_secret_file_warns_at_start_up(tmp_path):
    """A short secret in CATALYST_SME_JWT_SECRET_FILE is said at start-up too (the file is read
    when the app is made), not only once the first request or probe reads it."""
    path = tmp_path / "JWT_SECRET"
    path.write_bytes(b"short-file-secret")
    with capture_logs() as logs:
        create_app(Settings(jwks_url="http://k/j", bridge_secret_file=str(path)))
    warnings = [entry for entry in logs if entry["event"] == "bridge_secret.short"]
    assert len(warnings) == 1
    assert warnings[0]["source"] == "file"
    assert "short-file-secret" not in repr(logs)


def test_long_secret_does_not_warn():
    """A secret of 32 bytes or more starts without a warning."""
    with capture_logs() as logs:
        create_app(Settings(jwks_url="http://k/j", bridge_secret=b"x" * 32))
    assert logs == []


@pytest.mark.parametrize(
    "sub", ["plain", 'quo"te', "back\\slash", "line\nbreak", "\u2028sep", "é ü 中文", "\x00nul"]
)
def test_minted_claims_survive_any_characters(sub):
    """Subjects and emails with quotes, escapes, separators or non-ASCII decode unchanged."""
    from catalyst_proxy.bridge import mint

    token = mint(b"s" * 32, sub=sub, email=f"{sub}@x", role="member", now=1_000_000)
    claims = jwt.decode(token, b"s" * 32, algorithms=["HS256"], options={"verify_exp": False})
    assert claims["sub"] == sub
    assert claims["email"] == f"{sub}@x"
    assert (claims["iat"], claims["exp"], claims["typ"]) == (1_000_000, 1_000_300, "session")
