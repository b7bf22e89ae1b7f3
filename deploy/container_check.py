"""Build the container image and run it for real, all on this machine.

    .venv/bin/python deploy/container_check.py      (make container-check; needs root)

1. a stand-in base image: Debian bookworm with python3 and python3-venv, made
   by mmdebstrap and cached under .cache/container/ (later runs reuse it);
2. the wheelhouse, built on the host (deploy/build_wheelhouse.py);
3. a private Docker daemon: its own data root, exec root, socket and pid file
   in a scratch folder, no bridge, no iptables, so it touches no host network
   set-up and no other daemon;
4. ``docker build`` with the classic builder and ``--network none``, so the
   image provably builds without the network;
5. the image run as production runs it: ``--network host`` (all traffic stays
   on 127.0.0.1), read-only root filesystem, user 10001:10001, no
   capabilities, the operator public key mounted read-only, the bridge secret
   from an env file; in front of the SME stand-in started here on 127.0.0.1;
6. checks: image metadata, /healthz, /readyz, a purchase with an operator
   token (200 with an order_id), a request without one (401), /metrics naming
   every metric the chart's alerts use, SIGTERM → exit 0 within the grace, a
   JSON access-log line and no token or secret in the container's output;
   then the image's own default command, in a container with no network at
   all, probed from inside;
7. clean-up: the containers, the SME stand-in, then the daemon by its PID
   and its scratch folder (the base rootfs tarball stays cached).

Every failure names what went wrong; nothing is skipped.
"""
# ruff: noqa: S603, S607  (runs docker, dockerd and mmdebstrap by design)

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache" / "container"
VENV_BIN = Path(sys.executable).parent
RULES_TEMPLATE = ROOT / "deploy/helm/catalyst-proxy/templates/prometheusrule.yaml"

SUITE = "bookworm"
BASE_PACKAGES = ("python3", "python3-venv")
MIRROR = os.environ.get("CATALYST_DEBIAN_MIRROR", "http://deb.debian.org/debian")
SECURITY_MIRROR = os.environ.get(
    "CATALYST_DEBIAN_SECURITY_MIRROR", "http://deb.debian.org/debian-security"
)
DOCKER = os.environ.get("DOCKER") or (
    "/usr/bin/docker" if Path("/usr/bin/docker").exists() else "docker"  # Debian's docker.io
)
BASE_TAG = f"catalyst-proxy-base:{SUITE}-check"
IMAGE_TAG = "catalyst-proxy:check"
UID_GID = "10001:10001"
SHUTDOWN_GRACE = 10
PURCHASE_PATH = "/api/v1/billing/purchase"


class CheckFailed(Exception):
    pass


class Report:
    """Counts the checks and prints one line for each, with its time."""

    def __init__(self) -> None:
        self.passed = 0
        self.started = time.monotonic()

    def ok(self, what: str, since: float | None = None) -> None:
        self.passed += 1
        took = f" ({time.monotonic() - since:.1f}s)" if since is not None else ""
        print(f"  ok  {what}{took}", flush=True)

    def step(self, what: str) -> float:
        print(f"--- {what}", flush=True)
        return time.monotonic()


def run(*args: str, env: dict[str, str] | None = None, timeout: float = 600) -> str:
    done = subprocess.run(
        args,
        stdin=subprocess.DEVNULL,  # CI has none; mmdebstrap would read sources from a pipe
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        check=False,
    )
    if done.returncode != 0:
        raise CheckFailed(
            f"{' '.join(args[:3])} ... exited {done.returncode}\n{done.stdout}{done.stderr}"
        )
    return done.stdout


def preflight() -> None:
    missing = [tool for tool in ("dockerd", "mmdebstrap", DOCKER) if shutil.which(tool) is None]
    if missing:
        raise CheckFailed(
            f"missing {', '.join(missing)}: run deploy/install-ci-packages.sh "
            "(Debian packages docker.io and mmdebstrap)"
        )
    if os.geteuid() != 0:
        raise CheckFailed("must run as root: it starts its own dockerd and runs mmdebstrap")


