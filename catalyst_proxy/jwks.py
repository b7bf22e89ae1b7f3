"""The operator verification keys: local PEM keys plus the realm's JWKS.

Lifecycle of the JWKS part:

1. ``start()`` begins the first fetch in the background (start-up never waits
   for the identity provider) and a loop that refreshes every
   ``cache_seconds``; after a failure it retries with back-off, and the last good
   key set keeps serving meanwhile.
2. A token naming a ``kid`` we do not hold triggers one refresh at once, shared
   by every request waiting on it (single flight) and at most one per
   ``MISS_REFRESH_INTERVAL`` seconds, so junk ``kid`` values cannot drive the
   identity provider.
3. A fetch is a plain aiohttp GET with a time limit and a size cap. A document
   that is not a JWKS (not JSON, no ``keys`` list) counts as a failure. A JWKS
   is the identity provider's word, even with no usable signing key in it: its
   keys replace the set, so a key withdrawn (a compromised key removed, the
   realm left with an encryption key only) stops verifying at once. Until a JWKS
   holds a usable key again it is fetched as after a failure (1, 2, 5... s).

Keys are never taken from a token (``jku``, ``x5u``, ``jwk``, ``x5c`` are ignored).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import jwt
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from yarl import URL

from . import log
from .metrics import Metrics

MISS_REFRESH_INTERVAL = 30.0
MAX_JWKS_BYTES = 512 * 1024
_RETRY_BACKOFF = (1.0, 2.0, 5.0, 10.0, 30.0)
_KTY_FOR_ALG = {"RS": "RSA", "PS": "RSA", "ES": "EC", "Ed": "OKP"}

VerifyKey = Any  # a cryptography public key object, as PyJWT accepts it


@dataclass(frozen=True, slots=True)
class Key:
    key: VerifyKey
    kty: str
    alg: str | None = None  # the JWK's "alg", when it pins one

    def fits(self, alg: str) -> bool:
        return _KTY_FOR_ALG.get(alg[:2]) == self.kty and (self.alg is None or self.alg == alg)


class JWKSError(Exception):
    """A fetch failed; ``result`` is the metric label (error, timeout, invalid)."""

    def __init__(self, result: str, message: str) -> None:
        super().__init__(message)
        self.result = result


class KeySet:
    def __init__(
        self,
        *,
        local_keys: tuple[Key, ...] = (),
        jwks_url: str | None = None,
        cache_seconds: float = 600.0,
        timeout: float = 3.0,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.local_keys = local_keys
        self.jwks_url = jwks_url
        # What /readyz and the log show: never the URL's user:password nor its query (either
        # may hold a credential); a query is shown as "?..." so that its presence is known.
        self.shown_url = _shown(jwks_url) if jwks_url else None
        self._cache_seconds = cache_seconds
        self._timeout = timeout
        self._metrics = metrics or Metrics()
        self._clock = clock
        self._log = log.get_logger()
        self._jwks: dict[str, tuple[Key, ...]] = {}
        self._fetched_ok = False
        self.generation = 0  # bumped whenever the JWKS keys change
        self.refreshes = 0  # fetches completed, good or failed
        self._refreshed = asyncio.Event()  # set (and replaced) when a fetch completes
        self._emptied = asyncio.Event()  # set when a fetch found no usable key (_refresh_loop)
        self._last_miss_refresh = -MISS_REFRESH_INTERVAL
        self._inflight: asyncio.Task[None] | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        self._update_gauge()

    # --- lifecycle --------------------------------------------------------
    async def start(self) -> None:
        if self.jwks_url is None:
            return
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self._timeout),
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        self._loop_task = asyncio.create_task(self._refresh_loop(), name="jwks-refresh")

    async def close(self) -> None:
        for task in (self._loop_task, self._inflight):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._session is not None:
            await self._session.close()

    # --- state ------------------------------------------------------------
    @property
    def usable(self) -> bool:
        """True when some key can verify a token (JWKS fetched once, or a local key)."""
        return bool(self.local_keys) or bool(self._jwks)

    @property
    def jwks_loaded(self) -> bool:
        return self._fetched_ok

    def describe(self) -> dict[str, Any]:
        return {
            "local_keys": len(self.local_keys),
            "jwks_url": self.shown_url,
            "jwks_keys": len(self._jwks),
            "jwks_loaded": self._fetched_ok,
        }

    async def wait_refreshes(self, count: int) -> None:
        """Return once ``count`` fetches have completed (good or failed): for probes and tests."""
        while self.refreshes < count:
            await self._refreshed.wait()

    # --- lookups ----------------------------------------------------------
    def cached(self, kid: str | None) -> tuple[Key, ...]:
        return self._jwks.get(kid, ()) if kid is not None else ()

    async def lookup(self, kid: str) -> tuple[Key, ...]:
        """The JWKS keys named ``kid``, refreshing once if it is unknown (rate-limited)."""
        keys = self._jwks.get(kid, ())
        if keys or self.jwks_url is None:
            return keys
        task = self._inflight
        if task is None:
            now = self._clock()
            if now - self._last_miss_refresh < MISS_REFRESH_INTERVAL:
                return ()
            self._last_miss_refresh = now
            task = self._start_fetch()
        # Shield: one caller giving up (client gone) must not cancel the shared fetch.
        with contextlib.suppress(Exception):  # a failed fetch was counted and logged already
            await asyncio.wait_for(asyncio.shield(task), self._timeout + 0.5)
        return self._jwks.get(kid, ())

    # --- fetching ---------------------------------------------------------
    def _start_fetch(self) -> asyncio.Task[None]:
        if self._inflight is None:
            self._inflight = asyncio.create_task(self._fetch_once(), name="jwks-fetch")
            self._inflight.add_done_callback(self._fetch_done)
        return self._inflight

    def _fetch_done(self, task: asyncio.Task[None]) -> None:
        self._inflight = None
        self.refreshes += 1
        self._refreshed.set()
        self._refreshed = asyncio.Event()
        if not task.cancelled():
            task.exception()  # retrieved here: waiters may all have given up

    async def _fetch_once(self) -> None:
        try:
            keys = await self._fetch()
        except JWKSError as exc:
            self._metrics.jwks_refreshes.labels(exc.result).inc()
            self._log.warning(
                log.JWKS_REFRESH, result=exc.result, reason=str(exc), url=self.shown_url,
                serving_keys=len(self._jwks),
            )  # fmt: skip
            raise
        if keys != self._jwks:  # (Key compares its public key by value)
            self.generation += 1
        self._jwks = keys
        self._fetched_ok = True
        self._update_gauge()
        if not keys:  # every key withdrawn: nothing verifies with the JWKS from now on
            self._emptied.set()
            self._metrics.jwks_refreshes.labels("empty").inc()
            self._log.warning(
                log.JWKS_REFRESH, result="empty", reason="the JWKS holds no usable signing key",
                keys=0, url=self.shown_url,
            )  # fmt: skip
            return
        self._metrics.jwks_refreshes.labels("ok").inc()
        self._log.info(
            log.JWKS_REFRESH, result="ok", keys=len(keys), kids=sorted(keys), url=self.shown_url
        )

    async def _fetch(self) -> dict[str, tuple[Key, ...]]:
        assert self._session is not None
        assert self.jwks_url is not None
        try:
            async with self._session.get(
                self.jwks_url, headers={"Accept": "application/json"}, allow_redirects=False
            ) as resp:
                if resp.status != 200:
                    raise JWKSError("error", f"HTTP {resp.status}")
                body = bytearray()
                async for chunk in resp.content.iter_chunked(65536):
                    body += chunk
                    if len(body) > MAX_JWKS_BYTES:
                        raise JWKSError("invalid", f"document larger than {MAX_JWKS_BYTES} bytes")
        except TimeoutError:
            raise JWKSError("timeout", f"no complete answer within {self._timeout} s") from None
        except aiohttp.ClientError as exc:
            raise JWKSError("error", _fault(exc)) from None
        return parse_jwks(bytes(body))

    async def _refresh_loop(self) -> None:
        failures = 0
        while True:
            task = self._start_fetch()
            # Whatever a fetch raised was counted and logged; the loop must outlive it.
            with contextlib.suppress(Exception):
                await asyncio.shield(task)
            if not task.cancelled() and task.exception() is None and self._jwks:
                failures = 0
                self._emptied.clear()
                # Until the next refresh, or until another fetch (a token's unknown kid)
                # finds the keys withdrawn: then the failure schedule, not the cache's.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._emptied.wait(), self._cache_seconds)
                if not self._emptied.is_set():
                    continue
            await asyncio.sleep(_RETRY_BACKOFF[min(failures, len(_RETRY_BACKOFF) - 1)])
            failures += 1

    def _update_gauge(self) -> None:
        self._metrics.keys_available.set(1 if self.usable else 0)


def parse_jwks(document: bytes) -> dict[str, tuple[Key, ...]]:
    """Usable signing keys of a JWKS document by ``kid`` (maybe none); JWKSError if the
    document is not a JWKS. A ``kid`` may name several keys (RFC 7517 allows it for keys
    of different types): a token is checked against those that fit its ``alg``."""
    try:
        data = json.loads(document)
    except (ValueError, RecursionError):
        raise JWKSError("invalid", "not JSON") from None
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise JWKSError("invalid", 'no "keys" list')
    keys: dict[str, tuple[Key, ...]] = {}
    for entry in data["keys"]:
        if not isinstance(entry, dict) or not isinstance(entry.get("kid"), str):
            continue
        if entry.get("use", "sig") != "sig" or entry.get("kty") not in ("RSA", "EC", "OKP"):
            continue
        if "d" in entry:  # a private key published by mistake: never use it
            continue
        alg = entry.get("alg")
        try:
            parsed = jwt.PyJWK(entry)
        except Exception:  # noqa: S112 - an entry PyJWK cannot read is skipped, never fatal
            continue  # (e.g. "alg": "none" raises NotImplementedError, not a PyJWTError)
        key = Key(parsed.key, entry["kty"], alg if isinstance(alg, str) else None)
        keys[entry["kid"]] = (*keys.get(entry["kid"], ()), key)
    return keys


def load_local_keys(path: str) -> tuple[Key, ...]:
    """Every PEM public key in ``path`` (one file may hold several). Raises ValueError."""
    with open(path, "rb") as file:
        data = file.read()
    blocks = [
        b"-----BEGIN PUBLIC KEY-----" + part.split(b"-----END PUBLIC KEY-----")[0]
        + b"-----END PUBLIC KEY-----\n"
        for part in data.split(b"-----BEGIN PUBLIC KEY-----")[1:]
    ]  # fmt: skip
    if not blocks:
        raise ValueError("holds no PEM public key (-----BEGIN PUBLIC KEY-----)")
    keys = []
    for block in blocks:
        key = load_pem_public_key(block)
        keys.append(Key(key, _kty(key)))
    return tuple(keys)


def _kty(key: VerifyKey) -> str:
    from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

    if isinstance(key, rsa.RSAPublicKey):
        return "RSA"
    if isinstance(key, ec.EllipticCurvePublicKey):
        return "EC"
    if isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        return "OKP"
    raise ValueError(f"unsupported public key type {type(key).__name__}")


def _shown(url: str) -> str:
    """``url`` as it may be logged: no user info, the query (if any) as ``?...``, no fragment."""
    parsed = URL(url)
    shown = str(parsed.with_user(None).with_query(None).with_fragment(None))
    return shown + "?..." if parsed.raw_query_string else shown


def _fault(exc: aiohttp.ClientError) -> str:
    """What went wrong in a fetch, in aiohttp's and the system's words: never in its text,
    which may quote the URL (a query may hold a credential) or the bytes the server sent
    (one may echo the request line), with or without aiohttp's compiled parser."""
    words = type(exc).__name__
    if isinstance(exc, aiohttp.ClientResponseError):
        words += f": {exc.status}"
    elif isinstance(exc, aiohttp.ClientOSError) and exc.strerror:
        words += f": {exc.strerror}"
    cause: BaseException = exc
    for _ in range(8):  # (a chain is short; a bound, in case one loops)
        inner = cause.__cause__ or cause.__context__
        if inner is None:
            break
        cause = inner
    return words if cause is exc else f"{words}, {type(cause).__name__}"
