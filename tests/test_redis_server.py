"""The Redis test fixtures: a real redis-server per session, clean for every test."""

from __future__ import annotations

import hashlib
import socket

import pytest
import redis.asyncio
import redis.exceptions

from .redis_server import RedisServer, RedisServerError

SCRIPT = "return 1"
SCRIPT_SHA = hashlib.sha1(SCRIPT.encode()).hexdigest()  # noqa: S324 - Redis names scripts by SHA-1


@pytest.mark.parametrize("run", ["first", "second"])
async def test_every_test_starts_with_an_empty_server(
    redis_server: RedisServer, redis_url: str, run: str
) -> None:
    """Each test starts with no keys in any database and no cached scripts, whatever ran before."""
    assert redis_server.command("INFO", "keyspace").strip() == b"# Keyspace"
    assert redis_server.command("SCRIPT", "EXISTS", SCRIPT_SHA) == [0]

    # Leave keys in two databases and a cached script for the other run to not find.
    for url in (redis_url, redis_url.removesuffix("/0") + "/1"):
        client = redis.asyncio.from_url(url)
        try:
            assert await client.set("left-behind", run) is True
        finally:
            await client.aclose()
    assert redis_server.command("SCRIPT", "LOAD", SCRIPT) == SCRIPT_SHA.encode()


@pytest.mark.parametrize("run", ["first", "second"])
def test_every_test_gets_a_running_server(
    redis_server: RedisServer, redis_url: str, run: str
) -> None:
    """Each test gets the server running, even when the test before it stopped it."""
    assert redis_server.command("PING") == "PONG"
    redis_server.stop()


async def test_stop_refuses_connections_and_start_brings_back_the_same_port(
    redis_server: RedisServer, redis_url: str
) -> None:
    """After stop() connections are refused; start() serves again on the same port and URL."""
    port = redis_server.port
    redis_server.stop()

    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    with socket.socket() as other, pytest.raises(OSError, match="in use"):
        other.bind(("127.0.0.1", port))  # still reserved: nothing else can take it
    client = redis.asyncio.from_url(redis_url)
    try:
        with pytest.raises(redis.exceptions.ConnectionError):
            await client.ping()

        redis_server.start()
        assert (redis_server.port, redis_server.url) == (port, redis_url)
        assert await client.ping() is True
    finally:
        await client.aclose()


def test_the_server_has_noeviction_and_no_persistence(
    redis_server: RedisServer, redis_url: str
) -> None:
    """The server evicts nothing, reads no config file and keeps nothing across a restart."""

    def config(name: str) -> bytes:
        _, value = redis_server.command("CONFIG", "GET", name)
        return bytes(value)

    assert config("maxmemory-policy") == b"noeviction"
    assert config("save") == b""
    assert config("appendonly") == b"no"
    assert b"\r\nconfig_file:\r\n" in redis_server.command("INFO", "server")

    redis_server.command("SET", "k", "v")
    redis_server.stop()
    redis_server.start()
    assert redis_server.command("EXISTS", "k") == 0
    assert [p.name for p in redis_server.directory.iterdir()] == ["redis.log"]


async def test_a_password_server_wants_the_password() -> None:
    """With a password, clients without it or with a wrong one are refused; with it they get in."""
    with RedisServer(password="p@ss word/1") as server:
        assert server.command("PING") == "PONG"
        for url in (server.url, server.url_with_password("wrong")):
            client = redis.asyncio.from_url(url)
            try:
                with pytest.raises(redis.exceptions.AuthenticationError):
                    await client.ping()
            finally:
                await client.aclose()
        client = redis.asyncio.from_url(server.url_with_password())
        try:
            assert await client.ping() is True
        finally:
            await client.aclose()


def test_a_missing_redis_server_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without redis-server on PATH, starting one fails with a message naming the package."""
    monkeypatch.setenv("PATH", "/nonexistent")
    server = RedisServer()
    try:
        with pytest.raises(RedisServerError, match="install Debian's redis-server"):
            server.start()
    finally:
        server.close()