# --- the base image -----------------------------------------------------------------


def base_tarball(report: Report) -> Path:
    """The mmdebstrap rootfs tarball, made once and cached by its recipe."""
    sources = (
        f"deb {MIRROR} {SUITE} main",
        f"deb {MIRROR} {SUITE}-updates main",
        f"deb {SECURITY_MIRROR} {SUITE}-security main",
    )
    options = (
        "--variant=apt",
        f"--include={','.join(BASE_PACKAGES)}",
        "--aptopt=APT::Install-Recommends false",
        "--dpkgopt=path-exclude=/usr/share/doc/*",
        "--dpkgopt=path-exclude=/usr/share/man/*",
        "--dpkgopt=path-exclude=/usr/share/locale/*",
        "--dpkgopt=path-include=/usr/share/doc/*/copyright",
    )
    recipe = hashlib.sha256(repr((SUITE, options)).encode()).hexdigest()[:12]
    tarball = CACHE / f"base-{SUITE}-{recipe}.tar"
    if tarball.exists():
        report.ok(f"base rootfs cached: {tarball.relative_to(ROOT)}")
        return tarball
    since = report.step(f"mmdebstrap {SUITE} + {' '.join(BASE_PACKAGES)} (cached after this run)")
    CACHE.mkdir(parents=True, exist_ok=True)
    partial = tarball.with_suffix(".partial.tar")
    run("mmdebstrap", "--quiet", *options, SUITE, str(partial), *sources, timeout=1200)
    partial.rename(tarball)
    report.ok(f"base rootfs built: {tarball.relative_to(ROOT)}", since)
    return tarball


# --- a private docker daemon --------------------------------------------------------


