"""The command line (reference.md: Command line): keygen, token, errors, and `dev` end to end."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import shlex
import signal
import socket
import stat
import time
from pathlib import Path

import aiohttp
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from catalyst_proxy import cli

from .serve_proc import ServeProcess, child_env, run_cli


def b64url_uint(value: int) -> str:
    raw = value.to_bytes((value.bit_length() + 7) // 8, "big")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def rfc7638_thumbprint(public: rsa.RSAPublicKey) -> str:
    """RFC 7638 §3: SHA-256 of {"e","kty","n"} in lexicographic order, no white space."""
    numbers = public.public_numbers()
    canonical = (
        '{"e":"' + b64url_uint(numbers.e) + '","kty":"RSA","n":"' + b64url_uint(numbers.n) + '"}'
    )
    digest = hashlib.sha256(canonical.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


@pytest.fixture(scope="module")
def keys_dir(tmp_path_factory) -> Path:
    """One `catalyst-proxy keygen` output shared by the token tests."""
    out = tmp_path_factory.mktemp("keys")
    status, _, err = asyncio.run(run_cli("keygen", "--out", str(out)))
    assert status == 0, err
    return out


async def test_keygen_writes_the_three_files(tmp_path):
    """keygen --out DIR writes private.pem (0600), public.pem and jwks.json of one key pair."""
    out = tmp_path / "new" / "keys"
    status, stdout, stderr = await run_cli("keygen", "--out", str(out))
    assert (status, stderr) == (0, "")
    assert sorted(p.name for p in out.iterdir()) == ["jwks.json", "private.pem", "public.pem"]
    assert stat.S_IMODE((out / "private.pem").stat().st_mode) == 0o600
    private = serialization.load_pem_private_key((out / "private.pem").read_bytes(), None)
    public = serialization.load_pem_public_key((out / "public.pem").read_bytes())
    assert isinstance(private, rsa.RSAPrivateKey)
    assert isinstance(public, rsa.RSAPublicKey)
    assert private.public_key().public_numbers() == public.public_numbers()
    assert private.key_size >= 2048

    jwks = json.loads((out / "jwks.json").read_text())
    assert len(jwks["keys"]) == 1
    jwk = jwks["keys"][0]
    assert jwk["kty"] == "RSA"
    assert jwk["kid"] == rfc7638_thumbprint(public)
    assert (jwk["n"], jwk["e"]) == (
        b64url_uint(public.public_numbers().n),
        b64url_uint(public.public_numbers().e),
    )
    assert jwk["kid"] in stdout


async def test_keygen_tightens_an_existing_private_key_file(tmp_path):
    """Re-running keygen over a world-readable private.pem leaves it 0600."""
    (tmp_path / "private.pem").write_text("old")
    (tmp_path / "private.pem").chmod(0o644)
    status, _, _ = await run_cli("keygen", "--out", str(tmp_path))
    assert status == 0
    assert stat.S_IMODE((tmp_path / "private.pem").stat().st_mode) == 0o600


async def test_keygen_replaces_a_link_at_the_key_instead_of_following_it(tmp_path):
    """A symbolic link planted at private.pem (pointing at a file someone else can read) is
    replaced by the new key file; the file it pointed at is left as it was, and no temporary
    file is left behind."""
    out, elsewhere = tmp_path / "keys", tmp_path / "planted"
    out.mkdir()
    elsewhere.write_text("not a key")
    (out / "private.pem").symlink_to(elsewhere)
    status, _, _ = await run_cli("keygen", "--out", str(out))
    assert status == 0
    assert elsewhere.read_text() == "not a key"
    assert not (out / "private.pem").is_symlink()
    assert (out / "private.pem").read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert stat.S_IMODE((out / "private.pem").stat().st_mode) == 0o600
    assert sorted(path.name for path in out.iterdir()) == ["jwks.json", "private.pem", "public.pem"]


async def test_keygen_unwritable_dir_is_one_line(tmp_path):
    """keygen into a path that cannot be a directory exits 2 with one line."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    status, stdout, stderr = await run_cli("keygen", "--out", str(blocker / "sub"))
    assert status == 2
    assert stdout == ""
    assert len(stderr.splitlines()) == 1
    assert "--out" in stderr


