"""structlog set-up: one JSON object per line on stdout, or console lines.

Event names are constants here, so a reader (and a test) finds every kind of
line the gateway writes in one place. The ``redact`` processor is a last line of
defence: the code never passes a token, cookie or secret to a logger, and if a
value ever looked like a compact JWS it would still be masked.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

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

# Two base64url-encoded JSON objects ("eyJ" is '{"') joined by a dot: a JWS header.payload.
_JWS = re.compile(r"eyJ[A-Za-z0-9_-]*\.eyJ[A-Za-z0-9_-]*(?:\.[A-Za-z0-9_-]*)?")
_SECRET_KEYS = frozenset({"authorization", "cookie", "token", "secret", "password", "set-cookie"})


def redact(_logger: Any, _method: str, event: MutableMapping[str, Any]) -> Any:
    for key, value in event.items():
        if key.lower() in _SECRET_KEYS:
            event[key] = "[redacted]"
        elif isinstance(value, str) and "eyJ" in value:
            event[key] = _JWS.sub("[redacted-jws]", value)
    return event


def configure(*, fmt: str = "json", level: str = "info", stream: TextIO | None = None) -> None:
    """Configure structlog process-wide (called once by the CLI)."""
    renderer: Any
    if fmt == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=False)
    else:
        renderer = structlog.processors.JSONRenderer()
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            redact,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.WriteLoggerFactory(file=stream or sys.stdout),
        cache_logger_on_first_use=True,
    )
    # aiohttp's own loggers (e.g. unhandled-exception reports) go to stderr at WARNING,
    # redacted: aiohttp quotes the start of a header line it refused, token and all.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_RedactingFormatter("%(name)s: %(message)s"))
    logging.basicConfig(level=logging.WARNING, handlers=[handler], force=True)


# What a credential looks like in free text: a JWS (even cut short), or the value after
# "Bearer " / "Basic " / "catalyst_session=".
_CREDENTIAL = re.compile(
    r"eyJ[A-Za-z0-9_-]*(?:\.[A-Za-z0-9_.-]*)?"
    r"|(?i:(?<=bearer )|(?<=basic )|(?<=catalyst_session=))[^\s'\";,]+"
)


def redact_text(text: str) -> str:
    """``text`` with every credential-looking run replaced by ``[redacted]``."""
    return _CREDENTIAL.sub("[redacted]", text)


class _RedactingFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return redact_text(super().format(record))


def get_logger(name: str = "catalyst_proxy") -> Any:
    return structlog.get_logger(name)