class Dockerd:
    """A dockerd of our own: private data root, socket and pid file; no bridge, no iptables."""

    def __init__(self, workdir: Path) -> None:
        self.dir = workdir / "dockerd"
        self.socket = self.dir / "docker.sock"
        self.process: subprocess.Popen[bytes] | None = None
        self.env = {
            **os.environ,
            "DOCKER_HOST": f"unix://{self.socket}",
            "DOCKER_CONFIG": str(self.dir / "client"),  # never the user's ~/.docker
            "DOCKER_BUILDKIT": "0",  # the classic builder: BuildKit is not available here
        }

    def start(self) -> None:
        self.dir.mkdir(parents=True)
        config = self.dir / "daemon.json"
        config.write_text("{}\n")  # ignore the host's /etc/docker/daemon.json
        command = [
            "dockerd",
            f"--config-file={config}",
            "--bridge=none",
            "--iptables=false",
            "--ip6tables=false",
            "--ip-forward=false",
            "--ip-masq=false",
            f"--data-root={self.dir / 'data'}",
            f"--exec-root={self.dir / 'exec'}",
            f"--pidfile={self.dir / 'dockerd.pid'}",
            f"--host=unix://{self.socket}",
        ]
        with open(self.dir / "dockerd.log", "wb") as log:
            self.process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise CheckFailed(f"dockerd exited {self.process.returncode}:\n{self.log_tail()}")
            probe = subprocess.run(
                [DOCKER, "version", "--format", "{{.Server.Version}}"],
                capture_output=True, env=self.env, check=False,
            )  # fmt: skip
            if probe.returncode == 0:
                return
            time.sleep(0.5)
        raise CheckFailed(f"dockerd did not answer on {self.socket} in 60 s:\n{self.log_tail()}")

    def docker(self, *args: str, timeout: float = 600) -> str:
        return run(DOCKER, *args, env=self.env, timeout=timeout)

    def log_tail(self) -> str:
        path = self.dir / "dockerd.log"
        return (
            "\n".join(path.read_text(errors="replace").splitlines()[-20:]) if path.exists() else ""
        )

    def stop(self) -> None:
        """SIGTERM to the daemon we started (by PID), then SIGKILL if it lingers."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)


def unmount_under(path: Path) -> None:
    """Unmount anything a killed daemon left mounted below PATH (deepest first)."""
    prefix = str(path) + "/"
    with open("/proc/self/mounts") as mounts:
        points = [line.split()[1] for line in mounts if line.split()[1].startswith(prefix)]
    for point in sorted(points, key=len, reverse=True):
        subprocess.run(["umount", "-l", point], check=False)


# --- the application side: keys, token, SME stand-in ---------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for_port(port: int, process: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise CheckFailed(f"{what} exited {process.returncode} before listening")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.2)
    raise CheckFailed(f"{what} did not listen on 127.0.0.1:{port} in 30 s")


@contextlib.contextmanager
def sme_stand_in(secret_file: Path, port: int) -> Iterator[None]:
    command = [
        str(VENV_BIN / "python"), "-m", "catalyst_proxy.devtools.sme",
        "--port", str(port), "--secret-file", str(secret_file),
    ]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, process, "the SME stand-in")
        yield
    finally:
        process.terminate()
        process.wait(timeout=10)


def http(
    method: str, url: str, *, token: str | None = None, body: bytes | None = None
) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=body, method=method)  # noqa: S310 (http://127.0.0.1)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    if body is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


# --- the checks ---------------------------------------------------------------------


def build_image(daemon: Dockerd, workdir: Path, tarball: Path, report: Report) -> None:
    since = report.step("wheelhouse and image")
    context = workdir / "context"
    context.mkdir()
    shutil.copy(ROOT / "deploy/Dockerfile", context / "Dockerfile")
    shutil.copy(ROOT / "deploy/.dockerignore", context / ".dockerignore")
    run(str(VENV_BIN / "python"), str(ROOT / "deploy/build_wheelhouse.py"), str(context / "dist"))
    report.ok("wheelhouse built on the host", since)

    since = time.monotonic()
    daemon.docker("import", str(tarball), BASE_TAG)
    report.ok(f"base image imported as {BASE_TAG}", since)

    since = time.monotonic()
    daemon.docker(
        "build", "--network", "none", "--build-arg", f"BASE_IMAGE={BASE_TAG}",
        "--tag", IMAGE_TAG, str(context),
    )  # fmt: skip
    report.ok("docker build (classic builder, --network none)", since)

    config = json.loads(daemon.docker("image", "inspect", IMAGE_TAG))[0]["Config"]
    expected = {
        "User": UID_GID,
        "Entrypoint": ["/opt/venv/bin/catalyst-proxy"],
        "Cmd": ["serve", "--host", "0.0.0.0", "--port", "8080"],
    }
    wrong = {key: config.get(key) for key, value in expected.items() if config.get(key) != value}
    if wrong or "8080/tcp" not in (config.get("ExposedPorts") or {}):
        raise CheckFailed(f"image config differs from {expected} and EXPOSE 8080: {wrong}")
    report.ok("image runs as 10001:10001, exec-form entry point, exposes 8080")


def run_container(daemon: Dockerd, workdir: Path, report: Report) -> None:
    since = report.step("run the image against the SME stand-in on 127.0.0.1")
    keys = workdir / "keys"
    run(str(VENV_BIN / "catalyst-proxy"), "keygen", "--out", str(keys))
    (keys / "public.pem").chmod(0o644)  # readable by uid 10001 in the container
    secret = secrets.token_urlsafe(32)
    secret_file = workdir / "bridge.secret"
    secret_file.write_text(secret + "\n")
    token = run(
        str(VENV_BIN / "catalyst-proxy"), "token", "--key", str(keys / "private.pem"),
        "--sub", "container-check", "--email", "owner@check.example",
        "--realm-role", "catalyst-owner",
    ).strip()  # fmt: skip
    sme_port, proxy_port = free_port(), free_port()
    env_file = workdir / "container.env"  # keeps the secret out of the process list
    env_file.write_text(
        "CATALYST_SESSION_PUBLIC_KEY_FILE=/etc/catalyst-proxy/keys/public.pem\n"
        f"CATALYST_SME_JWT_SECRET={secret}\n"
        f"CATALYST_SME_GATEWAY_URL=http://127.0.0.1:{sme_port}\n"
        f"CATALYST_SHUTDOWN_GRACE_SECONDS={SHUTDOWN_GRACE}\n"
    )
    name = f"catalyst-proxy-check-{os.getpid()}"
    with sme_stand_in(secret_file, sme_port):
        daemon.docker(
            "run", "--detach", "--name", name,
            "--network", "host", "--read-only", "--user", UID_GID,
            "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
            "--env-file", str(env_file),
            "--volume", f"{keys / 'public.pem'}:/etc/catalyst-proxy/keys/public.pem:ro",
            IMAGE_TAG, "serve", "--host", "127.0.0.1", "--port", str(proxy_port),
        )  # fmt: skip
        try:
            exercise(daemon, name, f"http://127.0.0.1:{proxy_port}", token, report, since)
            stop_with_sigterm(daemon, name, report)
            output = daemon.docker("logs", name) + "\n"
            leaked = [
                label for label, value in (("token", token), ("secret", secret)) if value in output
            ]
            if leaked:
                raise CheckFailed(f"the container's output holds the {' and '.join(leaked)}")
            report.ok("no token or secret in the container's output")
            access = [line for line in json_lines(output) if line.get("path") == PURCHASE_PATH]
            if not any(line.get("status") == 200 and line.get("request_id") for line in access):
                raise CheckFailed(f"no JSON access-log line for the purchase in:\n{output[-2000:]}")
            report.ok("JSON access-log line for the purchase (status 200, request_id)")
        except CheckFailed:
            with contextlib.suppress(CheckFailed):
                print(daemon.docker("logs", "--tail", "40", name), file=sys.stderr)
            raise
        finally:
            with contextlib.suppress(CheckFailed):
                daemon.docker("rm", "--force", name)


def exercise(
    daemon: Dockerd, name: str, base: str, token: str, report: Report, since: float
) -> None:
    deadline = time.monotonic() + 30
    while True:
        with contextlib.suppress(OSError):
            status, body = http("GET", f"{base}/healthz")
            if status == 200:
                break
        state = json.loads(daemon.docker("inspect", "--format", "{{json .State}}", name))
        if not state["Running"] or time.monotonic() > deadline:
            raise CheckFailed(f"no 200 from /healthz (container state {state['Status']})")
        time.sleep(0.25)
    if json.loads(body) != {"status": "ok"}:
        raise CheckFailed(f"/healthz answered {body!r}")
    report.ok("/healthz 200 {status: ok} (read-only root fs, uid 10001, no capabilities)", since)

    status, body = http("GET", f"{base}/readyz")
    if status != 200:
        raise CheckFailed(f"/readyz answered {status}: {body!r}")
    report.ok("/readyz 200")

    order = json.dumps({"sku": "starter", "quantity": 1}).encode()
    status, body = http("POST", f"{base}{PURCHASE_PATH}", token=token, body=order)
    answer = json.loads(body) if status == 200 else {}
    if status != 200 or not isinstance(answer.get("order_id"), str) or not answer["order_id"]:
        raise CheckFailed(f"purchase answered {status}: {body!r}")
    report.ok(f"POST /api/v1/billing/purchase 200, order_id {answer['order_id']}")

    status, body = http("POST", f"{base}{PURCHASE_PATH}", body=order)
    if status != 401 or json.loads(body).get("error") != "unauthenticated":
        raise CheckFailed(f"purchase without a token answered {status}: {body!r}")
    report.ok("POST /api/v1/billing/purchase without a token 401 unauthenticated")

    status, body = http("GET", f"{base}/metrics")
    text = body.decode()
    if not RULES_TEMPLATE.exists():
        raise CheckFailed(f"{RULES_TEMPLATE} is missing")
    used = set(re.findall(r"\bcatalyst_proxy_[a-z_]+", RULES_TEMPLATE.read_text()))
    families = {re.sub(r"_(bucket|sum|count)$", "", metric) for metric in used}
    missing = sorted(family for family in families if f"# TYPE {family} " not in text)
    if status != 200 or not used or missing:
        raise CheckFailed(f"/metrics ({status}) lacks metrics the alerts use: {missing}")
    counted = r'catalyst_proxy_requests_total\{[^}]*method="POST"[^}]*status="200"[^}]*\} [1-9]'
    if not re.search(counted, text):
        raise CheckFailed("/metrics did not count the purchase in catalyst_proxy_requests_total")
    report.ok(f"/metrics exports all {len(families)} metrics the PrometheusRule uses")


def json_lines(output: str) -> list[dict[str, object]]:
    lines = []
    for line in output.splitlines():
        with contextlib.suppress(ValueError):
            value = json.loads(line)
            if isinstance(value, dict):
                lines.append(value)
    return lines


def check_default_command(daemon: Dockerd, workdir: Path, report: Report) -> None:
    """The image's own CMD (0.0.0.0:8080) serves /healthz. It runs with no network at all
    (--network none, so no port on the host and no bridge), probed from inside with the
    image's Python, since the image has no HTTP client of its own."""
    since = report.step("the image's default command, with no network")
    name = f"catalyst-proxy-check-cmd-{os.getpid()}"
    daemon.docker(
        "run", "--detach", "--name", name,
        "--network", "none", "--read-only", "--user", UID_GID, "--cap-drop", "ALL",
        "--env", "CATALYST_SESSION_PUBLIC_KEY_FILE=/etc/catalyst-proxy/keys/public.pem",
        "--volume", f"{workdir / 'keys/public.pem'}:/etc/catalyst-proxy/keys/public.pem:ro",
        IMAGE_TAG,
    )  # fmt: skip
    probe = (
        "import sys, time, urllib.request\n"
        "for _ in range(100):\n"
        "    try:\n"
        "        sys.exit(print(urllib.request.urlopen('http://127.0.0.1:8080/healthz').read()))\n"
        "    except OSError:\n"
        "        time.sleep(0.1)\n"
        "sys.exit('no answer on 127.0.0.1:8080')\n"
    )
    try:
        answer = daemon.docker("exec", name, "/opt/venv/bin/python", "-c", probe, timeout=30)
        if "ok" not in answer:
            raise CheckFailed(f"default command: /healthz answered {answer!r}")
        stop_with_sigterm(daemon, name, report)
        report.ok("default CMD serves /healthz on 0.0.0.0:8080", since)
    finally:
        with contextlib.suppress(CheckFailed):
            daemon.docker("rm", "--force", name)