async def test_token_verifies_against_the_generated_key(keys_dir):
    """token prints one RS256 token that verifies with keygen's key and carries the claims given."""
    jwk = json.loads((keys_dir / "jwks.json").read_text())["keys"][0]
    before = int(time.time())
    status, stdout, stderr = await run_cli(
        "token", "--key", str(keys_dir / "private.pem"), "--sub", "op-7",
        "--email", "op7@example.test", "--realm-role", "catalyst-admin",
        "--realm-role", "offline_access", "--tier", "admin", "--ttl", "120",
        "--kid=" + jwk["kid"], "--iss", "https://kc.test/realms/sovereign", "--aud", "console",
    )  # fmt: skip
    assert (status, stderr) == (0, "")
    assert stdout.count("\n") == 1
    token = stdout.strip()
    assert jwt.get_unverified_header(token) == {"alg": "RS256", "typ": "JWT", "kid": jwk["kid"]}
    public = jwt.PyJWK(jwk).key
    claims = jwt.decode(
        token,
        public,
        algorithms=["RS256"],
        audience="console",
        issuer="https://kc.test/realms/sovereign",
    )
    assert claims["sub"] == "op-7"
    assert claims["email"] == "op7@example.test"
    assert claims["realm_access"] == {"roles": ["catalyst-admin", "offline_access"]}
    assert claims["tier"] == "admin"
    assert before <= claims["iat"] <= int(time.time())
    assert claims["exp"] - claims["iat"] == 120
    pem_key = serialization.load_pem_public_key((keys_dir / "public.pem").read_bytes())
    jwt.decode(token, pem_key, algorithms=["RS256"], audience="console")  # type: ignore[arg-type]


async def test_token_minimal_arguments(keys_dir):
    """token with only --key, --sub and --email: no kid, no roles, default one-hour lifetime."""
    status, stdout, _ = await run_cli(
        "token", "--key", str(keys_dir / "private.pem"), "--sub", "s", "--email", "e@x.test"
    )
    assert status == 0
    token = stdout.strip()
    assert "kid" not in jwt.get_unverified_header(token)
    pem_key = serialization.load_pem_public_key((keys_dir / "public.pem").read_bytes())
    claims = jwt.decode(token, pem_key, algorithms=["RS256"])  # type: ignore[arg-type]
    assert claims["realm_access"] == {"roles": []}
    assert claims["exp"] - claims["iat"] == 3600
    assert "tier" not in claims
    assert "aud" not in claims
    assert "iss" not in claims


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({}, "CATALYST_JWKS_URL"),
        ({"CATALYST_JWKS_URL": "not-a-url"}, "CATALYST_JWKS_URL"),
        ({"CATALYST_UPSTREAM_TIMEOUT_SECONDS": "soon"}, "CATALYST_UPSTREAM_TIMEOUT_SECONDS"),
        ({"CATALYST_TOKEN_ALGORITHMS": "HS256"}, "CATALYST_TOKEN_ALGORITHMS"),
        ({"CATALYST_MAX_BODY_BYTES": "-1"}, "CATALYST_MAX_BODY_BYTES"),
        ({"CATALYST_LOG_FORMAT": "yaml"}, "CATALYST_LOG_FORMAT"),
        ({"CATALYST_SME_GATEWAY_URL": "gateway:8080"}, "CATALYST_SME_GATEWAY_URL"),
        ({"CATALYST_SESSION_PUBLIC_KEY_FILE": "/nonexistent/public.pem"},
         "CATALYST_SESSION_PUBLIC_KEY_FILE"),
        ({"CATALYST_ROUTES_FILE": "/nonexistent/routes.json"}, "CATALYST_ROUTES_FILE"),
    ],
)  # fmt: skip
async def test_config_error_exits_2_with_one_line(public_key_file, env, variable):
    """A configuration error exits 2 with exactly one stderr line naming the variable."""
    if env and "CATALYST_SESSION_PUBLIC_KEY_FILE" not in env and "JWKS" not in str(env):
        env = {"CATALYST_SESSION_PUBLIC_KEY_FILE": str(public_key_file), **env}
    if "CATALYST_JWKS_URL" in env:
        env = {k: v for k, v in env.items() if k != "CATALYST_SESSION_PUBLIC_KEY_FILE"}
    status, stdout, stderr = await run_cli("serve", "--port", "0", env=env)
    assert status == 2
    assert stdout == ""
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert variable in lines[0]
    assert "Traceback" not in stderr


