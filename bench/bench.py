"""``make bench``: what the gateway costs, next to a direct hit and a Go implementation.

One run starts, on 127.0.0.1 (ports from ``--port-base``, default 19080; see ROWS):

* a fast upstream stand-in: nginx answering ``POST /api/billing/purchase`` with
  a fixed JSON body (``bench/upstream.nginx.conf``);
* ``go-reference``: ``bench/goref/main.go``, built here (GOPATH mode, Debian's
  golang-jwt v4), doing the gateway's work in Go, verifying every token;
* the gateway, ``catalyst-proxy serve --workers N``, in its production
  configuration (default JSON logging, to a file; metrics on), once per gateway
  row: plain, with a rate limit that never refuses (``gateway-ratelimit``), and
  loaded with a new ``Idempotency-Key`` on every request (``gateway-idem``);
  each of the two also against a ``redis-server`` the bench starts (``-redis``);

and then, for every round, measures the rows next to each other in time:

* throughput: ``wrk -t2 -c50 -d10s`` with ``bench/post.lua`` (a 200-byte JSON
  POST, ``Authorization: Bearer`` round-robin over ``--tokens`` operators; for
  the idempotency rows a key never used before on every request);
* CPU per request: utime+stime of every process of the target (from
  /proc/<pid>/stat) before and after the wrk run, divided by the requests;
* latency at a fixed rate: ``bench/loadgen.py``, open loop, 500 requests/s on
  32 keep-alive connections (new keys too, for the idempotency rows);
* peak RSS per worker (VmHWM) at the end;
* correctness: every answer 200 with the upstream's body, bad tokens 401 and
  never upstream, the upstream's request counter (nginx stub_status) moved by
  the number of requests, and the bridge tokens (and idempotency keys) nginx
  logged for ~1/64 of the requests verify with the secret (are all distinct).

It prints one markdown table (medians over ``--rounds``; ratios inside a round,
then their median) and exits 1 if a check failed. See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import common  # noqa: E402
import loadgen  # noqa: E402

UPSTREAM_BODY = (
    b'{"order_id":"ord_0123456789abcdef","paid_by_credit":false,'
    b'"session_url":"https://pay.example.test/s/0123456789abcdef01"}'
)
GATEWAY_PATH = "/api/v1/billing/purchase"
UPSTREAM_PATH = "/api/billing/purchase"
# Checked on every request, never reached: 64 operators share ~10,000 requests/s at most.
RATE_LIMIT = "1000000/second"
UPSTREAM_OFFSET = 1  # +2 and +3 are `make soak`'s
REDIS_OFFSET = 10  # the first free port from here up that no row has
BURN_US = 15.0  # the calibration row's known cost, µs of CPU per request
SMALL_STORE_BYTES = 64 * 1024  # gateway-idem-64k's memory store bound


@dataclass(frozen=True)
class Row:
    """One row of the table: what is started, on which port, and how it is loaded."""

    name: str
    kind: str  # "upstream" (the direct hit), "go" (bench/goref) or "gateway"
    offset: int  # its port is --port-base + offset
    env: Mapping[str, str] = field(default_factory=dict)  # the gateway's extra variables
    keys: bool = False  # every request carries an Idempotency-Key never used before
    redis: bool = False  # CATALYST_REDIS_URL is the bench's redis-server
    launcher: tuple[str, ...] = ("-m", "catalyst_proxy")  # what the gateway's python runs


ROWS = (
    Row("direct", "upstream", UPSTREAM_OFFSET),
    Row("go-reference", "go", 4),
    Row("gateway", "gateway", 0),
    Row("gateway-ratelimit", "gateway", 5, {"CATALYST_RATE_LIMIT": RATE_LIMIT}),
    Row("gateway-ratelimit-redis", "gateway", 6, {"CATALYST_RATE_LIMIT": RATE_LIMIT}, redis=True),
    # The same load as the idem rows (a new key per request: wrk builds each one) with
    # idempotency off: the control that separates the feature's cost from the load's.
    Row("gateway-keys-off", "gateway", 9, {"CATALYST_IDEMPOTENCY": "off"}, keys=True),
    # The control plus a known cost (bench/burn.py): what +BURN_US µs of CPU per request
    # reads as in this run, next to what the feature reads as.
    Row(
        "gateway-keys-off-burn",
        "gateway",
        11,
        {"CATALYST_IDEMPOTENCY": "off", "CATALYST_BENCH_BURN_US": f"{BURN_US:g}"},
        keys=True,
        launcher=(str(HERE / "burn.py"),),
    ),
    Row("gateway-idem", "gateway", 7, keys=True),
    # The same with a 64 KiB memory store (bench/store_bound.py): its records are freed while
    # still in the caches, so the difference to gateway-idem is what the default store's
    # footprint costs, and the rest is the keyed path's code.
    Row(
        "gateway-idem-64k",
        "gateway",
        12,
        {"CATALYST_BENCH_STORE_BYTES": str(SMALL_STORE_BYTES)},
        keys=True,
        launcher=(str(HERE / "store_bound.py"),),
    ),
    Row("gateway-idem-redis", "gateway", 8, keys=True, redis=True),
)
ROW_NAMES = tuple(row.name for row in ROWS)


def request_body(size: int = 200) -> bytes:
    """A purchase-shaped JSON body of exactly ``size`` bytes."""
    head = '{"plan":"sme-pro-annual","seats":25,"currency":"EUR","voucher":null,"note":"'
    tail = '"}'
    return (head + "x" * (size - len(head) - len(tail)) + tail).encode()


@dataclass
class Target:
    name: str
    host: str
    port: int
    path: str
    root: int  # the process (with its descendants) whose CPU and memory are the target's
    jwt: bool  # does JWT work (bad tokens must get 401)
    keys: bool = False  # send a new Idempotency-Key with every request
    store: int | None = None  # the redis-server it uses (its CPU is reported apart)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}{self.path}"


@dataclass
class Measurement:
    target: str
    round: int
    rps: float = 0.0
    wrk: dict[str, Any] = field(default_factory=dict)
    cpu_us_per_req: float = 0.0
    store_us_per_req: float = 0.0
    cores: dict[str, float] = field(default_factory=dict)
    rate: dict[str, Any] = field(default_factory=dict)
    rate_cpu_us_per_req: float = 0.0
    bridge_verified: int = 0
    keys_sampled: int = 0
    problems: list[str] = field(default_factory=list)


def port_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def wait_redis(port: int, proc: subprocess.Popen[bytes], seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"redis-server exited with {proc.returncode} before answering")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(64).startswith(b"+PONG"):
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"redis-server on port {port} did not answer PING within {seconds:g} s")


def build_goref(work: Path) -> Path:
    """Compile bench/goref in GOPATH mode against Debian's golang-jwt: nothing is downloaded."""
    gopath = work / "gopath"
    src = gopath / "src" / "catalyst-bench" / "goref"
    src.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(HERE / "goref" / "main.go", src / "main.go")
    # GO111MODULE=off ignores this file for resolution, but only code under a go.mod gets
    # "minimal module compatibility" (golang.org/issue/25069): the import
    # github.com/golang-jwt/jwt/v4 is then read as Debian's .../golang-jwt/jwt, whose own
    # go.mod says it is v4.
    (src / "go.mod").write_text("module catalyst-bench/goref\n")
    env = {
        **os.environ,
        "GO111MODULE": "off",
        "GOPATH": f"{gopath}:/usr/share/gocode",
        "GOFLAGS": "",
        "CGO_ENABLED": "0",
    }
    if not any(env.get(k) for k in ("GOCACHE", "XDG_CACHE_HOME", "HOME")):
        env["GOCACHE"] = str(common.ROOT / ".cache" / "go-build")
    binary = work / "goref"
    out = subprocess.run(
        ["go", "build", "-o", str(binary), "catalyst-bench/goref"],
        cwd=work, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    if out.returncode:
        raise SystemExit(
            "bench: go build of bench/goref failed (golang-go and "
            f"golang-github-golang-jwt-jwt-dev: bench/install-tools.sh):\n{out.stderr}"
        )
    return binary


def tool_version(argv: list[str], pattern: str) -> str:
    try:
        text = subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "absent"
    found = re.search(pattern, text)
    return found.group(1) if found else "unknown"


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rows = [row for row in ROWS if row.name in args.targets]
        self.work = Path(args.workdir or tempfile.mkdtemp(prefix="catalyst-bench-"))
        self.work.mkdir(parents=True, exist_ok=True)
        os.chmod(self.work, 0o755)  # noqa: S103 - nginx's worker (nobody, when run as root) reads below it
        self.up_port = args.port_base + UPSTREAM_OFFSET
        self.procs: list[subprocess.Popen[bytes]] = []
        self.body = request_body()
        (self.work / "body.json").write_bytes(self.body)
        self.bridge_log = self.work / "bridge-tokens.log"
        self.bridge_offset = 0
        self.nonce = secrets.token_hex(4)  # Idempotency-Keys are new in every run
        self.redis_port = 0
        self.loadavg = " ".join(Path("/proc/loadavg").read_text().split()[:3])
        self.git = common.git_state()  # the code the gateway is started with

    # ------------------------------------------------------------ set-up
    def start(self) -> list[Target]:
        """Start the upstream, redis-server and every row's server; one Target per row."""
        busy = [
            p
            for p in {self.up_port, *(self.args.port_base + row.offset for row in self.rows)}
            if not port_free(p)
        ]
        if busy:
            raise SystemExit(f"bench: port(s) {sorted(busy)} in use: choose another --port-base")
        self.material = common.make_material(self.work, self.args.tokens)
        upstream = self.start_upstream()
        store = self.start_redis() if any(row.redis for row in self.rows) else None
        goref = build_goref(self.work) if any(row.kind == "go" for row in self.rows) else None
        started: list[tuple[Row, subprocess.Popen[bytes]]] = []
        for row in self.rows:  # start them all, then wait: the gateways start in parallel
            if row.kind == "go":
                assert goref is not None
                started.append((row, self.start_goref(goref, row)))
            elif row.kind == "gateway":
                started.append((row, self.start_gateway(row)))
        for row, proc in started:
            self.wait_ready(row, proc)
        procs = {row.name: proc for row, proc in started}
        targets = []
        for row in self.rows:
            if row.kind == "upstream":
                targets.append(
                    Target(row.name, "127.0.0.1", self.up_port, UPSTREAM_PATH, upstream.pid, False)
                )
                continue
            targets.append(
                Target(
                    row.name,
                    "127.0.0.1",
                    self.args.port_base + row.offset,
                    GATEWAY_PATH,
                    procs[row.name].pid,
                    jwt=True,
                    keys=row.keys,
                    store=store.pid if store and row.redis else None,
                )
            )
        return targets

    def start_upstream(self) -> subprocess.Popen[bytes]:
        self.bridge_log.touch()
        upstream = common.start_upstream(self.work, self.up_port)
        self.procs.append(upstream)
        self.upstream_proc = upstream
        return upstream

    def start_redis(self) -> subprocess.Popen[bytes]:
        """redis-server on the first free port from --port-base + 10, persistence off."""
        first = self.args.port_base + REDIS_OFFSET
        rows = {self.args.port_base + row.offset for row in ROWS}
        port = next((p for p in range(first, first + 100) if p not in rows and port_free(p)), 0)
        if not port:
            raise SystemExit(f"bench: no free port for redis-server in {first}..{first + 99}")
        self.redis_port = port
        proc = common.start(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.work), "--daemonize", "no",
             "--logfile", ""],
            self.work / "redis.log",
        )  # fmt: skip
        self.procs.append(proc)
        wait_redis(port, proc)
        return proc

    def start_goref(self, binary: Path, row: Row) -> subprocess.Popen[bytes]:
        env = common.gateway_env(
            self.material,
            f"http://127.0.0.1:{self.up_port}",
            GOREF_ADDR=f"127.0.0.1:{self.args.port_base + row.offset}",
            GOREF_PATH=GATEWAY_PATH,
        )
        for name in ("GOMAXPROCS", "GOGC", "GOMEMLIMIT", "GODEBUG"):  # Go's defaults
            env.pop(name, None)
        proc = common.start([str(binary)], self.work / f"{row.name}.log", env)
        self.procs.append(proc)
        return proc

    def start_gateway(self, row: Row) -> subprocess.Popen[bytes]:
        extra = dict(row.env)
        if row.redis:
            extra["CATALYST_REDIS_URL"] = f"redis://127.0.0.1:{self.redis_port}/0"
        env = common.gateway_env(self.material, f"http://127.0.0.1:{self.up_port}", **extra)
        proc = common.start(
            [sys.executable, *row.launcher, "serve", "--host", "127.0.0.1",
             "--port", str(self.args.port_base + row.offset), "--workers", str(self.args.workers)],
            self.work / f"{row.name}.log",
            env,
        )  # fmt: skip
        self.procs.append(proc)
        return proc

    def wait_ready(self, row: Row, proc: subprocess.Popen[bytes]) -> None:
        port = self.args.port_base + row.offset
        if row.kind == "go":
            common.wait_http(f"http://127.0.0.1:{port}/healthz", proc, 10)
            return
        common.wait_http(f"http://127.0.0.1:{port}/readyz", proc, 30)
        if self.args.workers > 1:  # every worker up: each answers on the shared port
            deadline = time.monotonic() + 20
            while len(common.tree(proc.pid)) < self.args.workers + 1:
                if time.monotonic() > deadline:
                    raise SystemExit(f"{row.name}: the gateway's workers did not all start")
                time.sleep(0.1)
            time.sleep(1)

    def stop(self) -> None:
        for proc in reversed(self.procs):
            common.stop(proc)

    def forget_work(self) -> None:
        """Remove the work dir, if it is a temp dir of this run's (no ``--workdir``)."""
        if not self.args.workdir:
            shutil.rmtree(self.work, ignore_errors=True)

    # ------------------------------------------------------------ helpers
    def upstream_requests(self) -> int:
        """nginx's request counter (it counts this /__stats request too)."""
        _, text = common.http_get(f"http://127.0.0.1:{self.up_port}/__stats")
        return int(text.decode().splitlines()[2].split()[2])

    def key_prefix(self, target: Target, rnd: int, phase: str) -> str | None:
        """The Idempotency-Key prefix of one load phase (None: the row sends no keys)."""
        return f"{self.nonce}-{target.name}-r{rnd}-{phase}" if target.keys else None

    def post(self, target: Target, token: str | None, key: str | None = None) -> tuple[int, bytes]:
        import http.client

        conn = http.client.HTTPConnection(target.host, target.port, timeout=5)
        headers = {"Content-Type": "application/json"}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        if key is not None:
            headers["Idempotency-Key"] = key
        try:
            conn.request("POST", target.path, body=self.body, headers=headers)
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def preflight(self, target: Target, rnd: int) -> list[str]:
        problems = []
        prefix = self.key_prefix(target, rnd, "pre")
        keys = (f"{prefix}-{n}" if prefix else None for n in range(1000))
        status, body = self.post(target, self.material.operators[0].token, next(keys))
        if status != 200 or body != UPSTREAM_BODY:
            problems.append(
                f"valid token: HTTP {status}, body {'ok' if body == UPSTREAM_BODY else 'differs'}"
            )
        if target.jwt:
            before = self.upstream_requests()
            for name, token in [*self.material.bad_tokens.items(), ("no-token", None)]:
                status, _ = self.post(target, token, next(keys))
                if status != 401:
                    problems.append(f"{name} token: HTTP {status}, want 401")
            if self.upstream_requests() - before - 1:
                problems.append("a refused request reached the upstream")
        return problems

    def wrk(
        self, target: Target, seconds: float, key_prefix: str | None = None
    ) -> tuple[dict[str, Any], float, str]:
        argv = [
            "wrk", f"-t{self.args.threads}", f"-c{self.args.conns}", f"-d{seconds:g}s",
            "--timeout", "5s", "--latency", "-s", str(HERE / "post.lua"), target.url, "--",
            str(self.work / "tokens.txt"), str(self.work / "body.json"),
            *([key_prefix] if key_prefix else []),
        ]  # fmt: skip
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        wrk_cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        found = re.search(r"^BENCHJSON (\{.*\})$", out.stdout, re.M)
        if not found:
            raise SystemExit(f"wrk failed against {target.url}: {out.stdout}{out.stderr}")
        data = json.loads(found.group(1))
        return data, wrk_cpu, out.stdout

    def new_bridge_samples(self) -> list[tuple[str, str | None]]:
        """(bridge token, Idempotency-Key or None) of the requests nginx sampled since last time."""
        with self.bridge_log.open("rb") as f:
            f.seek(self.bridge_offset)
            data = f.read()
        self.bridge_offset += len(data)
        out = []
        for line in data.decode().splitlines():
            auth, _, key = line.rpartition(" ")
            if auth.startswith("Bearer "):
                out.append((auth[len("Bearer ") :], None if key == "-" else key))
        return out

    # ------------------------------------------------------------ one measurement
    def measure(self, target: Target, rnd: int) -> Measurement:
        m = Measurement(target.name, rnd)
        m.problems = self.preflight(target, rnd)
        if any(p.startswith("valid token") for p in m.problems):
            return m
        if self.args.warmup > 0:
            self.wrk(target, self.args.warmup, self.key_prefix(target, rnd, "warm"))
            time.sleep(1)  # let requests the warm-up abandoned drain
        up_pids = common.tree(self.upstream_proc.pid)
        pids = common.tree(target.root)
        store_pids = common.tree(target.store) if target.store else []
        self.new_bridge_samples()  # skip what earlier runs logged

        # throughput (closed loop, saturating)
        c0 = self.upstream_requests()
        t0, u0, s0, b0 = (
            common.cpu_seconds(pids),
            common.cpu_seconds(up_pids),
            common.cpu_seconds(store_pids),
            common.machine_busy(),
        )
        w0 = time.monotonic()
        data, wrk_cpu, _ = self.wrk(target, self.args.duration, self.key_prefix(target, rnd, "wrk"))
        wall = time.monotonic() - w0
        t1, u1, s1, b1 = (
            common.cpu_seconds(pids),
            common.cpu_seconds(up_pids),
            common.cpu_seconds(store_pids),
            common.machine_busy(),
        )
        time.sleep(0.5)
        c1 = self.upstream_requests()
        requests = data["requests"]
        m.wrk = data
        m.rps = requests / (data["duration_us"] / 1e6)
        m.cpu_us_per_req = (t1 - t0) / max(requests, 1) * 1e6
        m.store_us_per_req = (s1 - s0) / max(requests, 1) * 1e6
        machine = (b1[0] - b0[0]) / wall
        m.cores = {
            "target": (t1 - t0) / wall,
            "upstream": (u1 - u0) / wall,
            "store": (s1 - s0) / wall,
            "wrk": wrk_cpu / wall,
            "machine": machine,
        }
        own = m.cores["target"] + m.cores["wrk"] + m.cores["store"]
        own += m.cores["upstream"] if target.jwt else 0
        m.cores["foreign"] = max(0.0, machine - own)
        errors = {k: data[k] for k in ("connect_errors", "read_errors", "write_errors", "timeouts")}
        if any(errors.values()):
            m.problems.append(f"wrk socket errors {errors}")
        if data["non2xx"]:
            m.problems.append(f"{data['non2xx']} non-2xx answers under wrk")
        seen = c1 - c0 - 1
        # wrk stops with up to one request per connection in flight: those reached the
        # upstream but are not in wrk's count.
        if not requests <= seen <= requests + self.args.conns:
            m.problems.append(f"upstream saw {seen} requests, wrk completed {requests}")

        # latency at a fixed rate (open loop)
        if self.args.rate > 0:
            self.fixed_rate(target, rnd, m, pids)

        if target.jwt:
            samples = self.new_bridge_samples()
            bad = [why for why in (self.verify(token) for token, _ in samples) if why]
            m.bridge_verified = len(samples) - len(bad)
            if not samples:
                m.problems.append("no bridge token was sampled")
            if bad:
                m.problems.append(f"{len(bad)} bridge tokens fail: {bad[0]}")
            if target.keys:
                m.keys_sampled = len(samples)
                m.problems.extend(self.check_keys(target, rnd, [k for _, k in samples]))
        return m

    def fixed_rate(self, target: Target, rnd: int, m: Measurement, pids: list[int]) -> None:
        reqs = loadgen.build_requests(
            target.host,
            target.port,
            target.path,
            [op.token for op in self.material.operators],
            self.body,
        )
        c0 = self.upstream_requests()
        t0 = common.cpu_seconds(pids)
        r0, w0 = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
        result = loadgen.run(
            loadgen.fixed_rate(
                target.host,
                target.port,
                reqs,
                rate=self.args.rate,
                duration=self.args.rate_duration,
                warmup=2,
                conns=32,
                idempotency_prefix=self.key_prefix(target, rnd, "rate"),
            )
        )
        r1, wall = resource.getrusage(resource.RUSAGE_SELF), time.monotonic() - w0
        t1 = common.cpu_seconds(pids)
        c1 = self.upstream_requests()
        m.rate = result.summary()
        m.cores["loadgen"] = (r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime) / wall
        m.rate_cpu_us_per_req = (t1 - t0) / max(result.sent, 1) * 1e6
        if result.errors or set(result.statuses) != {200}:
            m.problems.append(
                f"fixed rate: statuses {dict(result.statuses)}, {result.errors} errors"
            )
        if c1 - c0 - 1 != result.sent:
            m.problems.append(f"fixed rate: upstream saw {c1 - c0 - 1}, sent {result.sent}")

    def check_keys(self, target: Target, rnd: int, keys: list[str | None]) -> list[str]:
        """The sampled upstream requests of a keyed row each carried a new key of this round."""
        problems = []
        ours = f"{self.nonce}-{target.name}-r{rnd}-"
        if any(k is None for k in keys):
            problems.append(
                f"{keys.count(None)} sampled requests reached the upstream without a key"
            )
        present = [k for k in keys if k is not None]
        if len(set(present)) != len(present):
            problems.append(f"{len(present) - len(set(present))} sampled keys repeat")
        if any(not k.startswith(ours) for k in present):
            problems.append("a sampled key is not one this round sent")
        return problems

    def verify(self, token: str) -> str | None:
        return common.verify_bridge(token, self.material)

    def peak_rss(self, target: Target) -> dict[str, float]:
        """VmHWM in MB: the largest worker's, and the supervising parent's when there is one."""
        pids = common.tree(target.root)
        root, children = pids[0], pids[1:]
        workers = children or [root]
        out = {"worker": max(common.status_kb(p, "VmHWM") for p in workers) / 1024}
        if children:
            out["parent"] = common.status_kb(root, "VmHWM") / 1024
        return out

    def versions(self) -> dict[str, str]:
        out = common.versions()
        if any(row.kind == "go" for row in self.rows):
            out["go"] = tool_version(["go", "version"], r"go version go(\S+)")
            out["golang-jwt"] = tool_version(
                ["dpkg-query", "-W", "-f=${Version}", "golang-github-golang-jwt-jwt-dev"],
                r"(\S+)",
            )
        if self.redis_port:
            out["redis-server"] = tool_version(["redis-server", "--version"], r"v=(\S+)")
        return out


