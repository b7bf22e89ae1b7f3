"""Which headers cross the gateway, in each direction, and why.

Both directions are allow-lists: a header not named here does not cross.

Client → SME gateway. The SME gateway authorises *only* on the bridge token we
mint, so nothing the client sends can claim an identity upstream: the client's
``Authorization`` and ``Cookie`` never leave, nor do look-alikes such as
``X-User-Role``, ``X-Forwarded-User`` or ``X-HTTP-Method-Override``.

Trust in forwarded headers: the gateway runs behind the console's ingress,
which sets ``X-Forwarded-Proto``/``-Host``; we pass those on when present (or
state our own view) and append the peer address to ``X-Forwarded-For`` the way
nginx's ``$proxy_add_x_forwarded_for`` does. They are informational for the
SME gateway's logs; no decision here or upstream may rest on them, because a
client can send any value it likes.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

from multidict import CIMultiDict

from .ids import hex_id

# RFC 9110 §7.6.1 connection-specific fields (plus the de-facto Keep-Alive family).
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)

# Client headers copied upstream verbatim (the first of each), when present.
FORWARDED_REQUEST_HEADERS = ("Content-Type", "traceparent", "tracestate", "Idempotency-Key")
# ... except a list-valued one, whose lines are joined into one (W3C Trace Context: a
# tracestate split over several lines is one list, and every entry counts).
_LIST_VALUED = b"tracestate"

# Upstream answer headers copied to the client, when present (Content-Length is framing).
FORWARDED_RESPONSE_HEADERS = (
    "Content-Type",
    "Content-Encoding",
    "Cache-Control",
    "Location",
    "Retry-After",
    "ETag",
)

REQUEST_ID = "X-Request-ID"
FORWARDED = "X-Catalyst-Forwarded"  # yes / no / unknown: did the request reach the SME gateway?
REPLAYED = "Idempotent-Replayed"  # true on an answer replayed from an idempotency record
SERVER = "Server"
SERVER_NAME = "catalyst-proxy"  # no version banner (aiohttp would send its own)
_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._~:@+=/-]{1,128}")

_FORWARD_UP = {name.lower().encode(): name.encode() for name in FORWARDED_REQUEST_HEADERS}
_FORWARD_DOWN = {name.lower().encode(): name.encode() for name in FORWARDED_RESPONSE_HEADERS}
_DEFAULT_TYPE = (b"Content-Type", b"application/json")
_NO_BODY = frozenset({204, 304})  # statuses that never carry a body (nor 1xx)
# Fields of the client's that reach the upstream request, or feed it: the ones its
# Connection header can take away.
_CONNECTION_MAY_NAME = frozenset(
    [*_FORWARD_UP, b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"host"]
)
_REQUEST_ID_NAME, _FORWARDED_YES = REQUEST_ID.encode(), (FORWARDED.encode(), b"yes")


_OWS = " \t"  # the only white space around list elements (RFC 9110 §5.6.1), not str.strip()'s


def only_chunked(values: Iterable[str] | Iterable[bytes]) -> bool:
    """Whether ``Transfer-Encoding`` field values name exactly one coding, ``chunked``: the
    only coding the gateway handles, on a request (a str from aiohttp) or an answer (bytes
    from httptools).

    Empty list elements are ignored (RFC 9110 §5.6.1.2) before ``chunked`` but not after it:
    both parsers (llhttp) frame a body by chunks only when the field ends with ``chunked``,
    and ``chunked,`` would be framed by the connection's end, the chunks passed on as the
    body. What the parser does not frame by chunks is not called chunked here either."""
    codings = []
    last = ""
    for value in values:
        text = value.decode("latin-1") if isinstance(value, bytes) else value
        elements = text.split(",")
        last = elements[-1].lstrip(_OWS).lower()  # (llhttp: nothing may follow "chunked")
        codings += [coding.strip(_OWS).lower() for coding in elements if coding.strip(_OWS)]
    return codings == ["chunked"] and last == "chunked"


def request_id(headers: Any) -> str:
    """The client's X-Request-ID when it is one sane token of ≤128 characters and not named
    in the client's ``Connection`` header (a hop-by-hop field, RFC 9110 §7.6.1), else a new one."""
    values = headers.getall(REQUEST_ID, ())
    if (
        len(values) == 1
        and _SANE_REQUEST_ID.fullmatch(values[0])
        and not _connection_names(headers, "x-request-id")
    ):
        return str(values[0])
    return hex_id()


def _connection_names(headers: Any, lowered: str) -> bool:
    return any(
        token.strip().lower() == lowered
        for value in headers.getall("Connection", ())
        for token in value.split(",")
    )


