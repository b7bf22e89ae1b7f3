"""Shared fixtures: keys, the SME stand-in, a JWKS server, and a gateway factory.

A typical test::

    async def test_purchase(gateway, token):
        gw = await gateway()                      # local key + SME stand-in + secret
        status, headers, body = await gw.request(
            "POST", "/api/v1/billing/purchase",
            headers={"Authorization": f"Bearer {token(realm_roles=['catalyst-owner'])}"},
            data=b'{"sku": "starter"}')
        assert status == 200
        assert gw.sme.received[-1].claims["role"] == "superadmin"

``gateway(**settings)`` takes any ``Settings`` field to override; ``upstream=``
points it somewhere other than the SME stand-in.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import rsa

from catalyst_proxy.app import Tuning, create_app
from catalyst_proxy.config import Settings
from catalyst_proxy.devtools.keys import new_private_key, operator_token, public_pem
from catalyst_proxy.devtools.sme import SME
from catalyst_proxy.metrics import Metrics

from .rawhttp import HTTPUpstream, Respond
from .redis_server import RedisServer, RedisServerError
from .support import Gateway, JWKSServer, start_app, start_gateway

BRIDGE_SECRET = b"test-bridge-secret-0123456789abcdef"


@pytest.fixture(scope="session")
def rsa_key() -> rsa.RSAPrivateKey:
    """The operator key pair the gateway trusts (as its local PEM key)."""
    return new_private_key()


@pytest.fixture(scope="session")
def other_key() -> rsa.RSAPrivateKey:
    """A key pair the gateway does not trust."""
    return new_private_key()


@pytest.fixture
def public_key_file(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> Path:
    path = tmp_path / "public.pem"
    path.write_bytes(public_pem(rsa_key))
    return path


@pytest.fixture
def token(rsa_key: rsa.RSAPrivateKey) -> Callable[..., str]:
    """``token(sub=..., email=..., realm_roles=[...], tier=..., ttl=..., kid=..., extra={...})``."""

    def make(**kwargs: Any) -> str:
        kwargs.setdefault("sub", "op-1")
        kwargs.setdefault("email", "op1@example.test")
        key = kwargs.pop("key", rsa_key)
        return operator_token(key, **kwargs)

    return make


@pytest.fixture
async def sme() -> AsyncIterator[tuple[SME, str]]:
    """The SME stand-in on 127.0.0.1, sharing BRIDGE_SECRET; yields (state, base URL)."""
    stand_in = SME(BRIDGE_SECRET)
    runner, url = await start_app(stand_in.app(), access_log=None)
    yield stand_in, url
    await runner.cleanup()


@pytest.fixture
async def jwks_server() -> AsyncIterator[JWKSServer]:
    server = await JWKSServer().start()
    yield server
    await server.close()


class RunningGateway(Gateway):
    sme: SME


@pytest.fixture
async def gateway(
    sme: tuple[SME, str], public_key_file: Path
) -> AsyncIterator[Callable[..., Awaitable[RunningGateway]]]:
    """Factory: ``await gateway(**settings_overrides, upstream=URL, clock=..., metrics=...,
    tuning=Tuning(...), server={Runner options})``."""
    stand_in, sme_url = sme
    started: list[Gateway] = []

    async def make(
        *,
        upstream: str | None = None,
        clock: Callable[[], float] | None = None,
        monotonic: Callable[[], float] | None = None,
        server: dict[str, Any] | None = None,
        tuning: Tuning | None = None,
        **overrides: Any,
    ) -> RunningGateway:
        settings = Settings(
            gateway_url=upstream or sme_url,
            public_key_file=str(public_key_file),
            bridge_secret=BRIDGE_SECRET,
        )
        settings = dataclasses.replace(settings, **overrides)
        kwargs: dict[str, Any] = {"metrics": Metrics()}
        if clock is not None:
            kwargs["clock"] = clock
        if monotonic is not None:
            kwargs["monotonic"] = monotonic
        if tuning is not None:
            kwargs["tuning"] = tuning
        app: web.Application = create_app(settings, **kwargs)
        gw = await start_gateway(app, **(server or {}))
        gw.__class__ = RunningGateway
        gw.sme = stand_in  # type: ignore[attr-defined]
        started.append(gw)
        return gw  # type: ignore[return-value]

    yield make
    for gw in started:
        await gw.close()


@pytest.fixture
async def upstream() -> AsyncIterator[Callable[..., Awaitable[HTTPUpstream]]]:
    """Factory: ``await upstream(respond, **options)`` starts a recording HTTP/1.1 upstream
    (the options are ``HTTPUpstream``'s: ``cut``, ``backlog``, ``sock``...)."""
    started: list[HTTPUpstream] = []

    async def make(respond: Respond, **options: Any) -> HTTPUpstream:
        server = await HTTPUpstream(respond, **options).start()
        started.append(server)
        return server

    yield make
    for server in started:
        await server.close()


@pytest.fixture
def bearer(token: Callable[..., str]) -> Callable[..., dict[str, str]]:
    """``bearer(**token_kwargs)`` → an Authorization header dict with a fresh owner token."""

    def make(**kwargs: Any) -> dict[str, str]:
        kwargs.setdefault("realm_roles", ["catalyst-owner"])
        return {"Authorization": f"Bearer {token(**kwargs)}"}

    return make


# --- Redis ----------------------------------------------------------------------
# One real redis-server per session (tests/redis_server.py); `redis_url` hands
# each test that server running and empty. No fakes: a missing redis-server
# fails the tests that need it, it never skips them.


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """The session's redis-server; a test may stop() it, the next one gets it back."""
    server = RedisServer()
    try:
        server.start()
        failure = None
    except RedisServerError as exc:
        failure = str(exc)
    if failure is not None:  # failed outside the except block: one message, no chained copy
        server.close()
        pytest.fail(failure, pytrace=False)
    yield server
    server.close()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """``redis://127.0.0.1:PORT/0`` of the session's server, running and flushed."""
    redis_server.start()  # a no-op unless an earlier test stopped it
    redis_server.flush()
    return redis_server.url


# --- assurance figures -----------------------------------------------------------
# Suites add the figures README's "Assurance" section reports (attack tokens
# tried/accepted, duplicated upstream requests, body mismatches, ...);
# `make assurance` runs them with CATALYST_ASSURANCE_OUT set and prints the table.
_FIGURES: dict[str, float] = {}


class Assurance:
    def add(self, figure: str, amount: float = 1) -> None:
        _FIGURES[figure] = _FIGURES.get(figure, 0) + amount

    def peak(self, figure: str, value: float) -> None:
        _FIGURES[figure] = max(_FIGURES.get(figure, value), value)


@pytest.fixture
def assurance() -> Assurance:
    return Assurance()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    import json
    import os

    out = os.environ.get("CATALYST_ASSURANCE_OUT")
    if out:
        Path(out).write_text(json.dumps(_FIGURES, indent=2, sort_keys=True) + "\n")
