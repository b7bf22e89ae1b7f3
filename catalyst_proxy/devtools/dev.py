"""``catalyst-proxy dev``: the whole thing on one laptop, with nothing to set up.

1. make an RSA key pair and a bridge secret in a temporary folder;
2. start the SME stand-in on a free port of 127.0.0.1;
3. start the gateway in front of it, configured as in production;
4. print operator tokens and ready-to-paste ``curl`` lines.
"""

from __future__ import annotations

import secrets
import shlex
import shutil
import socket
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

from aiohttp import web

from ..app import create_app
from ..config import Settings
from ..server import serve
from .keys import keygen, load_private_key, operator_token
from .sme import SME

OWNER_EMAIL = "owner@dev.example"


async def run(port: int, host: str = "127.0.0.1", *, redis_url: str | None = None) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="catalyst-dev-"))
    kid = keygen(workdir)
    secret = secrets.token_urlsafe(32)
    (workdir / "bridge.secret").write_text(secret + "\n")

    sme = SME(secret.encode())
    sme_runner = web.AppRunner(sme.app(), access_log=None)
    await sme_runner.setup()
    sme_site = web.SockSite(sme_runner, _listen("127.0.0.1", 0))
    await sme_site.start()
    sme_url = sme_site.name.rstrip("/")

    settings = Settings(
        gateway_url=sme_url,
        public_key_file=str(workdir / "public.pem"),
        bridge_secret=secret.encode(),
        log_format="console",
        redis_url=redis_url,
    )
    key = load_private_key(workdir / "private.pem")
    owner = operator_token(
        key, sub="dev-owner", email=OWNER_EMAIL, realm_roles=["catalyst-owner"], ttl=12 * 3600
    )
    member = operator_token(
        key, sub="dev-member", email="member@dev.example", realm_roles=[], ttl=12 * 3600
    )
    try:
        await serve(
            create_app(settings),
            host,
            port,
            # flush: stdout may be a pipe (`| tee`), and the banner is what the user waits for
            on_ready=lambda bound: print(
                _banner(bound, sme_url, workdir, kid, owner, member, redis_url), flush=True
            ),
        )
    finally:
        await sme_runner.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)  # the keys and secret were for this run only


def _listen(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    return sock


def _banner(
    port: int,
    sme_url: str,
    workdir: Path,
    kid: str,
    owner: str,
    member: str,
    redis_url: str | None = None,
) -> str:
    base = f"http://127.0.0.1:{port}"
    json_body = "-H 'Content-Type: application/json'"
    auth = '-H "Authorization: Bearer $CATALYST_TOKEN"'
    purchase = shlex.quote('{"sku": "starter", "quantity": 1}')
    issue = shlex.quote('{"code": "WELCOME10", "amount_cents": 1000}')
    return f"""
catalyst-proxy dev is running.
  gateway        {base}
  SME stand-in   {sme_url}
  keys, secret   {workdir}  (kid {kid})
  shared store   {_store(redis_url)}

An operator token (realm role catalyst-owner → SME role superadmin), valid 12 h:

export CATALYST_TOKEN={owner}

A member token (no admin role → SME role member):

export CATALYST_MEMBER_TOKEN={member}

Try (in another shell, after the export):

# purchase
curl -sS -X POST {base}/api/v1/billing/purchase {auth} {json_body} -d {purchase}
# vouchers: issue, list, revoke
curl -sS -X POST {base}/api/v1/sme/billing/vouchers/issue {auth} {json_body} -d {issue}
curl -sS {base}/api/v1/sme/billing/vouchers/list {auth}
curl -sS -X DELETE {base}/api/v1/sme/billing/vouchers/revoke/WELCOME10 {auth}
# a member may not issue vouchers (403 from the SME gateway)
curl -sS -X POST {base}/api/v1/sme/billing/vouchers/issue \\
  -H "Authorization: Bearer $CATALYST_MEMBER_TOKEN" {json_body} -d {issue}
# no token: 401
curl -sS -i -X POST {base}/api/v1/billing/purchase {json_body} -d {purchase}

Health {base}/healthz · readiness {base}/readyz · metrics {base}/metrics
Ctrl-C stops everything.
""".lstrip("\n")


def _store(redis_url: str | None) -> str:
    if redis_url is None:
        return "none (counters and records in this process; try --redis redis://127.0.0.1:6379/0)"
    parts = urlsplit(redis_url)
    return f"{parts.scheme}://{parts.hostname}{f':{parts.port}' if parts.port else ''}{parts.path}"
