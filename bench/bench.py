"""``make bench``: what the gateway costs, measured against a direct hit on the same upstream.

One run starts, on 127.0.0.1 (ports ``--port-base`` .. +1, default 19080):

* the gateway, ``catalyst-proxy serve --workers N``, in its production
  configuration (default JSON logging, to a file; metrics on);
* a fast upstream stand-in: nginx answering ``POST /api/billing/purchase`` with
  a fixed JSON body (``bench/upstream.nginx.conf``);

and then, for every round, measures two targets next to each other in time:
``direct`` (the upstream itself: the floor) and ``gateway``:

* throughput: ``wrk -t2 -c50 -d10s`` with ``bench/post.lua`` (a 200-byte JSON
  POST, ``Authorization: Bearer`` round-robin over ``--tokens`` operators);
* CPU per request: utime+stime of every process of the target (from
  /proc/<pid>/stat) before and after the wrk run, divided by the requests;
* latency at a fixed rate: ``bench/loadgen.py``, open loop, 500 requests/s on
  32 keep-alive connections;
* peak RSS per worker (VmHWM) at the end;
* correctness: every answer 200 with the upstream's body, the upstream's
  request counter (nginx stub_status) moved by the number of requests, and the
  bridge tokens nginx logged for ~1/64 of the requests verify with the secret.

It prints one markdown table (medians over ``--rounds``) and exits 1 if a
check failed. See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
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
    cores: dict[str, float] = field(default_factory=dict)
    rate: dict[str, Any] = field(default_factory=dict)
    rate_cpu_us_per_req: float = 0.0
    bridge_verified: int = 0
    problems: list[str] = field(default_factory=list)


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.work = Path(args.workdir or tempfile.mkdtemp(prefix="catalyst-bench-"))
        self.work.mkdir(parents=True, exist_ok=True)
        os.chmod(self.work, 0o755)  # noqa: S103 - nginx's worker (nobody, when run as root) reads below it
        self.gw_port = args.port_base
        self.up_port = args.port_base + 1
        self.procs: list[subprocess.Popen[bytes]] = []
        self.body = request_body()
        (self.work / "body.json").write_bytes(self.body)
        self.bridge_log = self.work / "bridge-tokens.log"
        self.bridge_offset = 0
        self.loadavg = " ".join(Path("/proc/loadavg").read_text().split()[:3])
        self.git = common.git_state()  # the code the gateway is started with

    # ------------------------------------------------------------ set-up
    def start(self) -> tuple[Target, Target]:
        self.material = common.make_material(self.work, self.args.tokens)
        conf = (HERE / "upstream.nginx.conf").read_text()
        conf = conf.replace("@DIR@", str(self.work)).replace("@PORT@", str(self.up_port))
        (self.work / "ngx").mkdir(exist_ok=True)
        (self.work / "upstream.conf").write_text(conf)
        self.bridge_log.touch()
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        upstream = common.start(
            [nginx, "-e", str(self.work / "upstream.error.log"), "-p", str(self.work), "-c",
             str(self.work / "upstream.conf")],
            self.work / "upstream.out",
        )  # fmt: skip
        self.procs.append(upstream)
        common.wait_http(f"http://127.0.0.1:{self.up_port}/__stats", upstream, 10)
        env = common.gateway_env(self.material, f"http://127.0.0.1:{self.up_port}")
        gateway = common.start(
            [sys.executable, "-m", "catalyst_proxy", "serve", "--host", "127.0.0.1",
             "--port", str(self.gw_port), "--workers", str(self.args.workers)],
            self.work / "gateway.log",
            env,
        )  # fmt: skip
        self.procs.append(gateway)
        common.wait_http(f"http://127.0.0.1:{self.gw_port}/readyz", gateway, 30)
        if self.args.workers > 1:  # every worker up: each answers on the shared port
            deadline = time.monotonic() + 20
            while len(common.tree(gateway.pid)) < self.args.workers + 1:
                if time.monotonic() > deadline:
                    raise SystemExit("the gateway's workers did not all start")
                time.sleep(0.1)
            time.sleep(1)
        self.gateway_proc = gateway
        self.upstream_proc = upstream
        direct = Target("direct", "127.0.0.1", self.up_port, UPSTREAM_PATH, upstream.pid, False)
        proxy = Target("gateway", "127.0.0.1", self.gw_port, GATEWAY_PATH, gateway.pid, True)
        return direct, proxy

    def stop(self) -> None:
        for proc in reversed(self.procs):
            common.stop(proc)

    # ------------------------------------------------------------ helpers
    def upstream_requests(self) -> int:
        """nginx's request counter (it counts this /__stats request too)."""
        _, text = common.http_get(f"http://127.0.0.1:{self.up_port}/__stats")
        return int(text.decode().splitlines()[2].split()[2])

    def post(self, target: Target, token: str | None) -> tuple[int, bytes]:
        import http.client

        conn = http.client.HTTPConnection(target.host, target.port, timeout=5)
        headers = {"Content-Type": "application/json"}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        try:
            conn.request("POST", target.path, body=self.body, headers=headers)
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def preflight(self, target: Target) -> list[str]:
        problems = []
        status, body = self.post(target, self.material.operators[0].token)
        if status != 200 or body != UPSTREAM_BODY:
            problems.append(
                f"valid token: HTTP {status}, body {'ok' if body == UPSTREAM_BODY else 'differs'}"
            )
        if target.jwt:
            before = self.upstream_requests()
            for name, token in [*self.material.bad_tokens.items(), ("no-token", None)]:
                status, _ = self.post(target, token)
                if status != 401:
                    problems.append(f"{name} token: HTTP {status}, want 401")
            if self.upstream_requests() - before - 1:
                problems.append("a refused request reached the upstream")
        return problems

    def wrk(self, target: Target, seconds: float) -> tuple[dict[str, Any], float, str]:
        argv = [
            "wrk", f"-t{self.args.threads}", f"-c{self.args.conns}", f"-d{seconds:g}s",
            "--timeout", "5s", "--latency", "-s", str(HERE / "post.lua"), target.url, "--",
            str(self.work / "tokens.txt"), str(self.work / "body.json"),
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

    def new_bridge_tokens(self) -> list[str]:
        with self.bridge_log.open("rb") as f:
            f.seek(self.bridge_offset)
            data = f.read()
        self.bridge_offset += len(data)
        out = []
        for line in data.decode().splitlines():
            if line.startswith("Bearer "):
                out.append(line[len("Bearer ") :])
        return out

    # ------------------------------------------------------------ one measurement
    def measure(self, target: Target, rnd: int) -> Measurement:
        m = Measurement(target.name, rnd)
        m.problems = self.preflight(target)
        if any(p.startswith("valid token") for p in m.problems):
            return m
        if self.args.warmup > 0:
            self.wrk(target, self.args.warmup)
            time.sleep(1)  # let requests the warm-up abandoned drain
        up_pids = common.tree(self.upstream_proc.pid)
        pids = common.tree(target.root)
        self.new_bridge_tokens()  # skip what earlier runs logged

        # throughput (closed loop, saturating)
        c0 = self.upstream_requests()
        t0, u0, b0 = (
            common.cpu_seconds(pids),
            common.cpu_seconds(up_pids),
            common.machine_busy(),
        )
        w0 = time.monotonic()
        data, wrk_cpu, _ = self.wrk(target, self.args.duration)
        wall = time.monotonic() - w0
        t1, u1, b1 = (
            common.cpu_seconds(pids),
            common.cpu_seconds(up_pids),
            common.machine_busy(),
        )
        time.sleep(0.5)
        c1 = self.upstream_requests()
        requests = data["requests"]
        m.wrk = data
        m.rps = requests / (data["duration_us"] / 1e6)
        m.cpu_us_per_req = (t1 - t0) / max(requests, 1) * 1e6
        machine = (b1[0] - b0[0]) / wall
        m.cores = {
            "target": (t1 - t0) / wall,
            "upstream": (u1 - u0) / wall,
            "wrk": wrk_cpu / wall,
            "machine": machine,
        }
        own = m.cores["target"] + m.cores["wrk"] + (m.cores["upstream"] if target.jwt else 0)
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

        if target.jwt:
            tokens = self.new_bridge_tokens()
            bad = [why for why in map(self.verify, tokens) if why]
            m.bridge_verified = len(tokens) - len(bad)
            if not tokens:
                m.problems.append("no bridge token was sampled")
            if bad:
                m.problems.append(f"{len(bad)} bridge tokens fail: {bad[0]}")
        return m

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


# ------------------------------------------------------------------ the table


def spread(values: list[float]) -> str:
    if len(values) < 2 or not statistics.median(values):
        return ""
    return f" (±{(max(values) - min(values)) / 2 / statistics.median(values) * 100:.0f}%)"


def table(bench: Bench, results: list[Measurement], targets: list[Target]) -> tuple[str, bool]:
    args = bench.args
    by: dict[str, list[Measurement]] = {t.name: [] for t in targets}
    for m in results:
        by[m.target].append(m)
    rounds = {m.round for m in results}
    direct = {m.round: m for m in by["direct"]}

    def med(values: list[float]) -> float:
        return statistics.median(values) if values else float("nan")

    stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    lines = [
        f"catalyst-proxy `make bench` — {stamp} — gateway: {common.describe_git(bench.git)}, "
        f"`serve --workers {args.workers}` — {len(rounds)} round(s), median; throughput: "
        f"wrk -t{args.threads} -c{args.conns} -d{args.duration:g}s; latency: loadgen "
        f"{args.rate:g} req/s for {args.rate_duration:g}s on 32 connections; "
        f"{args.tokens} tokens",
        "",
        "| target | rps | x direct | CPU µs/req | target cores | wrk p50 / p99 ms "
        "| @rate p50 / p99 / p99.9 ms | added p50 / p99 ms over direct "
        "| CPU µs/req @rate | peak RSS MB/worker | foreign cores | check |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    ok = True
    for t in targets:
        ms = by[t.name]
        if not ms:
            continue
        problems = sorted({p for m in ms for p in m.problems})
        ok = ok and not problems
        rps = [m.rps for m in ms if m.rps]
        x_direct = [m.rps / direct[m.round].rps for m in ms if m.rps and direct[m.round].rps]
        rate_ok = [m for m in ms if m.rate]
        p = {q: med([m.rate[f"p{q}_us"] / 1000 for m in rate_ok]) for q in ("50", "99", "999")}
        added50 = med(
            [m.rate["p50_us"] / 1000 - direct[m.round].rate["p50_us"] / 1000 for m in rate_ok]
        )
        added99 = med(
            [m.rate["p99_us"] / 1000 - direct[m.round].rate["p99_us"] / 1000 for m in rate_ok]
        )
        rss = bench.peak_rss(t)
        rss_text = f"{rss['worker']:.1f}" + (
            f" (+ parent {rss['parent']:.1f})" if "parent" in rss else ""
        )
        verified = sum(m.bridge_verified for m in ms)
        if problems:
            check = "FAIL: " + "; ".join(problems)
        elif t.jwt:
            check = f"ok ({verified} bridge tokens verified)"
        else:
            check = "ok"
        lines.append(
            f"| {t.name} | {med(rps):,.0f}{spread(rps)} | {med(x_direct):.3f} "
            f"| {med([m.cpu_us_per_req for m in ms]):.1f} "
            f"| {med([m.cores.get('target', 0) for m in ms]):.2f} "
            f"| {med([m.wrk['p50_us'] / 1000 for m in ms if m.wrk]):.2f} / "
            f"{med([m.wrk['p99_us'] / 1000 for m in ms if m.wrk]):.2f} "
            f"| {p['50']:.2f} / {p['99']:.2f} / {p['999']:.2f} "
            f"| {added50:.2f} / {added99:.2f} "
            f"| {med([m.rate_cpu_us_per_req for m in rate_ok]):.1f} "
            f"| {rss_text} "
            f"| {max(m.cores.get('foreign', 0) for m in ms):.2f} | {check} |"
        )
    lines.append("")
    per_round = ", ".join(
        f"r{r}: "
        + " / ".join(
            f"{m.target} {m.rps:,.0f} rps {m.cpu_us_per_req:.0f} µs"
            for m in results
            if m.round == r
        )
        for r in sorted(rounds)
    )
    lines.append(f"Per round (rps, CPU µs/req): {per_round}.")
    gen = [m.cores["loadgen"] for m in results if "loadgen" in m.cores]
    if gen:
        lines.append(f"loadgen used {med(gen):.2f} cores at {args.rate:g} req/s (median).")
    lines.append(
        f"Machine: {os.cpu_count()} CPUs, load average before {bench.loadavg}; "
        + ", ".join(f"{k} {v}" for k, v in common.versions().items())
        + "."
    )
    return "\n".join(lines), ok


def ensure_tools() -> None:
    missing = [
        t for t in ("wrk", "nginx") if not (shutil.which(t) or Path(f"/usr/sbin/{t}").exists())
    ]
    if missing:
        raise SystemExit(
            f"bench: {', '.join(missing)} not found: run `make bench` as root (it installs them "
            "with apt-get) or `apt-get install wrk nginx` first"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=1, help="gateway worker processes [1]")
    parser.add_argument("--duration", type=float, default=10, help="wrk run, seconds [10]")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; medians are reported [3]")
    parser.add_argument("--tokens", type=int, default=64, help="distinct operator tokens [64]")
    parser.add_argument("--conns", type=int, default=50, help="wrk connections [50]")
    parser.add_argument("--threads", type=int, default=2, help="wrk threads [2]")
    parser.add_argument("--warmup", type=float, default=2, help="unrecorded wrk warm-up [2]")
    parser.add_argument("--rate", type=float, default=500, help="fixed rate, req/s (0: skip)")
    parser.add_argument("--rate-duration", type=float, default=10, help="fixed-rate run [10]")
    parser.add_argument(
        "--port-base",
        type=int,
        default=int(os.environ.get("BENCH_PORT_BASE", "19080")),
        help="gateway on this port, upstream on +1 [$BENCH_PORT_BASE or 19080]",
    )
    parser.add_argument("--workdir", help="keep keys, logs and configs here [a temp dir]")
    parser.add_argument("--json", help="also write every measurement to this file")
    args = parser.parse_args(argv)
    ensure_tools()
    bench = Bench(args)
    results: list[Measurement] = []
    try:
        targets = list(bench.start())
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
    if not args.workdir:
        shutil.rmtree(bench.work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
