"""Our own client for the SME gateway (asyncio Protocols on httptools' llhttp parser).

- ``client.py``: ``Client.request()``, one request at most once, and its ``Response``;
- ``pool.py``: the bounded keep-alive pool and its line of waiting requests;
- ``connection.py``: one connection's states, parser callbacks and bytes;
- ``flow.py``: back-pressure both ways;
- ``breaker.py``: fail fast when the SME gateway cannot be connected to;
- ``failures.py``: what can go wrong, as our own exception types.
"""

from .breaker import Breaker
from .client import Body, Client, Progress, Response
from .failures import (
    BadResponse,
    BodyBroken,
    BodyFailed,
    BreakerOpen,
    ConnectFailed,
    PoolOverloaded,
    ResponseTimeout,
    UpstreamFailure,
)

__all__ = [
    "BadResponse",
    "Body",
    "BodyBroken",
    "BodyFailed",
    "Breaker",
    "BreakerOpen",
    "Client",
    "ConnectFailed",
    "PoolOverloaded",
    "Progress",
    "Response",
    "ResponseTimeout",
    "UpstreamFailure",
]
