"""``serve --workers N``: several processes on one port, one signal to stop them all."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from catalyst_proxy import log
from catalyst_proxy.devtools.sme import SME
from catalyst_proxy.workers import _PR_SET_PDEATHSIG, BACKLOG

from .conftest import BRIDGE_SECRET
from .support import start_app


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _children(pid: int) -> set[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return {int(p) for p in path.read_text().split()} if path.exists() else set()


@pytest.fixture
async def sme_url() -> AsyncIterator[str]:
    runner, url = await start_app(SME(BRIDGE_SECRET).app(), access_log=None)
    yield url
    await runner.cleanup()


def _serve_env(public_key_file: Path, sme_url: str) -> dict[str, str]:
    return {
        **os.environ,
        "CATALYST_SESSION_PUBLIC_KEY_FILE": str(public_key_file),
        "CATALYST_SME_JWT_SECRET": BRIDGE_SECRET.decode(),
        "CATALYST_SME_GATEWAY_URL": sme_url,
        "CATALYST_SHUTDOWN_GRACE_SECONDS": "2",
    }


def _serve_args(port: int, workers: str, host: str = "127.0.0.1") -> list[str]:
    return [sys.executable, "-m", "catalyst_proxy", "serve", "--host", host,
            "--port", str(port), "--workers", workers]  # fmt: skip


async def _start(
    port: int, public_key_file: Path, sme_url: str, workers: str, *, capture: bool = False
) -> subprocess.Popen[bytes]:
    """``serve`` running and answering; ``capture``: its stdout and stderr piped."""
    output = subprocess.PIPE if capture else subprocess.DEVNULL
    proc = subprocess.Popen(
        _serve_args(port, workers), env=_serve_env(public_key_file, sme_url),
        stdout=output, stderr=output,
    )  # fmt: skip
    await _wait_serving(port, proc)
    return proc


async def _wait_serving(port: int, proc: subprocess.Popen[bytes]) -> None:
    async with aiohttp.ClientSession() as http:
        for _ in range(200):
            assert proc.poll() is None, "the server exited before serving"
            try:
                async with http.get(f"http://127.0.0.1:{port}/healthz") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientConnectionError:
                await asyncio.sleep(0.05)  # polling a process we do not control
    raise AssertionError("the server never answered /healthz")


async def _exit_code(proc: subprocess.Popen[bytes], timeout: float) -> int:
    return await asyncio.wait_for(asyncio.to_thread(proc.wait), timeout)


def _listen_queues(port: int) -> list[int]:
    """The listen queue of each socket listening on ``port`` (``ss``: its Send-Q)."""
    listing = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True,
                             text=True, check=True).stdout  # fmt: skip
    return [int(line.split()[2]) for line in listing.splitlines()]


async def test_each_worker_listens_with_the_full_backlog(
    public_key_file: Path, sme_url: str
) -> None:
    """Each worker's socket keeps a listen queue of BACKLOG (1024, or the kernel's cap), not
    aiohttp's default of 128: its server listens again on the socket it is given, and a burst
    of connections while the workers are busy must wait in the queue, not be dropped."""
    port = _free_port()
    proc = await _start(port, public_key_file, sme_url, "2")
    try:
        expected = min(BACKLOG, int(Path("/proc/sys/net/core/somaxconn").read_text()))
        for _ in range(200):
            queues = _listen_queues(port)
            if len(queues) == 2 and expected in queues:  # both workers are listening
                break
            await asyncio.sleep(0.05)  # polling processes we do not control
        assert queues == [expected, expected]
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        assert await _exit_code(proc, 15) == 0


async def test_two_workers_serve_one_port_and_stop_on_one_sigterm(
    public_key_file: Path, sme_url: str, bearer: object
) -> None:
    """Two worker processes share the port, both serve, and one SIGTERM to the parent stops all."""
    port = _free_port()
    proc = await _start(port, public_key_file, sme_url, "2")
    workers = _children(proc.pid)
    assert len(workers) == 2
    # New connections are spread across the workers; each counts only what it served.
    headers = bearer()  # type: ignore[operator]
    url = f"http://127.0.0.1:{port}"
    purchase = f"{url}/api/v1/billing/purchase"
    for _ in range(40):  # a new connection each time
        async with (
            aiohttp.ClientSession() as http,
            http.post(purchase, headers=headers, data=b"{}") as resp,
        ):
            assert resp.status == 200
    tallies: dict[int, int] = {}  # worker pid -> purchases it served
    for _ in range(30):
        async with aiohttp.ClientSession() as http:  # one connection: one worker
            async with http.get(f"{url}/readyz") as resp:
                pid = (await resp.json())["pid"]
            async with http.get(f"{url}/metrics") as resp:
                tallies[pid] = int(float(_sample(await resp.text(), PURCHASES)))
    assert set(tallies) == workers
    assert len(tallies) == 2, tallies  # two workers answered ...
    assert sum(tallies.values()) == 40  # ... and between them served every request once
    os.kill(proc.pid, signal.SIGTERM)
    assert await _exit_code(proc, 10) == 0
    for pid in workers:
        assert not _running(pid)


async def test_a_crashed_worker_is_replaced(public_key_file: Path, sme_url: str) -> None:
    """A worker that dies on its own is replaced and the port keeps serving."""
    port = _free_port()
    proc = await _start(port, public_key_file, sme_url, "2")
    before = _children(proc.pid)
    victim = min(before)
    os.kill(victim, signal.SIGKILL)
    for _ in range(100):
        after = _children(proc.pid)
        if len(after) == 2 and victim not in after:
            break
        await asyncio.sleep(0.05)  # polling the supervisor, which we do not control
    assert len(after) == 2
    assert victim not in after
    await _wait_serving(port, proc)
    os.kill(proc.pid, signal.SIGTERM)
    assert await _exit_code(proc, 10) == 0


async def test_workers_drain_and_exit_when_the_parent_is_killed(
    public_key_file: Path, sme_url: str
) -> None:
    """A SIGKILLed parent leaves no orphan: each worker gets SIGTERM, exits, and frees the port."""
    port = _free_port()
    proc = await _start(port, public_key_file, sme_url, "2")
    workers = _children(proc.pid)
    assert len(workers) == 2
    os.kill(proc.pid, signal.SIGKILL)
    await _exit_code(proc, 10)
    try:
        for _ in range(200):
            alive = {pid for pid in workers if _running(pid)}
            if not alive:
                break
            await asyncio.sleep(0.05)  # polling processes we no longer parent
        assert not alive, f"orphaned workers still running: {alive}"
    finally:
        for pid in workers:  # never leave an orphan behind the suite, pass or fail
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    with socket.socket() as probe, pytest.raises(ConnectionRefusedError):
        probe.connect(("127.0.0.1", port))


async def test_a_worker_that_cannot_start_says_why_and_the_server_exits_2(
    public_key_file: Path, sme_url: str, tmp_path: Path
) -> None:
    """A worker's replacement that cannot start (its key file was broken meanwhile) says why in
    one line naming the variable and exits 2; the supervisor logs each exit, drains the other
    worker and exits 2 itself, instead of replacing it, silently, for ever."""
    key = tmp_path / "public.pem"
    key.write_bytes(public_key_file.read_bytes())
    port = _free_port()
    proc = await _start(port, key, sme_url, "2", capture=True)
    try:
        key.write_text("not a key\n")
        victim = min(_children(proc.pid))
        os.kill(victim, signal.SIGKILL)
        assert await _exit_code(proc, 30) == 2
    finally:
        if proc.poll() is None:
            proc.kill()
        out, err = proc.communicate()
    lines = err.decode().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("catalyst-proxy: error: CATALYST_SESSION_PUBLIC_KEY_FILE")
    exits = [json.loads(line) for line in out.splitlines() if b'"worker.exited"' in line]
    assert [(e["pid"], e["exit_status"]) for e in exits][:1] == [(victim, -signal.SIGKILL)]
    assert exits[-1]["exit_status"] == 2
    assert not _children(proc.pid)


async def test_a_second_server_on_a_port_another_servers_workers_share_exits_2(
    public_key_file: Path, sme_url: str
) -> None:
    """Workers share their port (SO_REUSEPORT); a second ``serve --workers`` on it must not join
    them and split the traffic between two servers: it exits 2, naming the port."""
    port = _free_port()
    first = await _start(port, public_key_file, sme_url, "2")
    try:
        second = await asyncio.to_thread(
            subprocess.run, _serve_args(port, "2"), env=_serve_env(public_key_file, sme_url),
            capture_output=True, timeout=30,
        )  # fmt: skip
        assert second.returncode == 2
        assert f"--port {port}: Address already in use" in second.stderr.decode()
    finally:
        first.send_signal(signal.SIGTERM)
        assert await _exit_code(first, 15) == 0


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_host_that_does_not_resolve_is_named_as_the_host(
    public_key_file: Path, workers: str
) -> None:
    """A --host that does not resolve is a usage error that names --host, not --port."""
    done = subprocess.run(
        _serve_args(_free_port(), workers, host="no-such-host.invalid"),
        env=_serve_env(public_key_file, "http://127.0.0.1:9"), capture_output=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.decode().startswith("catalyst-proxy: error: --host no-such-host.invalid: ")


def _running(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (reaped or not, a zombie serves nothing)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


PURCHASES = (
    'catalyst_proxy_requests_total{method="POST",route="/api/v1/billing/purchase",status="200"}'
)


def _sample(metrics: str, name: str) -> str:
    return next(line.split()[-1] for line in metrics.splitlines() if line.startswith(name + " "))


def test_workers_needs_a_fixed_port() -> None:
    """--workers with port 0 is a usage error: each worker must bind the same port."""
    result = subprocess.run(
        [sys.executable, "-m", "catalyst_proxy", "serve", "--port", "0", "--workers", "2"],
        env={**os.environ, "CATALYST_SESSION_PUBLIC_KEY_FILE": "/dev/null"},
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(("option", "refused"), [(_PR_SET_PDEATHSIG, False), (0x7FFF, True)],
                         ids=["PR_SET_PDEATHSIG", "an-option-the-kernel-refuses"])  # fmt: skip
def test_a_worker_says_so_when_the_kernel_refuses_the_parent_death_signal(
    option: int, refused: bool
) -> None:
    """``prctl`` failing is not silent: the worker logs ``worker.untethered`` with the errno.

    The refusal is real (the kernel's EINVAL for an option it does not know), in
    a process of its own; with the real option nothing is logged.
    """
    script = (
        "import os, sys\n"
        "from catalyst_proxy import log, workers\n"
        "log.configure(stream=sys.stdout)\n"
        "workers._PR_SET_PDEATHSIG = int(sys.argv[1])\n"
        "workers._end_with(os.getppid())\n"
        "log.flush()\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(option)],
        capture_output=True, text=True, check=True, timeout=30,
    )  # fmt: skip
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    untethered = [line for line in lines if line["event"] == "worker.untethered"]
    if refused:
        assert [(line["level"], line["errno"]) for line in untethered] == [
            ("warning", errno.EINVAL)
        ]
    else:
        assert untethered == []


RACE = """
import os, signal, sys, time
from catalyst_proxy import workers

real_fork = os.fork

def fork():
    pid = real_fork()
    if pid:  # the parent, before it has registered the child: the worst moment for a SIGTERM
        os.kill(os.getpid(), signal.SIGTERM)
    return pid

os.fork = fork

def worker(index):
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    while True:
        time.sleep(1)

sys.exit(workers.supervise(1, worker))
"""


def test_a_sigterm_as_a_worker_is_forked_still_stops_it() -> None:
    """A SIGTERM that reaches the supervisor between fork() and its registering the child is
    held until then, so it reaches the new worker too: the supervisor exits instead of
    waiting forever for a worker nobody told to stop."""
    done = subprocess.run([sys.executable, "-c", RACE], capture_output=True, timeout=60,
                          text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr


FORK_FAILS = """
import os, signal, sys
from catalyst_proxy import workers

def fork():
    raise BlockingIOError(11, "Resource temporarily unavailable")

os.fork = fork
try:
    workers.supervise(1, lambda index: 0)
except BlockingIOError:
    pass
held = signal.pthread_sigmask(signal.SIG_BLOCK, [])
sys.exit(3 if signal.SIGTERM in held else 0)
"""


def test_a_failed_fork_leaves_the_stop_signals_deliverable() -> None:
    """If fork() fails, the signals held around it are let through again: the process stays
    stoppable."""
    done = subprocess.run([sys.executable, "-c", FORK_FAILS], capture_output=True, timeout=60,
                          text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr


BACKING_OFF = """
import signal, sys
from catalyst_proxy import log, workers

log.configure(fmt="json", stream=sys.stdout)
workers.RESTART_INTERVAL = workers.RESTART_MOST = 60.0  # the second replacement waits 60 s

def worker(index):
    if index == 0:
        return 1  # dies at once, every time
    signal.pause()  # the healthy one, until its SIGTERM
    return 0

sys.exit(workers.supervise(2, worker))
"""


def test_a_sigterm_during_a_crash_loops_back_off_stops_the_server_at_once() -> None:
    """One worker keeps dying young, so the supervisor waits (up to ``RESTART_MOST``) before
    replacing it again; a SIGTERM during that wait stops the server then, with status 0, not
    once the wait is over (a pod's grace period would run out first: SIGKILL)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with subprocess.Popen([sys.executable, "-c", BACKING_OFF], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, env=env, text=True) as proc:  # fmt: skip
        try:
            assert proc.stdout is not None
            exits = 0
            while exits < 2:  # the second death: the supervisor now waits 60 s to replace it
                line = proc.stdout.readline()
                assert line, proc.stderr.read() if proc.stderr else ""
                exits += json.loads(line)["event"] == log.WORKER_EXITED
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=15) == 0
        finally:
            proc.kill()


WAKEUP_WIRED = """
import os, select, signal, sys
from catalyst_proxy import workers

workers.RESTART_INTERVAL = workers.RESTART_MOST = 60.0
real_select = select.select

def select_checked(rlist, wlist, xlist, timeout):
    fd = signal.set_wakeup_fd(-1)  # where the interpreter's C handler writes on a signal
    signal.set_wakeup_fd(fd, warn_on_full_buffer=False)
    assert fd != -1, "no wake-up descriptor"
    os.write(fd, b"\\0")  # what a signal landing now would write, whatever Python does
    ready, _, _ = real_select(rlist, [], [], 0)
    assert ready == rlist, "the wait does not watch the wake-up descriptor"
    os.kill(os.getpid(), signal.SIGTERM)
    return real_select(rlist, wlist, xlist, timeout)

workers.select.select = select_checked

def worker(index):
    return 1  # dies at once, every time: the second replacement waits 60 s

sys.exit(workers.supervise(1, worker))
"""


def test_a_signal_wakes_the_back_off_at_the_c_level() -> None:
    """A signal can land after the last bytecode before the back-off's select() system
    call: its Python handler runs only once select() returns, up to 30 s later. So the
    interpreter's C-level handler writes the wake-up byte itself (``set_wakeup_fd``): the
    wait watches the descriptor that handler writes to (landing a signal in that window
    takes a C shim; this checks the wiring). The handler takes no lock (an Event's, taken
    again by a handler that interrupts its own thread inside wait(), would hang the
    supervisor for good): a SIGTERM arriving as the wait begins then ends it at once."""
    done = subprocess.run([sys.executable, "-c", WAKEUP_WIRED], capture_output=True,
                          timeout=15, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr
