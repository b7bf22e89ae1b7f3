"""The route table (reference.md: Routes): what each client path becomes upstream."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from yarl import URL

from catalyst_proxy.app import PARTS, create_app
from catalyst_proxy.config import ConfigError, Settings
from catalyst_proxy.devtools.sme import Voucher
from catalyst_proxy.routes import DEFAULT_ROUTES, OPERATIONS_PATHS, RouteTable, load_routes

from .serve_proc import run_cli

REVOKE = "/api/v1/sme/billing/vouchers/revoke/"
UPSTREAM_REVOKE = "/api/billing/vouchers/revoke/"


async def raw(gw: Any, method: str, target: str, **kwargs: Any) -> tuple[int, Any, bytes]:
    """One request whose target is sent exactly as written (no client-side normalising)."""
    async with gw.http.request(method, URL(gw.url + target, encoded=True), **kwargs) as resp:
        return resp.status, resp.headers, await resp.read()


@pytest.mark.parametrize(
    ("method", "path", "upstream_method", "upstream_path", "body", "status"),
    [
        ("POST", "/api/v1/billing/purchase", "POST", "/api/billing/purchase", b"{}", 200),
        ("POST", "/api/v1/sme/billing/purchase", "POST", "/api/billing/purchase", b"{}", 200),
        ("GET", "/api/v1/sme/billing/vouchers/list", "GET", "/api/billing/vouchers/list",
         None, 200),
        ("POST", "/api/v1/sme/billing/vouchers/issue", "POST", "/api/billing/vouchers/issue",
         b'{"code": "V2"}', 201),
        ("POST", REVOKE + "V1", "DELETE", UPSTREAM_REVOKE + "V1", None, 200),
        ("DELETE", REVOKE + "V1", "DELETE", UPSTREAM_REVOKE + "V1", None, 200),
    ],
)  # fmt: skip
async def test_route_table_row(
    gateway, bearer, method, path, upstream_method, upstream_path, body, status
):
    """Each row of the route table sends one request with the table's upstream method and path."""
    gw = await gateway()
    gw.sme.vouchers["V1"] = Voucher("V1", 100, "op-1")
    got, _, answer = await gw.request(method, path, headers=bearer(), data=body)
    assert got == status, answer
    assert [(r.method, r.target) for r in gw.sme.received] == [(upstream_method, upstream_path)]
    assert gw.sme.received[0].complete


@pytest.mark.parametrize(
    ("sent", "upstream", "code"),
    [
        ("a%2Fb", "a%2Fb", "a/b"),
        ("..", "%2E%2E", ".."),
        (".", "%2E", "."),
        ("%2e%2E", "%2E%2E", ".."),
        ("..%2F..%2Fadmin", "..%2F..%2Fadmin", "../../admin"),
        ("a%3Fb%3Dc", "a%3Fb%3Dc", "a?b=c"),
        ("a%23frag", "a%23frag", "a#frag"),
        ("a%252Fb", "a%252Fb", "a%2Fb"),
        ("two%20words", "two%20words", "two words"),
        ("%20%20padded%09", "padded", "padded"),
        ("%C3%A9t%C3%A9-%E2%82%AC", "%C3%A9t%C3%A9-%E2%82%AC", "été-€"),
        ("a;b=c", "a%3Bb%3Dc", "a;b=c"),
        ("line%0Abreak", "line%0Abreak", "line\nbreak"),
        ("nul%00byte", "nul%00byte", "nul\x00byte"),
    ],
)
async def test_code_is_one_percent_encoded_segment(gateway, bearer, sent, upstream, code):
    """No voucher code can change the upstream path: it stays one percent-encoded segment."""
    gw = await gateway()
    gw.sme.vouchers[code] = Voucher(code, 100, "op-1")
    status, _, body = await raw(gw, "DELETE", REVOKE + sent, headers=bearer())
    assert len(gw.sme.received) == 1
    assert gw.sme.received[0].target == UPSTREAM_REVOKE + upstream
    assert status == 200, body
    assert json.loads(body) == {"code": code, "revoked": True}


