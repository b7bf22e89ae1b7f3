"""structlog set-up: one JSON object per line on stdout, or console lines.

Event names are constants here, so a reader (and a test) finds every kind of
line the gateway writes in one place. The ``redact`` processor is a last line of
defence: the code never passes a token, cookie or secret to a logger, and if a
value ever looked like a compact JWS it would still be masked.

Lines are not written with one system call each: they gather in ``LineSink``
and go out when it holds 64 KiB, at least every ``FLUSH_INTERVAL`` (100 ms)
while the event loop runs, and at shutdown (``flush()``, called by the server
after the drain and by each worker before it exits; and at interpreter exit).
Into a pipe or a socket (a container's stdout, which ``serve --workers`` shares
among its processes) a batch goes out in writes of whole lines of at most
``PIPE_BUF`` bytes each, the most a pipe takes from one writer without
interleaving another's: a 64 KiB write would let another worker's lines in
mid-line.
The access-log line (``access()``), written once per request, takes a fast
path that renders the same fields with orjson instead of structlog's chain.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import logging
import os
import re
import select
import stat
import sys
import time
import traceback
from collections.abc import Callable, Iterator, MutableMapping
from typing import Any, TextIO

import orjson
import structlog

REQUEST = "request"
STARTUP = "startup"
SHUTDOWN_BEGIN = "shutdown.begin"
SHUTDOWN_GRACE_EXCEEDED = "shutdown.grace_exceeded"
SHUTDOWN_DONE = "shutdown.done"
JWKS_REFRESH = "jwks.refresh"
BRIDGE_SECRET_SHORT = "bridge_secret.short"
BRIDGE_SECRET_UNREADABLE = "bridge_secret.unreadable"
HANDLER_ERROR = "handler.error"
REFUSED = "request.refused"
BREAKER = "breaker.state"
STORE = "store.state"
RATE_LIMIT_STORE_ERROR = "ratelimit.store_error"  # throttled: ratelimit.STORE_ERROR_LOG_EVERY
IDEMPOTENCY_OFF = "idempotency.off"
IDEMPOTENCY_EVICTION = "idempotency.eviction_policy"
IDEMPOTENCY_NO_PERSISTENCE = "idempotency.no_persistence"  # Redis keeps nothing across a restart
IDEMPOTENCY_STORE_ERROR = "idempotency.store_error"
IDEMPOTENCY_RECORD_LOST = "idempotency.record_lost"  # a completion found no reservation
IDEMPOTENCY_RECORD_TAKEN = "idempotency.record_taken"  # ... or another request's record
WORKER_UNTETHERED = "worker.untethered"  # PR_SET_PDEATHSIG refused
WORKER_EXITED = "worker.exited"  # the supervisor: a worker died on its own
WORKER_CRASHED = "worker.crashed"  # a worker: an exception nothing else caught

FLUSH_INTERVAL = 0.1
_FLUSH_BYTES = 64 * 1024

# A JWS (header.payload.signature) or a JWE (five parts), by its first segment: base64url
# of a JSON object ('{"' is "eyJ", '{ "' is "eyA"), then at least one more part after a dot,
# the dot maybe percent-encoded, any number of times over (%2E, %252E, ...; the SME gateway
# decodes a path, so a token so written is one). Never begun inside a longer run of
# base64url (the lookbehind; an encoded dot ends a run): each run is scanned once, so the
# time stays linear in the text ("eyJ" * 20,000 took seconds without it). Nothing is decoded.
_DOT = r"(?:\.|%(?:25)*2[Ee])"
_JWS = re.compile(
    rf"(?:(?<![A-Za-z0-9_-])|(?<=%2E)|(?<=%2e))ey[JA][A-Za-z0-9_-]{{4,}}(?:{_DOT}[A-Za-z0-9_-]*)+"
)
_SECRET_KEYS = frozenset({"authorization", "cookie", "token", "secret", "password", "set-cookie"})


# The user info of a URL (``//user:password@host``): an absolute-form request target has one.
_USERINFO = re.compile(r"(//)[^/@\s]*@")


def masked(value: str) -> str:
    """``value`` (a field from the client: a path, a request ID) with what looks like a
    credential masked: a JWS or JWE, also with its dots percent-encoded, and the user info
    of a URL (an absolute-form request target, ``http://user:password@host/...``)."""
    if "ey" in value:
        value = _JWS.sub("[redacted-jws]", value)
    if "//" in value and "@" in value:
        value = _USERINFO.sub(r"\1[redacted]@", value)
    return value


def redact(_logger: Any, _method: str, event: MutableMapping[str, Any]) -> Any:
    for key, value in event.items():
        if key.lower() in _SECRET_KEYS:
            event[key] = "[redacted]"
        elif isinstance(value, str):
            event[key] = masked(value)
    return event


class LineSink:
    """Whole lines for one file descriptor, written in batches (see the module docstring)."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._pending: list[bytes] = []
        self._size = 0
        self._timer: asyncio.TimerHandle | None = None
        self._piece = select.PIPE_BUF if _shared_stream(stream) else _FLUSH_BYTES
        # A fork (``serve --workers``) writes out the parent's lines first; the child starts empty.
        os.register_at_fork(before=self.flush, after_in_child=self._forget)

    def line(self, text: str | bytes) -> None:
        data = text.encode("utf-8", "backslashreplace") if isinstance(text, str) else text
        self._pending.append(data + b"\n")
        self._size += len(data) + 1
        if self._size >= _FLUSH_BYTES:
            self.flush()
        elif self._timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self.flush()  # no event loop (start-up, the CLI): nothing would flush later
            else:
                self._timer = loop.call_later(FLUSH_INTERVAL, self.flush)

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._pending:
            return
        pending = self._pending
        self._pending = []
        self._size = 0
        stream = self._stream
        buffer = getattr(stream, "buffer", None)
        try:
            stream.flush()
            for data in _pieces(pending, self._piece):
                if buffer is not None:
                    buffer.write(data)
                    buffer.flush()
                else:
                    stream.write(data.decode())
                    stream.flush()
        except (OSError, ValueError):
            pass  # stdout closed or gone: nothing to write to

    def _forget(self) -> None:
        self._pending.clear()
        self._size = 0
        self._timer = None  # the parent's loop's, not ours


def _shared_stream(stream: TextIO) -> bool:
    """A pipe or a socket: where writes of several processes may interleave."""
    try:
        mode = os.fstat(stream.fileno()).st_mode
    except (OSError, ValueError, AttributeError):  # no descriptor (a test's StringIO)
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)


def _pieces(lines: list[bytes], size: int) -> Iterator[bytes]:
    """``lines`` joined into pieces of at most ``size`` bytes (a longer line: on its own)."""
    piece: list[bytes] = []
    length = 0
    for line in lines:
        if piece and length + len(line) > size:
            yield b"".join(piece)
            piece, length = [], 0
        piece.append(line)
        length += len(line)
    if piece:
        yield b"".join(piece)


class _SinkLogger:
    """structlog's logger interface, writing to the sink."""

    def __init__(self, sink: LineSink) -> None:
        self._sink = sink

    def msg(self, message: str | bytes) -> None:
        self._sink.line(message)

    log = debug = info = warn = warning = err = error = critical = exception = fatal = msg


_sink: LineSink | None = None
_fast_access = False  # JSON format and the info level enabled: access() renders itself


def configure(*, fmt: str = "json", level: str = "info", stream: TextIO | None = None) -> None:
    """Configure structlog process-wide (called once by the CLI)."""
    global _sink, _fast_access
    if _sink is not None:
        _sink.flush()
    sink = _sink = LineSink(stream or sys.stdout)
    atexit.register(sink.flush)
    renderer = console_renderer() if fmt == "console" else _json_renderer()
    threshold = logging.getLevelNamesMapping()[level.upper()]
    _fast_access = fmt == "json" and threshold <= logging.INFO
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            redact,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(threshold),
        logger_factory=lambda *_: _SinkLogger(sink),
        cache_logger_on_first_use=True,
    )
    # aiohttp's own loggers (e.g. unhandled-exception reports), at WARNING, redacted:
    # aiohttp quotes the start of a header line it refused, token and all. In the JSON
    # format they are lines of ours, one JSON object each (a collector reads a container's
    # stdout and stderr as one stream: a plain multi-line traceback there breaks it); in
    # the console format, text on stderr.
    handler: logging.Handler
    if fmt == "json":
        handler = _ToStructlog()
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_RedactingFormatter("%(name)s: %(message)s"))
    logging.basicConfig(level=logging.WARNING, handlers=[handler], force=True)


