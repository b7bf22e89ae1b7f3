"""The real ``catalyst-proxy`` as a child process, for tests that need every byte it writes.

``ServeProcess`` runs ``python -m catalyst_proxy <args>`` with a given environment,
keeps everything it writes to stdout and stderr, and lets a test wait for a line
(no fixed sleeps: lines are read as they come). Used by the CLI, logging and
shutdown suites.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def child_env(extra: dict[str, str]) -> dict[str, str]:
    """A clean environment for the child: PATH and the like, no CATALYST_* from the outside."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("CATALYST_", "OPERATOR_"))}
    base.pop("PYTHONUNBUFFERED", None)  # the product must flush on its own
    return {**base, **extra}


@dataclass
class ServeProcess:
    """One child process; ``stdout_lines``/``stderr_lines`` fill in as it writes."""

    args: list[str]
    env: dict[str, str]
    proc: asyncio.subprocess.Process | None = None
    stdout_lines: list[str] = field(default_factory=list)
    stderr_lines: list[str] = field(default_factory=list)
    _new_line: asyncio.Condition = field(default_factory=asyncio.Condition)
    _readers: list[asyncio.Task[None]] = field(default_factory=list)

    async def start(self) -> ServeProcess:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "catalyst_proxy",
            *self.args,
            env=child_env(self.env),
            cwd=str(ROOT),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        assert self.proc.stdout is not None
        assert self.proc.stderr is not None
        self._readers = [
            asyncio.create_task(self._read(self.proc.stdout, self.stdout_lines)),
            asyncio.create_task(self._read(self.proc.stderr, self.stderr_lines)),
        ]
        return self

    async def _read(self, stream: asyncio.StreamReader, into: list[str]) -> None:
        while line := await stream.readline():
            async with self._new_line:
                into.append(line.decode("utf-8", "replace").rstrip("\n"))
                self._new_line.notify_all()
        async with self._new_line:
            self._new_line.notify_all()

    @property
    def output(self) -> str:
        """Everything written so far, stdout then stderr."""
        return "\n".join(self.stdout_lines + self.stderr_lines)

    async def wait_for_line(self, predicate: Callable[[str], bool], timeout: float = 20) -> str:
        """The first stdout line matching ``predicate``, waiting for it as lines arrive."""
        assert self.proc is not None

        def found() -> str | None:
            return next((line for line in self.stdout_lines if predicate(line)), None)

        async with asyncio.timeout(timeout), self._new_line:
            while (line := found()) is None:
                if all(task.done() for task in self._readers):
                    raise AssertionError(f"process ended without the line:\n{self.output}")
                await self._new_line.wait()
        return line

    async def wait_for_event(self, event: str, timeout: float = 20) -> dict[str, Any]:
        """The first JSON log line whose ``event`` is ``event``."""
        line = await self.wait_for_line(lambda text: json_event(text) == event, timeout)
        return dict(json.loads(line))

    async def wait_listening(self, timeout: float = 20) -> str:
        """The base URL from the start-up log line."""
        startup = await self.wait_for_event("startup", timeout)
        port = int(str(startup["listen"]).rsplit(":", 1)[1])
        return f"http://127.0.0.1:{port}"

    def signal(self, signum: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    async def wait(self, timeout: float = 20) -> int:
        """The exit status, once the process ended and its output was read to the end."""
        assert self.proc is not None
        async with asyncio.timeout(timeout):
            status = await self.proc.wait()
            await asyncio.gather(*self._readers)
        return status

    async def stop(self) -> None:
        """Kill it if it still runs (test teardown)."""
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        for task in self._readers:
            await task

    def json_lines(self) -> list[dict[str, Any]]:
        out = []
        for line in self.stdout_lines:
            if line.startswith("{"):
                out.append(json.loads(line))
        return out


def json_event(line: str) -> str | None:
    if not line.startswith("{"):
        return None
    try:
        value = json.loads(line).get("event")
    except ValueError:
        return None
    return value if isinstance(value, str) else None


# A compact JWS (header and payload are JSON objects, so both start with "eyJ").
JWS_SHAPE = re.compile(r"eyJ[A-Za-z0-9_-]+\.eyJ[A-Za-z0-9_-]+")


async def run_cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """Run ``python -m catalyst_proxy ARGS`` to the end; (status, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "catalyst_proxy",
        *args,
        env=child_env(env or {}),
        cwd=str(ROOT),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(60):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()