async def test_non_ascii_code_from_a_client_url(gateway, bearer):
    """A code typed as Unicode reaches the upstream UTF-8 percent-encoded, as one segment."""
    gw = await gateway()
    status, _, _ = await gw.request("DELETE", REVOKE + "Straße 1", headers=bearer())
    assert status == 404  # the SME stand-in has no such voucher: the request got there
    assert gw.sme.received[0].target == UPSTREAM_REVOKE + "Stra%C3%9Fe%201"


@pytest.mark.parametrize("target", [REVOKE, REVOKE + "%20", REVOKE + "%20%09", REVOKE.rstrip("/")])
@pytest.mark.parametrize("method", ["POST", "DELETE"])
async def test_blank_code_is_missing_code(gateway, bearer, target, method):
    """A blank voucher code answers 400 missing-code and sends nothing upstream."""
    gw = await gateway()
    status, _, body = await raw(gw, method, target, headers=bearer())
    assert (status, json.loads(body)) == (400, {"error": "missing-code"})
    assert gw.sme.received == []


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("GET", "/api/v1/billing/purchase", "POST"),
        ("DELETE", "/api/v1/sme/billing/purchase", "POST"),
        ("POST", "/api/v1/sme/billing/vouchers/list", "GET"),
        ("PUT", "/api/v1/sme/billing/vouchers/issue", "POST"),
        ("GET", REVOKE + "V1", "POST, DELETE"),
        ("PATCH", REVOKE + "V1", "POST, DELETE"),
    ],
)
async def test_other_method_on_known_path_is_405(gateway, bearer, method, path, allow):
    """Another method on a known path answers 405 with Allow, and nothing goes upstream."""
    gw = await gateway()
    status, headers, body = await gw.request(method, path, headers=bearer())
    assert status == 405
    assert headers["Allow"] == allow
    assert json.loads(body)["error"] == "method-not-allowed"
    assert gw.sme.received == []


@pytest.mark.parametrize(
    "path",
    [
        "/",
        "/api/v1/billing/purchases",
        "/api/v1/billing/purchase/",
        "/api/v1/billing/purchase/extra",
        "/API/v1/billing/purchase",
        "/api/billing/purchase",
        REVOKE + "a/b",
        "/api/v1/sme/billing/vouchers/revokeX",
    ],
)
async def test_unknown_path_is_404_json(gateway, bearer, path):
    """An unknown path answers 404 {"error":"not-found"} and nothing goes upstream."""
    gw = await gateway()
    status, headers, body = await raw(gw, "POST", path, headers=bearer())
    assert (status, json.loads(body)) == (404, {"error": "not-found"})
    assert headers["Content-Type"].startswith("application/json")
    assert gw.sme.received == []


@pytest.mark.parametrize(
    "query",
    ["a=1&b=2", "b=2&a=1&a=3", "x=%2F%3F%23&y=%zz&empty=&flag", "q=caf%C3%A9+au+lait", "a=1;b=2"],
)
async def test_query_string_forwarded_verbatim(gateway, bearer, query):
    """The client's query string reaches the upstream byte for byte."""
    gw = await gateway()
    status, _, body = await raw(
        gw, "GET", "/api/v1/sme/billing/vouchers/list?" + query, headers=bearer()
    )
    assert status == 200, body
    assert gw.sme.received[0].target == "/api/billing/vouchers/list?" + query


async def test_query_string_on_a_templated_route(gateway, bearer):
    """On the revoke route the query stays a query; it never becomes part of the code."""
    gw = await gateway()
    gw.sme.vouchers["V1"] = Voucher("V1", 100, "op-1")
    status, _, _ = await raw(gw, "POST", REVOKE + "V1?reason=dup", headers=bearer())
    assert status == 200
    assert gw.sme.received[0].target == UPSTREAM_REVOKE + "V1?reason=dup"