async def test_config_error_never_echoes_a_secret(public_key_file):
    """The one-line error does not repeat a secret set alongside the bad value."""
    status, _, stderr = await run_cli(
        "serve",
        env={
            "CATALYST_SESSION_PUBLIC_KEY_FILE": str(public_key_file),
            "CATALYST_SME_JWT_SECRET": "cli-secret-value-123",
            "CATALYST_SESSION_COOKIE_SECRET": "cookie-secret-value-123",
            "CATALYST_SHUTDOWN_GRACE_SECONDS": "forever",
        },
    )
    assert status == 2
    assert "secret-value-123" not in stderr


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["launch"],
        ["serve", "--port", "http"],
        ["serve", "--port", "70000"],
        ["serve", "--bogus"],
        ["dev", "--port", "-1"],
        ["keygen"],
        ["token", "--key", "k.pem", "--sub", "s"],
        ["token", "--key", "{private}", "--sub", "", "--email", "e"],
        ["token", "--key", "{private}", "--sub", " ", "--email", "e"],
        ["token", "--key", "{private}", "--sub", "op-\udcff", "--email", "e"],  # not UTF-8
        ["token", "--key", "{private}", "--sub", "s", "--email", "e", "--iss", "i\udcff"],
        ["token", "--key", "k.pem", "--sub", "s", "--email", "e", "--ttl", "0"],
        ["token", "--key", "k.pem", "--sub", "s", "--email", "e", "--ttl", "1h"],
        ["token", "--key", "{private}", "--sub", "s", "--email", "e", "--ttl", "36_00"],
        *(
            ["token", "--key", "{private}", "--sub", "s", "--email", "e", "--ttl", ttl]
            for ttl in ("nan", "inf", "1e309", "1e300", "315360001", "0.5", "1e-300")
        ),  # not finite, or absurd
        ["token", "--key", "/nonexistent/k.pem", "--sub", "s", "--email", "e"],
        ["token", "--key", "pyproject.toml", "--sub", "s", "--email", "e"],
        ["token", "--key", "{public}", "--sub", "s", "--email", "e"],
    ],
)
async def test_usage_error_exits_2_with_one_line(keys_dir, args):
    """A usage error exits 2 with one line on stderr and nothing on stdout."""
    args = [a.replace("{public}", str(keys_dir / "public.pem"))
            .replace("{private}", str(keys_dir / "private.pem")) for a in args]  # fmt: skip
    status, stdout, stderr = await run_cli(*args)
    assert status == 2
    assert stdout == ""
    assert len(stderr.splitlines()) == 1, stderr
    assert "error" in stderr


