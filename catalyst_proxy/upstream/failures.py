"""Everything that can go wrong talking to the SME gateway, as our own exception types.

The client raises only these; ``proxy.py`` turns them into the contract's
answers in one table. ``sent`` says whether the SME gateway may have acted on
the request when it failed (the whole request had been handed to the
connection, or a final answer had begun): an answer after that says
``X-Catalyst-Forwarded: unknown``.

::

    UpstreamFailure              when                                   answer
    ├── PoolOverloaded           too many waiting, the budget ran out   503 gateway-overloaded
    │                            waiting for a connection, or this
    │                            process out of descriptors or ports
    ├── BreakerOpen              the breaker is open (nothing tried)    503 sme-gateway-unreachable
    ├── ConnectFailed            no connection (DNS, refused, timeout)  503 sme-gateway-unreachable
    ├── ResponseTimeout          no response head within the budget     504 sme-gateway-timeout
    ├── BadResponse              closed, garbage or over-long head      502 sme-gateway-bad-response
    ├── BodyFailed               the client's request body failed       (the body's own error)
    └── BodyBroken               the answer broke off mid-body, or      the client's transfer is
                                 stalled past the budget                aborted

``BodyFailed`` carries the exception the request body raised (the body
over the limit, or the client going away); the proxy re-raises that one.
"""

from __future__ import annotations


class UpstreamFailure(Exception):
    kind: str = "bad_response"  # the upstream-failures metric's label

    def __init__(self, reason: str, *, sent: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.sent = sent


class PoolOverloaded(UpstreamFailure):
    kind = "overloaded"


class BreakerOpen(UpstreamFailure):
    kind = "breaker_open"

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"breaker open for {retry_after} s more")
        self.retry_after = retry_after


class ConnectFailed(UpstreamFailure):
    kind = "unreachable"


class ResponseTimeout(UpstreamFailure):
    kind = "timeout"


class BadResponse(UpstreamFailure):
    kind = "bad_response"


class BodyFailed(UpstreamFailure):
    """The request body's own iterator raised ``cause``; the upstream request was aborted."""

    kind = "aborted"

    def __init__(self, cause: BaseException) -> None:
        super().__init__(f"request body failed: {type(cause).__name__}")
        self.cause = cause


class BodyBroken(UpstreamFailure):
    """After the response head: framing error, early close, or a stall (``kind`` says which)."""

    kind = "aborted"

    def __init__(self, reason: str, *, stalled: bool = False) -> None:
        super().__init__(reason, sent=True)
        if stalled:
            self.kind = "timeout"