def test_default_table_is_the_contract_table():
    """The built-in table holds exactly the contract's five rows."""
    rows = {(r.methods, r.path, r.upstream_method, r.upstream_path) for r in DEFAULT_ROUTES}
    assert rows == {
        (("POST",), "/api/v1/billing/purchase", "POST", "/api/billing/purchase"),
        (("POST",), "/api/v1/sme/billing/purchase", "POST", "/api/billing/purchase"),
        (("GET",), "/api/v1/sme/billing/vouchers/list", "GET", "/api/billing/vouchers/list"),
        (("POST",), "/api/v1/sme/billing/vouchers/issue", "POST", "/api/billing/vouchers/issue"),
        (
            ("POST", "DELETE"),
            "/api/v1/sme/billing/vouchers/revoke/{code}",
            "DELETE",
            "/api/billing/vouchers/revoke/{code}",
        ),
    }


def test_match_takes_the_code_from_the_raw_path():
    """Matching decodes the one raw segment after the prefix; a raw '/' never matches."""
    table = RouteTable(DEFAULT_ROUTES)
    match = table.match(REVOKE + "a%2Fb")
    assert match is not None
    assert match.code == b"a/b"
    assert table.match(REVOKE + "a/b") is None
    assert table.match("/api/v1/billing/purchase?x=1") is None  # the caller strips the query


# --- CATALYST_ROUTES_FILE -------------------------------------------------------------------

ORG_PURCHASE = {
    "methods": ["POST"],
    "path": "/api/v1/org/billing/purchase",
    "upstream_method": "POST",
    "upstream_path": "/api/billing/purchase",
}
ORG_REVOKE = {
    "methods": ["DELETE", "POST"],
    "path": "/api/v1/org/vouchers/{code}/revoke",
    "upstream_method": "DELETE",
    "upstream_path": "/api/billing/vouchers/revoke/{code}",
}


def toml_routes(entries: list[dict[str, Any]]) -> str:
    out = []
    for entry in entries:
        out.append("[[routes]]")
        for key, value in entry.items():
            out.append(f"{key} = {json.dumps(value)}")
    return "\n".join(out) + "\n"


@pytest.fixture(params=["json", "toml"])
def routes_file(request, tmp_path: Path):
    """Factory: write entries as JSON or TOML (the fixture's parameter); return the path."""

    def write(entries: list[dict[str, Any]]) -> Path:
        path = tmp_path / f"routes.{request.param}"
        if request.param == "json":
            path.write_text(json.dumps({"routes": entries}))
        else:
            path.write_text(toml_routes(entries))
        return path

    return write


async def test_routes_file_alias_works_end_to_end(gateway, bearer, routes_file):
    """An alias from CATALYST_ROUTES_FILE (JSON or TOML) is routed like a built-in route."""
    path = routes_file([ORG_PURCHASE, ORG_REVOKE])
    gw = await gateway(routes_file=str(path))
    gw.sme.vouchers["x/y"] = Voucher("x/y", 100, "op-1")
    status, _, body = await raw(gw, "POST", "/api/v1/org/billing/purchase?src=org",
                                headers=bearer(), data=b"{}")  # fmt: skip
    assert status == 200
    assert b"order_id" in body
    status, _, body = await raw(gw, "POST", "/api/v1/org/vouchers/x%2Fy/revoke", headers=bearer())
    assert status == 200, body
    assert [(r.method, r.target) for r in gw.sme.received] == [
        ("POST", "/api/billing/purchase?src=org"),
        ("DELETE", UPSTREAM_REVOKE + "x%2Fy"),
    ]
    status, headers, _ = await raw(gw, "GET", "/api/v1/org/vouchers/x/revoke", headers=bearer())
    assert (status, headers["Allow"]) == (405, "DELETE, POST")
    status, _, body = await raw(gw, "POST", "/api/v1/org/vouchers/%20/revoke", headers=bearer())
    assert (status, json.loads(body)) == (400, {"error": "missing-code"})
    assert len(gw.sme.received) == 2


