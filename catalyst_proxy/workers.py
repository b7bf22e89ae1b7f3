"""``serve --workers N``: N processes, one port, each with its own event loop.

The parent validates the configuration, then forks the workers and does
nothing else: it never runs an event loop, so nothing async is shared across
``fork()``. Each worker binds its own listening socket with ``SO_REUSEPORT``
and the kernel spreads new connections across them.

Signals: SIGTERM/SIGINT to the parent are passed to every worker, each of
which drains as a single-process server does (readiness 503, stop accepting,
finish in-flight requests within the grace); the parent exits 0 when all have
exited cleanly.

A worker that dies on its own is logged (``worker.exited``: which, its pid,
its exit status) and replaced, at most once a second, and less often while
replacements keep dying young (a crash loop backs off, up to ``RESTART_MOST``
seconds apart). One that could not start for a reason a restart cannot mend
(exit status 2: its configuration or its port, said in one line on stderr, as
at start-up) stops the server: the others drain and the parent exits 2, so
that the failure shows (a pod restarts, and says why) instead of a server
serving on at a fraction of itself.

A parent that dies without passing a signal on (SIGKILL, a crash) takes its
workers with it: on Linux each asks the kernel for a SIGTERM when its parent
goes (``PR_SET_PDEATHSIG``) and drains as above, so no orphan keeps the port
or serves a configuration that nothing supervises any more.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import signal
import socket
import time
from collections.abc import Callable

from . import log

RESTART_INTERVAL = 1.0
RESTART_MOST = 30.0  # s between replacements of a worker that keeps dying young
YOUNG = 10.0  # s: a worker that dies younger than this is in a crash loop
USAGE_ERROR = 2  # a worker's exit status for a failure a restart cannot mend
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
# The listen queue of each worker's socket (the kernel caps it at net.core.somaxconn). Its
# server listens again on it when it starts: it must be given this again (aiohttp's 128).
BACKLOG = 1024


def listen_socket(host: str, port: int, *, reuse_port: bool) -> socket.socket:
    """A listening socket; an IPv6 address (``::``) listens for IPv4 too (dual stack), so
    that one ``--host ::`` serves both families, on an IPv6-only cluster as on any other."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(BACKLOG)
    sock.set_inheritable(False)
    return sock


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


_STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT})


def supervise(count: int, worker: Callable[[int], int]) -> int:
    """Fork ``count`` workers running ``worker(index)``; return the exit status."""
    children: dict[int, int] = {}  # pid -> worker index
    born: dict[int, float] = {}  # pid -> when it was forked (monotonic)
    stopping = False
    # A byte here ends a back-off's wait at once. The interpreter's own C-level handler
    # writes it (set_wakeup_fd) the moment a signal lands, even one that lands after the
    # last bytecode before select()'s system call, where the Python handler would only run
    # once the wait is over; and no lock is taken (an Event's set() from a handler could
    # wait for ever on the lock its own thread holds in wait()). Left open at the end: the
    # handlers stay, and must never write to a descriptor reused.
    stop_reader, stop_writer = os.pipe()
    os.set_blocking(stop_writer, False)

    parent = os.getpid()

    def spawn(index: int) -> None:
        # A signal between fork() and the child's registration would be forwarded to every
        # worker but the new one, which would then run on and be waited for forever (and
        # the child would run the parent's handler until it resets its own): both sides
        # hold the signals until they are ready for them.
        signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        try:
            pid = os.fork()
        except BaseException:  # no child: the parent must not stay deaf to a stop
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
            raise
        if pid == 0:  # the worker
            signal.set_wakeup_fd(-1)  # (its event loop sets its own)
            os.close(stop_reader)
            os.close(stop_writer)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
            status = 1
            try:
                _end_with(parent)
                status = worker(index)
            except SystemExit as exc:  # the worker's one-line failure, said on stderr
                status = exc.code if isinstance(exc.code, int) else 1
            except BaseException:
                log.get_logger().exception(log.WORKER_CRASHED, worker=index)
            finally:
                log.flush()  # os._exit skips atexit: a worker's last lines go out first
                os._exit(status)
        children[pid] = index
        born[pid] = time.monotonic()
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True  # (the wake-up byte: the interpreter writes it, see stop_writer)
        for pid in list(children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    signal.set_wakeup_fd(stop_writer, warn_on_full_buffer=False)
    for index in range(count):
        spawn(index)

    status = 0
    last_restart = 0.0
    interval = RESTART_INTERVAL
    logger = log.get_logger()
    while children:
        try:
            pid, wait_status = os.wait()
        except ChildProcessError:
            break
        if pid not in children:
            continue
        index = children.pop(pid)
        lived = time.monotonic() - born.pop(pid)
        code = os.waitstatus_to_exitcode(wait_status)
        if stopping:
            # Ended by the signal it was passed (one still starting has no handler yet): a
            # stop like any other.
            stopped = code == 0 or -code in _STOP_SIGNALS
            status = status or (0 if stopped else 1)
            continue
        logger.warning(log.WORKER_EXITED, worker=index, pid=pid, exit_status=code,
                       lived_seconds=round(lived, 3))  # fmt: skip
        if code == USAGE_ERROR:  # a restart would fail the same way: stop, and say so
            status = USAGE_ERROR
            forward(signal.SIGTERM, None)
            continue
        # A worker died on its own: replace it, never more than once a second, and less often
        # while replacements keep dying young.
        if lived >= YOUNG:
            interval = RESTART_INTERVAL
        delay = interval - (time.monotonic() - last_restart)
        if delay > 0 and not stopping:  # (a stop must not wait for its end: up to 30 s)
            select.select([stop_reader], [], [], delay)
        interval = min(interval * 2, RESTART_MOST)  # for the next, should this one die young
        last_restart = time.monotonic()
        if not stopping:
            spawn(index)
    return status


def _end_with(parent: int) -> None:
    """Have the kernel send this process SIGTERM when ``parent`` exits (Linux only)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        refused = libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        return
    if refused:  # say so: this worker would outlive a parent killed outright
        log.get_logger().warning(log.WORKER_UNTETHERED, errno=ctypes.get_errno())
    if os.getppid() != parent:  # it went between fork() and prctl(): no signal will come
        os.kill(os.getpid(), signal.SIGTERM)