def stop_with_sigterm(daemon: Dockerd, name: str, report: Report) -> None:
    since = time.monotonic()
    daemon.docker("kill", "--signal", "TERM", name)
    limit = SHUTDOWN_GRACE + 5
    try:
        code = int(daemon.docker("wait", name, timeout=limit).strip())
    except subprocess.TimeoutExpired:
        raise CheckFailed(f"still running {limit} s after SIGTERM") from None
    took = time.monotonic() - since
    if code != 0 or took > SHUTDOWN_GRACE:
        raise CheckFailed(f"after SIGTERM: exit {code} in {took:.1f} s (want 0 within 10 s)")
    report.ok(f"SIGTERM: exit 0 in {took:.1f}s (grace {SHUTDOWN_GRACE}s)")


def main() -> int:
    report = Report()
    workdir = Path(tempfile.mkdtemp(prefix="catalyst-container-check-"))
    daemon = Dockerd(workdir)
    try:
        preflight()
        tarball = base_tarball(report)
        since = report.step("private dockerd (no bridge, no iptables)")
        daemon.start()
        report.ok(f"dockerd pid {daemon.process.pid if daemon.process else '?'} answering", since)
        build_image(daemon, workdir, tarball, report)
        run_container(daemon, workdir, report)
        check_default_command(daemon, workdir, report)
    except (CheckFailed, subprocess.TimeoutExpired) as failure:
        print(f"FAILED: {failure}", file=sys.stderr)
        print(f"container-check: {report.passed} passed, 1 failed")
        return 1
    finally:
        daemon.stop()
        unmount_under(workdir)
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"container-check took {time.monotonic() - report.started:.0f}s")
    print(f"container-check: {report.passed} passed, 0 failed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