# ------------------------------------------------------------------ the table


def spread(values: list[float]) -> str:
    if len(values) < 2 or not statistics.median(values):
        return ""
    return f" (±{(max(values) - min(values)) / 2 / statistics.median(values) * 100:.0f}%)"


def med(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def num(value: float, spec: str) -> str:
    """``value`` formatted, or a dash when there is nothing to show (a row not measured)."""
    return "–" if value != value else format(value, spec)  # NaN


def within_rounds(
    ms: list[Measurement],
    ref: Mapping[int, Measurement],
    f: Callable[[Measurement, Measurement], float],
) -> list[float]:
    """``f(m, the reference row's measurement of the same round)`` for every round both have."""
    out = []
    for m in ms:
        other = ref.get(m.round)
        if other is not None and m.rps and other.rps:
            out.append(f(m, other))
    return out


def against(
    ms: list[Measurement], ref: Mapping[int, Measurement], value: Callable[[Measurement], float]
) -> str:
    """``+delta / times`` of ``value`` over the reference row, per round, then the medians."""
    ms = [m for m in ms if value(m)]
    ref = {r: m for r, m in ref.items() if value(m)}
    delta = med(within_rounds(ms, ref, lambda m, c: value(m) - value(c)))
    times = med(within_rounds(ms, ref, lambda m, c: value(m) / value(c)))
    return f"{num(delta, '+.1f')} / {num(times, '.3f')}"


def cost_lines(bench: Bench, by: Mapping[str, list[Measurement]]) -> list[str]:
    """The keyed rows against their control, at saturation and at the fixed rate, and what the
    calibration row's known cost reads as in the same run."""
    control = {m.round: m for m in by.get("gateway-keys-off", [])}
    keyed = [name for name, ms in by.items() if ms and name.startswith("gateway-idem")]
    burn = by.get("gateway-keys-off-burn", [])
    if not control or not (keyed or burn):
        return []
    rate = f"{bench.args.rate:g} req/s" if bench.args.rate else "not run"
    lines = [
        "",
        "Against `gateway-keys-off` (the same load, idempotency off), inside each round, then "
        "the median (+Δ µs / ×):",
        "",
        f"| target | CPU µs/req at saturation (wrk -c{bench.args.conns}) "
        f"| CPU µs/req at the fixed rate ({rate}) |",
        "|---|---|---|",
    ]
    for name in [*keyed, *(["gateway-keys-off-burn"] if burn else [])]:
        ms = by[name]
        lines.append(
            f"| {name} | {against(ms, control, lambda m: m.cpu_us_per_req)} "
            f"| {against(ms, control, lambda m: m.rate_cpu_us_per_req)} |"
        )
    if burn:
        lines += [
            "",
            f"`gateway-keys-off-burn` is the control plus a known {BURN_US:g} µs of CPU per "
            "request (bench/burn.py): what its row reads above that is how this run's "
            "measure scales a cost added to each request.",
        ]
    return lines


def table(bench: Bench, results: list[Measurement], targets: list[Target]) -> tuple[str, bool]:
    args = bench.args
    by: dict[str, list[Measurement]] = {t.name: [] for t in targets}
    for m in results:
        by[m.target].append(m)
    rounds = sorted({m.round for m in results})
    direct = {m.round: m for m in by.get("direct", [])}
    goref = {m.round: m for m in by.get("go-reference", [])}
    plain = {m.round: m for m in by.get("gateway", [])}

    stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    lines = [
        f"catalyst-proxy `make bench` — {stamp} — gateway: {common.describe_git(bench.git)}, "
        f"`serve --workers {args.workers}` (every gateway row) — {len(rounds)} round(s), "
        f"median; throughput: wrk -t{args.threads} -c{args.conns} -d{args.duration:g}s; "
        f"latency: loadgen {args.rate:g} req/s for {args.rate_duration:g}s on 32 connections; "
        f"{args.tokens} tokens round-robin (the gateway caches verified tokens, go-reference "
        "verifies every request)",
        "",
        "| target | rps | x direct | x go-ref rps | CPU µs/req | x go-ref CPU/req "
        "| over gateway CPU µs/req (+Δ / ×) | target cores | wrk p50 / p99 ms "
        "| @rate p50 / p99 / p99.9 ms | added p50 / p99 ms over direct "
        "| CPU µs/req @rate | peak RSS MB/worker | foreign cores | check |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    ok = True
    for t in targets:
        ms = by[t.name]
        if not ms:
            continue
        problems = sorted({p for m in ms for p in m.problems})
        ok = ok and not problems
        rps = [m.rps for m in ms if m.rps]
        x_direct = within_rounds(ms, direct, lambda m, d: m.rps / d.rps)
        x_go_rps = within_rounds(ms, goref, lambda m, g: m.rps / g.rps)
        x_go_cpu = within_rounds(ms, goref, lambda m, g: m.cpu_us_per_req / g.cpu_us_per_req)
        over_text = (
            against(ms, plain, lambda m: m.cpu_us_per_req) if t.name.startswith("gateway") else "–"
        )
        rate_ok = [m for m in ms if m.rate]
        rate_direct = {r: d for r, d in direct.items() if d.rate}
        p = {q: med([m.rate[f"p{q}_us"] / 1000 for m in rate_ok]) for q in ("50", "99", "999")}
        added50 = med(
            within_rounds(
                rate_ok, rate_direct, lambda m, d: (m.rate["p50_us"] - d.rate["p50_us"]) / 1000
            )
        )
        added99 = med(
            within_rounds(
                rate_ok, rate_direct, lambda m, d: (m.rate["p99_us"] - d.rate["p99_us"]) / 1000
            )
        )
        rss = bench.peak_rss(t)
        rss_text = f"{rss['worker']:.1f}" + (
            f" (+ parent {rss['parent']:.1f})" if "parent" in rss else ""
        )
        verified = sum(m.bridge_verified for m in ms)
        if problems:
            check = "FAIL: " + "; ".join(problems)
        elif t.keys:
            keys = sum(m.keys_sampled for m in ms)
            check = f"ok ({verified} bridge tokens verified, {keys} sampled keys all new)"
        elif t.jwt:
            check = f"ok ({verified} bridge tokens verified)"
        else:
            check = "ok"
        lines.append(
            f"| {t.name} | {num(med(rps), ',.0f')}{spread(rps)} | {num(med(x_direct), '.3f')} "
            f"| {num(med(x_go_rps), '.3f')} "
            f"| {num(med([m.cpu_us_per_req for m in ms if m.rps]), '.1f')} "
            f"| {num(med(x_go_cpu), '.2f')} | {over_text} "
            f"| {num(med([m.cores['target'] for m in ms if m.cores]), '.2f')} "
            f"| {num(med([m.wrk['p50_us'] / 1000 for m in ms if m.wrk]), '.2f')} / "
            f"{num(med([m.wrk['p99_us'] / 1000 for m in ms if m.wrk]), '.2f')} "
            f"| {num(p['50'], '.2f')} / {num(p['99'], '.2f')} / {num(p['999'], '.2f')} "
            f"| {num(added50, '.2f')} / {num(added99, '.2f')} "
            f"| {num(med([m.rate_cpu_us_per_req for m in rate_ok]), '.1f')} "
            f"| {rss_text} "
            f"| {max(m.cores.get('foreign', 0) for m in ms):.2f} | {check} |"
        )
    lines += ["", "Per round (rps / CPU µs/req):", ""]
    lines.append("| target | " + " | ".join(f"round {r}" for r in rounds) + " |")
    lines.append("|---|" + "---|" * len(rounds))
    for t in targets:
        cells = {m.round: f"{m.rps:,.0f} / {m.cpu_us_per_req:.1f}" for m in by[t.name] if m.rps}
        lines.append(f"| {t.name} | " + " | ".join(cells.get(r, "–") for r in rounds) + " |")
    lines += cost_lines(bench, by)
    lines.append("")
    store = [
        f"{t.name} {num(med([m.store_us_per_req for m in by[t.name] if m.rps]), '.1f')}"
        for t in targets
        if t.store and by[t.name]
    ]
    if store:
        lines.append(
            "redis-server CPU µs/req during the wrk run (not in the CPU µs/req column, median): "
            + ", ".join(store)
            + f"; redis-server on port {bench.redis_port}, persistence off."
        )
    if args.workers > 1 and "gateway-idem" in by:
        lines.append(
            f"With --workers {args.workers} and no CATALYST_REDIS_URL the contract turns "
            "idempotency off (CATALYST_IDEMPOTENCY=auto): gateway-idem then measures the key "
            "passed through, not the memory store."
        )
    gen = [m.cores["loadgen"] for m in results if "loadgen" in m.cores]
    if gen:
        lines.append(f"loadgen used {med(gen):.2f} cores at {args.rate:g} req/s (median).")
    lines.append(
        f"Machine: {os.cpu_count()} CPUs, load average before {bench.loadavg}; "
        + ", ".join(f"{k} {v}" for k, v in bench.versions().items())
        + "."
    )
    return "\n".join(lines), ok


def ensure_tools(rows: list[Row]) -> None:
    needed = ["wrk", "nginx"]
    if any(row.kind == "go" for row in rows):
        needed.append("go")
    if any(row.redis for row in rows):
        needed.append("redis-server")
    missing = [t for t in needed if not (shutil.which(t) or Path(f"/usr/sbin/{t}").exists())]
    if missing:
        raise SystemExit(
            f"bench: {', '.join(missing)} not found: run `make bench` as root (it installs them "
            "with apt-get: bench/install-tools.sh) or install wrk, nginx, golang-go, "
            "golang-github-golang-jwt-jwt-dev and redis-server first"
        )


def target_list(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in ROW_NAMES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown row(s) {', '.join(unknown) or '(none given)'}; rows: {', '.join(ROW_NAMES)}"
        )
    return names


def parser() -> argparse.ArgumentParser:
    """``make bench``'s options (also how ``interleave.py`` gets a ``Bench`` of its own)."""
    options = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    options.add_argument(
        "--workers", type=int, default=1, help="worker processes of every gateway row [1]"
    )
    options.add_argument(
        "--targets",
        type=target_list,
        default=list(ROW_NAMES),
        help="comma-separated rows to measure, in the table's order [all: "
        + ",".join(ROW_NAMES)
        + "]; the x direct, x go-ref and over-gateway columns need those rows",
    )
    options.add_argument("--duration", type=float, default=10, help="wrk run, seconds [10]")
    options.add_argument("--rounds", type=int, default=3, help="rounds; medians are reported [3]")
    options.add_argument("--tokens", type=int, default=64, help="distinct operator tokens [64]")
    options.add_argument("--conns", type=int, default=50, help="wrk connections [50]")
    options.add_argument("--threads", type=int, default=2, help="wrk threads [2]")
    options.add_argument("--warmup", type=float, default=2, help="unrecorded wrk warm-up [2]")
    options.add_argument("--rate", type=float, default=500, help="fixed rate, req/s (0: skip)")
    options.add_argument("--rate-duration", type=float, default=10, help="fixed-rate run [10]")
    options.add_argument(
        "--port-base",
        type=int,
        default=int(os.environ.get("BENCH_PORT_BASE", "19080")),
        help="gateway on this port, upstream +1, go-reference +4, the other gateway rows "
        "+5..+9, +11 and +12, redis-server the first free port from +10 "
        "[$BENCH_PORT_BASE or 19080]",
    )
    options.add_argument("--workdir", help="keep keys, logs and configs here [a temp dir]")
    options.add_argument("--json", help="also write every measurement to this file")
    return options


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    ensure_tools([row for row in ROWS if row.name in args.targets])
    bench = Bench(args)
    results: list[Measurement] = []
    try:
        targets = bench.start()
        for rnd in range(1, args.rounds + 1):
            for target in targets:
                print(f"[bench] round {rnd}: {target.name} -> {target.url}", file=sys.stderr)
                m = bench.measure(target, rnd)
                print(
                    f"[bench]   {m.rps:,.0f} rps, {m.cpu_us_per_req:.1f} µs CPU/req, "
                    f"@rate p50 {m.rate.get('p50_us', float('nan')) / 1000:.2f} ms, "
                    f"foreign {m.cores.get('foreign', 0):.2f} cores"
                    + (f"; problems: {m.problems}" if m.problems else ""),
                    file=sys.stderr,
                )
                results.append(m)
        text, ok = table(bench, results, targets)
    finally:
        bench.stop()
    print(text)
    if args.json:
        common.dump(Path(args.json), [m.__dict__ for m in results])
    bench.forget_work()
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