def upstream_request_head(
    raw_headers: Sequence[tuple[bytes, bytes]],
    *,
    bridge_token: str,
    request_id: str,
    peer: str | None,
    scheme: str,
) -> bytes:
    """The exact header lines sent to the SME gateway (the client adds Host and the framing).

    One pass over the client's raw headers: values cross as the bytes the client sent
    (the server's parser has refused any CR, LF or NUL in them already). A field the
    client's ``Connection`` header names is hop-by-hop (RFC 9110 §7.6.1): never sent, and
    never the source of an ``X-Forwarded-*`` value.
    """
    lines = [
        b"Authorization: Bearer %s\r\nAccept: application/json\r\nX-Request-ID: %s\r\n"
        % (bridge_token.encode(), request_id.encode())
    ]
    seen: set[bytes] = set()
    tracestate: list[bytes] = []
    forwarded_for: list[bytes] = []
    forwarded_proto = forwarded_host = client_host = None
    connection: list[bytes] = []
    for name, value in raw_headers:
        lowered = name.lower()
        canonical = _FORWARD_UP.get(lowered)
        if canonical is not None:
            if lowered == _LIST_VALUED:
                if value.strip(b" \t"):  # an empty line adds no list member
                    tracestate.append(value)
            elif lowered not in seen:
                seen.add(lowered)
                lines.append(b"%s: %s\r\n" % (canonical, value))
        elif lowered == b"x-forwarded-for":  # its members, empty ones left out (RFC 9110 §5.6.1)
            forwarded_for += [m for member in value.split(b",") if (m := member.strip(b" \t"))]
        elif lowered == b"x-forwarded-proto":
            forwarded_proto = forwarded_proto or value
        elif lowered == b"x-forwarded-host":
            forwarded_host = forwarded_host or value
        elif lowered == b"host":
            client_host = client_host or value
        elif lowered == b"connection":
            connection.append(value)
    if connection:
        named = _CONNECTION_MAY_NAME.intersection(
            token.strip().lower() for value in connection for token in value.split(b",")
        )
        if named:  # rare: the client made end-to-end fields hop-by-hop; without them, again
            dropped = named | {b"connection"}
            kept = [(n, v) for n, v in raw_headers if n.lower() not in dropped]
            return upstream_request_head(
                kept, bridge_token=bridge_token, request_id=request_id, peer=peer, scheme=scheme
            )
    if tracestate:
        lines.append(b"tracestate: %s\r\n" % b",".join(tracestate))
    if peer:
        forwarded_for.append(peer.encode())
    if forwarded_for:
        lines.append(b"X-Forwarded-For: %s\r\n" % b", ".join(forwarded_for))
    lines.append(b"X-Forwarded-Proto: %s\r\n" % (forwarded_proto or scheme.encode()))
    # No Host at all (HTTP/1.0 allows that): no X-Forwarded-Host, rather than a guess.
    forwarded_host = forwarded_host or client_host
    if forwarded_host:
        lines.append(b"X-Forwarded-Host: %s\r\n" % forwarded_host)
    return b"".join(lines)


def replayable(upstream: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The answer's header fields a replay may send (the allow-list, less any field the
    answer's ``Connection`` header names), as received: what a shared store keeps of them
    (never a ``Set-Cookie`` or anything else off the list)."""
    upstream = list(upstream)
    hop = _hop_by_hop(value for name, value in upstream if name.lower() == b"connection")
    return [(name, value) for name, value in upstream
            if (lowered := name.lower()) in _FORWARD_DOWN and lowered not in hop]  # fmt: skip


# The Connection values nearly every answer has, naming no field: not looked into.
_PLAIN_CONNECTION = frozenset({b"keep-alive", b"close", b"Keep-Alive", b"Close"})


def _hop_by_hop(connection: Iterable[bytes]) -> frozenset[bytes]:
    """The allowed fields that ``Connection`` header values name: hop-by-hop, RFC 9110
    §7.6.1, so not passed on (for example ``Connection: keep-alive, ETag``)."""
    named = {token.strip().lower() for value in connection for token in value.split(b",")}
    return frozenset(named.intersection(_FORWARD_DOWN))


def answer_fields(
    upstream: Iterable[tuple[bytes, bytes]], request_id: str, status: int
) -> tuple[list[tuple[bytes, bytes]], int | None]:
    """The client's answer's header fields (the allow-list, a default Content-Type,
    X-Request-ID and the forwarding marker), and the upstream's Content-Length when it
    framed the body by length.

    The default Content-Type is for an answer that can carry a body and came without
    any: never on a 1xx, 204 or 304 (on a 304 a cache would take it for the stored
    answer's type), never in place of a type the upstream gave and that was dropped.

    Values cross as the bytes received. One that is not UTF-8 is dropped rather than
    altered (aiohttp's writer, which streamed answers go through, could only send it
    altered), and so is one holding CR, LF or NUL: the upstream's parser refuses those
    already, but a replayed record's fields come from a store, and must not be able to
    start a header line of their own.
    """
    fields: list[tuple[bytes, bytes]] = []
    length: int | None = None
    chunked = typed = False
    connection: list[bytes] = []
    for name, value in upstream:
        lowered = name.lower()
        canonical = _FORWARD_DOWN.get(lowered)
        if canonical is not None:
            typed = typed or lowered == b"content-type"
            if _passable(value):
                fields.append((canonical, value))
        elif lowered == b"content-length" and value.strip().isdigit():
            length = int(value)
        elif lowered == b"transfer-encoding":
            chunked = True
        elif lowered == b"connection" and value not in _PLAIN_CONNECTION:
            connection.append(value)
    if connection and (hop := _hop_by_hop(connection)):
        fields = [(name, value) for name, value in fields if name.lower() not in hop]
    if not typed and status >= 200 and status not in _NO_BODY:
        fields.append(_DEFAULT_TYPE)
    fields += ((_REQUEST_ID_NAME, request_id.encode()), _FORWARDED_YES)
    return fields, None if chunked else length


def _passable(value: bytes) -> bool:
    if b"\r" in value or b"\n" in value or b"\0" in value:
        return False
    try:
        value.decode()
    except UnicodeDecodeError:
        return False
    return True


def client_response_headers(
    upstream: Iterable[tuple[bytes, bytes]], request_id: str, status: int
) -> tuple[CIMultiDict[str], int | None]:
    """``answer_fields()`` as aiohttp's response headers (for an answer streamed back)."""
    fields, length = answer_fields(upstream, request_id, status)
    out: CIMultiDict[str] = CIMultiDict((name.decode(), value.decode()) for name, value in fields)
    out[SERVER] = SERVER_NAME
    return out, length
