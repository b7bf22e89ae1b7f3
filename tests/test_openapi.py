"""The OpenAPI 3.1 document (catalyst_proxy/openapi.py), held to the route table and the error tree.

Two environments, each with a routes file of three aliases: the defaults
(``CATALYST_IDEMPOTENCY=auto``, no global rate limit), and a strict one
(``CATALYST_IDEMPOTENCY=required``, ``CATALYST_RATE_LIMIT``). What each route's
operation must say is written out below as data (its methods, its idempotency
mode, whether it is rate-limited), and which error codes it may answer is
derived here from each error's ``step``, independently of openapi.py. Also the
small polish the document's headers promise: ``Server: catalyst-proxy`` with no
version banner on every answer, and no ``*_created`` series in ``/metrics``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from openapi_spec_validator import OpenAPIV31SpecValidator, validate

from catalyst_proxy.app import PARTS, create_app
from catalyst_proxy.config import Settings
from catalyst_proxy.errors import STEPS, IdempotencyKeyMissing, every_error
from catalyst_proxy.routes import DEFAULT_ROUTES

from .rawhttp import exchange, request_bytes
from .serve_proc import ServeProcess, run_cli

ALIASES = [
    {
        "methods": ["POST"],
        "path": "/api/v1/console/purchase",
        "upstream_method": "POST",
        "upstream_path": "/api/billing/purchase",
        "idempotency": "required",
        "rate_limit": "5/minute",
    },
    {
        "methods": ["GET"],
        "path": "/api/v1/console/vouchers",
        "upstream_method": "GET",
        "upstream_path": "/api/billing/vouchers/list",
        "idempotency": "off",
    },
    {
        "methods": ["post", "delete"],  # any case: the document says POST and DELETE
        "path": "/api/v1/console/vouchers/{code}",
        "upstream_method": "DELETE",
        "upstream_path": "/api/billing/vouchers/revoke/{code}",
        "idempotency": "optional",
        "rate_limit": "10/second",
    },
]
PURCHASE, SME_PURCHASE = "/api/v1/billing/purchase", "/api/v1/sme/billing/purchase"
LIST, ISSUE = "/api/v1/sme/billing/vouchers/list", "/api/v1/sme/billing/vouchers/issue"
REVOKE = "/api/v1/sme/billing/vouchers/revoke/{code}"
ALIAS_PURCHASE, ALIAS_LIST, ALIAS_REVOKE = (alias["path"] for alias in ALIASES)

# environment → path → (methods, idempotency mode, rate-limited)
EXPECTED: dict[str, dict[str, tuple[set[str], str, bool]]] = {
    "defaults": {
        PURCHASE: ({"post"}, "optional", False),  # auto: optional on the purchase upstream
        SME_PURCHASE: ({"post"}, "optional", False),
        LIST: ({"get"}, "off", False),
        ISSUE: ({"post"}, "optional", False),  # auto: and on voucher issue
        REVOKE: ({"post", "delete"}, "off", False),
        ALIAS_PURCHASE: ({"post"}, "required", True),
        ALIAS_LIST: ({"get"}, "off", False),
        ALIAS_REVOKE: ({"post", "delete"}, "optional", True),
    },
    "strict": {
        PURCHASE: ({"post"}, "required", True),
        SME_PURCHASE: ({"post"}, "required", True),
        LIST: ({"get"}, "required", True),
        ISSUE: ({"post"}, "required", True),
        REVOKE: ({"post", "delete"}, "required", True),
        ALIAS_PURCHASE: ({"post"}, "required", True),
        ALIAS_LIST: ({"get"}, "off", True),  # its own mode wins; the global limit applies
        ALIAS_REVOKE: ({"post", "delete"}, "optional", True),
    },
}
STRICT_ENV = {
    "CATALYST_IDEMPOTENCY": "required",
    "CATALYST_RATE_LIMIT": "100/minute",
    # A shared store (never reached here) that refuses when it cannot be reached: its
    # absence is an answer only then.
    "CATALYST_REDIS_URL": "redis://127.0.0.1:9/0",
    "CATALYST_RATE_LIMIT_ON_STORE_ERROR": "refuse",
}
STORE_ERRORS = {"idempotency-store-unavailable", "rate-limit-store-unavailable"}
OPS_PATHS = {"/healthz", "/readyz", "/metrics", "/openapi.json"}
EVERY_ROUTE_ANSWERS = {"protocol", "session", "bridge", "body", "exchange"}
TRACE_HEADERS = ("X-Request-ID", "X-Catalyst-Forwarded")


@pytest.fixture
def routes_file(tmp_path: Path) -> Path:
    path = tmp_path / "routes.json"
    path.write_text(json.dumps({"routes": ALIASES}))
    return path


@pytest.fixture
def environ(public_key_file: Path, routes_file: Path) -> dict[str, dict[str, str]]:
    """The two environments, by name, as `catalyst-proxy` reads them."""
    base = {
        "CATALYST_SESSION_PUBLIC_KEY_FILE": str(public_key_file),
        "CATALYST_ROUTES_FILE": str(routes_file),
    }
    return {"defaults": base, "strict": {**base, **STRICT_ENV}}


def build(env: dict[str, str]) -> dict[str, Any]:
    """The document the app builds at start-up for ``env``."""
    app = create_app(Settings.from_env(env))
    document: dict[str, Any] = json.loads(app[PARTS].ops.openapi)
    return document


def operations(document: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """(path, method, operation) for every operation of the document."""
    return [
        (path, method, operation)
        for path, item in document["paths"].items()
        for method, operation in item.items()
        if method != "parameters"
    ]


def expected_codes(path: str, mode: str, limited: bool, shared: bool) -> dict[str, set[str]]:
    """Status → the error codes a route can answer itself, from each error's ``step`` (a store's
    absence only with a shared store: ``shared``)."""
    steps = set(EVERY_ROUTE_ANSWERS)
    if "{code}" in path:
        steps.add("code")
    if limited:
        steps.add("rate-limit")
    if mode != "off":
        steps.add("idempotency")
    codes: dict[str, set[str]] = {}
    for cls in every_error():
        if cls.code in STORE_ERRORS and not shared:
            continue
        if cls.step in steps and (cls is not IdempotencyKeyMissing or mode == "required"):
            codes.setdefault(str(cls.status), set()).add(cls.code)
    return codes


def every_code_of(documented: dict[str, set[str]]) -> set[str]:
    return set().union(*documented.values())


def documented_codes(operation: dict[str, Any]) -> dict[str, set[str]]:
    """Status → the error codes the operation documents as ours."""
    codes = {}
    for status, response in operation["responses"].items():
        if status == "default":  # the SME gateway's own answer, any status
            continue
        ours = response["content"]["application/json"]["schema"]["anyOf"][0]
        codes[status] = set(ours["properties"]["error"]["enum"])
    return codes


def resolve(document: dict[str, Any], item: dict[str, Any]) -> dict[str, Any]:
    ref = item.get("$ref")
    if ref is None:
        return item
    found: Any = document
    for part in ref.removeprefix("#/").split("/"):
        found = found[part]
    return dict(found)


@pytest.mark.parametrize("name", ["defaults", "strict"])
def test_the_document_is_valid_openapi_3_1(environ, name):
    """The document validates as OpenAPI 3.1 (openapi-spec-validator) in either environment."""
    document = build(environ[name])
    assert document["openapi"] == "3.1.0"
    validate(document, cls=OpenAPIV31SpecValidator)  # raises on the first problem


async def test_served_document_equals_the_cli_output(environ):
    """GET /openapi.json of `catalyst-proxy serve` is byte for byte `catalyst-proxy openapi` for
    the same environment, which needs no operator keys to print it."""
    env = environ["strict"]
    proc = await ServeProcess(["serve", "--host", "127.0.0.1", "--port", "0"], env).start()
    try:
        url = await proc.wait_listening()
        async with aiohttp.ClientSession() as http, http.get(url + "/openapi.json") as resp:
            assert resp.status == 200
            assert resp.content_type == "application/json"
            served = await resp.read()
    finally:
        await proc.stop()
    status, printed, stderr = await run_cli("openapi", env=env)
    assert (status, stderr) == (0, "")
    assert printed.encode() == served + b"\n"
    keyless = {k: v for k, v in env.items() if k != "CATALYST_SESSION_PUBLIC_KEY_FILE"}
    assert await run_cli("openapi", env=keyless) == (0, printed, "")
    assert json.loads(served) == build(env)


async def test_the_printed_document_is_all_of_stdout_whatever_is_logged(environ, tmp_path):
    """`catalyst-proxy openapi` prints the document alone on stdout: a warning made while the
    app is built (here a bridge secret file that is too short) goes to stderr."""
    secret = tmp_path / "JWT_SECRET"
    secret.write_bytes(b"short")
    env = {**environ["defaults"], "CATALYST_SME_JWT_SECRET_FILE": str(secret)}
    status, printed, stderr = await run_cli("openapi", env=env)
    assert status == 0
    assert json.loads(printed) == build(environ["defaults"])
    assert "bridge_secret.short" in stderr


@pytest.mark.parametrize("name", ["defaults", "strict"])
def test_every_route_appears_with_exactly_its_methods(environ, name):
    """Every route of the table and every alias of the routes file is a path with exactly its
    methods (lower-case `post` in the file is `post` here), and nothing else is."""
    document = build(environ[name])
    table = {route.path for route in DEFAULT_ROUTES} | {alias["path"] for alias in ALIASES}
    assert set(EXPECTED[name]) == table
    assert set(document["paths"]) == table | OPS_PATHS
    for path, (methods, _, _) in EXPECTED[name].items():
        assert set(document["paths"][path]) - {"parameters"} == methods, path
        code_parameter = [p["name"] for p in document["paths"][path].get("parameters", [])]
        assert code_parameter == (["code"] if "{code}" in path else []), path
    for path in OPS_PATHS:
        assert set(document["paths"][path]) == {"get"}, path


@pytest.mark.parametrize("name", ["defaults", "strict"])
def test_idempotency_key_parameter_follows_the_route_mode(environ, name):
    """Idempotency-Key is a required header on `required` routes, optional on `optional` ones,
    and absent where idempotency is off."""
    document = build(environ[name])
    for path, method, operation in operations(document):
        if path in OPS_PATHS:
            continue
        mode = EXPECTED[name][path][1]
        keys = [p for p in operation["parameters"] if p["name"] == "Idempotency-Key"]
        if mode == "off":
            assert keys == [], (path, method)
        else:
            assert len(keys) == 1, (path, method)
            assert keys[0]["in"] == "header"
            assert keys[0]["required"] is (mode == "required"), (path, method, mode)


@pytest.mark.parametrize("name", ["defaults", "strict"])
def test_each_operation_documents_exactly_the_error_codes_its_route_can_answer(environ, name):
    """Every error whose step applies to a route is documented under each of its operations at
    its status with its exact code; an error whose step does not apply is absent."""
    document = build(environ[name])
    for path, method, operation in operations(document):
        if path in OPS_PATHS:
            continue
        _, mode, limited = EXPECTED[name][path]
        documented = documented_codes(operation)
        shared = name == "strict"
        assert documented == expected_codes(path, mode, limited, shared), (path, method)
        codes = every_code_of(documented)
        assert ("idempotency-store-unavailable" in codes) is (shared and mode != "off")
        assert ("rate-limit-store-unavailable" in codes) is (shared and limited)
        every_code = set().union(*documented.values())
        assert ("429" in documented) is limited, (path, method)
        assert ("rate-limited" in every_code) is limited, (path, method)
        assert ("missing-code" in every_code) is ("{code}" in path), (path, method)
        assert ("idempotency-key-missing" in every_code) is (mode == "required"), (path, method)
        assert ("idempotency-key-reused" in every_code) is (mode != "off"), (path, method)
        assert not every_code & {"not-found", "method-not-allowed"}  # not an operation's


def test_every_error_has_a_known_step_and_is_documented_somewhere(environ):
    """Each error class names a step of the order of checks, and each one but routing's (a path
    or method not in the document) is documented on some operation of the strict environment."""
    assert {cls.step for cls in every_error()} <= set(STEPS)
    document = build(environ["strict"])
    documented = {
        (int(status), code)
        for path, _, operation in operations(document)
        if path not in OPS_PATHS
        for status, codes in documented_codes(operation).items()
        for code in codes
    }
    routing = {cls for cls in every_error() if cls.step == "routing"}
    assert {(cls.status, cls.code) for cls in every_error() if cls not in routing} == documented


@pytest.mark.parametrize("name", ["defaults", "strict"])
def test_every_response_documents_the_trace_headers(environ, name):
    """Every response of every operation (ours, the SME gateway's default, the ops endpoints')
    documents X-Request-ID and X-Catalyst-Forwarded as required headers."""
    document = build(environ[name])
    seen = 0
    for path, method, operation in operations(document):
        for status, response in operation["responses"].items():
            for header in TRACE_HEADERS:
                assert header in response["headers"], (path, method, status, header)
                definition = resolve(document, response["headers"][header])
                assert definition["required"] is True, (path, method, status, header)
            seen += 1
    assert seen > len(operations(document))  # the proxied operations have several each
    forwarded = document["components"]["headers"]["X-Catalyst-Forwarded"]["schema"]
    assert forwarded["enum"] == ["yes", "no", "unknown"]


def test_refusals_document_the_headers_they_carry(environ):
    """429 documents Retry-After, RateLimit-Policy and RateLimit; 401 documents WWW-Authenticate."""
    document = build(environ["strict"])
    for path, method, operation in operations(document):
        if path in OPS_PATHS:
            continue
        responses = operation["responses"]
        assert {"Retry-After", "RateLimit-Policy", "RateLimit"} <= set(responses["429"]["headers"])
        assert "WWW-Authenticate" in responses["401"]["headers"], (path, method)


# --- the polish the headers promise ------------------------------------------------


async def test_every_answer_says_server_catalyst_proxy_without_a_version(gateway, bearer):
    """Our own answers (ops, 401, 404, 405, unparsable requests, header too large) and the SME
    gateway's passed-through ones carry exactly `Server: catalyst-proxy` and no aiohttp banner."""
    gw = await gateway()
    answers = []
    for method, path, kwargs in [
        ("GET", "/healthz", {}),
        ("GET", "/readyz", {}),
        ("GET", "/metrics", {}),
        ("GET", "/openapi.json", {}),
        ("POST", PURCHASE, {"data": b"{}"}),  # 401: no session
        ("GET", "/nowhere", {}),  # 404
        ("GET", PURCHASE, {"headers": bearer()}),  # 405
        ("POST", PURCHASE, {"headers": bearer(), "data": b'{"sku": "starter"}'}),  # the SME's
    ]:
        status, headers, _ = await gw.request(method, path, **kwargs)
        answers.append((status, headers))
    too_long = [("X-Filler", "a" * 20_000)]
    for raw in (b"NOT HTTP AT ALL\r\n\r\n", request_bytes("GET", "/healthz", too_long)):
        (response,) = await exchange(gw.url, raw)
        answers.append((response.status, response.headers))
    assert [status for status, _ in answers] == [200, 200, 200, 200, 401, 404, 405, 200, 400, 431]
    assert gw.sme.received  # the last proxied one was answered by the stand-in (aiohttp)
    for status, headers in answers:
        assert headers.getall("Server") == ["catalyst-proxy"], status
        banners = [v for v in headers.values() if "aiohttp" in v.lower() or "python/" in v.lower()]
        assert banners == [], status


