"""The command line: serve | dev | openapi | keygen | token. Only this module prints or exits."""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from . import __version__, log
from .config import ConfigError, Settings
from .numerals import decimal, whole

USAGE_ERROR = 2
DESCRIPTION = (
    "The operator-console gateway to the SME billing tier: verifies the operator's RS256 "
    "session, mints the HS256 bridge token and forwards the purchase and voucher routes. "
    "Configured from CATALYST_* environment variables (docs/reference.md)."
)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, exit 2: probes and scripts read the first line only.
        self.exit(USAGE_ERROR, f"{self.prog}: error: {message}\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="catalyst-proxy", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"catalyst-proxy {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    serve = commands.add_parser("serve", help="run the production server (config from the env)")
    serve.add_argument("--host", default="0.0.0.0", help="address to listen on [0.0.0.0]")
    serve.add_argument("--port", type=_port, default=8080, help="port to listen on [8080]")
    serve.add_argument(
        "--workers",
        type=_workers,
        default=1,
        help="worker processes sharing the port (SO_REUSEPORT); 'auto' = one per CPU [1]",
    )

    dev = commands.add_parser("dev", help="gateway + local SME stand-in, keys and tokens")
    dev.add_argument("--port", type=_port, default=8080, help="the gateway's port [8080]")
    dev.add_argument(
        "--redis",
        metavar="URL",
        help="a Redis/Valkey to share rate-limit counters and idempotency records (redis://...)",
    )

    openapi = commands.add_parser(
        "openapi", help="print the OpenAPI 3.1 document (routes from CATALYST_ROUTES_FILE too)"
    )
    openapi.add_argument(
        "--workers",
        type=_workers,
        default=1,
        help="as serve will run: with more than 1 and no CATALYST_REDIS_URL, idempotency "
        "is off, and so out of the document [1]",
    )

    keygen = commands.add_parser("keygen", help="write private.pem, public.pem, jwks.json")
    keygen.add_argument(
        "--out", required=True, type=Path, help="directory to write the key pair and JWKS into"
    )

    token = commands.add_parser("token", help="print an RS256 operator token")
    token.add_argument("--key", required=True, type=Path, help="RSA private key (PEM)")
    token.add_argument(
        "--sub", required=True, type=_subject, help="the operator's subject (sub claim)"
    )
    token.add_argument("--email", required=True, type=_text, help="the operator's email claim")
    token.add_argument(
        "--realm-role",
        action="append",
        default=[],
        dest="realm_roles",
        type=_text,
        metavar="ROLE",
        help="a Keycloak realm role (realm_access.roles); repeat for more",
    )
    token.add_argument("--tier", type=_text, help="the tier claim")
    token.add_argument("--ttl", type=_seconds, default=3600.0, help="lifetime in seconds [3600]")
    token.add_argument("--kid", type=_text, help="kid in the token's header [none]")
    token.add_argument("--iss", type=_text, help="issuer claim [none]")
    token.add_argument("--aud", type=_text, help="audience claim [none]")
    return parser


def _whole(text: str, low: int, high: int, what: str) -> int:
    try:
        value = whole(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a {what}: {text!r}") from None
    if not low <= value <= high:
        raise argparse.ArgumentTypeError(f"{what} out of range {low}-{high}: {text!r}")
    return value


def _subject(text: str) -> str:
    if not text.strip():  # the gateway refuses a token whose sub is empty
        raise argparse.ArgumentTypeError("the subject must not be empty")
    return _text(text)


def _text(text: str) -> str:
    """A claim's text: what the gateway would refuse in a token is refused here."""
    from .auth import is_text

    if not is_text(text):
        raise argparse.ArgumentTypeError("not UTF-8 text")
    return text


def _port(text: str) -> int:
    return _whole(text, 0, 65535, "port number")


def _workers(text: str) -> int:
    from .workers import cpu_count

    return cpu_count() if text == "auto" else _whole(text, 1, 64, "number of workers")


MAX_TOKEN_TTL = 10 * 365 * 86400  # s: a token's lifetime past this is a typo, or infinite


def _seconds(text: str) -> float:
    try:
        value = decimal(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 1 <= value <= MAX_TOKEN_TTL:  # (nan fails this too; exp is whole seconds)
        raise argparse.ArgumentTypeError(
            f"must be at least 1 and at most {MAX_TOKEN_TTL} (10 years): {text!r}"
        )
    return value


def _fail(message: str) -> NoReturn:
    print(f"catalyst-proxy: error: {message}", file=sys.stderr)
    raise SystemExit(USAGE_ERROR)


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.command == "serve":
        _serve(args.host, args.port, args.workers)
    elif args.command == "dev":
        _dev(args.port, args.redis)
    elif args.command == "openapi":
        _openapi(args.workers)
    elif args.command == "keygen":
        _keygen(args.out)
    else:
        _token(args)


def _serve(host: str, port: int, workers: int = 1) -> None:
    from .app import create_app
    from .server import ListenError, serve
    from .workers import listen_socket, supervise

    try:
        settings = Settings.from_env(os.environ)
        settings.check_workers(workers)
        log.configure(fmt=settings.log_format, level=settings.log_level)
        app = create_app(settings, workers=workers)  # validates routes, key and password files
    except ConfigError as exc:
        _fail(str(exc))
    if workers == 1:
        try:
            _run(serve(app, host, port))
        except ListenError as exc:  # a taken port: a usage error (exit 2), not a traceback
            _fail(_listen_problem(host, port, exc.cause))
        return
    if port == 0:
        _fail("--workers needs a fixed --port (each worker binds it with SO_REUSEPORT)")
    # Bind once in the parent, so a taken port is one clear error, not N; without
    # SO_REUSEPORT, so that a port another server's workers share is taken too (with it,
    # a second server would join theirs and split the traffic).
    try:
        listen_socket(host, port, reuse_port=False).close()
    except OSError as exc:
        _fail(_listen_problem(host, port, exc))

    def worker(index: int) -> int:
        """One worker; a failure a restart cannot mend: one line, exit 2 (see workers.py)."""
        try:
            sock = listen_socket(host, port, reuse_port=True)
        except OSError as exc:
            _fail(_listen_problem(host, port, exc))
        try:
            app = create_app(settings, workers=workers)  # reads the key and routes files
        except ConfigError as exc:
            _fail(str(exc))
        _run(serve(app, host, port, sock=sock))
        return 0

    raise SystemExit(supervise(workers, worker))


def _listen_problem(host: str, port: int, exc: OSError) -> str:
    """Why ``host``:``port`` cannot be listened on, naming the option at fault."""
    reason = exc.strerror or str(exc)
    return (
        f"--host {host}: {reason}"
        if isinstance(exc, socket.gaierror)
        else f"--port {port}: {reason}"
    )


def _openapi(workers: int = 1) -> None:
    from .app import PARTS, create_app

    environ = dict(os.environ)
    if not any(environ.get(name) for name in _KEY_SOURCES):
        environ["CATALYST_JWKS_URL"] = "http://unused.invalid/"  # the document needs no keys
    log.configure(fmt="console", stream=sys.stderr)  # stdout is the document: warnings elsewhere
    try:
        settings = Settings.from_env(environ)
        settings.check_workers(workers)
        app = create_app(settings, workers=workers)
    except ConfigError as exc:
        _fail(str(exc))
    sys.stdout.buffer.write(app[PARTS].ops.openapi + b"\n")


_KEY_SOURCES = ("CATALYST_JWKS_URL", "CATALYST_KC_ADDR", "CATALYST_SESSION_PUBLIC_KEY_FILE")


def _dev(port: int, redis_url: str | None = None) -> None:
    from .devtools.dev import run

    if redis_url is not None:
        try:
            Settings.from_env({"CATALYST_REDIS_URL": redis_url, "CATALYST_JWKS_URL": "http://x/"})
        except ConfigError as exc:
            _fail(f"--redis: {exc.problem}")
    from .server import ListenError

    log.configure(fmt="console", level="info")
    try:
        _run(run(port, redis_url=redis_url))
    except ListenError as exc:  # a taken port: exit 2 with one line, as serve does
        _fail(f"--port {port}: {exc.reason} (make dev PORT=N picks another)")


def _run(main: object) -> None:
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)  # type: ignore[arg-type]
    else:
        uvloop.run(main)  # type: ignore[arg-type]


def _keygen(out: Path) -> None:
    from .devtools.keys import keygen

    try:
        kid = keygen(out)
    except OSError as exc:
        _fail(f"--out {out}: {exc.strerror}")
    print(f"wrote {out / 'private.pem'}, {out / 'public.pem'}, {out / 'jwks.json'} (kid {kid})")


def _token(args: argparse.Namespace) -> None:
    from .devtools.keys import load_private_key, operator_token

    try:
        key = load_private_key(args.key)
    except (OSError, ValueError) as exc:
        _fail(f"--key {args.key}: {getattr(exc, 'strerror', None) or exc}")
    print(
        operator_token(
            key,
            sub=args.sub,
            email=args.email,
            realm_roles=args.realm_roles,
            tier=args.tier,
            ttl=args.ttl,
            kid=args.kid,
            iss=args.iss,
            aud=args.aud,
        )
    )
