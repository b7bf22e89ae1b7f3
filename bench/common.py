"""Shared pieces of bench.py and soak.py: keys, tokens, processes, /proc readings.

Only the standard library, the project's own dependencies (aiohttp, PyJWT,
cryptography) and ``catalyst_proxy.devtools.keys`` are used, so both scripts run
from the project's venv with nothing else installed.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt

from catalyst_proxy.devtools.keys import new_private_key, operator_token, public_pem

ROOT = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")

# (realm roles, tier) of the bench operators, in turn, and the role the contract maps them to.
PROFILES: tuple[tuple[tuple[str, ...], str | None, str], ...] = (
    (("catalyst-owner",), None, "superadmin"),
    (("sovereign-admin", "offline_access"), None, "sovereign-admin"),
    (("offline_access",), None, "member"),
    ((), "admin", "sovereign-admin"),
)


@dataclass(frozen=True)
class Operator:
    sub: str
    email: str
    role: str  # what the bridge token must say
    token: str


@dataclass(frozen=True)
class Material:
    """Keys, secret and operator tokens written under ``workdir`` for one run."""

    workdir: Path
    public_key_file: Path
    secret: str
    operators: tuple[Operator, ...]
    bad_tokens: Mapping[str, str]

    def by_sub(self) -> dict[str, Operator]:
        return {op.sub: op for op in self.operators}


def make_material(workdir: Path, count: int, *, ttl: float = 6 * 3600) -> Material:
    """A fresh RSA key pair, a 48-byte bridge secret and ``count`` distinct operator tokens."""
    workdir.mkdir(parents=True, exist_ok=True)
    key = new_private_key()
    other = new_private_key()
    public = workdir / "public.pem"
    public.write_bytes(public_pem(key))
    operators = []
    for index in range(count):
        roles, tier, role = PROFILES[index % len(PROFILES)]
        sub = f"bench-op-{index:04d}"
        email = f"op{index:04d}@bench.example"
        token = operator_token(
            key,
            sub=sub,
            email=email,
            realm_roles=roles,
            tier=tier,
            ttl=ttl,
            iss="https://bench.catalyst.invalid/realms/sovereign",
            # Keycloak-sized: real session tokens carry ~1 KB of claims.
            extra={"azp": "catalyst-console", "scope": "openid email profile", "pad": "x" * 500},
        )
        operators.append(Operator(sub, email, role, token))
    now = time.time()
    bad = {
        "expired": operator_token(key, sub="bench-expired", ttl=60, now=now - 3600),
        "wrong-key": operator_token(other, sub="bench-op-0000", email="op0000@bench.example"),
        "hs256": jwt.encode({"sub": "bench-op-0000", "exp": int(now) + 600}, "k" * 32, "HS256"),
        "junk": "not-a-token",
    }
    (workdir / "tokens.txt").write_text("".join(op.token + "\n" for op in operators))
    return Material(workdir, public, secrets.token_urlsafe(48), tuple(operators), bad)


def gateway_env(material: Material, upstream_url: str, **extra: str) -> dict[str, str]:
    """The environment for ``catalyst-proxy serve``: ours, and no stray CATALYST_* settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CATALYST_", "OPERATOR_"))}
    env.update(
        CATALYST_SESSION_PUBLIC_KEY_FILE=str(material.public_key_file),
        CATALYST_SME_JWT_SECRET=material.secret,
        CATALYST_SME_GATEWAY_URL=upstream_url,
        **extra,
    )
    return env


def verify_bridge(token: str, material: Material) -> str | None:
    """None if ``token`` is a bridge token the contract allows for one of our operators."""
    try:
        header = jwt.get_unverified_header(token)
        claims = jwt.decode(
            token, material.secret, algorithms=["HS256"], options={"verify_exp": True}
        )
    except jwt.PyJWTError as exc:
        return f"does not verify: {type(exc).__name__}"
    if header.get("alg") != "HS256":
        return f"alg {header.get('alg')!r}"
    if claims.get("typ") != "session":
        return f"typ {claims.get('typ')!r}"
    if claims.get("exp") != claims.get("iat", 0) + 300:
        return "exp is not iat + 300"
    if not claims.get("jti"):
        return "no jti"
    op = material.by_sub().get(claims.get("sub", ""))
    if op is None:
        return "sub is not one of the bench operators"
    if claims.get("email") != op.email or claims.get("role") != op.role:
        return f"email/role {claims.get('email')!r}/{claims.get('role')!r} for {op.sub}"
    return None