async def test_metrics_have_no_created_series(gateway, bearer):
    """/metrics exports counters and histograms with their children but no `*_created` series."""
    gw = await gateway()
    await gw.request("POST", PURCHASE, headers=bearer(), data=b"{}")  # upstream, histograms
    await gw.request("POST", PURCHASE, data=b"{}")  # an auth failure
    text = await gw.metrics_text()
    assert "catalyst_proxy_requests_total{" in text  # counters with children are there
    assert "_bucket{" in text  # and histograms
    assert [line for line in text.splitlines() if "_created" in line] == []


def test_operation_ids_are_unique_when_two_paths_spell_the_same_name(public_key_file, tmp_path):
    """`/api/v1/a-b` and `/api/v1/a/b` both read as postApiV1AB: OpenAPI requires unique
    operationIds (code generators break on a clash), so the later route gets a number."""
    entry = {"methods": ["POST"], "upstream_method": "POST",
             "upstream_path": "/api/billing/purchase"}  # fmt: skip
    routes = tmp_path / "routes.json"
    routes.write_text(json.dumps({"routes": [{**entry, "path": "/api/v1/a-b"},
                                             {**entry, "path": "/api/v1/a/b"}]}))  # fmt: skip
    document = build({"CATALYST_SESSION_PUBLIC_KEY_FILE": str(public_key_file),
                      "CATALYST_ROUTES_FILE": str(routes)})  # fmt: skip
    ids = [operation["operationId"] for _, _, operation in operations(document)]
    assert len(ids) == len(set(ids)), ids
    assert document["paths"]["/api/v1/a-b"]["post"]["operationId"] == "postApiV1AB"
    assert document["paths"]["/api/v1/a/b"]["post"]["operationId"] == "postApiV1AB2"


def test_the_code_parameter_refuses_what_the_gateway_answers_missing_code(environ):
    """The {code} parameter's schema has the gateway's own rule: a code that is blank once
    trimmed of ASCII white space (``400 missing-code``) does not match it; any other does."""
    document = build(environ["defaults"])
    [parameter] = document["paths"]["/api/v1/sme/billing/vouchers/revoke/{code}"]["parameters"]
    pattern = re.compile(parameter["schema"]["pattern"])
    for blank in (" ", "\t", "\n", "\x0b\x0c", " \r\n "):
        assert not pattern.search(blank), repr(blank)
    for code in ("V1", " V1 ", "ünïcode", "a/b", "%2F"):
        assert pattern.search(code), code


def test_the_routing_answers_are_documented_with_allow(environ):
    """405 (with Allow) and 404, which any path or method can get, are documented once, as
    components.responses, with the error code each carries; the document says so."""
    document = build(environ["defaults"])
    responses = document["components"]["responses"]
    allowed = responses["MethodNotAllowed"]
    assert set(allowed["headers"]) == {"X-Request-ID", "X-Catalyst-Forwarded", "Allow"}
    schema = allowed["content"]["application/json"]["schema"]
    assert schema["properties"]["error"]["enum"] == ["method-not-allowed"]
    assert "Allow" in document["components"]["headers"]
    not_found = responses["NotFound"]["content"]["application/json"]["schema"]
    assert not_found["properties"]["error"]["enum"] == ["not-found"]
    assert "405 method-not-allowed" in document["info"]["description"]
    validate(document, cls=OpenAPIV31SpecValidator)