async def test_builtin_routes_still_work_with_a_routes_file(gateway, bearer, routes_file):
    """A routes file adds aliases; the contract's table stays in place."""
    gw = await gateway(routes_file=str(routes_file([ORG_PURCHASE])))
    status, _, _ = await gw.request(
        "POST", "/api/v1/billing/purchase", headers=bearer(), data=b"{}"
    )
    assert status == 200
    assert gw.sme.received[0].target == "/api/billing/purchase"


BAD_ENTRIES: list[tuple[str, dict[str, Any], str]] = [
    ("unknown key", {**ORG_PURCHASE, "rewrite": True}, "rewrite"),
    ("missing field", {k: v for k, v in ORG_PURCHASE.items() if k != "upstream_path"},
     "upstream_path"),
    ("non-standard method", {**ORG_PURCHASE, "methods": ["FETCH"]}, "methods"),
    ("non-standard upstream method", {**ORG_PURCHASE, "upstream_method": "PURGE"},
     "upstream_method"),
    ("unknown idempotency mode", {**ORG_PURCHASE, "idempotency": "auto"}, "idempotency"),
    ("idempotency not a string", {**ORG_PURCHASE, "idempotency": True}, "idempotency"),
    ("bad rate limit", {**ORG_PURCHASE, "rate_limit": "30/fortnight"}, "rate_limit"),
    ("zero rate limit", {**ORG_PURCHASE, "rate_limit": "0/minute"}, "rate_limit"),
    ("rate limit not a string", {**ORG_PURCHASE, "rate_limit": 30}, "rate_limit"),
    ("bad method", {**ORG_PURCHASE, "methods": ["GET POST"]}, "methods"),
    ("empty methods", {**ORG_PURCHASE, "methods": []}, "methods"),
    ("bad upstream method", {**ORG_PURCHASE, "upstream_method": "FETCH!"}, "upstream_method"),
    ("code only upstream", {**ORG_PURCHASE, "upstream_path": "/api/billing/vouchers/revoke/{code}"},
     "{code}"),
    ("duplicate of a built-in path", {**ORG_PURCHASE, "path": "/api/v1/billing/purchase"},
     "/api/v1/billing/purchase"),
    ("relative path", {**ORG_PURCHASE, "path": "api/v1/x"}, "path"),
    ("dot segment", {**ORG_PURCHASE, "upstream_path": "/api/../admin"}, "upstream_path"),
    ("code inside a segment", {**ORG_REVOKE, "path": "/api/v1/org/v-{code}"}, "{code}"),
    ("query in a path", {**ORG_PURCHASE, "upstream_path": "/api/billing/purchase?admin=1"},
     "upstream_path"),
    ("an endpoint of the gateway's own", {**ORG_PURCHASE, "path": "/metrics"}, "own endpoints"),
    ("another of them", {**ORG_PURCHASE, "path": "/openapi.json"}, "own endpoints"),
]  # fmt: skip


def test_methods_are_case_insensitive_and_the_route_options_are_kept(tmp_path):
    """Standard methods in any case are accepted as upper case, the idempotency mode in any
    case as lower case (choices are case-insensitive); idempotency and rate_limit are kept
    on the route."""
    path = tmp_path / "routes.json"
    entry = {**ORG_PURCHASE, "methods": ["post", "Put"], "upstream_method": "post",
             "idempotency": "Required", "rate_limit": "5/second; 100 per hour"}  # fmt: skip
    path.write_text(json.dumps({"routes": [entry]}))
    [route] = load_routes(str(path))
    assert route.methods == ("POST", "PUT")
    assert route.upstream_method == "POST"
    assert route.idempotency == "required"
    assert [str(rate) for rate in route.rate_limit or ()] == ["5/second", "100/hour"]