def flush() -> None:
    """Write out every pending line now (shutdown, worker exit)."""
    if _sink is not None:
        _sink.flush()


def _json_renderer() -> Callable[[Any, str, MutableMapping[str, Any]], str]:
    """JSON lines; an exception's traceback as the ``exception`` field (plain, no local
    variables, what its messages quote redacted as free text), not as ``exc_info: true``."""
    render = structlog.processors.JSONRenderer(serializer=_dumps)

    def rendering(logger: Any, name: str, event: MutableMapping[str, Any]) -> str:
        if "exc_info" in event:
            event = structlog.processors.format_exc_info(logger, name, event)
            if isinstance(event.get("exception"), str):
                event["exception"] = redact_text(event["exception"])
        return str(render(logger, name, event))

    return rendering


def _dumps(event: Any, **_: Any) -> str:
    return _json(event).decode()


def _json(event: dict[str, Any]) -> bytes:
    """One JSON object. orjson refuses a string that is not valid Unicode (a lone surrogate:
    what Python makes of an environment variable's byte that is not UTF-8) and an integer
    past 64 bits; the standard library writes them (the string with a ``\\udcff`` escape),
    so that such a value never costs its line."""
    try:
        return orjson.dumps(event, default=str)
    except TypeError:
        return json.dumps(event, default=str, separators=(",", ":")).encode()


