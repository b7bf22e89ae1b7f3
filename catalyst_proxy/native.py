"""Which compiled speed-ups this process runs on (reported at start-up; the tests demand all).

Each has a pure-Python fallback that works, several times slower: aiohttp's
HTTP parser and header writer (``AIOHTTP_NO_EXTENSIONS`` or a wheel built
without them), the event loop (uvloop, a dependency on Linux). httptools has
no fallback: our upstream client does not run without it.
"""

from __future__ import annotations

import asyncio

import aiohttp.http_parser
import aiohttp.http_writer
import httptools.parser.parser


def extensions() -> dict[str, bool]:
    """``{name: compiled?}`` for this process (the loop: the running one, if any)."""
    try:
        loop_module = type(asyncio.get_running_loop()).__module__
    except RuntimeError:
        loop_module = ""
    return {
        "aiohttp_http_parser": aiohttp.http_parser.HttpRequestParser.__module__
        == "aiohttp._http_parser",
        "aiohttp_http_writer": aiohttp.http_writer._serialize_headers.__module__
        == "aiohttp._http_writer",
        "httptools": httptools.parser.parser.__file__.endswith((".so", ".pyd")),
        "uvloop": loop_module.startswith("uvloop"),
    }