@pytest.mark.parametrize(("case", "entry", "named"), BAD_ENTRIES, ids=[c[0] for c in BAD_ENTRIES])
def test_bad_routes_entry_stops_create_app(routes_file, case, entry, named):
    """A bad routes entry raises ConfigError naming the variable, the file and the entry."""
    path = routes_file([ORG_REVOKE, entry])
    with pytest.raises(ConfigError) as caught:
        create_app(Settings(jwks_url="http://k/j", routes_file=str(path)))
    message = str(caught.value)
    assert caught.value.variable == "CATALYST_ROUTES_FILE"
    assert str(path) in message
    assert "routes[1]" in message
    assert named in message
    assert "\n" not in message


def test_the_reserved_paths_are_the_gateways_own_endpoints():
    """The paths a routes file may not use are exactly those the gateway answers itself."""
    ops = create_app(Settings(jwks_url="http://k/j"))[PARTS].ops
    assert set(ops.routes()) == OPERATIONS_PATHS


def test_duplicate_path_inside_the_file(routes_file):
    """Two entries with the same path: the second is named as the culprit."""
    path = routes_file([ORG_PURCHASE, ORG_REVOKE, ORG_PURCHASE])
    with pytest.raises(Exception, match=r"routes\[2\]: /api/v1/org/billing/purchase"):
        load_routes(str(path), existing=DEFAULT_ROUTES)


@pytest.mark.parametrize(
    ("name", "text", "named"),
    [
        ("routes.json", '{"routes": [', "not valid JSON"),
        ("routes.toml", "[[routes]\nmethods = [", "not valid TOML"),
        ("routes.yaml", "routes: []\n", ".json or .toml"),
        ("routes.json", '{"paths": []}', '"routes" list'),
        ("routes.json", '{"routes": ["/api/x"]}', "routes[0]"),
    ],
)
def test_bad_routes_file_stops_create_app(tmp_path, name, text, named):
    """An unparsable or misshapen routes file raises ConfigError naming the file."""
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        create_app(Settings(jwks_url="http://k/j", routes_file=str(path)))
    assert caught.value.variable == "CATALYST_ROUTES_FILE"
    assert str(path) in str(caught.value)
    assert named in str(caught.value)
    assert "\n" not in str(caught.value)


def test_missing_routes_file_stops_create_app(tmp_path):
    """A routes file that does not exist is a start-up error, not an empty table."""
    path = tmp_path / "absent.json"
    with pytest.raises(ConfigError, match=r"absent\.json"):
        create_app(Settings(jwks_url="http://k/j", routes_file=str(path)))


@pytest.mark.parametrize(
    ("name", "text", "named"),
    [
        ("routes.json", json.dumps({"routes": [{**ORG_PURCHASE, "via": 1}]}), "routes[0]"),
        ("routes.toml", toml_routes([ORG_PURCHASE, {**ORG_PURCHASE, "methods": ["get"]}]),
         "routes[1]"),
        ("routes.json", '{"routes": [', "not valid JSON"),
        ("routes.ini", "[routes]", ".json or .toml"),
    ],
)  # fmt: skip
async def test_bad_routes_file_stops_serve(tmp_path, public_key_file, name, text, named):
    """`catalyst-proxy serve` with a bad routes file exits 2 with one line naming file and entry."""
    path = tmp_path / name
    path.write_text(text)
    status, out, err = await run_cli(
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        env={
            "CATALYST_SESSION_PUBLIC_KEY_FILE": str(public_key_file),
            "CATALYST_ROUTES_FILE": str(path),
        },
    )
    assert status == 2
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert "CATALYST_ROUTES_FILE" in lines[0]
    assert str(path) in lines[0]
    assert named in lines[0]