def access(fields: dict[str, Any]) -> None:
    """The one ``request`` line of a request: the same fields, rendered cheaply."""
    if not _fast_access or _sink is None:
        get_logger().info(REQUEST, **fields)
        return
    for key in _CLIENT_FIELDS:  # the others are ours: numbers and fixed vocabularies
        value = fields.get(key)
        if isinstance(value, str) and ("ey" in value or "//" in value):
            fields[key] = masked(value)  # (its own first tests: no call for a plain field)
    fields["event"] = REQUEST
    fields["level"] = "info"
    fields["timestamp"] = _timestamp()
    _sink.line(_json(fields))


# Access-log fields whose text comes from the client or its token.
_CLIENT_FIELDS = ("request_id", "method", "path", "sub", "email")

_second = -1
_second_text = ""


def _timestamp() -> str:
    """structlog's ISO form (``2026-12-02T05:00:00.123456Z``), the date part cached per second."""
    global _second, _second_text
    now = time.time()
    second = int(now)
    if second != _second:
        _second, _second_text = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
    return f"{_second_text}.{int((now - second) * 1_000_000):06d}Z"


# What a credential looks like in free text (a traceback, a library's message): a JWS or a
# JWE, even cut short, its dots maybe percent-encoded (once or more), in either base64
# alphabet, its JSON maybe begun '{ "' (eyAi): the whole run from its first segment on; or
# the value after "Bearer", "Basic", "catalyst_session" or "access_token", whatever
# separates them (spaces, a tab, a no-break space, ':', '=', a quote, %20), or after
# "authorization" and ':' or '=' ("Authorization header missing" stays as it is).
_CREDENTIAL = re.compile(
    r"(?<![A-Za-z0-9_-])ey[JA][A-Za-z0-9_+/.%-]*"
    r"|(?i:(?<=bearer)|(?<=basic)|(?<=catalyst_session)|(?<=access_token))"
    r"(?P<separator>(?:[\s\u00a0:=\"']|%20)+)[^\s\u00a0'\";,&\\]+"
    r"|(?i:(?<=authorization))(?P<assigned>\s*[:=][\s\"']*)[^\s\u00a0'\";,&\\]+"
)


def _credential_masked(found: re.Match[str]) -> str:
    return (found.group("separator") or found.group("assigned") or "") + "[redacted]"


def redact_text(text: str) -> str:
    """``text`` with every credential-looking run replaced by ``[redacted]``."""
    return _CREDENTIAL.sub(_credential_masked, text)


def console_renderer() -> Callable[[Any, str, MutableMapping[str, Any]], str]:
    """structlog's console lines, with plain tracebacks and credentials redacted.

    Its default traceback formatter (rich's, when rich is installed) prints every
    frame's local variables: the cookie secret, a token, the bridge secret. A plain
    traceback has none; what its messages may still quote is redacted as free text
    (the fields were redacted already, by ``redact``)."""
    render = structlog.dev.ConsoleRenderer(
        colors=False, exception_formatter=structlog.dev.plain_traceback
    )

    def redacting(logger: Any, name: str, event: MutableMapping[str, Any]) -> str:
        event = structlog.processors.format_exc_info(logger, name, event)
        if isinstance(event.get("exception"), str):
            event["exception"] = redact_text(event["exception"])
        return str(render(logger, name, event))

    return redacting


class _ToStructlog(logging.Handler):
    """A standard-library log record as a line of ours: its logger, level, message and
    traceback (``exception``), through the same processors (redaction included)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            # Redacted as the text format redacts them (a credential of any shape, not only
            # what the JSON renderer looks for): aiohttp quotes a refused header line whole.
            fields: dict[str, Any] = {"logger": record.name}
            if record.exc_info and record.exc_info[0] is not None:
                trace = "".join(traceback.format_exception(*record.exc_info))
                fields["exception"] = redact_text(trace)
            message = redact_text(record.getMessage())
            get_logger(record.name).log(record.levelno, message, **fields)
        except Exception:  # (logging's own convention: a failure to log is reported, not raised)
            self.handleError(record)


class _RedactingFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return redact_text(super().format(record))


def get_logger(name: str = "catalyst_proxy") -> Any:
    return structlog.get_logger(name)