@pytest.mark.parametrize(
    ("args", "what"),
    [(["--port", "8_080"], "port number"), (["--port", " 8080"], "port number"),
     (["--workers", "\uff12"], "number of workers"), (["--workers", "0x2"], "number of workers")],
)  # fmt: skip
def test_numbers_in_options_are_plain_digits(capsys, args, what):
    """``--port`` and ``--workers`` take ASCII digits only: ``8_080`` or a fullwidth digit is a
    usage error naming the option's kind, not port 8080 or two workers."""
    with pytest.raises(SystemExit) as caught:
        cli._parser().parse_args(["serve", *args])
    assert caught.value.code == 2
    assert what in capsys.readouterr().err


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_a_taken_port_exits_2_with_one_line(public_key_file, workers):
    """``serve`` on a port another socket holds exits 2 with one line naming the port, with
    one worker as with several (never a traceback)."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = str(holder.getsockname()[1])
        status, stdout, stderr = await run_cli(
            "serve", "--host", "127.0.0.1", "--port", port, "--workers", workers,
            env={"CATALYST_SESSION_PUBLIC_KEY_FILE": str(public_key_file)},
        )  # fmt: skip
    assert status == 2
    assert stdout == ""
    assert len(stderr.splitlines()) == 1, stderr
    assert f"--port {port}" in stderr
    assert "Traceback" not in stderr


@pytest.mark.skipif(not socket.has_ipv6, reason="this host has no IPv6 at all")
@pytest.mark.parametrize("workers", ["1", "2"])
async def test_host_ipv6_any_serves_both_families(public_key_file, workers):
    """``serve --host ::`` (what an IPv6-only or IPv6-first cluster needs) listens on both
    families, with one worker as with several: /healthz answers on [::1] and on 127.0.0.1."""
    with socket.socket(socket.AF_INET6) as probe:
        probe.bind(("::", 0))
        port = str(probe.getsockname()[1])
    env = {"CATALYST_SESSION_PUBLIC_KEY_FILE": str(public_key_file)}
    proc = await ServeProcess(["serve", "--host", "::", "--port", port, "--workers", workers],
                              env).start()  # fmt: skip
    try:
        await proc.wait_listening()
        async with aiohttp.ClientSession() as http:
            for host in ("127.0.0.1", "[::1]"):
                async with http.get(f"http://{host}:{port}/healthz") as resp:
                    assert resp.status == 200, host
    finally:
        await proc.stop()


async def test_serve_takes_variables_that_are_not_utf8(public_key_file):
    """``serve`` with bytes that are not UTF-8 in a secret and in the issuer list starts and
    serves (a traceback and exit 1 before: the secret could not be encoded, the start-up
    line could not be written), and its start-up line is one JSON object."""
    env = {
        "CATALYST_SESSION_PUBLIC_KEY_FILE": str(public_key_file),
        "CATALYST_SME_JWT_SECRET": b"\xff\xfe-bridge-secret-0123456789-abcdef".decode(
            "utf-8", "surrogateescape"
        ),
        "CATALYST_TOKEN_ISSUER": b"https://idp.test/\xff".decode("utf-8", "surrogateescape"),
    }
    proc = await ServeProcess(["serve", "--host", "127.0.0.1", "--port", "0"], env).start()
    try:
        base = await proc.wait_listening()
        async with aiohttp.ClientSession() as http, http.get(base + "/readyz") as resp:
            assert resp.status == 200
            assert (await resp.json())["bridge_secret"] == "set"
    finally:
        await proc.stop()
    (startup,) = [line for line in proc.json_lines() if line["event"] == "startup"]
    assert startup["token_issuers"] == ["https://idp.test/\udcff"]


async def test_dev_on_a_taken_port_exits_2_without_a_traceback():
    """``dev`` (what ``make dev`` runs first) on a taken port exits 2 with a line naming the
    port and how to pick another, never a traceback."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = str(holder.getsockname()[1])
        status, _, stderr = await run_cli("dev", "--port", port)
    assert status == 2
    assert "Traceback" not in stderr
    assert f"catalyst-proxy: error: --port {port}:" in stderr.splitlines()[-1]
    assert "PORT=" in stderr.splitlines()[-1]


async def test_version_and_help():
    """--version and --help succeed (exit 0) and print to stdout."""
    status, stdout, _ = await run_cli("--version")
    assert status == 0
    assert stdout.startswith("catalyst-proxy ")
    status, stdout, _ = await run_cli("--help")
    assert status == 0
    for command in ("serve", "dev", "keygen", "token"):
        assert command in stdout


# --- dev ------------------------------------------------------------------------------------


def banner_line(lines: list[str], startswith: str) -> str:
    found = [line for line in lines if line.startswith(startswith)]
    assert len(found) == 1, lines
    return found[0]