async def test_openapi_for_several_workers_without_redis_has_no_idempotency(environ):
    """`catalyst-proxy openapi --workers 2` prints what `serve --workers 2` serves: without a
    shared store idempotency is off, so no route documents an Idempotency-Key; an explicit
    mode that several workers cannot honour is the usage error serve gives (exit 2)."""
    # The built-in routes only: the routes file's explicit modes would refuse two workers.
    env = {k: v for k, v in environ["defaults"].items() if k != "CATALYST_ROUTES_FILE"}
    status, printed, stderr = await run_cli("openapi", "--workers", "2", env=env)
    assert (status, stderr) == (0, "")
    document = json.loads(printed)
    keyed = [
        (path, method)
        for path, method, operation in operations(document)
        if any(p["name"] == "Idempotency-Key" for p in operation.get("parameters", []))
    ]
    assert keyed == []
    assert any(
        p["name"] == "Idempotency-Key"
        for _, _, operation in operations(build(env))
        for p in operation.get("parameters", [])
    )  # one worker: there is a key to document
    status, printed, stderr = await run_cli(
        "openapi", "--workers", "2", env={**env, "CATALYST_IDEMPOTENCY": "required"}
    )
    assert (status, printed) == (2, "")
    assert "CATALYST_IDEMPOTENCY" in stderr
