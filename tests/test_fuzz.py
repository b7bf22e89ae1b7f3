"""Inputs fuzzed against the document: schemathesis on a live gateway in front of the SME stand-in.

The gateway and the stand-in run on the test's event loop, on real sockets;
the document is the one the gateway serves at ``/openapi.json``. Schemathesis
generates cases from it (valid and invalid inputs, a bounded number per
operation, from a fixed seed, so CI sends the same cases every run) and sends
them with ``requests`` from a worker thread while the loop keeps serving.
Every answer goes through schemathesis' conformance checks (no 5xx; status,
headers, content type and body as documented) and ours below. Failures are
collected rather than raised inside Hypothesis, so the figures count every
case and the assertion lists the failing ones with a curl line each.

Twice: with an operator token, and without one (schemathesis then fills the
bearer scheme with random tokens in some cases, which must not get through
either): nothing may reach the stand-in. The gateway also routes two aliases
from a routes file, one requiring an ``Idempotency-Key``, one rate-limited, so
those answers are fuzzed too.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hypothesis
import jsonschema
import pytest
import requests
import schemathesis
from schemathesis import GenerationMode
from schemathesis.checks import CheckContext, not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from .conftest import Assurance

SEED = 20261202
EXAMPLES = 30  # per operation and generation mode: under 500 requests a run
MODES = (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
UPSTREAM_BUDGET = 2.0  # the fuzzed gateway's CATALYST_UPSTREAM_TIMEOUT_SECONDS
MARGIN = 0.5  # what a busy shared machine may add to it
RUNS = {"operator": "operator token", "anonymous": "no token"}
ALIASES = [
    {
        "methods": ["POST"],
        "path": "/api/v1/console/purchase",
        "upstream_method": "POST",
        "upstream_path": "/api/billing/purchase",
        "idempotency": "required",
    },
    {
        "methods": ["GET"],
        "path": "/api/v1/console/vouchers",
        "upstream_method": "GET",
        "upstream_path": "/api/billing/vouchers/list",
        "rate_limit": "20/hour",  # an hour: the same 429s however long the run takes
    },
]


def within_budget(
    ctx: CheckContext, response: schemathesis.Response, case: schemathesis.Case
) -> None:
    """No answer takes longer than the upstream budget plus a small margin."""
    limit = UPSTREAM_BUDGET + MARGIN
    assert response.elapsed <= limit, f"answered in {response.elapsed:.3f} s (limit {limit} s)"


def traced(ctx: CheckContext, response: schemathesis.Response, case: schemathesis.Case) -> None:
    """Every answer carries X-Request-ID and X-Catalyst-Forwarded, and our own Server."""
    for name in ("x-request-id", "x-catalyst-forwarded"):
        assert response.headers.get(name), f"no {name} header"
    assert response.headers.get("server") == ["catalyst-proxy"], response.headers.get("server")


def own_answers_as_documented(
    ctx: CheckContext, response: schemathesis.Response, case: schemathesis.Case
) -> None:
    """An answer of ours (X-Catalyst-Forwarded not ``yes``) has a status documented for the
    operation, our media type there, and a body of exactly the shape documented for it."""
    forwarded = response.headers.get("x-catalyst-forwarded", ["(none)"])[0]
    if forwarded == "yes":
        return
    documented = case.operation.definition.raw["responses"].get(str(response.status_code))
    assert documented is not None, (
        f"our answer (forwarded: {forwarded}) has status {response.status_code}, "
        f"undocumented for {case.operation.label}: {response.content[:200]!r}"
    )
    ours = [media for media in documented["content"] if media != "*/*"]  # */*: the SME's
    media = response.headers.get("content-type", [""])[0].split(";")[0].strip()
    assert [media] == ours, f"our answer is {media!r}, documented {ours}"
    if media == "application/json":
        schema = documented["content"][media]["schema"]
        schema = schema["anyOf"][0] if "anyOf" in schema else schema  # anyOf: [ours, the SME's]
        body = json.loads(response.content)
        problems = [
            error.message for error in jsonschema.Draft202012Validator(schema).iter_errors(body)
        ]
        assert not problems, (
            f"our {response.status_code} body {body} is not as documented: {problems}"
        )


CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    within_budget,
    traced,
    own_answers_as_documented,
]


@dataclass
class Tally:
    """What one run sent and got back."""

    cases: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    per_operation: Counter[tuple[str, GenerationMode]] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    slowest: float = 0.0  # seconds

    def summary(self) -> str:
        outcomes = ", ".join(f"{status} ×{n}" for status, n in sorted(self.statuses.items()))
        return (
            f"{self.cases} cases ({outcomes}), {len(self.failures)} failing, "
            f"slowest answer {self.slowest * 1000:.0f} ms"
        )


def fuzz(document: dict[str, Any], base_url: str, headers: dict[str, str]) -> Tally:
    """Send EXAMPLES generated cases per operation and mode, checking each answer (blocking)."""
    schema = schemathesis.openapi.from_dict(document, config=schemathesis.Config())
    tally = Tally()
    with requests.Session() as session:
        for mode in MODES:
            for result in schema.get_all_operations():
                operation = result.ok()
                if mode is GenerationMode.NEGATIVE and not list(operation.iter_parameters()):
                    continue  # nothing to make invalid (GET /healthz and the like)
                _run(operation.as_strategy(generation_mode=mode), mode, tally, session, base_url,
                     headers)  # fmt: skip
    return tally


def _run(
    cases: Any,
    mode: GenerationMode,
    tally: Tally,
    session: requests.Session,
    base_url: str,
    headers: dict[str, str],
) -> None:
    @hypothesis.seed(SEED)
    @hypothesis.settings(
        max_examples=EXAMPLES,
        database=None,
        deadline=None,
        phases=[hypothesis.Phase.generate],  # no shrinking: every failure is kept as sent
        suppress_health_check=list(hypothesis.HealthCheck),
    )
    @hypothesis.given(case=cases)
    def send(case: schemathesis.Case) -> None:
        response = case.call(base_url=base_url, session=session, headers=headers, timeout=10)
        tally.cases += 1
        tally.statuses[response.status_code] += 1
        tally.per_operation[case.operation.label, mode] += 1
        tally.slowest = max(tally.slowest, response.elapsed)
        try:
            case.validate_response(response, checks=CHECKS, headers=headers)
        except FailureGroup as failures:
            tally.failures.append(str(failures))

    send()


@pytest.fixture
def routes_file(tmp_path: Path) -> Path:
    path = tmp_path / "routes.json"
    path.write_text(json.dumps({"routes": ALIASES}))
    return path


@pytest.mark.parametrize("who", ["operator", "anonymous"])
async def test_fuzzed_requests_get_documented_answers(
    gateway, bearer, routes_file, assurance: Assurance, capsys, who
):
    """Every generated request gets a documented answer within the budget, never a 5xx, our own
    in the documented error shape; without an operator token none reaches the SME gateway."""
    gw = await gateway(routes_file=str(routes_file), upstream_timeout_seconds=UPSTREAM_BUDGET)
    status, _, body = await gw.request("GET", "/openapi.json")
    assert status == 200
    document = json.loads(body)
    headers = bearer() if who == "operator" else {}
    reached_before = len(gw.sme.received)

    tally = await asyncio.to_thread(fuzz, document, gw.url, headers)

    reached = len(gw.sme.received) - reached_before
    record(assurance, who, tally, reached)
    with capsys.disabled():
        print(f"\nfuzz, {RUNS[who]}: {tally.summary()}; {reached} reached the SME stand-in")
    assert not tally.failures, f"{len(tally.failures)} failing:\n\n" + "\n\n".join(
        tally.failures[:5]
    )
    proxied = [
        f"{method.upper()} {path}"
        for path, item in document["paths"].items()
        if path.startswith("/api/")
        for method in item
        if method != "parameters"
    ]
    assert len(proxied) == 8  # the table's six operations and the two aliases
    for label in proxied:  # each got its cases, valid and invalid
        assert tally.per_operation[label, GenerationMode.POSITIVE] == EXAMPLES, label
        assert tally.per_operation[label, GenerationMode.NEGATIVE] > 0, label
    if who == "operator":
        assert reached > 0
        assert {200, 201, 400, 422, 429} <= set(tally.statuses)  # ours and the stand-in's
    else:
        assert reached == 0
        assert set(tally.statuses) == {200, 401}  # the ops endpoints, and 401 for the rest


def record(assurance: Assurance, who: str, tally: Tally, reached: int) -> None:
    """The run's figures for ``make assurance``."""
    assurance.add(f"fuzz (schemathesis) cases, {RUNS[who]}", tally.cases)
    for status, count in tally.statuses.items():
        assurance.add(f"fuzz (schemathesis) answers, {RUNS[who]}: {status}", count)
    assurance.peak("fuzz (schemathesis) slowest answer, ms", round(tally.slowest * 1000))
    server_errors = sum(count for status, count in tally.statuses.items() if status >= 500)
    assurance.add("fuzz (schemathesis) 5xx answers (must be 0)", server_errors)
    assurance.add("fuzz (schemathesis) cases failing a check (must be 0)", len(tally.failures))
    if who == "anonymous":
        assurance.add(
            "fuzz (schemathesis) no-token cases that reached the SME (must be 0)", reached
        )