# ------------------------------------------------------------------ processes


def start(
    argv: Sequence[str], log: Path, env: Mapping[str, str] | None = None, err: Path | None = None
) -> subprocess.Popen[bytes]:
    """Start ``argv`` in its own process group, stdout (and stderr unless ``err``) to files."""
    out = log.open("wb")
    errf = err.open("wb") if err else subprocess.STDOUT
    try:
        return subprocess.Popen(
            list(argv),
            stdout=out,
            stderr=errf,
            stdin=subprocess.DEVNULL,
            env=dict(env) if env is not None else None,
            start_new_session=True,
        )
    finally:
        out.close()
        if err:
            errf.close()  # type: ignore[union-attr]


def start_upstream(work: Path, port: int) -> subprocess.Popen[bytes]:
    """nginx as the fast upstream stand-in (``bench/upstream.nginx.conf``) on ``port``."""
    conf = (ROOT / "bench" / "upstream.nginx.conf").read_text()
    conf = conf.replace("@DIR@", str(work)).replace("@PORT@", str(port))
    (work / "ngx").mkdir(exist_ok=True)
    (work / "upstream.conf").write_text(conf)
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    upstream = start(
        [nginx, "-e", str(work / "upstream.error.log"), "-p", str(work), "-c",
         str(work / "upstream.conf")],
        work / "upstream.out",
    )  # fmt: skip
    wait_http(f"http://127.0.0.1:{port}/__stats", upstream, 10)
    return upstream


def stop(proc: subprocess.Popen[bytes], timeout: float = 15) -> int | None:
    """SIGTERM (the graceful path), then SIGKILL of the process group after ``timeout``."""
    if proc.poll() is not None:
        return proc.returncode
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        return proc.wait(5)


def tree(pid: int) -> list[int]:
    """``pid`` and its descendants (read from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rpartition(")")[2].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, ()))
    return out


def cpu_seconds(pids: Iterable[int]) -> float:
    """utime + stime of the live processes ``pids``, in seconds."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return total / CLK_TCK


def status_kb(pid: int, field: str) -> int:
    """A ``kB`` field of /proc/<pid>/status (VmRSS, VmHWM, ...), 0 if gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def fd_count(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


def machine_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine, from /proc/stat."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + values[4]
    total = sum(values[:8])
    return (total - idle) / CLK_TCK, total / CLK_TCK


def http_get(url: str, timeout: float = 2) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 (our URLs)
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def wait_http(url: str, proc: subprocess.Popen[bytes] | None, seconds: float = 30) -> None:
    """Until ``url`` answers 200; fail early if ``proc`` exits."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"{proc.args!r} exited with {proc.returncode} before {url} answered")
        try:
            if http_get(url, 1)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"{url} did not answer 200 within {seconds:g} s")


def git_state() -> str:
    """``<short commit>`` plus ``with uncommitted changes`` when catalyst_proxy/ differs."""

    def git(*args: str) -> str:
        try:
            return subprocess.run(
                ["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=10
            ).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown commit"
    dirty = git("status", "--porcelain", "catalyst_proxy")
    return commit + (" with uncommitted changes in catalyst_proxy/" if dirty else "")


def describe_git(at_start: str) -> str:
    """The commit measured; says so when the checkout moved while the run was going."""
    now = git_state()
    return at_start if now == at_start else f"{at_start} (at the start; now {now})"


def versions() -> dict[str, str]:
    import aiohttp

    out = {"python": sys.version.split()[0], "aiohttp": aiohttp.__version__}
    try:
        out["uvloop"] = importlib.metadata.version("uvloop")
    except importlib.metadata.PackageNotFoundError:
        out["uvloop"] = "absent"
    return out


def dump(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=1, default=str))