async def run_pasted(line: str, token: str) -> tuple[int, str]:
    """Run a printed curl line in a shell, exactly as a user pastes it after the export."""
    proc = await asyncio.create_subprocess_exec(
        "bash", "-c", line,
        env=child_env({"CATALYST_TOKEN": token}),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode() + err.decode()


async def perform(
    http: aiohttp.ClientSession, line: str, tokens: dict[str, str]
) -> tuple[int, str]:
    """Do what a printed curl line asks (-X, -H, -d, the URL) with aiohttp; (status, body)."""
    words = shlex.split(line)
    assert words[0] == "curl"
    method, headers, data, url = "GET", {}, None, None
    words = iter(words[1:])
    for word in words:
        if word == "-X":
            method = next(words)
        elif word == "-H":
            name, _, value = next(words).partition(":")
            for variable, token in tokens.items():
                value = value.replace("$" + variable, token)
            headers[name.strip()] = value.strip()
        elif word == "-d":
            data = next(words).encode()
            method = "POST" if method == "GET" else method
        elif word.startswith("http://"):
            url = word
        else:
            assert word in ("-sS", "-i"), word
    assert url is not None
    async with http.request(method, url, headers=headers, data=data) as resp:
        return resp.status, await resp.text()


async def test_dev_serves_a_purchase_end_to_end():
    """`dev` prints a token and curl lines; the purchase line completes; SIGINT exits 0."""
    dev = await ServeProcess(["dev", "--port", "0"], {}).start()
    try:
        export = await dev.wait_for_line(lambda line: line.startswith("export CATALYST_TOKEN="))
        token = export.split("=", 1)[1]
        await dev.wait_for_line(lambda line: line.startswith("Ctrl-C"))
        lines = dev.stdout_lines
        purchase = lines[lines.index("# purchase") + 1]
        url = next(word for word in shlex.split(purchase) if word.startswith("http://"))
        assert url.endswith("/api/v1/billing/purchase")

        async with aiohttp.ClientSession() as http:
            status, body = await perform(http, purchase, {"CATALYST_TOKEN": token})
            assert status == 200, body
            assert set(json.loads(body)) == {"order_id", "paid_by_credit", "session_url"}
            async with http.post(url, json={"sku": "starter"}) as resp:
                assert resp.status == 401
        # and pasted into a shell, as a user would (curl: tests/test-packages.txt)
        status, output = await run_pasted(purchase, token)
        assert status == 0, output
        assert "order_id" in json.loads(output)
        workdir = next(line for line in lines if "keys, secret" in line).split()[2]
        assert Path(workdir, "private.pem").exists()

        dev.signal(signal.SIGINT)
        assert await dev.wait() == 0
        assert not Path(workdir).exists(), "dev leaves its keys and secret behind"
        assert "Traceback" not in dev.output
    finally:
        await dev.stop()


async def test_dev_voucher_and_member_lines_work():
    """The printed voucher lines issue, list and revoke; the member line gets the SME's 403."""
    dev = await ServeProcess(["dev", "--port", "0"], {}).start()
    try:
        tokens = {}
        for name in ("CATALYST_TOKEN", "CATALYST_MEMBER_TOKEN"):
            line = await dev.wait_for_line(lambda text, n=name: text.startswith(f"export {n}="))
            tokens[name] = line.split("=", 1)[1]
        await dev.wait_for_line(lambda line: line.startswith("Ctrl-C"))
        lines = dev.stdout_lines
        curls = [
            line[:-1] + " " + lines[i + 1] if line.endswith("\\") else line
            for i, line in enumerate(lines)
            if line.startswith("curl ")
        ]
        answers = []
        async with aiohttp.ClientSession() as http:
            for line in curls[1:]:
                answers.append(await perform(http, line, tokens))
        assert [status for status, _ in answers] == [201, 200, 200, 403, 401]
        assert json.loads(answers[0][1])["code"] == "WELCOME10"
        assert json.loads(answers[1][1])["vouchers"][0]["code"] == "WELCOME10"
        assert json.loads(answers[2][1]) == {"code": "WELCOME10", "revoked": True}
        dev.signal(signal.SIGINT)
        assert await dev.wait() == 0
    finally:
        await dev.stop()
